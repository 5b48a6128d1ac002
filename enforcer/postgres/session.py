"""The Postgres session state machine: fed client bytes and server bytes, returns actions. No I/O.

Actions are `(kind, payload)` tuples, executed in order by the asyncio shell (proxy.py):

    TO_SERVER  bytes                      write to the upstream
    TO_CLIENT  bytes                      write to the client
    EVENT      (event_type, fields)       record an event
    DECIDE     DecisionRequest            ask policy; then call `resume(verdicts)` and run its actions.
                                          Client input is held (not processed) until then. A session
                                          given `decide` asks it first and sends DECIDE only for what
                                          it could not answer at once (approvals).
    CONNECT_UPSTREAM  bytes               open the upstream (TLS per target), then send these startup bytes
    START_CLIENT_TLS  None                run the TLS handshake on the client leg, then `client_tls_established()`
    CANCEL     (pid, key)                 the client sent a CancelRequest carrying this (client-facing) key
    REGISTER_CANCEL_KEY (client_pid, client_key, server_pid, server_key)
    CLOSE      reason                     flush pending writes and close both legs

Events use the field names of records/schema.py EVENT_FIELDS (extra ones only as x_*).

Unchanged messages are forwarded as slices of the received bytes; consecutive forwarded
messages are coalesced into one write.

Denials: the denied statement never reaches the server. So that the *server's* transaction
state ends up exactly as if the statement had failed there (an explicit transaction becomes
aborted, an implicit one is rolled back, later statements of a pipeline are skipped), the
enforcer sends in its place a DO block that raises SQLSTATE 42501 with the denial message:
- simple Query: the whole Query message is replaced (none of its statements run — a
  multi-statement string is all-or-nothing under Warden, which is stricter than Postgres);
- extended protocol: the denied Parse (or Bind, see approvals) is replaced by Parse/Bind/Execute
  of the DO block on the unnamed statement and portal; their ParseComplete/BindComplete are
  swallowed, the client's following messages are discarded until Sync, and Sync is forwarded
  so the server answers ReadyForQuery with the true transaction status;
- FunctionCall (the fast-path interface, which calls a function by OID): denied, or of a
  function policy cannot name (fastpath.known_call), the DO block goes as a simple Query in its
  place, whose ErrorResponse and ReadyForQuery end the FunctionCall's cycle.

Approvals in the extended protocol: a Parse runs nothing, so a statement that needs approval
is parsed (its verdict says decision "approval") and each execution is held instead: the Bind,
with its parameters rendered (masked) for the approver, waits for DECIDE like a held Query, and
the client's later messages wait behind it. An approved Bind goes on; a denied one is refused
like a denied Parse. The executions of such a statement are never left to the C lane (its
statement never gets a record template), so none passes undecided.

Startup parameters outside STARTUP_SETTINGS (also inside `options`) are refused with FATAL
42501 before any upstream connection: they would take effect before the first decision.

Prepared statements are followed as the server will hold them: a Parse of a name the server
already holds counts only once confirmed (ParseComplete), Parses an ErrorResponse refuses or
skips are taken back, and SQL PREPARE / DEALLOCATE / DISCARD ALL change the names when sent
(taken back if they do not run), so an execution is never planned or recorded with a stale plan.
NotificationResponse payloads and channels go through the masker's text masking.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import struct
import time
from typing import Any, Callable, Optional

from ..masking.pgrow import MaskingRefused
from ..sqlclass import CLIENT_ONLY_ENCODINGS, mentions_execute
from . import fastpath
from . import native
from . import protocol as P
from .copyopts import copy_options

TO_SERVER = 1
TO_CLIENT = 2
EVENT = 3
DECIDE = 4
CONNECT_UPSTREAM = 5
START_CLIENT_TLS = 6
CANCEL = 7
REGISTER_CANCEL_KEY = 8
CLOSE = 9

# phases
STARTUP = "startup"
TLS_HANDSHAKE = "tls_handshake"
AUTH = "auth"
READY = "ready"
CLOSED = "closed"

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_STARTUP_PACKET = 10000          # same limit as the server's
_SERVER_MAX_MESSAGE_BYTES = (1 << 30) + 1024

_I32 = struct.Struct("!i")
_unpack_i32 = _I32.unpack_from
_pack_i32 = _I32.pack

# client message types allowed once authenticated (anything else is a protocol violation)
_CLIENT_FORWARD_TYPES = frozenset(b"HDCdcfF")
# server messages still delivered while a refused result's batch is withheld: ReadyForQuery ends
# the withholding; ParameterStatus, NotificationResponse and NoticeResponse are asynchronous
_PASS_WHILE_WITHHELD = frozenset(b"ZSAN")
_BIND_EXPECT = (50, False)    # BindComplete expected, not injected by us
_SYNC_EXPECT = (90, False)    # ReadyForQuery expected (Sync, Query, FunctionCall)
_DESCRIBE_REPLY = 84         # expectation marker for the RowDescription/NoData answering a Describe
# ParseComplete expectations: (49, False, name, seq) a Parse expected to succeed, (49, _CONFIRM,
# name, seq) one of a name the server already holds (committed only when confirmed), (49, True)
# our own injected Parse (its reply swallowed)
_CONFIRM = "confirm"
_NOT_EXECUTED = "not executed: an earlier statement in the same batch failed"


@dataclasses.dataclass
class DecisionRequest:
    sql: str
    protocol: str                 # simple | extended
    statement_name: Optional[str]
    # a text that may EXECUTE a prepared statement: the session's named statements (name -> text)
    # as the server holds them when the text is sent, which such an EXECUTE is decided as
    prepared: Optional[dict] = None
    # one execution (Bind) of a prepared statement that needs approval: its parameters as the
    # approver is shown them (masked, render_bind_params; None for a Query or Parse), a digest of the
    # values as sent (what approvals.grant_window matches: an approval of id=1 never covers id=2,
    # even when masking shows both alike) and the statement_index its pg.statement will have
    params: Optional[list] = None
    params_key: Optional[str] = None
    statement_index: Optional[int] = None


@dataclasses.dataclass
class Verdict:
    """The final decision for one statement (after approvals), as the session needs it."""
    allowed: bool
    text: str
    action: Optional[str] = None
    kind: Optional[str] = None
    tables: tuple = ()
    functions: tuple = ()
    # allow | deny | approval: only a Parse gets "approval" (allowed False): the statement is
    # parsed and each of its executions is decided, and held, with its parameters
    decision: str = "allow"
    policy_ids: tuple = ()
    reason: str = ""
    prepared: Optional[dict] = None   # an SQL EXECUTE decided as a prepared statement: {name, text}
    # the simple protocol's pg.statement fields for this decision, built on first use and shared
    # with every with_text copy (one list): a shape's texts differ only in text and index
    simple_record: list = dataclasses.field(default_factory=lambda: [None], compare=False, repr=False)

    def with_text(self, text: str) -> "Verdict":
        """The same verdict for another text of the statement's shape (dataclasses.replace
        costs several times more on the decision path)."""
        return Verdict(self.allowed, text, self.action, self.kind, self.tables, self.functions,
                       self.decision, self.policy_ids, self.reason, self.prepared, self.simple_record)


class _Statement:
    """A prepared statement as the client named it; `fields` is its RowDescription once a
    Describe 'S' was answered ([] for NoData), `described` once the client asked. `seq` numbers
    the Parse that made it (0: an SQL PREPARE); `effects` are what running it does to the
    prepared statements (namespace_effects: SQL PREPARE, DEALLOCATE, DISCARD ALL)."""
    __slots__ = ("text", "verdict", "fields", "described", "record", "seq", "effects", "param_types",
                 "decided_with")

    def __init__(self, text: str, verdict: Optional[Verdict], seq: int = 0, effects: tuple = (),
                 param_types: tuple = ()):
        self.text = text
        self.verdict = verdict
        self.fields: Optional[list] = None
        self.described = False
        # pg.statement fields shared by every execution (built once, without masking only):
        # a Bind then copies it and adds its parameters and index
        self.record: Optional[dict] = None
        self.seq = seq
        self.effects = effects
        # parameter type OIDs: the Parse's (0: the server infers), replaced by the server's own
        # ParameterDescription once a Describe 'S' of the statement is answered
        self.param_types = param_types
        # a text that may EXECUTE a prepared statement: the named statements (name -> text) it was
        # decided with; None for any other text
        self.decided_with: Optional[dict] = None


class _Portal:
    """A bound portal: its statement, the Bind's result-format codes, its own RowDescription when
    the client sent Describe 'P' (or we did), and the pg.statement index of its execution."""
    __slots__ = ("statement", "formats", "fields", "described", "index", "undo")

    def __init__(self, statement: Optional[_Statement], formats: list, index: int):
        self.statement = statement
        self.formats = formats
        self.fields: Optional[list] = None
        self.described = False
        self.index = index
        self.undo: Optional[list] = None      # how to take back its statement's effects if it does not run

    @property
    def text(self) -> Optional[str]:
        return self.statement.text if self.statement is not None else None

    def result_fields(self) -> Optional[list]:
        """Columns of the rows an Execute returns, with the Bind's formats applied (None: unknown)."""
        if self.fields is not None:
            return self.fields
        st = self.statement
        if st is None or st.fields is None:
            return None
        return [dataclasses.replace(f, format=fmt) for f, fmt in zip(st.fields, result_formats(self.formats,
                                                                                              len(st.fields)))]


def result_formats(codes: list, ncols: int) -> list:
    """Bind's result-format rule: no code = all text, one code = all columns, else one per column."""
    if not codes:
        return [0] * ncols
    if len(codes) == 1:
        return codes * ncols
    return list(codes[:ncols]) + [0] * (ncols - len(codes))


class _Result:
    """One expected statement result (an Execute, or one statement of a simple Query)."""
    __slots__ = ("text", "start_ns", "rows", "nbytes", "batch", "denied", "index", "portal", "refusal", "undo",
                 "call_plan")

    def __init__(self, text: Optional[str], start_ns: int, batch: int, denied: bool = False,
                 index: Optional[int] = None, portal: Optional[_Portal] = None):
        self.text = text
        self.start_ns = start_ns
        self.rows = 0
        self.nbytes = 0
        self.batch = batch
        self.denied = denied
        self.index = index
        self.portal = portal
        self.refusal: Optional[tuple[str, str]] = None     # (sqlstate, message) sent instead of rows
        self.undo: Optional[list] = None      # how to take back the statement's effects if it does not run
        self.call_plan = None                 # masking of a fast-path call's value (its RowPlan)


_BIG_MESSAGE = 256 * 1024


def _big_message_need(rest: bytes) -> int:
    """Total size of the incomplete message starting `rest` when much of it is still to come (else 0)."""
    if len(rest) < 5:
        return 0
    need = _unpack_i32(rest, 1)[0] + 1
    return need if need - len(rest) > _BIG_MESSAGE else 0


def _quote_literal(s: str) -> str:
    # E'' works whatever standard_conforming_strings says
    return "E'" + s.replace("\\", "\\\\").replace("'", "''") + "'"


# ---- SQL statements that change the prepared statements -------------------------------------------
# PREPARE, DEALLOCATE and DISCARD ALL share the protocol's statement namespace: the session tracks
# them so that an execution of a name is never planned for masking or recorded with what the
# name meant before (kinds as pglast names them; statements whose kind is unknown are looked at
# when they mention one of the words)
NAMESPACE_KINDS = frozenset({"PrepareStmt", "DeallocateStmt", "DiscardStmt"})
_NAMESPACE_WORDS = re.compile(r"prepare|deallocate|discard", re.IGNORECASE)
_FORGET_ALL = ("deallocate", None)


def namespace_effects(text: str, kind: Optional[str]) -> tuple:
    """What running `text` (a statement of pglast kind `kind`, or any SQL when the kind is not
    known) does to the session's prepared statements, in order: ("deallocate", name),
    ("deallocate", None) for DEALLOCATE ALL / DISCARD ALL, ("prepare", name, statement text)."""
    if kind is not None and kind not in NAMESPACE_KINDS:
        return ()
    if not _NAMESPACE_WORDS.search(text):
        return ()
    from pglast import parser as pg_parser
    try:
        tree = json.loads(pg_parser.parse_sql_json(text))
    except Exception:   # noqa: BLE001 - what pglast cannot read: forget every name (never a stale plan)
        return (_FORGET_ALL,)
    raw = text.encode("utf-8")
    effects = []
    for entry in tree.get("stmts", []):
        stmt_kind, node = next(iter(entry["stmt"].items()))
        if stmt_kind == "DeallocateStmt":
            name = node.get("name")
            effects.append(("deallocate", name) if name and not node.get("isall") else _FORGET_ALL)
        elif stmt_kind == "DiscardStmt":
            if node.get("target") == "DISCARD_ALL":
                effects.append(_FORGET_ALL)
        elif stmt_kind == "PrepareStmt":
            start = entry.get("stmt_location", 0)
            length = entry.get("stmt_len", 0)
            stmt_text = raw[start:start + length if length else len(raw)].decode("utf-8", "replace")
            effects.append(("prepare", node.get("name") or "", stmt_text.strip().rstrip(";").strip()))
    return tuple(effects)


def denial_message(identity: str, target: str, verdict: Verdict) -> str:
    policies = ", ".join(verdict.policy_ids) if verdict.policy_ids else "default deny"
    msg = (f'permission denied by Warden: identity "{identity}" may not perform '
           f'{verdict.action or "this statement"} on target "{target}" (policy: {policies})')
    if verdict.reason:
        msg += f": {verdict.reason}"
    return msg


def denial_do_block(message: str, hint: Optional[str] = None) -> str:
    """SQL that makes the server itself raise 42501 with `message` (aborting the transaction like any error)."""
    body = ("BEGIN RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = " + _quote_literal(message)
            + (", HINT = " + _quote_literal(hint) if hint else "") + "; END")
    tag = "$warden$"
    while tag in body:
        tag = "$warden" + os.urandom(4).hex() + "$"
    return f"DO {tag}{body}{tag}"


def _render(values: list, fmts: list, mask_text: Optional[Callable[[str], tuple]]) -> list:
    if mask_text is None and not fmts:
        # all text format, nothing to mask: the common case, one decode per value
        return [None if v is None else v.decode("utf-8", "replace") for v in values]
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if P.param_format(fmts, i) == 0:
            shown = v.decode("utf-8", "replace")
            if mask_text is not None:
                shown = mask_text(shown)[0]
        else:
            shown = "\\x" + v.hex()
            if mask_text is not None:
                try:
                    masked, count = mask_text(v.decode("utf-8"))
                except UnicodeDecodeError:
                    count = 0
                if count:
                    shown = masked
        out.append(shown)
    return out


def render_bind_params(values: list, fmts: list, types: tuple,
                       mask_text: Optional[Callable[[str], tuple]] = None) -> list:
    """A Bind's parameters as records and approvers show them: text format decoded; binary format
    as the text Postgres would print when the statement's type for it is known (declared in the
    Parse or described by the server) and simple to read (integers, bool, floats, uuid, dates,
    text, json), else as hex '\\x..'. Without a known type a binary value is all an auditor gets
    as hex: psycopg sends an int as binary int2, asyncpg every value in binary.

    With `mask_text` (the session's masker) every value shown as text is masked, and a binary
    value shown as hex that is UTF-8 text is recorded masked instead when it holds something to
    mask, so its hex cannot carry the raw value."""
    shown = _render(values, fmts, mask_text)
    if not fmts or not types:
        return shown            # all text format, or no type known: as _render shows them
    for i, v in enumerate(values):
        oid = types[i] if i < len(types) else 0
        if v is None or not oid or P.param_format(fmts, i) != 1:
            continue
        text = P.binary_value_text(oid, v)
        if text is not None:        # else not what the type says: the recorded hex
            shown[i] = mask_text(text)[0] if mask_text is not None else text
    return shown


def _params_key(values: list, fmts: list) -> str:
    """A digest of a Bind's parameter values and formats as sent: what a grant of an approval
    matches, without keeping the values themselves."""
    h = hashlib.sha256()
    for i, v in enumerate(values):
        if v is None:
            h.update(b"N;")
        else:
            h.update(b"%d:%d:" % (P.param_format(fmts, i), len(v)))
            h.update(v)
    return h.hexdigest()


def _copy_out_refusal(masking, overall: int, opts) -> Optional[MaskingRefused]:
    """Why the rows of a COPY TO STDOUT cannot be masked (None: they can, line by line)."""
    if overall == 1 or opts.format == "binary":
        # binary rows cannot be split into fields: the masker says so in its own words
        try:
            masking.mask_copy_line(b"", "binary")
        except MaskingRefused as e:
            return e
        return MaskingRefused("Warden refused COPY in binary format on a target with masking rules; "
                              "use FORMAT text or csv")
    if opts.columns is None and getattr(masking, "needs_column_names", False):
        # which field is which column is unknown: column rules could not apply, so the data would
        # leave unmasked. Refuse instead, and say how to make it maskable.
        return MaskingRefused("Warden refused COPY without a column list on a target with column masking "
                              "rules: name the columns, e.g. COPY customers (id, name, ssn) TO STDOUT, or "
                              "list them in the query instead of *")
    return None


def mask_applied_fields(stats: dict, index: Optional[int]) -> dict:
    """SessionMasker.take_stats() as a mask.applied event: counts per rule and column, never values."""
    fields = {"rules": stats.get("rules", {}), "columns": stats.get("columns", {}),
              "values_masked": stats.get("values_masked", 0),
              "rows": stats.get("rows", 0) + stats.get("copy_rows", 0)}
    for key in ("values_nulled", "copy_rows", "text_values_masked"):
        if stats.get(key):
            fields["x_" + key] = stats[key]
    if index is not None:
        fields["statement_index"] = index
    return fields


# ---- startup parameters ---------------------------------------------------------------------------
# Run-time settings a client may choose in its StartupMessage (or in its `options` parameter):
# those that change neither what policy decides nor what masking sees. Any other setting would
# take effect before the first statement and without a decision: search_path (which table an
# unqualified name is), role and session_authorization (who the session acts as),
# default_transaction_read_only, custom settings read by row-level security, ... Their SET
# statements go through policy like any other statement. Names as the server compares them.
STARTUP_SETTINGS = frozenset({
    "application_name", "client_encoding", "datestyle", "timezone", "intervalstyle", "extra_float_digits",
    "lc_messages", "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout",
    "idle_session_timeout", "transaction_timeout", "geqo", "jit",
})
# accepted only with this value: off would make the server read backslashes in string literals as
# escapes, which the classifier (standard_conforming_strings on) reads differently
_STARTUP_ON_ONLY = frozenset({"standard_conforming_strings"})
_BOOL_ON = frozenset({"on", "true", "yes", "1"})
_BOOL_OFF = frozenset({"off", "false", "no", "0"})
STARTUP_REFUSED = "42501"       # insufficient_privilege: a refusal by Warden, not a missing feature
_STARTUP_ALLOWED_TEXT = ("user, database, application_name, client_encoding, DateStyle, TimeZone, IntervalStyle, "
                         "extra_float_digits, lc_messages, statement_timeout, lock_timeout, "
                         "idle_in_transaction_session_timeout, idle_session_timeout, transaction_timeout, geqo, jit, "
                         "standard_conforming_strings=on, replication=false")


def _startup_setting_refusal(name: str, value: str, where: str) -> Optional[str]:
    """Why the run-time setting `name` (as the server compares names) may not be chosen at startup."""
    if name == "client_encoding" and re.sub(r"[^0-9a-z]", "", value.lower()) in CLIENT_ONLY_ENCODINGS:
        # in these encodings a character's second byte can be a backslash, which the server then
        # reads inside E'' strings otherwise than the classifier does
        return (f"the startup parameter client_encoding={value!r} ({where}) is not allowed: a client-only "
                f"multibyte encoding could hide statements from Warden's parser; use UTF8")
    if name in STARTUP_SETTINGS:
        return None
    if name in _STARTUP_ON_ONLY:
        if value.strip().lower() in _BOOL_ON:
            return None
        return (f"the startup parameter {name}={value!r} ({where}) is not allowed: only "
                f"{name}=on may be chosen at connection time; remove it (SET {name} after connecting is "
                f"decided by policy)")
    if name in ("role", "session_authorization"):
        return (f"the startup parameter {name} ({where}) is not allowed: the session acts as the role it "
                f"authenticated as; remove it and run SET ROLE after connecting, which policy decides "
                f"(pg:set_role)")
    return (f"the startup parameter {name} ({where}) is not allowed: it could change what policy decides or "
            f"what masking sees before the first statement; remove it from the connection settings "
            f"(options/PGOPTIONS, asyncpg server_settings, JDBC currentSchema/options, ...) and run "
            f"SET {name} ... after connecting, which policy decides")


def startup_refusal(params: dict) -> Optional[str]:
    """Why a StartupMessage's parameters (without the _pq_. protocol options) may not reach the
    server, or None. Keys are matched as the server reads them: user, database, options and
    replication exactly, anything else as a run-time setting (ASCII case-insensitive), and the
    settings inside `options` too (-c name=value, --name=value, backslash escapes)."""
    for key, value in params.items():
        if key in ("user", "database"):
            continue
        if key == "replication":
            if value.strip().lower() in _BOOL_OFF:
                continue
            return (f"the startup parameter replication={value!r} is not allowed: replication connections "
                    "cannot pass through Warden (their commands are not SQL statements policy can decide)")
        if key == "options":
            try:
                settings = P.startup_option_settings(value)
            except P.ProtocolError as e:
                return (f"the startup parameter options is not allowed: {e}; give only settings of the "
                        f"parameters in the hint, as -c name=value or --name=value")
            for name, setting in settings:
                refusal = _startup_setting_refusal(name, setting, "in options")
                if refusal is not None:
                    return refusal
            continue
        refusal = _startup_setting_refusal(P.setting_name(key), value, "in the startup packet")
        if refusal is not None:
            return refusal
    return None


class PostgresSession:
    def __init__(self, *, identity: str = "", target: str = "",
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 client_tls_available: bool = False, masking: Any = None,
                 clock: Callable[[], int] = time.perf_counter_ns,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 start_fields: Optional[dict] = None,
                 decide: Optional[Callable[[str], Optional[list]]] = None,
                 function_by_oid: Optional[Callable[[int], Optional[tuple]]] = None):
        self.identity = identity
        # the target catalog's OID -> (schema, name, argument types), which names the function
        # of a fast-path call (FunctionCall) for policy; None: only the large-object calls are known
        self.function_by_oid = function_by_oid
        self.target = target
        self.max_message_bytes = max_message_bytes
        self.client_tls_available = client_tls_available
        self.masking = masking
        self.clock = clock
        self.random_bytes = random_bytes
        self.start_fields = dict(start_fields or {})
        # the shell's synchronous decision for a statement text: its verdicts, or None when it
        # cannot decide at once (an approval is needed); then the session asks with DECIDE. A text
        # that may EXECUTE a prepared statement comes with prepared= (DecisionRequest.prepared)
        # when the session holds named statements
        self.decide = decide
        # the shell's memo of decided statement shapes, which the C client lane reads to answer a
        # simple Query without calling `decide` (proxy._Connection._decide_inline keeps it)
        self.shape_memo: Optional[tuple] = None

        self.phase = STARTUP
        self.tls_client = False
        self.tls_upstream = False
        self.startup_params: dict = {}
        self.auth_method: Optional[str] = None
        self.transaction_status = "I"
        self.server_key: Optional[tuple[int, bytes]] = None
        self.client_key: Optional[tuple[int, bytes]] = None
        self.end_reason: Optional[str] = None
        self.end_error: Optional[str] = None     # the FATAL message Warden ended the session with

        self._cbuf = b""
        self._sbuf = b""
        # a large message arriving in many reads is collected as parts and joined once (instead of
        # re-concatenating the growing buffer on every read): [parts, bytes held, bytes needed]
        self._cbig: Optional[list] = None
        self._sbig: Optional[list] = None
        self._pending: Optional[tuple] = None      # held client message awaiting resume()
        self._discard_until_sync = False
        self._terminated = False
        # per forwarded message that the server answers with ParseComplete/BindComplete/ReadyForQuery:
        # (expected type byte, injected-by-us); lets us swallow replies to our own injected messages
        self._expect: collections.deque = collections.deque()
        self._results: collections.deque = collections.deque()
        self._statements: dict[str, _Statement] = {}    # prepared statement name -> statement
        self._parse_seq = 0                        # Parses forwarded
        # Parses of a name the server already holds, until it answers: seq -> (name, new statement,
        # the statement held, client batch of the Parse)
        self._parse_waits: dict[int, tuple] = {}
        self._portals: dict[str, _Portal] = {}          # named portals
        # Describe 'S' sent, in order, until the server's ParameterDescription answers it:
        # (client batch, statement or None); a batch skipped after an error answers none of its own
        self._described_params: collections.deque = collections.deque()
        self._unnamed_portal: Optional[_Portal] = None
        self._client_batch = 0                     # Sync/Query messages sent
        self._server_batch = 0                     # ReadyForQuery received
        self._mask_plan = None
        self._plan_known = False                   # _mask_plan is set for the current result
        self._copy_out = None                      # CopyOptions while a COPY TO STDOUT is masked
        self._withhold = False                     # a result was refused: drop replies until ReadyForQuery
        self._plus_stripped = False                # the server offered SCRAM -PLUS and the client did not see it
        self._started_ns = clock()
        self._start_emitted = False
        self._end_emitted = False
        self.statements = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_sqlstate: Optional[str] = None

    # ================================================================================
    # public API
    # ================================================================================
    def feed_client(self, data: bytes) -> list:
        if _lanes is not None:
            out = _lanes.feed_client(self, data)    # None: not a read the C lane starts on
            if out is not None:
                return out
        return self.feed_client_python(data)

    def feed_client_python(self, data: bytes) -> list:
        """feed_client for a read the C lane already declined (the shell's C Reader asks it first)."""
        self.bytes_in += len(data)
        if self.phase == CLOSED:
            return []
        big = self._cbig
        if big is not None:
            big[0].append(data)
            big[1] += len(data)
            if big[1] < big[2]:
                return []
            self._cbig = None
            data = b"".join(big[0])
        self._cbuf = self._cbuf + data if self._cbuf else bytes(data)
        if self._pending is not None:
            return []          # held until resume()
        if self.phase == READY:
            out: list = []
            self._process_messages(out)
            return out
        if self.phase == TLS_HANDSHAKE:
            # bytes after SSLRequest and before the handshake: a known injection (CVE-2021-23214)
            return self._fatal("08P01", "received unencrypted data after SSL request", "tls_injection")
        return self._process_client()

    def feed_server(self, data: bytes) -> list:
        if _lanes is not None:
            out = _lanes.feed_server(self, data)    # None: not a read the C lane starts on
            if out is not None:
                return out
        return self.feed_server_python(data)

    def feed_server_python(self, data: bytes) -> list:
        """feed_server for a read the C lane already declined."""
        if self.phase == CLOSED:
            return []
        big = self._sbig
        if big is not None:
            big[0].append(data)
            big[1] += len(data)
            if big[1] < big[2]:
                return []
            self._sbig = None
            buf = b"".join(big[0])
        else:
            buf = self._sbuf + data if self._sbuf else bytes(data)
        self._sbuf = b""
        return self._server_from(buf, [], None)

    def _server_from(self, buf: bytes, out: list, pos: Optional[int]) -> list:
        """The server's bytes; from `pos` on when the C lane took those before it into `out`."""
        try:
            return self._process_server(buf, out, pos)
        except (P.ProtocolError, ValueError, IndexError, struct.error) as exc:
            # a malformed message from the server ends this one connection, never the enforcer
            return self._fatal("08P01", f"Warden closed the connection: the server sent a malformed "
                                        f"message ({exc})", "server_protocol_error")

    def client_tls_established(self) -> list:
        self.tls_client = True
        self.phase = STARTUP
        if self._cbuf:
            return self._process_client()
        return []

    def resume(self, verdicts: list[Verdict]) -> list:
        """Continue after a DECIDE action with the final verdict per statement."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("resume() without a pending decision")
        self._pending = None
        out: list = []
        self._resume_pending(pending, verdicts, out)
        if self._cbuf and self.phase != CLOSED and self._pending is None:
            out += self._process_client()
        return out

    def _resume_pending(self, pending: tuple, verdicts: list[Verdict], out: list) -> None:
        """Go on with a client message held for its decision (Query, Parse, Bind, FunctionCall)."""
        kind = pending[0]
        if kind == "Q":
            self._resume_query(pending, verdicts, out)
        elif kind == "B":
            self._resume_bind(pending, verdicts, out)
        elif kind == "F":
            self._resume_function_call(pending, verdicts, out)
        else:
            self._resume_parse(pending, verdicts, out)

    def _decide_or_hold(self, pending: tuple, text: str, request: Callable[[Optional[dict]], DecisionRequest],
                        rest: bytes, out: list) -> bool:
        """A client message that needs a decision: decided at once when the shell's decider can
        (True: the caller goes on with the next message), else held with the bytes after it
        (`rest`) behind a DECIDE of `request(prepared statements)` (False: the caller returns)."""
        verdicts, prepared = self._decide_at_once(text)
        if verdicts is not None:
            self._resume_pending(pending, verdicts, out)
            return True
        self._cbuf = rest
        self._pending = pending
        out.append((DECIDE, request(prepared)))
        return False

    def fatal(self, sqlstate: str, message: str, reason: str) -> list:
        """Error the connection from outside (timeouts, upstream failures)."""
        return self._fatal(sqlstate, message, reason)

    def finish(self, reason: str) -> list:
        """Session end (idempotent): returns the session.start (if never sent) and session.end events."""
        out: list = []
        if self._end_emitted:
            return out
        self._end_emitted = True
        if self.end_reason is None:
            self.end_reason = reason
        self._emit_start(out)
        # statements still waiting for a result never got one
        while self._results:
            self._emit_result(out, self._results.popleft(), None, "connection closed before the statement completed", None)
        out.append((EVENT, ("session.end", {
            "reason": self.end_reason,
            "duration_ns": self.clock() - self._started_ns,
            "statements": self.statements,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "sqlstate": self.last_sqlstate,
            "error": self.end_error,
        })))
        self.phase = CLOSED
        return out

    @property
    def waiting_for_decision(self) -> bool:
        return self._pending is not None

    @property
    def at_rest(self) -> bool:
        """Ready, and the client owes the next move with nothing open: no statement running or
        answer owed, no transaction, no decision pending. Where a stopping agent may end it."""
        return (self.phase == READY and not self._results and not self._expect
                and self.transaction_status == "I" and self._pending is None)

    # ================================================================================
    # client side
    # ================================================================================
    def _process_client(self) -> list:
        out: list = []
        while self.phase == STARTUP and self._cbuf and self.phase != CLOSED:
            if not self._process_startup(out):
                return out
        if self.phase in (AUTH, READY):
            self._process_messages(out)
        return out

    def _process_startup(self, out: list) -> bool:
        """Handle one startup-phase packet; False when more bytes are needed or the phase changed."""
        buf = self._cbuf
        if buf[0] == P.TLS_HANDSHAKE_BYTE:
            # PG17 direct SSL: a TLS ClientHello instead of SSLRequest
            if self.client_tls_available and not self.tls_client:
                self.phase = TLS_HANDSHAKE
                out.append((START_CLIENT_TLS, "direct"))
                return False
            if self.tls_client:
                message = "a TLS handshake arrived inside the already established TLS connection"
            else:
                message = (f"direct SSL (sslnegotiation=direct) is not enabled on Warden target {self.target}: "
                           "connect with sslnegotiation=postgres, or enable client TLS for the target")
            out += self._fatal("08P01", message, "protocol_error")
            return False
        if len(buf) < 8:
            return False
        length = _unpack_i32(buf, 0)[0]
        if length < 8 or length > MAX_STARTUP_PACKET:
            out += self._fatal("08P01", f"invalid startup packet length {length}", "protocol_error")
            return False
        if len(buf) < length:
            return False
        packet, self._cbuf = buf[:length], buf[length:]
        try:
            pkt = P.parse_startup_packet(packet)
        except P.ProtocolError as e:
            out += self._fatal("08P01", f"invalid startup packet: {e}", "protocol_error")
            return False
        if pkt.kind == "ssl":
            if self.client_tls_available and not self.tls_client:
                if self._cbuf:
                    out += self._fatal("08P01", "received unencrypted data after SSL request", "tls_injection")
                    return False
                out.append((TO_CLIENT, b"S"))
                self.bytes_out += 1
                self.phase = TLS_HANDSHAKE
                out.append((START_CLIENT_TLS, "sslrequest"))
                return False
            out.append((TO_CLIENT, b"N"))
            self.bytes_out += 1
            return True
        if pkt.kind == "gssenc":
            out.append((TO_CLIENT, b"N"))
            self.bytes_out += 1
            return True
        if pkt.kind == "cancel":
            out.append((CANCEL, (pkt.cancel_pid, pkt.cancel_key)))
            self.end_reason = "cancel_request"
            out.append((CLOSE, "cancel_request"))
            self.phase = CLOSED
            return False
        # StartupMessage
        if pkt.major != 3:
            out += self._fatal("0A000", f"unsupported frontend protocol {pkt.major}.{pkt.minor}: "
                                        "server supports 3.0", "protocol_error")
            return False
        params = pkt.params
        unrecognized = [k for k in params if k.startswith("_pq_.")]
        negotiate = pkt.minor != 0 or bool(unrecognized)
        if negotiate:
            params = {k: v for k, v in params.items() if not k.startswith("_pq_.")}
        if "user" not in params:
            out += self._fatal("28000", "no PostgreSQL user name specified in startup packet", "protocol_error")
            return False
        # session.start records who tried, also when the parameters are refused
        self.startup_params = params
        refusal = startup_refusal(params)
        if refusal is not None:
            out += self._fatal(STARTUP_REFUSED, f"Warden refused the connection to target {self.target}: {refusal}",
                               "startup_parameter_refused",
                               hint=f"parameters a client may set at connection time: {_STARTUP_ALLOWED_TEXT}")
            return False
        if negotiate:
            # we speak 3.0 only: tell the client, and ask the server for plain 3.0
            out.append((TO_CLIENT, P.build_negotiate_protocol_version(0, unrecognized)))
            packet = P.build_startup_message(params, P.PROTOCOL_3_0)
        self.phase = AUTH
        out.append((CONNECT_UPSTREAM, bytes(packet)))
        return False

    def _process_messages(self, out: list, pos: Optional[int] = None) -> None:
        """The client's messages in self._cbuf; from `pos` on when the C lane took those before it."""
        buf = self._cbuf
        n = len(buf)
        run = 0          # start of the pending forward run
        limit = self.max_message_bytes
        expect = self._expect
        ready = self.phase == READY
        if pos is None:
            pos = 0
            if ready and _lanes is not None and self.masking is None and not self._discard_until_sync:
                # the steady state in C (executions of prepared statements, queries decided at
                # once), up to the first message that needs more
                pos = _lanes.client_lane(self, buf, 0, limit, out)
        while n - pos >= 5:
            t = buf[pos]
            length = _unpack_i32(buf, pos + 1)[0]
            if length < 4 or length > limit:
                if run < pos:
                    out.append((TO_SERVER, buf[run:pos]))
                self._cbuf = b""
                if length < 4:
                    out += self._fatal("08P01", f"invalid message length {length}", "protocol_error")
                else:
                    out += self._fatal("08P01", f"message of {length} bytes exceeds the limit of {limit} "
                                                f"bytes (target option max_message_bytes)", "message_too_large")
                return
            end = pos + 1 + length
            if end > n:
                break
            if self._discard_until_sync:
                if run < pos:
                    out.append((TO_SERVER, buf[run:pos]))
                if t == 83:  # 'S' Sync: forwarded so the server answers ReadyForQuery with the true status
                    self._discard_until_sync = False
                    expect.append(_SYNC_EXPECT)
                    self._client_batch += 1
                    run = pos
                else:
                    run = end
                pos = end
                continue
            if not ready:
                if t == 112 or t == 88:   # 'p' password/SASL, 'X' Terminate
                    if t == 88:
                        self._terminated = True
                    elif self._plus_stripped and self._sasl_gs2_flag(buf[pos + 5:end]) == b"y":
                        # SASLInitialResponse with gs2 flag "y": the client could bind to its TLS channel
                        # but saw no -PLUS mechanism; the server (which offered one) would reject it
                        # as a downgrade with a confusing message, so say what to change
                        if run < pos:
                            out.append((TO_SERVER, buf[run:pos]))
                        self._cbuf = b""
                        out += self._fatal(
                            "28000", "SCRAM channel binding cannot pass through Warden, which terminates the "
                                     "client's TLS and re-originates it upstream; connect with "
                                     "channel_binding=disable, or give the target brokered credentials",
                            "auth_channel_binding")
                        return
                    pos = end
                    continue
                if run < pos:
                    out.append((TO_SERVER, buf[run:pos]))
                self._cbuf = b""
                out += self._fatal("08P01", f"unexpected message type {chr(t)!r} during authentication",
                                   "protocol_error")
                return
            if t == 66:          # 'B' Bind
                try:
                    bind = P.parse_bind_at(buf, pos + 5, end)
                except P.ProtocolError:
                    return self._client_protocol_error(out, buf, run, pos, P.bind_error(buf[pos + 5:end]))
                statement = self._statement_for(bind[1])
                if statement is not None and statement.verdict is not None and (
                        statement.verdict.decision == "approval" or (
                            statement.decided_with is not None
                            and statement.decided_with != self._prepared_texts())):
                    # an execution of a statement that needs approval, or of an EXECUTE whose name
                    # was prepared again since its Parse was decided: decided now, with the
                    # values it binds; held (and what follows with it) while an approver decides
                    if run < pos:
                        out.append((TO_SERVER, buf[run:pos]))
                    # (the policy may answer at once now, if it was reloaded: no approval to wait for)
                    if self._decide_or_hold(("B", buf[pos:end], bind, statement), statement.text,
                                            lambda prepared: self._bind_request(statement, bind, prepared),
                                            buf[end:], out):
                        run = pos = end
                        continue
                    return
                expect.append(_BIND_EXPECT)
                self._record_bind(bind, out, None, statement)
            elif t == 69:        # 'E' Execute
                nul = buf.find(b"\0", pos + 5, end)
                name = buf[pos + 5:nul].decode("utf-8", "replace") if nul > pos + 5 else ""
                portal = self._portals.get(name) if name else self._unnamed_portal
                if portal is None:
                    self._results.append(_Result(None, self.clock(), self._client_batch))
                else:
                    if (self.masking is not None and not portal.described
                            and not (portal.statement is not None and portal.statement.described)):
                        # rows would arrive with no RowDescription to plan masking from: ask for one
                        # ourselves and swallow the answer
                        if run < pos:
                            out.append((TO_SERVER, buf[run:pos]))
                        out.append((TO_SERVER, P.build_describe("P", name)))
                        expect.append((_DESCRIBE_REPLY, True, portal))
                        portal.described = True
                        run = pos
                    self._results.append(_Result(portal.text, self.clock(), self._client_batch,
                                                 index=portal.index, portal=portal))
            elif t == 68:        # 'D' Describe: remember what its answers describe
                try:
                    kind, name = P.parse_describe(buf[pos + 5:end])
                except P.ProtocolError as e:
                    return self._client_protocol_error(out, buf, run, pos, e)
                if kind == "S":
                    target = self._statement_for(name)
                    # its ParameterDescription gives the types the records read binary values by;
                    # the notes of batches already answered are dead (their Describes failed)
                    waits = self._described_params
                    while waits and waits[0][0] < self._server_batch:
                        waits.popleft()
                    waits.append((self._client_batch, target))
                else:
                    target = self._portals.get(name) if name else self._unnamed_portal
                if self.masking is not None:      # its RowDescription: masking plans
                    if target is not None:
                        target.described = True
                    expect.append((_DESCRIBE_REPLY, False, target))
            elif t == 67:        # 'C' Close: forget the statement or portal
                try:
                    kind, name = P.parse_close(buf[pos + 5:end])
                except P.ProtocolError as e:
                    return self._client_protocol_error(out, buf, run, pos, e)
                if kind == "S":
                    self._statements.pop(name, None)
                elif name:
                    self._portals.pop(name, None)
                else:
                    self._unnamed_portal = None
            elif t == 83:        # 'S' Sync
                expect.append(_SYNC_EXPECT)
                self._client_batch += 1
            elif t == 81 or t == 80:   # 'Q' Query, 'P' Parse: need a decision
                if run < pos:
                    out.append((TO_SERVER, buf[run:pos]))
                msg = buf[pos:end]
                try:
                    if t == 81:
                        sql = P.parse_query(msg[5:])
                        pending = ("Q", msg, sql)
                    else:
                        parse = P.parse_parse(msg[5:])
                        sql = parse.query
                        # what an EXECUTE in it runs may change before it is bound: kept to compare
                        pending = ("P", msg, parse, self._prepared_texts() if mentions_execute(sql) else None)
                except P.ProtocolError as e:
                    return self._client_protocol_error(out, msg, 0, 0, e)
                if self._decide_or_hold(pending, sql, lambda prepared: (
                        DecisionRequest(sql, "simple", None, prepared) if t == 81
                        else DecisionRequest(sql, "extended", parse.name, prepared)), buf[end:], out):
                    run = pos = end      # decided at once: the loop goes on with the next message
                    continue
                return
            elif t == 88:        # 'X' Terminate
                self._terminated = True
            elif t == 70:        # 'F' FunctionCall: decided as the SQL call it is, when that is known
                if run < pos:
                    out.append((TO_SERVER, buf[run:pos]))
                try:
                    call = P.parse_function_call(buf[pos + 5:end])
                except P.ProtocolError as e:
                    return self._client_protocol_error(out, buf, pos, pos, e)
                known = fastpath.known_call(call.function_oid, len(call.args), self.function_by_oid)
                if known is None:
                    self._refuse_function_call(call, out)
                    run = end
                else:
                    # held for an approval, the approver sees the arguments and a grant covers only these
                    if self._decide_or_hold(("F", buf[pos:end], call, known), known[0], lambda _prepared: (
                            DecisionRequest(known[0], "fastpath", None,
                                            params=self._function_call_params(call, known[1]),
                                            params_key=_params_key(call.args, call.arg_formats),
                                            statement_index=self.statements + 1)), buf[end:], out):
                        run = pos = end
                        continue
                    return
            elif t not in _CLIENT_FORWARD_TYPES:
                return self._client_protocol_error(out, buf, run, pos,
                                                   P.ProtocolError(f"unknown message type {chr(t)!r}"))
            pos = end
        if run < pos:
            out.append((TO_SERVER, buf if (run == 0 and pos == n) else buf[run:pos]))
        if pos < n:
            rest = self._cbuf = buf[pos:]
            need = _big_message_need(rest)
            if need:
                self._cbig = [[rest], len(rest), need]
                self._cbuf = b""
        else:
            self._cbuf = b""

    def _client_protocol_error(self, out, buf, run, pos, err) -> None:
        if run < pos:
            out.append((TO_SERVER, buf[run:pos]))
        self._cbuf = b""
        out += self._fatal("08P01", f"invalid frontend message: {err}", "protocol_error")

    def _record_bind(self, bind: tuple, out: list, verdict: Optional[Verdict],
                     statement: Optional[_Statement]) -> None:
        """A Bind is one execution of its statement: a new portal and a pg.statement record.
        `bind` is protocol.parse_bind_at's (portal, statement, param formats, params, result formats);
        `verdict`: this execution's own decision (an approved execution), instead of the statement's;
        `statement`: what the Bind's name refers to (_statement_for)."""
        portal_name, name, fmts, values, rfmts = bind
        index = self.statements = self.statements + 1
        portal = _Portal(statement, rfmts, index)
        if portal_name:
            self._portals[portal_name] = portal
        else:
            self._unnamed_portal = portal
        masking = self.masking
        if statement is not None and statement.effects:
            # an SQL PREPARE / DEALLOCATE / DISCARD ALL: its execution changes the statements
            # (taken back if it does not run); never a record template, so these Binds stay here
            portal.undo = self._apply_effects(statement.effects, statement.verdict)
        elif (masking is None and statement is not None and verdict is None and statement.decided_with is None
              and not (self._parse_waits and self._waiting(name))):
            # the statement's constant fields were built once; only parameters and index differ
            # (never for an EXECUTE: the C lane takes the Binds of a statement with a template,
            # and each Bind of an EXECUTE is checked here for a name prepared again)
            template = statement.record
            if template is None:
                template = statement.record = self._statement_fields(
                    statement.text, None, statement.verdict, "extended", name, 0)
            fields = template.copy()
            fields["params"] = render_bind_params(values, fmts, statement.param_types)
            fields["statement_index"] = index
            if portal_name:
                fields["portal"] = portal_name
            out.append((EVENT, ("pg.statement", fields)))
            return
        params = render_bind_params(values, fmts, statement.param_types if statement is not None else (),
                                    masking.mask_text if masking is not None else None)
        if verdict is None and statement is not None:
            verdict = statement.verdict
        out.append((EVENT, ("pg.statement", self._statement_fields(
            portal.text, params, verdict, "extended", name, index, portal_name))))

    def _bind_request(self, statement: _Statement, bind: tuple, prepared: Optional[dict]) -> DecisionRequest:
        """The DECIDE of one held execution: the statement, and its parameters as recorded."""
        portal_name, name, fmts, values, _rfmts = bind
        masking = self.masking
        params = render_bind_params(values, fmts, statement.param_types,
                                    masking.mask_text if masking is not None else None)
        # nothing else is recorded while the client is held: this is the index its record gets
        return DecisionRequest(statement.text, "extended", name, prepared, params=params,
                               params_key=_params_key(values, fmts), statement_index=self.statements + 1)

    def _resume_bind(self, pending, verdicts: list[Verdict], out: list) -> None:
        """The decision of one execution of a statement that needs approval (held at its Bind)."""
        _, msg, bind, statement = pending
        # no verdict at all: the statement's own ("approval", not allowed) refuses it
        denied = next((v for v in verdicts if not v.allowed), None) if verdicts else statement.verdict
        if denied is None:
            self._expect.append(_BIND_EXPECT)
            self._record_bind(bind, out, verdicts[0], statement)
            out.append((TO_SERVER, msg))
            return
        portal_name, name, fmts, values, _rfmts = bind
        index = self.statements = self.statements + 1
        masking = self.masking
        params = render_bind_params(values, fmts, statement.param_types,
                                    masking.mask_text if masking is not None else None)
        out.append((EVENT, ("pg.statement", self._statement_fields(statement.text, params, denied, "extended",
                                                                     name, index, portal_name))))
        # the client's Bind never reaches the server: no portal of that name exists there either
        self._refuse_extended(denied, statement.text, index, out)

    # ---- the prepared statements as the server will hold them -----------------------------------
    def _statement_for(self, name: str) -> Optional[_Statement]:
        """The statement a Bind or Describe of `name` sent now refers to. While a Parse of a name the
        server already holds is unanswered, a message of the same batch refers to the new statement
        (if the server refuses the Parse, it skips the rest of the batch), a later one to the held."""
        statement = self._statements.get(name)
        if self._parse_waits:
            batch = self._client_batch
            for wname, new, _held, wbatch in self._parse_waits.values():
                if wname == name and wbatch == batch:
                    statement = new
        return statement

    def _decide_at_once(self, text: str) -> tuple:
        """(the shell's inline verdicts or None, the prepared statements they were decided with):
        an EXECUTE is decided as the statement the session holds under its name."""
        prepared = self._prepared_texts() if self._statements and mentions_execute(text) else None
        if self.decide is None:
            return None, prepared
        return (self.decide(text, prepared=prepared) if prepared else self.decide(text)), prepared

    def _prepared_texts(self) -> dict:
        """The named statements (name -> text) an SQL EXECUTE sent now would run, for its decision
        (the unnamed statement has no SQL name)."""
        texts = {name: st.text for name, st in self._statements.items() if name}
        for wname, _new, _held, _batch in self._parse_waits.values():
            statement = self._statement_for(wname)
            if wname and statement is not None:
                texts[wname] = statement.text
        return texts

    def _waiting(self, name: str) -> bool:
        return any(w[0] == name for w in self._parse_waits.values())

    def _parse_confirmed(self, seq: int) -> None:
        """ParseComplete for a Parse of a name the session believed held: the server did not hold it
        after all, so the new statement is the name's (unless the client closed the name since)."""
        wait = self._parse_waits.pop(seq, None)
        if wait is None:
            return
        name, statement, held, _batch = wait
        if self._statements.get(name) is held:
            self._statements[name] = statement

    def _parses_failed(self) -> None:
        """An ErrorResponse: the server refuses the Parses of this batch it has not confirmed yet
        (the one that failed, and those it now skips until Sync). Those expected to succeed are
        taken back; a refused unnamed Parse leaves no unnamed statement either (the server drops
        the old one first)."""
        for e in self._expect:
            if e[0] == 90:
                break
            if e[0] != 49 or len(e) < 4:
                continue
            _, mark, name, seq = e
            if mark is False:
                statement = self._statements.get(name)
                if statement is not None and statement.seq == seq:
                    del self._statements[name]
            else:
                self._parse_waits.pop(seq, None)

    def _apply_effects(self, effects: tuple, verdict: Optional[Verdict]) -> list:
        """Apply SQL PREPARE / DEALLOCATE / DISCARD ALL to the statements when the statement is sent
        (so no later message of the client uses a name's old plan); returns how to take them back."""
        undo = []
        statements = self._statements
        for effect in effects:
            if effect[0] == "deallocate":
                name = effect[1]
                if name is None:
                    # DEALLOCATE ALL / DISCARD ALL: every named statement (not the unnamed one)
                    gone = {k: v for k, v in statements.items() if k}
                    for k in gone:
                        del statements[k]
                    undo.append(("all", gone))
                else:
                    undo.append(("deallocate", name, statements.pop(name, None)))
            else:
                _, name, text = effect
                if name in statements:
                    continue        # the server refuses a PREPARE of a name it holds (42P05)
                statement = statements[name] = _Statement(text, verdict)
                undo.append(("prepare", name, statement))
        return undo

    def _undo_effects(self, undo: list, sqlstate: Optional[str]) -> None:
        """A statement with effects did not run (`sqlstate`: its own error; None: skipped)."""
        statements = self._statements
        for entry in reversed(undo):
            if entry[0] == "all":
                for name, statement in entry[1].items():
                    statements.setdefault(name, statement)
            elif entry[0] == "deallocate":
                _, name, before = entry
                # 26000: the server had no such statement, so there is nothing to give back
                if before is not None and name not in statements and sqlstate != "26000":
                    statements[name] = before
            else:
                _, name, statement = entry
                if statements.get(name) is statement:
                    del statements[name]

    def _batch_failed(self, sqlstate: Optional[str]) -> None:
        """An ErrorResponse for the first outstanding result: it and the rest of its batch do not run."""
        self._parses_failed()
        results = self._results
        batch = self._server_batch
        failed = []
        for r in results:
            if r.batch != batch:
                break
            undo = r.undo or (r.portal.undo if r.portal is not None else None)
            if undo:
                failed.append((r, undo))
        for r, undo in reversed(failed):
            r.undo = None
            if r.portal is not None:
                r.portal.undo = None
            self._undo_effects(undo, sqlstate if r is results[0] else None)

    def _resume_function_call(self, pending, verdicts: list[Verdict], out: list) -> None:
        """The decision of a fast-path call policy can see (fastpath.known_call): allowed, the
        FunctionCall goes to the server as sent and its FunctionCallResponse is its result;
        denied, it is refused like any denied statement."""
        _, msg, call, (text, types) = pending
        if not verdicts:        # no answer for the call: it does not run
            verdicts = [Verdict(False, text, action="pg:function", decision="deny", reason="no decision for the call")]
        denied = next((v for v in verdicts if not v.allowed), None)
        self.statements += 1
        index = self.statements
        params = self._function_call_params(call, types)
        out.append((EVENT, ("pg.statement", self._statement_fields(text, params, denied or verdicts[0], "fastpath",
                                                                     None, index))))
        if denied is not None:
            self._refuse_call(text, index, denial_message(self.identity, self.target, denied), None, out)
            return
        try:
            plan = self._call_plan(call, text)
        except MaskingRefused as e:
            self._refuse_call(text, index, str(e), None, out)
            return
        result = _Result(text, self.clock(), self._client_batch, index=index)
        result.call_plan = plan
        self._results.append(result)
        self._client_batch += 1
        self._expect.append(_SYNC_EXPECT)
        out.append((TO_SERVER, msg))

    def _call_plan(self, call: P.FunctionCallMessage, text: str):
        """How the value of an allowed fast-path call is masked: as the one column of its SQL call
        (`SELECT "public"."get_ssn"($1)`), so a function whose body returns a masked column is
        masked like it, and the detectors read it; None when nothing can need masking. Large-object
        contents are not masked (as for lo_get in SQL). Raises MaskingRefused when no plan can be
        made (a result type the catalog does not give, or a rule's on_binary: error)."""
        masking = self.masking
        if masking is None or fastpath.is_large_object_call(call.function_oid):
            return None
        found = self.function_by_oid(call.function_oid) if self.function_by_oid is not None else None
        if found is None or len(found) < 4:
            raise MaskingRefused(f"Warden refused the fast-path call of function OID {call.function_oid}: masking "
                                 f"rules apply and its result type is not known, so its result cannot be masked; "
                                 f"call it in SQL (SELECT fn(...))")
        field = P.FieldDescription(found[1], 0, 0, found[3], -1, -1, call.result_format)
        return masking.plan_for([field], text)

    def _function_call_params(self, call: P.FunctionCallMessage, types: tuple) -> list:
        """A call's arguments as recorded: as Bind parameters are, except that data written to a
        large object is recorded by its size (as COPY data is), not as a copy of it."""
        masking = self.masking
        params = render_bind_params(call.args, call.arg_formats, types,
                                    masking.mask_text if masking is not None else None)
        if fastpath.is_large_object_call(call.function_oid):
            for i, value in enumerate(call.args):
                if value is not None and i < len(types) and types[i] == fastpath.BYTEA:
                    params[i] = f"[{len(value)} bytes]"
        return params

    def _refuse_function_call(self, call: P.FunctionCallMessage, out: list) -> None:
        """FunctionCall (the fast-path interface) of a function policy cannot see (by OID, and not
        one fastpath.known_call knows): refused. Like a denied statement, the server itself raises
        the error (an explicit transaction becomes aborted) and answers ReadyForQuery, which ends
        the cycle."""
        text = f"<FunctionCall of function OID {call.function_oid}>"
        verdict = Verdict(False, text, action="pg:function", kind="FunctionCall", decision="deny",
                          reason="the fast-path function call interface is refused for this function: it is "
                                 "called by OID, which policy cannot see")
        self.statements += 1
        index = self.statements
        masking = self.masking
        params = _render(call.args, call.arg_formats, masking.mask_text if masking is not None else None)
        out.append((EVENT, ("pg.statement", self._statement_fields(text, params, verdict, "fastpath", None, index))))
        message = (f'permission denied by Warden: identity "{self.identity}" may not use the fast-path function '
                   f'call interface (FunctionCall of function OID {call.function_oid}) on target "{self.target}": '
                   f"it calls a function by OID, which policy cannot see")
        hint = ("Call the function in SQL instead, e.g. SELECT fn(...), which policy decides (large-object calls, "
                "and calls of the functions the target's catalog_dsn names, are decided as the SQL calls they are).")
        self._refuse_call(text, index, message, hint, out)

    def _refuse_call(self, text: str, index: int, message: str, hint: Optional[str], out: list) -> None:
        """A refused FunctionCall: the server raises 42501 in its place and answers ReadyForQuery."""
        self._results.append(_Result(text, self.clock(), self._client_batch, denied=True, index=index))
        self._client_batch += 1
        self._expect.append(_SYNC_EXPECT)
        out.append((TO_SERVER, P.build_query(denial_do_block(message, hint))))

    def _statement_fields(self, text, params, verdict: Optional[Verdict], protocol: str, name,
                          index: int, portal: Optional[str] = None) -> dict:
        if text is None and verdict is not None:
            text = verdict.text
        if text and self.masking is not None:
            # records never hold a value the masking rules would hide from the client
            text = self.masking.mask_text(text)[0]
        fields = {"text": text, "params": params, "protocol": protocol, "statement_name": name,
                  "statement_index": index}
        if portal:
            fields["portal"] = portal
        # the statement's record carries its decision (no separate policy.decision event)
        if verdict is None:
            fields.update({"kind": None, "action": None, "tables": [], "functions": [], "decision": "allow",
                           "policy_ids": [], "reason": ""})
        else:
            fields.update({"kind": verdict.kind, "action": verdict.action, "tables": list(verdict.tables),
                           "functions": list(verdict.functions), "decision": verdict.decision,
                           "policy_ids": list(verdict.policy_ids), "reason": verdict.reason})
            prepared = verdict.prepared
            if prepared is not None:
                # an SQL EXECUTE: what it ran (its kind, action and tables are that statement's)
                shown = prepared.get("text")
                if shown and self.masking is not None:
                    shown = self.masking.mask_text(shown)[0]
                fields["prepared"] = {"name": prepared.get("name"), "text": shown}
        return fields

    def _resume_query(self, pending, verdicts: list[Verdict], out: list) -> None:
        _, msg, sql = pending
        denied = None
        for v in verdicts:
            if not v.allowed:
                denied = v
                break
        batch = self._client_batch
        self._client_batch += 1
        self._expect.append(_SYNC_EXPECT)
        now = self.clock()
        if not verdicts:
            verdicts = [Verdict(True, sql)]
        masking = self.masking
        for v in verdicts:
            self.statements += 1
            index = self.statements
            effects = namespace_effects(v.text, v.kind) if denied is None else ()
            if v.prepared is not None and denied is None:
                effects += self._executed_effects(v.prepared)
            # an EXECUTE never leaves a template either: the C lane takes a text whose verdict has
            # one, and what that text runs changes with the session's statements
            if masking is None and not effects and v.prepared is None:
                template = v.simple_record[0]
                if template is None:
                    template = v.simple_record[0] = self._statement_fields(v.text, None, v, "simple", None, 0)
                fields = template.copy()
                fields["text"] = v.text
                fields["statement_index"] = index
            else:
                # (a statement with effects never leaves a template: the C lane, which takes a
                # text whose verdict has one, would not apply them)
                fields = self._statement_fields(v.text, None, v, "simple", None, index)
            out.append((EVENT, ("pg.statement", fields)))
            if v is denied:
                break
            if denied is None:
                result = _Result(v.text, now, batch, index=index)
                if effects:
                    result.undo = self._apply_effects(effects, v)
                self._results.append(result)
        if denied is None:
            out.append((TO_SERVER, msg))
            return
        message = denial_message(self.identity, self.target, denied)
        self._results.append(_Result(denied.text, now, batch, denied=True, index=self.statements))
        out.append((TO_SERVER, P.build_query(denial_do_block(message))))

    def _executed_effects(self, prepared: dict) -> tuple:
        """What an SQL EXECUTE of a protocol-prepared DEALLOCATE / PREPARE / DISCARD ALL does to the
        statements (the name still holding the text it was decided as)."""
        statement = self._statements.get(prepared.get("name") or "")
        if statement is None or statement.text != prepared.get("text"):
            return ()
        return statement.effects

    def _resume_parse(self, pending, verdicts: list[Verdict], out: list) -> None:
        _, msg, parse, decided_with = pending
        if not verdicts:
            verdicts = [Verdict(True, parse.query)]
        # "approval" is no denial here: parsing runs nothing; each execution is held instead
        denied = next((v for v in verdicts if not v.allowed and v.decision != "approval"), None)
        if denied is None:
            verdict = next((v for v in verdicts if v.decision == "approval"), verdicts[0])
            # the executions (Bind) are the recorded statements, each carrying this decision
            name = parse.name
            seq = self._parse_seq = self._parse_seq + 1
            effects = namespace_effects(parse.query, verdict.kind)
            if verdict.prepared is not None:
                effects += self._executed_effects(verdict.prepared)
            statement = _Statement(parse.query, verdict, seq, effects, tuple(parse.param_types))
            statement.decided_with = decided_with
            held = self._statements.get(name) if name else None
            if held is None:
                # expected to succeed: in force from now on for the client's next messages (and for
                # the C lane); an ErrorResponse before its ParseComplete takes it back
                self._statements[name] = statement
                self._expect.append((49, False, name, seq))
            else:
                # the server already holds this name: it refuses the Parse (42P05) and keeps what it
                # has, which later executions run. The new statement counts only once the server
                # confirms it with ParseComplete (which the C lane leaves to Python: the marker is
                # truthy); until then the Binds of the name are recorded here, without the template
                self._parse_waits[seq] = (name, statement, held, self._client_batch)
                held.record = None
                self._expect.append((49, _CONFIRM, name, seq))
            out.append((TO_SERVER, msg))
            return
        self.statements += 1
        out.append((EVENT, ("pg.statement", self._statement_fields(parse.query, None, denied, "extended",
                                                                     parse.name, self.statements))))
        self._refuse_extended(denied, parse.query, self.statements, out)

    def _refuse_extended(self, denied: Verdict, text: str, index: int, out: list) -> None:
        """A denied Parse or Bind: the server itself raises 42501 in its place (an explicit
        transaction becomes aborted), and the client's messages are discarded until Sync."""
        message = denial_message(self.identity, self.target, denied)
        # the server never sees the denied message; its unnamed statement becomes the DO block below
        self._statements.pop("", None)
        self._expect.append((49, True))
        self._expect.append((50, True))
        self._results.append(_Result(text, self.clock(), self._client_batch, denied=True, index=index))
        out.append((TO_SERVER, P.build_parse("", denial_do_block(message)) + P.build_bind("", "")
                    + P.build_execute("", 0)))
        self._discard_until_sync = True

    # ================================================================================
    # server side
    # ================================================================================
    def _process_server(self, buf: bytes, out: list, pos: Optional[int]) -> list:
        n = len(buf)
        run = 0
        results = self._results
        masking = self.masking
        plan = self._mask_plan
        if pos is None:
            pos = 0
            if masking is None and _lanes is not None and self.phase == READY and not self._withhold:
                # results with nothing to mask in C, up to the first message that needs more
                pos = _lanes.server_lane(self, buf, 0, out)
        while n - pos >= 5:
            t = buf[pos]
            length = _unpack_i32(buf, pos + 1)[0]
            if length < 4 or length > _SERVER_MAX_MESSAGE_BYTES:
                out += self._fatal("08P01", f"upstream sent an invalid message length {length}", "upstream_protocol_error")
                return out
            end = pos + 1 + length
            if end > n:
                break
            if t == 68:                      # 'D' DataRow
                if plan is None and (masking is None or self._plan_known) and not self._withhold:
                    # nothing to mask: count the whole run of DataRows in one tight loop; they stay
                    # in the forwarded slice untouched
                    rows = 1
                    nbytes = length
                    pos = end
                    while n - pos >= 5 and buf[pos] == 68:
                        length = _unpack_i32(buf, pos + 1)[0]
                        end = pos + 1 + length
                        if length < 4 or end > n:
                            break            # invalid or incomplete: the outer loop deals with it
                        rows += 1
                        nbytes += length
                        pos = end
                    if results:
                        r = results[0]
                        r.rows += rows
                        r.nbytes += nbytes
                    continue
                if (plan is not None and self._plan_known and not self._withhold
                        and hasattr(plan, "mask_rows")):
                    # masked result: the plan takes the whole run of DataRows in one loop and
                    # hands back one buffer for the rows up to the last one it changed
                    data, last, stop, rows, nbytes = plan.mask_rows(buf, pos, n)
                    if data is not None:
                        if run < pos:
                            out.append((TO_CLIENT, buf[run:pos]))
                        out.append((TO_CLIENT, data))
                        run = last
                    pos = stop
                    if results:
                        r = results[0]
                        r.rows += rows
                        r.nbytes += nbytes
                    continue
                if results:
                    r = results[0]
                    r.rows += 1
                    r.nbytes += length
                if masking is not None and not self._withhold:
                    if not self._plan_known:
                        # extended protocol: the RowDescription came from an earlier Describe
                        self._plan_known = True
                        try:
                            plan = self._mask_plan = self._execute_plan()
                        except MaskingRefused as e:
                            plan = None
                            run = self._refuse(out, buf, run, pos, end, e)
                    if plan is not None:
                        body = buf[pos + 5:end]
                        masked = plan.mask_data_row(body)
                        if masked is not body:
                            if run < pos:
                                out.append((TO_CLIENT, buf[run:pos]))
                            out.append((TO_CLIENT, b"D" + _pack_i32(len(masked) + 4) + masked))
                            run = end
            elif t == 100:                   # 'd' CopyData (COPY TO STDOUT)
                copy = self._copy_out
                if copy is None and not self._withhold:
                    # nothing to mask: count the whole run of CopyData in one tight loop
                    nbytes = length
                    pos = end
                    while n - pos >= 5 and buf[pos] == 100:
                        length = _unpack_i32(buf, pos + 1)[0]
                        end = pos + 1 + length
                        if length < 4 or end > n:
                            break
                        nbytes += length
                        pos = end
                    if results:
                        results[0].nbytes += nbytes
                    continue
                if results:
                    results[0].nbytes += length
                if copy is not None and not self._withhold:
                    body = buf[pos + 5:end]
                    masked = masking.mask_copy_line(body, copy.format, copy.columns, copy.delimiter, copy.quote)
                    if masked is not body:
                        if run < pos:
                            out.append((TO_CLIENT, buf[run:pos]))
                        out.append((TO_CLIENT, b"d" + _pack_i32(len(masked) + 4) + masked))
                        run = end
            elif t == 67 or t == 73 or t == 115:   # CommandComplete, EmptyQueryResponse, PortalSuspended
                self._mask_plan = plan = None
                self._plan_known = False
                self._copy_out = None
                if results:
                    r = results.popleft()
                    tag = (None if r.refusal is not None
                           else P.parse_command_complete(buf[pos + 5:end]) if t == 67
                           else "" if t == 73 else "PORTAL SUSPENDED")
                    if masking is not None and tag == "DECLARE CURSOR" and r.text:
                        masking.cursor_declared(r.text)
                    self._emit_result(out, r, tag, None, None)
            elif t == 90:                    # 'Z' ReadyForQuery
                self._mask_plan = plan = None
                self._plan_known = False
                self._copy_out = None
                self._withhold = False
                self.transaction_status = chr(buf[pos + 5]) if length == 5 else "?"
                if self.phase != AUTH:
                    # the ReadyForQuery that ends startup answers no client batch
                    self._server_batch += 1
                expect = self._expect
                while expect:
                    if expect.popleft()[0] == 90:
                        break
                # statements of this batch skipped after an error never produce a result
                while results and results[0].batch < self._server_batch:
                    self._emit_result(out, results.popleft(), None, _NOT_EXECUTED, None)
                if self.phase == AUTH:
                    self.phase = READY
                    if run < pos:
                        out.append((TO_CLIENT, buf[run:pos]))
                    run = pos
                    self._emit_start(out)
            elif t == 49 or t == 50:         # ParseComplete / BindComplete
                expect = self._expect
                if expect and expect[0][0] == t:
                    e = expect.popleft()
                    if e[1] is True:
                        if run < pos:
                            out.append((TO_CLIENT, buf[run:pos]))
                        run = end            # reply to our injected message: swallow
                    elif e[1] == _CONFIRM:
                        self._parse_confirmed(e[3])
            elif t == 116:                   # 't' ParameterDescription: answers a Describe 'S'
                waits = self._described_params
                while waits and waits[0][0] < self._server_batch:
                    waits.popleft()          # Describes of a batch the server skipped after an error
                if waits:
                    statement = waits.popleft()[1]
                    if statement is not None:
                        try:
                            statement.param_types = tuple(P.parse_parameter_description(buf[pos + 5:end]))
                        except P.ProtocolError as e:
                            out += self._fatal("08P01", f"upstream sent a malformed ParameterDescription: {e}",
                                               "upstream_protocol_error")
                            return out
            elif t == 84 or t == 110:        # 'T' RowDescription, 'n' NoData
                if masking is not None:
                    if t == 84:
                        try:
                            fields = P.parse_row_description(buf[pos + 5:end])
                        except P.ProtocolError as e:
                            out += self._fatal("08P01", f"upstream sent a malformed RowDescription: {e}",
                                               "upstream_protocol_error")
                            return out
                    else:
                        fields = []
                    expect = self._expect
                    if expect and expect[0][0] == _DESCRIBE_REPLY:
                        # answers a Describe: kept for the Executes that follow (plans are made per result)
                        _, injected, described = expect.popleft()
                        if described is not None:
                            described.fields = fields
                        if injected:
                            if run < pos:
                                out.append((TO_CLIENT, buf[run:pos]))
                            run = end
                    elif t == 84 and not self._withhold:
                        # simple query: the rows of this statement follow
                        self._plan_known = True
                        try:
                            plan = self._mask_plan = masking.plan_for(
                                fields, results[0].text if results else None, self._named_text)
                        except MaskingRefused as e:
                            plan = self._mask_plan = None
                            run = self._refuse(out, buf, run, pos, end, e)
            elif t == 72:                    # 'H' CopyOutResponse
                if masking is not None and not self._withhold:
                    try:
                        overall, _cols = P.parse_copy_response(buf[pos + 5:end])
                    except P.ProtocolError as e:
                        out += self._fatal("08P01", f"upstream sent a malformed CopyOutResponse: {e}",
                                           "upstream_protocol_error")
                        return out
                    opts = copy_options(results[0].text if results else None)
                    if opts.columns is None and opts.query is not None and overall == 0:
                        # COPY (query) TO: its fields are the query's columns
                        columns = masking.copy_query_columns(opts.query, len(_cols))
                        if columns is not None:
                            opts = dataclasses.replace(opts, columns=columns)
                    refusal = _copy_out_refusal(masking, overall, opts)
                    if refusal is not None:
                        run = self._refuse(out, buf, run, pos, end, refusal)
                    else:
                        self._copy_out = opts
            elif t == 86:                    # 'V' FunctionCallResponse: an allowed fast-path call's result
                if results:
                    r = results.popleft()
                    r.nbytes += max(length - 8, 0)       # the value, without its length word
                    if r.call_plan is not None:
                        # the value as the one column of a DataRow: int16 1, then the same int32 length + bytes
                        row = b"\x00\x01" + buf[pos + 5:end]
                        masked = r.call_plan.mask_data_row(row)
                        if masked is not row:
                            if run < pos:
                                out.append((TO_CLIENT, buf[run:pos]))
                            out.append((TO_CLIENT, b"V" + _pack_i32(len(masked) + 2) + masked[2:]))
                            run = end
                    self._emit_result(out, r, None, None, None)
            elif t == 99:                    # 'c' CopyDone
                self._copy_out = None
            elif t == 69 or t == 78:         # 'E' ErrorResponse, 'N' NoticeResponse
                try:
                    fields = P.parse_error_fields(buf[pos + 5:end])
                except P.ProtocolError:
                    fields = {}
                if masking is not None and fields:
                    # messages and details can echo values (a unique violation's Key (ssn)=(...))
                    masked_fields, count = masking.mask_error_fields(fields)
                    if count:
                        fields = masked_fields
                        if run < pos:
                            out.append((TO_CLIENT, buf[run:pos]))
                        out.append((TO_CLIENT, P.build_error_fields(fields) if t == 69
                                    else P.build_notice_response(fields)))
                        run = end
                if t == 69:
                    self._mask_plan = plan = None
                    self._plan_known = False
                    self._copy_out = None
                    sqlstate = fields.get("C")
                    self.last_sqlstate = sqlstate
                    if self.phase == READY:
                        # what the rest of the batch would have done to the prepared statements does not happen
                        self._batch_failed(sqlstate)
                    if results:
                        self._emit_result(out, results.popleft(), None, fields.get("M"), sqlstate)
            elif t == 65 and masking is not None:   # 'A' NotificationResponse: pg_notify() can carry any value
                pid, channel, payload = P.parse_notification(buf[pos + 5:end])
                masked_channel, n_channel = masking.mask_text(channel)
                masked_payload, n_payload = masking.mask_text(payload)
                if n_channel or n_payload:
                    if run < pos:
                        out.append((TO_CLIENT, buf[run:pos]))
                    out.append((TO_CLIENT, P.build_notification(pid, masked_channel, masked_payload)))
                    run = end
            elif t == 82 and self.phase == AUTH:    # 'R' Authentication
                replacement = self._on_authentication(buf[pos + 5:end])
                if replacement is not None:
                    if run < pos:
                        out.append((TO_CLIENT, buf[run:pos]))
                    out.append((TO_CLIENT, replacement))
                    run = end
            elif t == 75:                    # 'K' BackendKeyData: the client gets our key, we keep the server's
                try:
                    spid, skey = P.parse_backend_key_data(buf[pos + 5:end])
                except P.ProtocolError as e:
                    out += self._fatal("08P01", f"upstream sent malformed BackendKeyData: {e}", "upstream_protocol_error")
                    return out
                self.server_key = (spid, skey)
                cpid = int.from_bytes(self.random_bytes(4), "big") & 0x7FFFFFFF or 1
                ckey = self.random_bytes(len(skey))
                self.client_key = (cpid, ckey)
                out.append((REGISTER_CANCEL_KEY, (cpid, ckey, spid, skey)))
                if run < pos:
                    out.append((TO_CLIENT, buf[run:pos]))
                out.append((TO_CLIENT, P.build_backend_key_data(cpid, ckey)))
                run = end
            if self._withhold and t not in _PASS_WHILE_WITHHELD and run < end:
                # the client was told this result failed: the rest of its batch must not reach it
                if run < pos:
                    out.append((TO_CLIENT, buf[run:pos]))
                run = end
            pos = end
        if run < pos:
            chunk = buf if (run == 0 and pos == n) else buf[run:pos]
            out.append((TO_CLIENT, chunk))
        if pos < n:
            rest = self._sbuf = buf[pos:]
            need = _big_message_need(rest)
            if need:
                self._sbig = [[rest], len(rest), need]
                self._sbuf = b""
        for kind, payload in out:
            if kind == TO_CLIENT:
                self.bytes_out += len(payload)
        return out

    def _execute_plan(self):
        """The masking plan for an Execute's rows: its portal's columns with the Bind's formats."""
        r = self._results[0] if self._results else None
        fields = r.portal.result_fields() if r is not None and r.portal is not None else None
        if fields is None:
            raise MaskingRefused("Warden refused the result: no RowDescription was seen for it, so the "
                                 "target's masking rules cannot be applied; describe the statement or portal "
                                 "before executing it", "08P01")
        return self.masking.plan_for(fields, r.text, self._named_text)

    def _named_text(self, kind: str, name: str) -> Optional[str]:
        """For masking: the text a statement name means now (EXECUTE), or the DECLARE of a
        cursor (FETCH)."""
        if kind == "prepared":
            statement = self._statements.get(name)
            return statement.text if statement is not None else None
        return self.masking.cursor_text(name) if self.masking is not None else None

    def _refuse(self, out: list, buf: bytes, run: int, pos: int, end: int, err: MaskingRefused) -> int:
        """Answer the current result with an ErrorResponse instead of its rows and withhold the rest
        of its batch until ReadyForQuery, as the server would skip after an error. Returns the new run."""
        if run < pos:
            out.append((TO_CLIENT, buf[run:pos]))
        out.append((TO_CLIENT, P.build_error_response(err.sqlstate, str(err))))
        self.last_sqlstate = err.sqlstate
        if self._results:
            self._results[0].refusal = (err.sqlstate, str(err))
        self._withhold = True
        self._mask_plan = None
        self._copy_out = None
        return end

    def _sasl_gs2_flag(self, body: bytes) -> Optional[bytes]:
        """The channel-binding flag (n | y | p) of a SASLInitialResponse; only the first 'p' is one."""
        self._plus_stripped = False
        try:
            _mech, data = P.parse_sasl_initial_response(body)
        except P.ProtocolError:
            return None
        return data[:1] if data and data[1:2] == b"," else None

    def _on_authentication(self, body: bytes) -> Optional[bytes]:
        """Track the auth method; strip SCRAM -PLUS mechanisms (channel binding cannot cross a re-originated TLS)."""
        try:
            req = P.parse_authentication(body)
        except P.ProtocolError:
            return None
        if self.auth_method is None:
            self.auth_method = P.AUTH_METHOD_NAMES.get(req.code, f"code-{req.code}")
        if req.code == P.AUTH_SASL:
            mechs = [m for m in req.mechanisms if not m.endswith("-PLUS")]
            self._plus_stripped = len(mechs) != len(req.mechanisms)
            if self._plus_stripped:
                return P.build_authentication_sasl(mechs)
        return None

    def _emit_start(self, out: list) -> None:
        if self._start_emitted:
            return
        self._start_emitted = True
        # the agent's fields (identity, target, process record, ...) as given; `user` there would be
        # the OS user, so the database role is auth_user
        fields = dict(self.start_fields)
        fields.update({
            "database": self.startup_params.get("database", self.startup_params.get("user")),
            # brokered: the role the session runs as upstream (what the client typed is client_user)
            "auth_user": fields.get("brokered_user") or self.startup_params.get("user"),
            "application_name": self.startup_params.get("application_name"),
            "tls_client": self.tls_client,
            "tls_upstream": self.tls_upstream,
            "auth_method": self.auth_method,
        })
        out.append((EVENT, ("session.start", fields)))

    def _emit_result(self, out: list, r: _Result, tag, error, sqlstate) -> None:
        if r.refusal is not None:
            # the client got Warden's refusal instead of this result: that is its outcome
            tag = None
            sqlstate, error = r.refusal
        rows = r.rows
        if tag and not rows:
            rows = P.rows_from_tag(tag) or 0
        masking = self.masking
        if error and masking is not None:
            error = masking.mask_text(error)[0]
        fields = {"command_tag": tag, "rows": rows, "bytes": r.nbytes, "duration_ns": self.clock() - r.start_ns,
                  "sqlstate": sqlstate, "error": error}
        if r.index is not None:
            fields["statement_index"] = r.index
        out.append((EVENT, ("pg.result", fields)))
        if masking is not None:
            stats = masking.take_stats()
            if stats:
                out.append((EVENT, ("mask.applied", mask_applied_fields(stats, r.index))))

    # ================================================================================
    def _fatal(self, sqlstate: str, message: str, reason: str, hint: Optional[str] = None) -> list:
        out: list = []
        if self.phase == CLOSED:
            return out
        self.last_sqlstate = sqlstate
        self.end_reason = reason
        self.end_error = message if self.masking is None else self.masking.mask_text(message)[0]
        err = P.build_error_response(sqlstate, message, severity="FATAL", hint=hint)
        self.bytes_out += len(err)
        out.append((TO_CLIENT, err))
        out.append((CLOSE, reason))
        out += self.finish(reason)
        self.phase = CLOSED
        return out

    @property
    def terminated(self) -> bool:
        return self._terminated


# enforcer/postgres/_pglanes.c: the steady-state loops above without the interpreter per message
_lanes = native.lanes
if _lanes is not None:
    _lanes.configure(_Portal, _Result, _BIND_EXPECT, _SYNC_EXPECT, EVENT, _NOT_EXECUTED, TO_SERVER, TO_CLIENT,
                     READY, P.binary_value_text)
