"""The `masking:` section of agent.yaml (or the file it names): validation and MaskingEngine building.

    masking:
      hash_key_file: /etc/warden/masking.key   # or hash_key: "..." (>= 16 bytes); needed by strategy hash
      redaction: "[REDACTED]"                  # replacement of strategy redact (per rule: replacement)
      exempt: [fraud-analytics]                # identities (globs) exempt from every rule
      detectors:                               # custom regex detectors, usable by name below
        - {name: employee_id, regex: 'EMP-[0-9]{6}'}
      record_detectors: [card, ssn, email]     # also run on statement texts/parameters/errors
      rules:
        - column: "*ssn*"                      # label glob, or schema.table.column (glob per part)
          strategy: partial                    # redact | partial | hash | email | null | fixed:<value>
          keep_last: 4
          targets: [customers-db]              # globs; default every target
          exempt: [fraud-analytics]
          on_binary: null                      # non-text column types: null (default) | error
        - column: notes
          detectors: [card, ssn]               # mask only what the detectors find in that column
        - scan_all_text: true                  # detectors over every text value
          detectors: [card, ssn, email]
        - json_key: "*card*"                   # HTTP JSON bodies; or json_path: $.customer.cards[*].number

Or `masking: {path: /etc/warden/masking.yaml}` with the same keys in that file (errors then
carry that file's line numbers).
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Optional

from agent.yamlpos import YamlPositionError, load_yaml

from .detectors import BUILTIN, DEFAULT_SCAN, Detector, Scanner, custom_detector
from .engine import MaskingEngine
from .rules import ON_BINARY_ERROR, ON_BINARY_NULL, JsonPath, Rule, glob_regex
from .strategies import DEFAULT_REDACTION, build_strategy

Where = Callable[[tuple], str]

TOP_KEYS = {"path", "hash_key_file", "hash_key", "hash_prefix", "redaction", "exempt", "detectors",
            "record_detectors", "rules"}
RULE_KEYS = {"name", "target", "targets", "column", "detectors", "scan_all_text", "json_key", "json_path",
             "strategy", "keep_first", "keep_last", "mask_char", "replacement", "on_binary", "exempt"}
MIN_HASH_KEY_BYTES = 16
_DETECTOR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


class MaskingConfigError(Exception):
    """One or more problems, each 'file:line: message'."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _load_file(path: str, where: Where, at: tuple) -> tuple[dict, Where, tuple]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise MaskingConfigError([f"{where(at)}: cannot read masking rules file {path}: {e.strerror}"]) from None
    except UnicodeDecodeError as e:
        raise MaskingConfigError([f"{where(at)}: masking rules file {path} is not UTF-8 text: {e.reason}"]) from None
    try:
        data, lines = load_yaml(text, path)
    except YamlPositionError as e:
        raise MaskingConfigError([str(e)]) from None
    if not isinstance(data, dict):
        raise MaskingConfigError([f"{lines(())}: a masking rules file must be a mapping (rules, detectors, ...)"])
    prefix: tuple = ()
    if set(data) == {"masking"}:
        data, prefix = data["masking"] or {}, ("masking",)
        if not isinstance(data, dict):
            raise MaskingConfigError([f"{lines(prefix)}: 'masking' must be a mapping"])
    return data, lines, prefix


def _glob_list(value: Any, path: tuple, err) -> tuple[re.Pattern, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        err(path, "must be a name or a list of names (globs allowed)")
        return ()
    return tuple(glob_regex(v) for v in value)


def _read_hash_key(data: dict, base_dir: Optional[str], at: tuple, err) -> Optional[bytes]:
    key_file = data.get("hash_key_file")
    key = data.get("hash_key")
    if key_file is not None and key is not None:
        err(at + ("hash_key",), "set either hash_key_file or hash_key, not both")
        return None
    if key_file is not None:
        path = str(key_file)
        if base_dir and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        try:
            with open(path, "rb") as f:
                raw = f.read().strip()
        except OSError as e:
            err(at + ("hash_key_file",), f"cannot read hash key file {path}: {e.strerror} "
                                          f"(create one with: head -c 32 /dev/urandom | base64 > {path})")
            return None
        if len(raw) < MIN_HASH_KEY_BYTES:
            err(at + ("hash_key_file",), f"hash key file {path} holds {len(raw)} bytes; use at least "
                                          f"{MIN_HASH_KEY_BYTES} random bytes")
            return None
        return raw
    if key is not None:
        raw = str(key).encode()
        if len(raw) < MIN_HASH_KEY_BYTES:
            err(at + ("hash_key",), f"hash_key must be at least {MIN_HASH_KEY_BYTES} bytes long")
            return None
        return raw
    return None


def load_masking(data: dict, where: Optional[Where] = None, base_dir: Optional[str] = None) -> MaskingEngine:
    """Validate the `masking:` mapping and build the engine; raises MaskingConfigError listing every problem."""
    where = where or (lambda path: "masking")
    at: tuple = ("masking",)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MaskingConfigError([f"{where(at)}: 'masking' must be a mapping (rules, detectors, hash_key_file, ...)"])
    if "path" in data:
        others = sorted(set(data) - {"path"})
        if others:
            raise MaskingConfigError([f"{where(at + (others[0],))}: with masking.path the rules live in that file; "
                                      f"move {', '.join(others)} there"])
        path = str(data["path"])
        if base_dir and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        data, where, at = _load_file(path, where, at + ("path",))
        base_dir = os.path.dirname(os.path.abspath(path))
        if "path" in data:
            raise MaskingConfigError([f"{where(at + ('path',))}: a masking rules file cannot name another one"])

    problems: list[str] = []

    def err(path: tuple, msg: str) -> None:
        problems.append(f"{where(path)}: {msg}")

    for key in data:
        if key not in TOP_KEYS:
            err(at + (key,), f"unknown key {key!r} in masking (known: {', '.join(sorted(TOP_KEYS))})")

    hash_key = _read_hash_key(data, base_dir, at, err)
    hash_prefix = str(data.get("hash_prefix", "h:"))
    redaction = data.get("redaction", DEFAULT_REDACTION)
    if not isinstance(redaction, str):
        err(at + ("redaction",), "redaction must be a string"); redaction = DEFAULT_REDACTION
    exempt = _glob_list(data.get("exempt"), at + ("exempt",), err)

    # custom detectors
    detectors: dict[str, Detector] = dict(BUILTIN)
    custom = data.get("detectors") or []
    if not isinstance(custom, list):
        err(at + ("detectors",), "detectors must be a list of {name, regex}"); custom = []
    custom_names = []
    for i, item in enumerate(custom):
        p = at + ("detectors", i)
        if not isinstance(item, dict):
            err(p, "each custom detector is a mapping {name: ..., regex: ...}"); continue
        unknown = set(item) - {"name", "regex", "ignore_case"}
        for k in sorted(unknown):
            err(p + (k,), f"unknown key {k!r} in a custom detector (known: name, regex, ignore_case)")
        name, regex = item.get("name"), item.get("regex")
        if not isinstance(name, str) or not _DETECTOR_NAME.fullmatch(name):
            err(p + ("name",), "a custom detector needs a name of letters, digits, _ or -"); continue
        if name in detectors:
            err(p + ("name",), f"detector name {name!r} is already taken"
                              f"{' by a built-in detector' if name in BUILTIN else ''}"); continue
        if not isinstance(regex, str) or not regex:
            err(p + ("regex",), f"custom detector {name!r} needs a regex"); continue
        try:
            detectors[name] = custom_detector(name, regex, bool(item.get("ignore_case", False)))
            custom_names.append(name)
        except (re.error, ValueError) as e:
            err(p + ("regex",), f"regex of detector {name!r} does not compile: {e}")

    def detector_list(value, path: tuple, default: tuple) -> Optional[tuple[Detector, ...]]:
        if value is None:
            return tuple(detectors[n] for n in default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            err(path, "must be a list of detector names"); return None
        out = []
        for j, n in enumerate(value):
            if n not in detectors:
                err(path + (j,), f"unknown detector {n!r} (known: {', '.join(sorted(detectors))})")
                continue
            if detectors[n] not in out:
                out.append(detectors[n])
        return tuple(out)

    record = detector_list(data.get("record_detectors"), at + ("record_detectors",),
                           DEFAULT_SCAN + tuple(custom_names)) or ()

    rules: list[Rule] = []
    raw_rules = data.get("rules") or []
    if not isinstance(raw_rules, list):
        err(at + ("rules",), "rules must be a list"); raw_rules = []
    names: set[str] = set()
    for i, item in enumerate(raw_rules):
        p = at + ("rules", i)
        if not isinstance(item, dict):
            err(p, "each rule is a mapping (column | scan_all_text | json_key | json_path, strategy, ...)")
            continue
        rule = _parse_rule(item, i, p, err, detector_list, hash_key, hash_prefix, redaction)
        if rule is None:
            continue
        if rule.name in names:
            err(p + ("name",), f"duplicate rule name {rule.name!r}")
            continue
        names.add(rule.name)
        rules.append(rule)

    if problems:
        raise MaskingConfigError(problems)
    return MaskingEngine(rules, record_detectors=record, exempt=exempt)


def _parse_rule(item: dict, index: int, p: tuple, err, detector_list, hash_key, hash_prefix,
                redaction) -> Optional[Rule]:
    ok = True
    for k in sorted(set(item) - RULE_KEYS):
        err(p + (k,), f"unknown key {k!r} in a masking rule (known: {', '.join(sorted(RULE_KEYS))})")
        ok = False
    selectors = [k for k in ("column", "scan_all_text", "json_key", "json_path") if item.get(k) not in (None, False)]
    if len(selectors) != 1:
        what = "none" if not selectors else " and ".join(selectors)
        err(p, f"a rule selects with exactly one of column, scan_all_text, json_key, json_path (found {what})")
        return None
    selector = selectors[0]

    column = qualified = table_column = source_table = source_column = None
    json_key = json_key_glob = json_path = None
    value = item[selector]
    if selector == "scan_all_text":
        if value is not True:
            err(p + (selector,), "scan_all_text must be true (or left out)"); ok = False
    elif not isinstance(value, str) or not value.strip():
        err(p + (selector,), f"{selector} must be a non-empty string"); return None
    elif selector == "column":
        dots = value.count(".")
        if dots == 2:
            qualified = glob_regex(value)
            table_column = glob_regex(value.split(".", 1)[1])
            source_table = glob_regex(value.split(".")[1])
            source_column = glob_regex(value.split(".")[2])
        elif dots == 0:
            column = glob_regex(value)
        else:
            err(p + (selector,), f"column {value!r}: use a column label glob (e.g. '*ssn*') or "
                                 "schema.table.column (e.g. public.customers.ssn)"); ok = False
    elif selector == "json_key":
        json_key = glob_regex(value)
        json_key_glob = value
    else:
        try:
            json_path = JsonPath.parse(value)
        except ValueError as e:
            err(p + (selector,), f"json_path {value!r}: {e}"); ok = False

    scanner = None
    if "detectors" in item or selector == "scan_all_text":
        if selector in ("json_key", "json_path"):
            err(p + ("detectors",), "detectors do not combine with json_key/json_path (a JSON field rule masks "
                                    "the whole value); use a scan_all_text rule for detectors in bodies")
            ok = False
        else:
            dets = detector_list(item.get("detectors"), p + ("detectors",), DEFAULT_SCAN)
            if dets is None:
                ok = False
            elif not dets:
                err(p + ("detectors",), "the detector list is empty"); ok = False
            else:
                scanner = Scanner(dets)

    strategy_spec = item.get("strategy", "redact")
    if strategy_spec is None:      # `strategy: null` in YAML
        strategy_spec = "null"
    ints = {}
    for k, default in (("keep_first", 0), ("keep_last", 4)):
        v = item.get(k, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            err(p + (k,), f"{k} must be a whole number >= 0"); ok = False; v = default
        ints[k] = v
    mask_char = item.get("mask_char", "*")
    if not isinstance(mask_char, str) or len(mask_char) != 1:
        err(p + ("mask_char",), "mask_char must be one character"); ok = False; mask_char = "*"
    replacement = item.get("replacement", redaction)
    if not isinstance(replacement, str):
        err(p + ("replacement",), "replacement must be a string"); ok = False; replacement = redaction
    if "replacement" in item and strategy_spec != "redact":
        err(p + ("replacement",), "replacement only applies to strategy redact (use fixed:<value> otherwise)")
        ok = False
    strategy = None
    if not isinstance(strategy_spec, str):
        err(p + ("strategy",), "strategy must be a string such as partial or fixed:<value>"); ok = False
    else:
        try:
            strategy = build_strategy(strategy_spec, replacement=replacement, keep_first=ints["keep_first"],
                                      keep_last=ints["keep_last"], mask_char=mask_char, hash_key=hash_key,
                                      hash_prefix=hash_prefix)
        except ValueError as e:
            err(p + ("strategy",), str(e)); ok = False

    on_binary = item.get("on_binary", ON_BINARY_NULL)
    if on_binary is None:          # YAML reads a bare `null` as None
        on_binary = ON_BINARY_NULL
    if on_binary not in (ON_BINARY_NULL, ON_BINARY_ERROR):
        err(p + ("on_binary",), f"on_binary must be null or error, got {on_binary!r}"); ok = False
    if on_binary == ON_BINARY_ERROR and selector != "column":
        err(p + ("on_binary",), "on_binary applies to column rules only"); ok = False

    targets = _glob_list(item.get("targets", item.get("target")), p + ("targets" if "targets" in item else "target",), err)
    if "target" in item and "targets" in item:
        err(p + ("target",), "use either target or targets"); ok = False
    exempt = _glob_list(item.get("exempt"), p + ("exempt",), err)

    name = item.get("name")
    if name is None:
        name = f"{selector}:{value}" if selector != "scan_all_text" else f"scan_all_text#{index}"
    elif not isinstance(name, str) or not name:
        err(p + ("name",), "name must be a non-empty string"); ok = False
    if not ok or strategy is None:
        return None
    return Rule(name=str(name), strategy=strategy, targets=targets, exempt=exempt, column=column,
                qualified=qualified, table_column=table_column, source_table=source_table,
                source_column=source_column, scanner=scanner, scan_all_text=selector == "scan_all_text",
                json_key=json_key, json_key_glob=json_key_glob, json_path=json_path, on_binary=on_binary)
