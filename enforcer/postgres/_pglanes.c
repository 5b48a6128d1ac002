/* The steady state of enforcer/postgres/session.py and proxy.py without the interpreter per
 * message: the Bind/Execute/Sync a client sends for each execution of a prepared statement, the
 * simple queries its decider allows at once, and the BindComplete/RowDescription/DataRow/
 * CommandComplete/ReadyForQuery the server answers with.
 *
 * client_lane(session, buf, pos, limit, out) -> pos
 * server_lane(session, buf, pos, out) -> pos
 * feed_client(session, data), feed_server(session, data) -> actions, or None
 * apply_steady(emit, server_transport, client_transport, actions) -> bool
 * Reader(session, client, done, emit, server_transport, client_transport, handler, rest, fail)(data)
 * number_shape(sql) -> shape, or None
 *
 * The lanes take over PostgresSession._process_messages / _process_server only for messages
 * that are forwarded unchanged when the target has no masking rules, and return at the first
 * message they leave to the Python loop (anything else, anything malformed, a denial, an
 * approval, an error or an injected reply), which then goes on from there; feed_* run them on
 * a whole read of a session in its steady state. The Python code is the reference: the same
 * bytes to each leg, the same records (fields in the same order), the same session state and
 * the same calls of session.clock(); tests/unit/test_pg_lanes.py drives both with the same
 * byte streams. The callers check the session-wide preconditions (ready phase, no masking,
 * nothing buffered, withheld or discarded).
 *
 * The GIL is held throughout: the session's objects are ordinary Python objects. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* set by configure(): session.py's classes and constants */
static PyObject *Portal, *Result, *BindExpect, *SyncExpect, *EventKind, *NotExecuted, *ToServer, *ToClient,
    *Ready, *PgStatement, *PgResult, *PortalSuspendedTag, *EmptyTag, *BinaryValueText;

static PyObject *s_statements, *s_client_batch, *s_server_batch, *s_statements_map, *s_portals,
    *s_unnamed_portal, *s_expect, *s_results, *s_clock, *s_record, *s_text, *s_statement,
    *s_index, *s_rows, *s_nbytes, *s_start_ns, *s_batch, *s_refusal, *s_transaction_status,
    *s_append, *s_popleft, *s_params, *s_statement_index, *s_portal, *s_command_tag, *s_bytes,
    *s_duration_ns, *s_sqlstate, *s_error, *s_phase, *s_masking, *s_pending, *s_cbig, *s_cbuf, *s_sbig, *s_sbuf,
    *s_discard_until_sync, *s_withhold, *s_max_message_bytes, *s_bytes_in, *s_bytes_out, *s_process_messages,
    *s_server_from, *s_decide, *s_allowed, *s_simple_record, *s_param_types, *s_shape_memo, *s_policy,
    *s_version, *s_identity, *s_identity_attrs;

static inline int32_t read_i32(const unsigned char *p) {
    return (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3]);
}

static inline int16_t read_i16(const unsigned char *p) {
    return (int16_t)(((uint16_t)p[0] << 8) | p[1]);
}

/* the session's instance dict (a new reference): its attributes are read and written there */
static PyObject *session_dict(PyObject *session) {
    PyObject *d = PyObject_GenericGetDict(session, NULL);
    if (d != NULL && !PyDict_CheckExact(d)) {
        Py_DECREF(d);
        PyErr_SetString(PyExc_TypeError, "session has no instance dict");
        return NULL;
    }
    return d;
}

static PyObject *dict_item(PyObject *d, PyObject *key) {
    PyObject *v = PyDict_GetItemWithError(d, key);
    if (v == NULL && !PyErr_Occurred())
        PyErr_Format(PyExc_AttributeError, "session has no attribute %R", key);
    return v;   /* borrowed */
}

static int append_event(PyObject *out, PyObject *event_type, PyObject *fields) {
    PyObject *payload = PyTuple_Pack(2, event_type, fields);
    if (payload == NULL)
        return -1;
    PyObject *action = PyTuple_Pack(2, EventKind, payload);
    Py_DECREF(payload);
    if (action == NULL)
        return -1;
    int rc = PyList_Append(out, action);
    Py_DECREF(action);
    return rc;
}

/* _render(values, fmts, None) for one value */
static PyObject *render_value(const unsigned char *p, Py_ssize_t len, int fmt) {
    if (fmt == 0)
        return PyUnicode_DecodeUTF8((const char *)p, len, "replace");
    static const char hexdigits[] = "0123456789abcdef";
    PyObject *s = PyUnicode_New(2 + 2 * len, 127);
    if (s == NULL)
        return NULL;
    Py_UCS1 *d = PyUnicode_1BYTE_DATA(s);
    d[0] = '\\';
    d[1] = 'x';
    for (Py_ssize_t i = 0; i < len; i++) {
        d[2 + 2 * i] = hexdigits[p[i] >> 4];
        d[3 + 2 * i] = hexdigits[p[i] & 15];
    }
    return s;
}

/* session.render_bind_params for one binary value whose statement gives the type `oid`: the text
 * Postgres prints for the integer, bool and text types here, protocol.binary_value_text for the
 * other types, and the hex of render_value when the bytes do not fit the type or it is unknown */
static PyObject *render_typed(const unsigned char *p, Py_ssize_t len, unsigned long oid) {
    switch (oid) {
    case 0:
        break;
    case 16:        /* bool */
        if (len == 1)
            return PyUnicode_FromString(p[0] ? "true" : "false");
        break;
    case 21:        /* int2 */
        if (len == 2)
            return PyUnicode_FromFormat("%d", (int)read_i16(p));
        break;
    case 23:        /* int4 */
        if (len == 4)
            return PyUnicode_FromFormat("%d", (int)read_i32(p));
        break;
    case 26:        /* oid */
        if (len == 4)
            return PyUnicode_FromFormat("%u", (unsigned int)(uint32_t)read_i32(p));
        break;
    case 20:        /* int8 */
        if (len == 8) {
            uint64_t u = ((uint64_t)(uint32_t)read_i32(p) << 32) | (uint32_t)read_i32(p + 4);
            return PyUnicode_FromFormat("%lld", (long long)u);
        }
        break;
    case 25: case 1043: case 1042: case 19: case 114: {     /* text, varchar, bpchar, name, json */
        PyObject *text = PyUnicode_DecodeUTF8((const char *)p, len, NULL);
        if (text != NULL || !PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            return text;
        PyErr_Clear();
        break;
    }
    default: {
        PyObject *value = PyBytes_FromStringAndSize((const char *)p, len);
        PyObject *type = value == NULL ? NULL : PyLong_FromUnsignedLong(oid);
        PyObject *text = type == NULL ? NULL : PyObject_CallFunctionObjArgs(BinaryValueText, type, value, NULL);
        Py_XDECREF(value);
        Py_XDECREF(type);
        if (text != Py_None)
            return text;
        Py_DECREF(text);
    }
    }
    return render_value(p, len, 1);
}

/* session._Result and session._Portal built without running their __init__ (a Python frame per
 * statement): the same slots set to the same values. configure() checks the classes still have
 * exactly these slots. */
static const char *const RESULT_SLOTS[] = {"text", "start_ns", "rows", "nbytes", "batch", "denied", "index",
                                           "portal", "refusal", "undo", "call_plan"};
static const char *const PORTAL_SLOTS[] = {"statement", "formats", "fields", "described", "index", "undo"};
#define N_RESULT_SLOTS (sizeof RESULT_SLOTS / sizeof RESULT_SLOTS[0])
#define N_PORTAL_SLOTS (sizeof PORTAL_SLOTS / sizeof PORTAL_SLOTS[0])
static PyObject *result_slot_names[N_RESULT_SLOTS], *portal_slot_names[N_PORTAL_SLOTS];
/* where each slot lives in an instance, from the classes' own member descriptors (check_slots) */
static Py_ssize_t result_slot_offsets[N_RESULT_SLOTS], portal_slot_offsets[N_PORTAL_SLOTS];

/* an instance of `cls` with its slots set as __init__ would, written straight into the member
 * offsets (a generic setattr per slot was a dict lookup and a descriptor call each) */
static PyObject *new_slotted(PyObject *cls, const Py_ssize_t *offsets, PyObject *const *values, size_t n) {
    PyTypeObject *type = (PyTypeObject *)cls;
    PyObject *obj = type->tp_alloc(type, 0);
    if (obj == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject **slot = (PyObject **)((char *)obj + offsets[i]);
        Py_XSETREF(*slot, Py_NewRef(values[i]));
    }
    return obj;
}

/* _Result(text, start_ns, batch, denied, index, portal) */
static PyObject *new_result(PyObject *text, PyObject *start_ns, PyObject *batch, PyObject *denied, PyObject *index,
                            PyObject *portal) {
    PyObject *zero = PyLong_FromLong(0);
    if (zero == NULL)
        return NULL;
    PyObject *values[N_RESULT_SLOTS] = {text, start_ns, zero, zero, batch, denied, index, portal, Py_None, Py_None,
                                        Py_None};
    PyObject *r = new_slotted(Result, result_slot_offsets, values, N_RESULT_SLOTS);
    Py_DECREF(zero);
    return r;
}

/* _Portal(statement, formats, index) */
static PyObject *new_portal(PyObject *statement, PyObject *formats, PyObject *index) {
    PyObject *values[N_PORTAL_SLOTS] = {statement, formats, Py_None, Py_False, index, Py_None};
    return new_slotted(Portal, portal_slot_offsets, values, N_PORTAL_SLOTS);
}

/* 0 when `cls` is a class whose __slots__ are exactly `expected` (their interned names then in
 * `names`), else -1 with TypeError */
static int check_slots(PyObject *cls, const char *const *expected, size_t n, PyObject **names,
                       Py_ssize_t *offsets) {
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "configure: _Portal and _Result must be classes");
        return -1;
    }
    PyObject *slots = PyObject_GetAttrString(cls, "__slots__");
    if (slots == NULL)
        return -1;
    int same = PyTuple_Check(slots) && (size_t)PyTuple_GET_SIZE(slots) == n;
    for (size_t i = 0; same && i < n; i++) {
        PyObject *name = PyTuple_GET_ITEM(slots, i);
        same = PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, expected[i]) == 0;
    }
    Py_DECREF(slots);
    if (!same) {
        PyErr_Format(PyExc_TypeError, "configure: %R's __slots__ are not the ones the lanes set; "
                     "change RESULT_SLOTS / PORTAL_SLOTS and new_result / new_portal in _pglanes.c with them",
                     cls);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        if (names[i] == NULL && (names[i] = PyUnicode_InternFromString(expected[i])) == NULL)
            return -1;
        /* the slot as the class itself defines it: a writable object member */
        PyObject *descr = PyDict_GetItemWithError(((PyTypeObject *)cls)->tp_dict, names[i]);
        if (descr == NULL && PyErr_Occurred())
            return -1;
        if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type) ||
            ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX ||
            (((PyMemberDescrObject *)descr)->d_member->flags & READONLY)) {
            PyErr_Format(PyExc_TypeError, "configure: %R.%U is not a plain slot of that class", cls, names[i]);
            return -1;
        }
        offsets[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
    }
    return 0;
}

/* ---- client -------------------------------------------------------------------------------- */

typedef struct {
    PyObject *dict, *statements_map, *portals, *expect_append, *results_append, *clock, *decide;
    PyObject *shape_memo;      /* borrowed from the session dict: None or the shell's memo tuple */
    long long statements, batch;
    int batch_changed;
} ClientState;

/* Bind at buf[pos:end]: 1 handled, 0 left to the reference, -1 error */
static int client_bind(ClientState *st, const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end,
                       PyObject *out) {
    Py_ssize_t p = pos + 5, q;
    /* the reference parses the whole message before looking at anything */
    const unsigned char *nul1 = memchr(buf + p, 0, (size_t)(end - p));
    if (nul1 == NULL)
        return 0;
    Py_ssize_t i = nul1 - buf;
    const unsigned char *nul2 = memchr(buf + i + 1, 0, (size_t)(end - i - 1));
    if (nul2 == NULL)
        return 0;
    Py_ssize_t j = nul2 - buf;
    q = j + 1;
    if (q + 2 > end)
        return 0;
    int nf = read_i16(buf + q);
    q += 2;
    if (nf < 0 || q + 2 * (Py_ssize_t)nf + 2 > end)
        return 0;
    Py_ssize_t fmts_at = q;
    q += 2 * (Py_ssize_t)nf;
    int np = read_i16(buf + q);
    q += 2;
    if (np < 0)
        return 0;
    Py_ssize_t params_at = q;
    for (int k = 0; k < np; k++) {
        if (q + 4 > end)
            return 0;
        int32_t ln = read_i32(buf + q);
        q += 4;
        if (ln == -1)
            continue;
        if (ln < 0 || q + ln > end)
            return 0;
        q += ln;
    }
    if (q + 2 > end)
        return 0;
    int nr = read_i16(buf + q);
    q += 2;
    if (nr < 0 || q + 2 * (Py_ssize_t)nr != end)
        return 0;
    Py_ssize_t rfmts_at = q;

    /* only a statement this session prepared and has a record template for */
    PyObject *name = PyUnicode_DecodeUTF8((const char *)buf + i + 1, j - i - 1, "replace");
    if (name == NULL)
        return -1;
    PyObject *statement = PyDict_GetItemWithError(st->statements_map, name);   /* borrowed */
    if (statement == NULL) {
        Py_DECREF(name);
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *template = PyObject_GetAttr(statement, s_record);
    Py_DECREF(name);
    if (template == NULL)
        return -1;
    if (!PyDict_CheckExact(template)) {
        Py_DECREF(template);
        return 0;
    }

    int rc = -1;
    PyObject *portal_name = NULL, *rfmts = NULL, *index = NULL, *portal = NULL, *fields = NULL,
             *params = NULL, *types = NULL;
    PyObject *appended = PyObject_CallOneArg(st->expect_append, BindExpect);
    if (appended == NULL)
        goto done;
    Py_DECREF(appended);
    portal_name = PyUnicode_DecodeUTF8((const char *)buf + pos + 5, i - pos - 5, "replace");
    if (portal_name == NULL)
        goto done;
    rfmts = PyList_New(nr);
    if (rfmts == NULL)
        goto done;
    for (int k = 0; k < nr; k++) {
        PyObject *v = PyLong_FromLong(read_i16(buf + rfmts_at + 2 * k));
        if (v == NULL)
            goto done;
        PyList_SET_ITEM(rfmts, k, v);
    }
    st->statements += 1;
    index = PyLong_FromLongLong(st->statements);
    if (index == NULL)
        goto done;
    if (PyDict_SetItem(st->dict, s_statements, index) < 0)
        goto done;
    portal = new_portal(statement, rfmts, index);
    if (portal == NULL)
        goto done;
    if (PyUnicode_GET_LENGTH(portal_name)) {
        if (PyDict_SetItem(st->portals, portal_name, portal) < 0)
            goto done;
    } else if (PyDict_SetItem(st->dict, s_unnamed_portal, portal) < 0) {
        goto done;
    }
    fields = PyDict_Copy(template);
    if (fields == NULL)
        goto done;
    params = PyList_New(np);
    if (params == NULL)
        goto done;
    q = params_at;
    for (int k = 0; k < np; k++) {
        int32_t ln = read_i32(buf + q);
        q += 4;
        PyObject *v;
        if (ln == -1) {
            v = Py_NewRef(Py_None);
        } else {
            int fmt = nf == 0 ? 0 : nf == 1 ? read_i16(buf + fmts_at) : k < nf ? read_i16(buf + fmts_at + 2 * k) : 0;
            if (fmt == 0) {
                v = render_value(buf + q, ln, fmt);
            } else {
                /* a binary value reads by the statement's type for it (session.render_bind_params) */
                if (types == NULL) {
                    types = PyObject_GetAttr(statement, s_param_types);
                    if (types == NULL)
                        goto done;
                    if (!PyTuple_CheckExact(types)) {
                        PyErr_SetString(PyExc_TypeError, "param_types is not a tuple");
                        goto done;
                    }
                }
                unsigned long oid = 0;
                if (k < PyTuple_GET_SIZE(types)) {
                    oid = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(types, k));
                    if (oid == (unsigned long)-1 && PyErr_Occurred())
                        goto done;
                }
                v = render_typed(buf + q, ln, oid);
            }
            q += ln;
            if (v == NULL)
                goto done;
        }
        PyList_SET_ITEM(params, k, v);
    }
    if (PyDict_SetItem(fields, s_params, params) < 0 || PyDict_SetItem(fields, s_statement_index, index) < 0)
        goto done;
    if (PyUnicode_GET_LENGTH(portal_name) && PyDict_SetItem(fields, s_portal, portal_name) < 0)
        goto done;
    if (append_event(out, PgStatement, fields) < 0)
        goto done;
    rc = 1;
done:
    Py_DECREF(template);
    Py_XDECREF(portal_name);
    Py_XDECREF(rfmts);
    Py_XDECREF(index);
    Py_XDECREF(portal);
    Py_XDECREF(fields);
    Py_XDECREF(params);
    Py_XDECREF(types);
    return rc;
}

/* Execute at buf[pos:end]: the result it will produce */
static int client_execute(ClientState *st, const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end) {
    PyObject *portal;     /* borrowed */
    const unsigned char *nul = memchr(buf + pos + 5, 0, (size_t)(end - pos - 5));
    Py_ssize_t nlen = nul == NULL ? 0 : (nul - buf) - (pos + 5);
    if (nlen > 0) {
        PyObject *name = PyUnicode_DecodeUTF8((const char *)buf + pos + 5, nlen, "replace");
        if (name == NULL)
            return -1;
        portal = PyDict_GetItemWithError(st->portals, name);
        Py_DECREF(name);
        if (portal == NULL && PyErr_Occurred())
            return -1;
    } else {
        portal = PyDict_GetItemWithError(st->dict, s_unnamed_portal);
        if (portal == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_AttributeError, "session has no attribute '_unnamed_portal'");
            return -1;
        }
        if (portal == Py_None)
            portal = NULL;
    }
    PyObject *batch = PyLong_FromLongLong(st->batch);
    if (batch == NULL)
        return -1;
    PyObject *result = NULL, *text = NULL, *now = NULL, *index = NULL;
    int rc = -1;
    if (portal == NULL) {
        now = PyObject_CallNoArgs(st->clock);
        if (now == NULL)
            goto done;
        result = new_result(Py_None, now, batch, Py_False, Py_None, Py_None);
    } else {
        /* _Portal.text: its statement's text */
        PyObject *statement = PyObject_GetAttr(portal, s_statement);
        if (statement == NULL)
            goto done;
        text = statement == Py_None ? Py_NewRef(Py_None) : PyObject_GetAttr(statement, s_text);
        Py_DECREF(statement);
        if (text == NULL)
            goto done;
        now = PyObject_CallNoArgs(st->clock);
        if (now == NULL)
            goto done;
        index = PyObject_GetAttr(portal, s_index);
        if (index == NULL)
            goto done;
        result = new_result(text, now, batch, Py_False, index, portal);
    }
    if (result == NULL)
        goto done;
    PyObject *r = PyObject_CallOneArg(st->results_append, result);
    if (r == NULL)
        goto done;
    Py_DECREF(r);
    rc = 1;
done:
    Py_DECREF(batch);
    Py_XDECREF(result);
    Py_XDECREF(text);
    Py_XDECREF(now);
    Py_XDECREF(index);
    return rc;
}

static PyObject *number_shape(PyObject *module, PyObject *sql);

/* Python's str.isspace for ASCII: what str.strip() removes */
static inline int ascii_space(int c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f); }

/* sqlclass.single_statement_text for an ASCII text: sql.strip().rstrip(";").strip() */
static PyObject *statement_text(PyObject *sql) {
    const unsigned char *s = PyUnicode_1BYTE_DATA(sql);
    Py_ssize_t lo = 0, hi = PyUnicode_GET_LENGTH(sql);
    while (lo < hi && ascii_space(s[lo]))
        lo++;
    while (hi > lo && ascii_space(s[hi - 1]))
        hi--;
    while (hi > lo && s[hi - 1] == ';')
        hi--;
    while (hi > lo && ascii_space(s[hi - 1]))
        hi--;
    return PyUnicode_Substring(sql, lo, hi);
}

/* whether a getattr result equals what the memo was made with (`same`: by identity) */
static int attr_is(PyObject *obj, PyObject *name, PyObject *expected, int same) {
    PyObject *v;
    /* getattr(obj, name, None) without raising and clearing an AttributeError on every
     * transaction (a policy engine with no version attribute) */
#if PY_VERSION_HEX >= 0x030D0000
    int found = PyObject_GetOptionalAttr(obj, name, &v);
#else
    int found = _PyObject_LookupAttr(obj, name, &v);
#endif
    if (found < 0)
        return -1;
    if (found == 0)
        v = Py_NewRef(Py_None);
    int eq = v == expected ? 1 : same ? 0 : PyObject_RichCompareBool(v, expected, Py_EQ);
    Py_DECREF(v);
    return eq;
}

/* The shell's shape memo (proxy._Connection._decide_inline) answered here, without a Python
 * frame: session.shape_memo is (ctx, policy, policy.version, ctx.identity_attrs, ctx.identity,
 * end of the hour, {shape: Verdict}) as of the memo's cache_base. It answers only while all of
 * those are still what ctx holds (a reloaded policy, another principal or the next hour: the
 * shell decides, and renews the memo), for an ASCII text without EXECUTE whose number shape it
 * holds. 1: *verdict and *text set (new references), 0: ask the decider, -1: error. */
static int memo_lookup(ClientState *st, PyObject *sql, PyObject **verdict, PyObject **text) {
    PyObject *memo = st->shape_memo;
    if (!PyTuple_CheckExact(memo) || PyTuple_GET_SIZE(memo) != 7 || !PyUnicode_IS_ASCII(sql))
        return 0;
    PyObject *ctx = PyTuple_GET_ITEM(memo, 0), *until = PyTuple_GET_ITEM(memo, 5),
             *shapes = PyTuple_GET_ITEM(memo, 6);
    if (!PyFloat_CheckExact(until) || !PyDict_CheckExact(shapes) || PyDict_GET_SIZE(shapes) == 0)
        return 0;
    /* sqlclass.mentions_execute: such a text means what the session's prepared statements mean */
    const unsigned char *s = PyUnicode_1BYTE_DATA(sql);
    Py_ssize_t n = PyUnicode_GET_LENGTH(sql);
    static const char execute[] = "execute";
    for (Py_ssize_t i = 0; i + 7 <= n; i++) {
        Py_ssize_t k = 0;
        while (k < 7 && (s[i + k] | 0x20) == execute[k])
            k++;
        if (k == 7)
            return 0;
    }
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    if ((double)now.tv_sec + now.tv_nsec * 1e-9 >= PyFloat_AS_DOUBLE(until))
        return 0;
    PyObject *policy = PyObject_GetAttr(ctx, s_policy);
    if (policy == NULL)
        return -1;
    int valid = policy == PyTuple_GET_ITEM(memo, 1);
    if (valid)
        valid = attr_is(policy, s_version, PyTuple_GET_ITEM(memo, 2), 0);
    Py_DECREF(policy);
    if (valid == 1)
        valid = attr_is(ctx, s_identity_attrs, PyTuple_GET_ITEM(memo, 3), 1);
    if (valid == 1)
        valid = attr_is(ctx, s_identity, PyTuple_GET_ITEM(memo, 4), 0);
    if (valid <= 0)
        return valid;
    PyObject *shape = number_shape(NULL, sql);
    if (shape == NULL)
        return -1;
    PyObject *template = shape == Py_None ? NULL : PyDict_GetItemWithError(shapes, shape);
    Py_DECREF(shape);
    if (template == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if ((*text = statement_text(sql)) == NULL)
        return -1;
    *verdict = Py_NewRef(template);
    return 1;
}

/* Query at buf[pos:end], decided by session.decide: the lane takes a one-statement text its
 * decider allows at once and whose simple-protocol record template exists (_resume_query's
 * common case); anything else is left to the reference, which asks the decider again (its
 * memo answers) */
static int client_query(ClientState *st, const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end, PyObject *out) {
    if (st->decide == Py_None)
        return 0;
    const unsigned char *body = buf + pos + 5;
    Py_ssize_t blen = end - pos - 5;
    if (blen < 1 || body[blen - 1] != 0 || memchr(body, 0, (size_t)(blen - 1)) != NULL)
        return 0;       /* malformed: the reference's protocol error */
    PyObject *sql = PyUnicode_DecodeUTF8((const char *)body, blen - 1, "replace");
    if (sql == NULL)
        return -1;
    int rc = -1;
    PyObject *verdicts = NULL, *verdict = NULL, *allowed = NULL, *box = NULL, *text = NULL, *batch = NULL,
             *now = NULL, *index = NULL, *fields = NULL, *result = NULL, *r;
    int hit = memo_lookup(st, sql, &verdict, &text);
    if (hit == 0) {
        verdicts = PyObject_CallOneArg(st->decide, sql);
        if (verdicts != NULL && PyList_CheckExact(verdicts) && PyList_GET_SIZE(verdicts) == 1)
            verdict = Py_NewRef(PyList_GET_ITEM(verdicts, 0));
    }
    Py_DECREF(sql);
    if (hit < 0 || (hit == 0 && verdicts == NULL))
        goto done;
    if (verdict == NULL) {
        rc = 0;
        goto done;
    }
    if ((allowed = PyObject_GetAttr(verdict, s_allowed)) == NULL || (box = PyObject_GetAttr(verdict, s_simple_record)) == NULL)
        goto done;
    if (allowed != Py_True || !PyList_CheckExact(box) || PyList_GET_SIZE(box) < 1 ||
        !PyDict_CheckExact(PyList_GET_ITEM(box, 0))) {
        rc = 0;     /* a denial, or no template yet: the reference's */
        goto done;
    }
    PyObject *template = PyList_GET_ITEM(box, 0);
    if ((text == NULL && (text = PyObject_GetAttr(verdict, s_text)) == NULL) ||
        (batch = PyLong_FromLongLong(st->batch)) == NULL)
        goto done;
    st->batch += 1;
    st->batch_changed = 1;
    if ((r = PyObject_CallOneArg(st->expect_append, SyncExpect)) == NULL)
        goto done;
    Py_DECREF(r);
    if ((now = PyObject_CallNoArgs(st->clock)) == NULL)
        goto done;
    st->statements += 1;
    if ((index = PyLong_FromLongLong(st->statements)) == NULL || PyDict_SetItem(st->dict, s_statements, index) < 0)
        goto done;
    Py_INCREF(template);     /* copied below; the box is the verdict's */
    fields = PyDict_Copy(template);
    Py_DECREF(template);
    if (fields == NULL || PyDict_SetItem(fields, s_text, text) < 0 ||
        PyDict_SetItem(fields, s_statement_index, index) < 0 || append_event(out, PgStatement, fields) < 0)
        goto done;
    if ((result = new_result(text, now, batch, Py_False, index, Py_None)) == NULL)
        goto done;
    if ((r = PyObject_CallOneArg(st->results_append, result)) == NULL)
        goto done;
    Py_DECREF(r);
    rc = 1;
done:
    Py_XDECREF(verdicts);
    Py_XDECREF(verdict);
    Py_XDECREF(allowed);
    Py_XDECREF(box);
    Py_XDECREF(text);
    Py_XDECREF(batch);
    Py_XDECREF(now);
    Py_XDECREF(index);
    Py_XDECREF(fields);
    Py_XDECREF(result);
    return rc;
}

/* the client lane over buf[pos:n] of the session whose instance dict is `dict`: the position of
 * the first message it leaves to Python, -1 on error */
static Py_ssize_t run_client_lane(PyObject *dict, const unsigned char *buf, Py_ssize_t n, Py_ssize_t pos,
                                  long long limit, PyObject *out) {
    ClientState st = {0};
    st.dict = Py_NewRef(dict);
    PyObject *expect, *results, *v;
    int failed = 0;
    if ((v = dict_item(st.dict, s_statements)) == NULL || (st.statements = PyLong_AsLongLong(v), PyErr_Occurred()) ||
        (v = dict_item(st.dict, s_client_batch)) == NULL || (st.batch = PyLong_AsLongLong(v), PyErr_Occurred()) ||
        (st.statements_map = dict_item(st.dict, s_statements_map)) == NULL ||
        (st.portals = dict_item(st.dict, s_portals)) == NULL || (st.clock = dict_item(st.dict, s_clock)) == NULL ||
        (st.decide = dict_item(st.dict, s_decide)) == NULL ||
        (st.shape_memo = dict_item(st.dict, s_shape_memo)) == NULL ||
        (expect = dict_item(st.dict, s_expect)) == NULL || (results = dict_item(st.dict, s_results)) == NULL) {
        Py_DECREF(st.dict);
        return -1;
    }
    if (!PyDict_CheckExact(st.statements_map) || !PyDict_CheckExact(st.portals)) {
        Py_DECREF(st.dict);
        PyErr_SetString(PyExc_TypeError, "session state of an unexpected type");
        return -1;
    }
    /* held across the Python calls below (the classes' __init__, the clock) */
    Py_INCREF(st.statements_map);
    Py_INCREF(st.portals);
    Py_INCREF(st.clock);
    Py_INCREF(st.decide);
    Py_INCREF(st.shape_memo);
    st.expect_append = PyObject_GetAttr(expect, s_append);
    st.results_append = st.expect_append == NULL ? NULL : PyObject_GetAttr(results, s_append);
    if (st.results_append == NULL) {
        failed = 1;
        goto finish;
    }
    while (n - pos >= 5) {
        int t = buf[pos];
        int32_t length = read_i32(buf + pos + 1);
        if (length < 4 || length > limit)
            break;
        Py_ssize_t end = pos + 1 + (Py_ssize_t)length;
        if (end > n)
            break;
        int rc = 1;
        if (t == 'B') {
            rc = client_bind(&st, buf, pos, end, out);
        } else if (t == 'E') {
            rc = client_execute(&st, buf, pos, end);
        } else if (t == 'Q') {
            rc = client_query(&st, buf, pos, end, out);
        } else if (t == 'S') {
            PyObject *r = PyObject_CallOneArg(st.expect_append, SyncExpect);
            if (r == NULL) {
                rc = -1;
            } else {
                Py_DECREF(r);
                st.batch += 1;
                st.batch_changed = 1;
            }
        } else if (t == 'D') {
            /* a well-formed Describe 'P' passes; Describe 'S' (the reference notes which
             * ParameterDescription answers it) and a malformed one (its protocol error) do not */
            if (end - pos < 7 || buf[pos + 5] != 'P' || buf[end - 1] != 0 ||
                memchr(buf + pos + 6, 0, (size_t)(end - pos - 7)) != NULL)
                rc = 0;
        } else if (!(t == 'H' || t == 'd' || t == 'c' || t == 'f')) {
            rc = 0;     /* Parse, Query, Close, Terminate, FunctionCall, unknown: the reference's */
        }
        if (rc < 0) {
            failed = 1;
            break;
        }
        if (rc == 0)
            break;
        pos = end;
    }
    if (st.batch_changed) {
        PyObject *b = PyLong_FromLongLong(st.batch);
        if (b == NULL || PyDict_SetItem(st.dict, s_client_batch, b) < 0)
            failed = 1;
        Py_XDECREF(b);
    }
finish:
    Py_XDECREF(st.expect_append);
    Py_XDECREF(st.results_append);
    Py_DECREF(st.statements_map);
    Py_DECREF(st.portals);
    Py_DECREF(st.clock);
    Py_DECREF(st.decide);
    Py_DECREF(st.shape_memo);
    Py_DECREF(st.dict);
    return failed ? -1 : pos;
}

/* the lanes build and compare session.py's own objects: used before session.py configured them
 * (a caller that imported the module directly), they would dereference NULL. 0 ok, -1 raised */
static int require_configured(void) {
    if (Ready == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_pglanes is not configured: import enforcer.postgres.session first "
                                            "(it is not, with WARDEN_PURE_PYTHON=1)");
        return -1;
    }
    return 0;
}

static PyObject *client_lane(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (require_configured() < 0)
        return NULL;
    if (nargs != 5 || !PyBytes_CheckExact(args[1]) || !PyList_CheckExact(args[4])) {
        PyErr_SetString(PyExc_TypeError, "client_lane(session, buf: bytes, pos, limit, out: list)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[2]);
    long long limit = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *dict = session_dict(args[0]);
    if (dict == NULL)
        return NULL;
    pos = run_client_lane(dict, (const unsigned char *)PyBytes_AS_STRING(args[1]), PyBytes_GET_SIZE(args[1]), pos,
                          limit, args[4]);
    Py_DECREF(dict);
    return pos < 0 ? NULL : PyLong_FromSsize_t(pos);
}

/* ---- server -------------------------------------------------------------------------------- */

/* old + delta (a new reference), NULL on error */
static PyObject *plus(PyObject *old, long long delta) {
    PyObject *d = PyLong_FromLongLong(delta);
    PyObject *sum = d == NULL ? NULL : PyNumber_Add(old, d);
    Py_XDECREF(d);
    return sum;
}

static int add_to_attr(PyObject *obj, PyObject *name, long long delta) {
    PyObject *old = PyObject_GetAttr(obj, name);
    if (old == NULL)
        return -1;
    PyObject *sum = plus(old, delta);
    Py_DECREF(old);
    int rc = sum == NULL ? -1 : PyObject_SetAttr(obj, name, sum);
    Py_XDECREF(sum);
    return rc;
}

/* rows_from_tag for an ASCII tag: the number after the last space; 0 when there is none.
 * -2: a number too long for this code (the reference's int() decides) */
static long long rows_from_ascii_tag(const unsigned char *tag, Py_ssize_t len) {
    Py_ssize_t s = len;
    while (s > 0 && tag[s - 1] != ' ')
        s--;
    Py_ssize_t digits = len - s;
    if (digits == 0)
        return 0;
    if (digits > 18)
        return -2;
    long long v = 0;
    for (Py_ssize_t k = s; k < len; k++) {
        if (tag[k] < '0' || tag[k] > '9')
            return 0;
        v = v * 10 + (tag[k] - '0');
    }
    return v;
}

/* _emit_result(out, r, tag, error, None) of a session without masking; `tag_rows` is the tag's
 * row count (used when no DataRow was counted) */
static int emit_result(PyObject *out, PyObject *clock, PyObject *r, PyObject *tag, long long tag_rows,
                       PyObject *error) {
    int rc = -1;
    PyObject *rows = NULL, *nbytes = NULL, *start = NULL, *now = NULL, *duration = NULL, *index = NULL,
             *fields = NULL;
    if ((rows = PyObject_GetAttr(r, s_rows)) == NULL)
        goto done;
    if (tag != Py_None && PyUnicode_GET_LENGTH(tag)) {
        int truth = PyObject_IsTrue(rows);
        if (truth < 0)
            goto done;
        if (!truth) {
            Py_SETREF(rows, PyLong_FromLongLong(tag_rows));
            if (rows == NULL)
                goto done;
        }
    }
    if ((nbytes = PyObject_GetAttr(r, s_nbytes)) == NULL || (start = PyObject_GetAttr(r, s_start_ns)) == NULL)
        goto done;
    if ((now = PyObject_CallNoArgs(clock)) == NULL || (duration = PyNumber_Subtract(now, start)) == NULL)
        goto done;
    if ((fields = PyDict_New()) == NULL)
        goto done;
    if (PyDict_SetItem(fields, s_command_tag, tag) < 0 || PyDict_SetItem(fields, s_rows, rows) < 0 ||
        PyDict_SetItem(fields, s_bytes, nbytes) < 0 || PyDict_SetItem(fields, s_duration_ns, duration) < 0 ||
        PyDict_SetItem(fields, s_sqlstate, Py_None) < 0 || PyDict_SetItem(fields, s_error, error) < 0)
        goto done;
    if ((index = PyObject_GetAttr(r, s_index)) == NULL)
        goto done;
    if (index != Py_None && PyDict_SetItem(fields, s_statement_index, index) < 0)
        goto done;
    if (append_event(out, PgResult, fields) < 0)
        goto done;
    rc = 0;
done:
    Py_XDECREF(rows);
    Py_XDECREF(nbytes);
    Py_XDECREF(start);
    Py_XDECREF(now);
    Py_XDECREF(duration);
    Py_XDECREF(index);
    Py_XDECREF(fields);
    return rc;
}

static PyObject *call_method0(PyObject *obj, PyObject *name) {
    return PyObject_CallMethodNoArgs(obj, name);
}

/* the first result still expected (borrowed from the deque), NULL without an exception when none */
static PyObject *first(PyObject *deque) {
    Py_ssize_t len = PyObject_Length(deque);
    if (len <= 0)
        return NULL;
    PyObject *item = PySequence_GetItem(deque, 0);
    if (item == NULL)
        return NULL;
    Py_DECREF(item);      /* the deque still holds it */
    return item;
}

/* the server lane over buf[pos:n]; as run_client_lane */
static Py_ssize_t run_server_lane(PyObject *dict, const unsigned char *buf, Py_ssize_t n, Py_ssize_t pos,
                                  PyObject *out) {
    PyObject *results = dict_item(dict, s_results), *expect = results ? dict_item(dict, s_expect) : NULL;
    PyObject *clock = expect ? dict_item(dict, s_clock) : NULL;
    if (clock == NULL)
        return -1;
    Py_INCREF(results);
    Py_INCREF(expect);
    Py_INCREF(clock);
    int failed = 0;
    while (n - pos >= 5) {
        int t = buf[pos];
        int32_t length = read_i32(buf + pos + 1);
        if (length < 4 || (long long)length > (1LL << 30) + 1024)
            break;
        Py_ssize_t end = pos + 1 + (Py_ssize_t)length;
        if (end > n)
            break;
        if (t == 'D' || t == 'd') {
            /* the run of DataRows (CopyData) is counted and stays in the forwarded slice */
            long long rows = 0, nbytes = 0;
            Py_ssize_t stop = pos;
            while (n - stop >= 5 && buf[stop] == t) {
                int32_t ln = read_i32(buf + stop + 1);
                if (ln < 4 || stop + 1 + (Py_ssize_t)ln > n)
                    break;
                rows += 1;
                nbytes += ln;
                stop += 1 + (Py_ssize_t)ln;
            }
            PyObject *r = first(results);
            if (r == NULL && PyErr_Occurred()) {
                failed = 1;
                break;
            }
            if (r != NULL && ((t == 'D' && add_to_attr(r, s_rows, rows) < 0) || add_to_attr(r, s_nbytes, nbytes) < 0)) {
                failed = 1;
                break;
            }
            pos = stop;
            continue;
        }
        if (t == 'C' || t == 'I' || t == 's') {
            PyObject *r = first(results);
            if (r == NULL && PyErr_Occurred()) {
                failed = 1;
                break;
            }
            if (r != NULL) {
                PyObject *refusal = PyObject_GetAttr(r, s_refusal);
                if (refusal == NULL) {
                    failed = 1;
                    break;
                }
                Py_DECREF(refusal);
                if (refusal != Py_None)
                    break;
                PyObject *tag;
                long long tag_rows = 0;
                if (t == 'C') {
                    /* one NUL-terminated ASCII string filling the body; anything else is the reference's */
                    const unsigned char *body = buf + pos + 5;
                    Py_ssize_t blen = end - pos - 5;
                    if (blen < 1 || body[blen - 1] != 0 || memchr(body, 0, (size_t)(blen - 1)) != NULL)
                        break;
                    int ascii = 1;
                    for (Py_ssize_t k = 0; k < blen - 1; k++)
                        if (body[k] >= 128) {
                            ascii = 0;
                            break;
                        }
                    if (!ascii)
                        break;
                    tag_rows = rows_from_ascii_tag(body, blen - 1);
                    if (tag_rows == -2)
                        break;
                    tag = PyUnicode_DecodeASCII((const char *)body, blen - 1, NULL);
                } else {
                    tag = Py_NewRef(t == 'I' ? EmptyTag : PortalSuspendedTag);
                }
                if (tag == NULL) {
                    failed = 1;
                    break;
                }
                PyObject *popped = call_method0(results, s_popleft);
                int rc = popped == NULL ? -1 : emit_result(out, clock, popped, tag, tag_rows, Py_None);
                Py_XDECREF(popped);
                Py_DECREF(tag);
                if (rc < 0) {
                    failed = 1;
                    break;
                }
            }
        } else if (t == 'Z') {
            PyObject *status = length == 5 ? PyUnicode_FromOrdinal(buf[pos + 5]) : PyUnicode_FromString("?");
            if (status == NULL || PyDict_SetItem(dict, s_transaction_status, status) < 0) {
                Py_XDECREF(status);
                failed = 1;
                break;
            }
            Py_DECREF(status);
            PyObject *sb = dict_item(dict, s_server_batch);
            PyObject *one = sb == NULL ? NULL : PyLong_FromLong(1);
            PyObject *next = one == NULL ? NULL : PyNumber_Add(sb, one);
            Py_XDECREF(one);
            if (next == NULL || PyDict_SetItem(dict, s_server_batch, next) < 0) {
                Py_XDECREF(next);
                failed = 1;
                break;
            }
            while (PyObject_Length(expect) > 0) {
                PyObject *e = call_method0(expect, s_popleft);
                if (e == NULL) {
                    failed = 1;
                    break;
                }
                PyObject *head = PySequence_GetItem(e, 0);
                Py_DECREF(e);
                if (head == NULL) {
                    failed = 1;
                    break;
                }
                int is_z = PyLong_CheckExact(head) && PyLong_AsLong(head) == 'Z';
                Py_DECREF(head);
                if (is_z)
                    break;
            }
            /* statements of this batch skipped after an error never produce a result */
            while (!failed) {
                PyObject *r = first(results);
                if (r == NULL) {
                    failed = PyErr_Occurred() != NULL;
                    break;
                }
                PyObject *batch = PyObject_GetAttr(r, s_batch);
                int older = batch == NULL ? -1 : PyObject_RichCompareBool(batch, next, Py_LT);
                Py_XDECREF(batch);
                if (older < 0) {
                    failed = 1;
                    break;
                }
                if (!older)
                    break;
                PyObject *popped = call_method0(results, s_popleft);
                if (popped == NULL || emit_result(out, clock, popped, Py_None, 0, NotExecuted) < 0)
                    failed = 1;
                Py_XDECREF(popped);
            }
            Py_DECREF(next);
            if (failed)
                break;
        } else if (t == '1' || t == '2') {
            PyObject *e = first(expect);
            if (e == NULL && PyErr_Occurred()) {
                failed = 1;
                break;
            }
            if (e != NULL) {
                if (!PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) < 2)
                    break;
                PyObject *head = PyTuple_GET_ITEM(e, 0);
                if (PyLong_CheckExact(head) && PyLong_AsLong(head) == t) {
                    int injected = PyObject_IsTrue(PyTuple_GET_ITEM(e, 1));
                    if (injected < 0) {
                        failed = 1;
                        break;
                    }
                    if (injected)
                        break;     /* a reply to our own message: the reference swallows it */
                    PyObject *popped = call_method0(expect, s_popleft);
                    if (popped == NULL) {
                        failed = 1;
                        break;
                    }
                    Py_DECREF(popped);
                }
            }
        } else if (t == 'E' || t == 'K' || t == 'R' || t == 't' || t == 'V') {
            break;      /* errors, keys, authentication, parameter types, fast-path results: the reference's */
        }
        /* anything else (RowDescription, NoData, notices, ParameterStatus, notifications, copy
         * responses) passes unchanged with nothing to note when nothing is masked */
        pos = end;
    }
    Py_DECREF(results);
    Py_DECREF(expect);
    Py_DECREF(clock);
    return failed ? -1 : pos;
}

static PyObject *server_lane(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (require_configured() < 0)
        return NULL;
    if (nargs != 4 || !PyBytes_CheckExact(args[1]) || !PyList_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "server_lane(session, buf: bytes, pos, out: list)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[2]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    PyObject *dict = session_dict(args[0]);
    if (dict == NULL)
        return NULL;
    pos = run_server_lane(dict, (const unsigned char *)PyBytes_AS_STRING(args[1]), PyBytes_GET_SIZE(args[1]), pos,
                          args[3]);
    Py_DECREF(dict);
    return pos < 0 ? NULL : PyLong_FromSsize_t(pos);
}

/* ---- whole reads ----------------------------------------------------------------------------- */

/* 1 when the session's `key` holds `want` (identical, or an equal str), 0 when not, -1 on error */
static int holds(PyObject *dict, PyObject *key, PyObject *want) {
    PyObject *v = PyDict_GetItemWithError(dict, key);
    if (v == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (v == want)
        return 1;
    if (PyUnicode_CheckExact(v) && PyUnicode_CheckExact(want))
        return PyUnicode_Compare(v, want) == 0;
    return 0;
}

/* 1 when the session's `key` holds an empty bytes object */
static int holds_empty_bytes(PyObject *dict, PyObject *key) {
    PyObject *v = PyDict_GetItemWithError(dict, key);
    return v != NULL && PyBytes_CheckExact(v) && PyBytes_GET_SIZE(v) == 0;
}

/* add_to_attr on the session's instance dict, which the whole-read functions already hold */
static int add_to_item(PyObject *dict, PyObject *key, Py_ssize_t delta) {
    PyObject *old = dict_item(dict, key);
    PyObject *sum = old == NULL ? NULL : plus(old, delta);
    int rc = sum == NULL ? -1 : PyDict_SetItem(dict, key, sum);
    Py_XDECREF(sum);
    return rc;
}

static int append_write(PyObject *out, PyObject *kind, PyObject *data) {
    PyObject *action = PyTuple_Pack(2, kind, data);
    if (action == NULL)
        return -1;
    int rc = PyList_Append(out, action);
    Py_DECREF(action);
    return rc;
}

/* The session's instance dict (a new reference) when `data` is a non-empty bytes read and the
 * session is in the steady state a lane starts on: each keys[i] holds wants[i] and `empty_key`
 * holds empty bytes. Otherwise NULL, with *steady 0 (nothing was changed) or -1 (an exception). */
static PyObject *steady_session(PyObject *session, PyObject *data, PyObject *const keys[], PyObject *const wants[],
                                int n, PyObject *empty_key, int *steady) {
    *steady = 0;
    if (!PyBytes_CheckExact(data) || PyBytes_GET_SIZE(data) == 0)
        return NULL;
    PyObject *dict = session_dict(session);
    if (dict == NULL) {
        *steady = -1;
        return NULL;
    }
    int ok = 1;
    for (int i = 0; i < n && ok > 0; i++)
        ok = holds(dict, keys[i], wants[i]);
    if (ok > 0)
        ok = holds_empty_bytes(dict, empty_key);
    if (ok <= 0) {
        Py_DECREF(dict);
        *steady = ok;
        return NULL;
    }
    *steady = 1;
    return dict;
}

/* feed_client(session, data) -> actions, or None when the read is not one the lane starts on
 * (then nothing was changed): a ready session without masking, nothing buffered, held or
 * discarded. Messages the lane leaves are handed to session._process_messages. */
static PyObject *client_feed(PyObject *session, PyObject *data) {
    PyObject *const keys[] = {s_phase, s_masking, s_pending, s_cbig, s_discard_until_sync};
    PyObject *const wants[] = {Ready, Py_None, Py_None, Py_None, Py_False};
    int steady;
    PyObject *dict = steady_session(session, data, keys, wants, 5, s_cbuf, &steady);
    if (dict == NULL)
        return steady < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *out = NULL, *result = NULL;
    PyObject *limit_obj = dict_item(dict, s_max_message_bytes);
    long long limit = limit_obj == NULL ? -1 : PyLong_AsLongLong(limit_obj);
    if (limit_obj == NULL || PyErr_Occurred())
        goto done;
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (add_to_item(dict, s_bytes_in, n) < 0 || (out = PyList_New(0)) == NULL)
        goto done;
    Py_ssize_t pos = run_client_lane(dict, (const unsigned char *)PyBytes_AS_STRING(data), n, 0, limit, out);
    if (pos < 0)
        goto done;
    if (pos == n) {
        if (append_write(out, ToServer, data) < 0)
            goto done;
    } else {
        /* the rest is the Python loop's, from where the lane stopped */
        if (PyDict_SetItem(dict, s_cbuf, data) < 0)
            goto done;
        PyObject *start = PyLong_FromSsize_t(pos);
        PyObject *r = start == NULL ? NULL : PyObject_CallMethodObjArgs(session, s_process_messages, out, start, NULL);
        Py_XDECREF(start);
        if (r == NULL)
            goto done;
        Py_DECREF(r);
    }
    result = Py_NewRef(out);
done:
    Py_XDECREF(out);
    Py_DECREF(dict);
    return result;
}

static PyObject *feed_client(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (require_configured() < 0)
        return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "feed_client(session, data)");
        return NULL;
    }
    return client_feed(args[0], args[1]);
}

/* feed_server(session, data) -> actions, or None as feed_client; what the lane leaves goes to
 * session._server_from */
static PyObject *server_feed(PyObject *session, PyObject *data) {
    PyObject *const keys[] = {s_phase, s_masking, s_withhold, s_sbig};
    PyObject *const wants[] = {Ready, Py_None, Py_False, Py_None};
    int steady;
    PyObject *dict = steady_session(session, data, keys, wants, 4, s_sbuf, &steady);
    if (dict == NULL)
        return steady < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *out = NULL, *result = NULL;
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if ((out = PyList_New(0)) == NULL)
        goto done;
    Py_ssize_t pos = run_server_lane(dict, (const unsigned char *)PyBytes_AS_STRING(data), n, 0, out);
    if (pos < 0)
        goto done;
    if (pos == n) {
        if (append_write(out, ToClient, data) < 0 || add_to_item(dict, s_bytes_out, n) < 0)
            goto done;
        result = Py_NewRef(out);
    } else {
        PyObject *start = PyLong_FromSsize_t(pos);
        result = start == NULL ? NULL : PyObject_CallMethodObjArgs(session, s_server_from, data, out, start, NULL);
        Py_XDECREF(start);
    }
done:
    Py_XDECREF(out);
    Py_DECREF(dict);
    return result;
}

static PyObject *feed_server(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (require_configured() < 0)
        return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "feed_server(session, data)");
        return NULL;
    }
    return server_feed(args[0], args[1]);
}

/* ---- the shell's steady state ---------------------------------------------------------------- */

static PyObject *s_write, *s_writelines, *s_is_closing;

/* the bytes of `count` write actions of `kind` in `actions` to `transport`, in one call, unless
 * it is closing (proxy._Connection._write for one leg) */
static int write_leg(PyObject *actions, Py_ssize_t n, PyObject *kind, Py_ssize_t count, PyObject *transport) {
    if (count == 0)
        return 0;
    PyObject *closing = PyObject_CallMethodNoArgs(transport, s_is_closing);
    if (closing == NULL)
        return -1;
    int is_closing = PyObject_IsTrue(closing);
    Py_DECREF(closing);
    if (is_closing)
        return is_closing < 0 ? -1 : 0;
    PyObject *r;
    if (count == 1) {
        PyObject *data = NULL;
        for (Py_ssize_t i = 0; i < n && data == NULL; i++) {
            PyObject *a = PyList_GET_ITEM(actions, i);
            if (PyTuple_GET_ITEM(a, 0) == kind)
                data = PyTuple_GET_ITEM(a, 1);
        }
        r = PyObject_CallMethodOneArg(transport, s_write, data);
    } else {
        PyObject *parts = PyList_New(0);
        if (parts == NULL)
            return -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *a = PyList_GET_ITEM(actions, i);
            if (PyTuple_GET_ITEM(a, 0) == kind && PyList_Append(parts, PyTuple_GET_ITEM(a, 1)) < 0) {
                Py_DECREF(parts);
                return -1;
            }
        }
        r = PyObject_CallMethodOneArg(transport, s_writelines, parts);
        Py_DECREF(parts);
    }
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* apply_steady(emit, server_transport, client_transport, actions) -> bool: proxy._Connection._apply
 * for a list of only EVENT, TO_SERVER and TO_CLIENT actions: every event recorded in order
 * (emit(type, fields); an exception stops here, before any write, as there), then each leg's bytes
 * written with one call. False, with nothing done, for any other list. */
/* 1 applied, 0 not such a list (nothing done), -1 error */
static int steady_apply(PyObject *emit, PyObject *server_transport, PyObject *client_transport, PyObject *actions) {
    Py_ssize_t n = PyList_GET_SIZE(actions), to_server = 0, to_client = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *a = PyList_GET_ITEM(actions, i);
        if (!PyTuple_CheckExact(a) || PyTuple_GET_SIZE(a) != 2)
            return 0;
        PyObject *kind = PyTuple_GET_ITEM(a, 0);
        if (kind == ToServer)
            to_server++;
        else if (kind == ToClient)
            to_client++;
        else if (kind != EventKind)
            return 0;
        else {
            PyObject *payload = PyTuple_GET_ITEM(a, 1);
            if (!PyTuple_CheckExact(payload) || PyTuple_GET_SIZE(payload) != 2)
                return 0;
        }
    }
    Py_INCREF(actions);     /* emit runs Python code */
    int failed = 0;
    for (Py_ssize_t i = 0; i < n && !failed; i++) {
        PyObject *a = PyList_GET_ITEM(actions, i);
        if (PyTuple_GET_ITEM(a, 0) != EventKind)
            continue;
        PyObject *payload = PyTuple_GET_ITEM(a, 1);
        PyObject *r = PyObject_Vectorcall(emit, &PyTuple_GET_ITEM(payload, 0), 2, NULL);
        if (r == NULL)
            failed = 1;
        Py_XDECREF(r);
    }
    if (!failed && (write_leg(actions, n, ToServer, to_server, server_transport) < 0 ||
                    write_leg(actions, n, ToClient, to_client, client_transport) < 0))
        failed = 1;
    Py_DECREF(actions);
    return failed ? -1 : 1;
}

static PyObject *apply_steady(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (require_configured() < 0)
        return NULL;
    if (nargs != 4 || !PyList_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "apply_steady(emit, server_transport, client_transport, actions: list)");
        return NULL;
    }
    int applied = steady_apply(args[0], args[1], args[2], args[3]);
    if (applied < 0)
        return NULL;
    return PyBool_FromLong(applied);
}

/* ---- Reader: a leg's data_received after the hand-over ------------------------------------------
 * Reader(session, client, done, emit, server_transport, client_transport, handler, rest, fail) is
 * called with each read of one leg and does what proxy._Connection._on_client_data (client true)
 * or _on_server_data does, without their Python frames for the reads of a steady session:
 *   done.done() (the connection has finished): the read is dropped;
 *   feed_client / feed_server gives None: handler(data), the Python handler, does the whole read;
 *   actions (the read is one more of `reads`): apply_steady; applied (and, client leg,
 *   session.terminated false): done; else rest(actions, applied) ends the read in Python;
 *   an Exception from the feed or the apply: fail(exception), as the handler's own except does. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *session, *done, *emit, *server_transport, *client_transport, *handler, *rest, *fail;
    int client;
    long long reads;
} Reader;

static PyObject *s_done, *s_terminated;

/* an Exception is the connection's (fail), anything else propagates */
static PyObject *reader_failed(Reader *self) {
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return NULL;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL)
        PyException_SetTraceback(value, tb);
    PyObject *r = PyObject_CallOneArg(self->fail, value);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return r;
}

static PyObject *Reader_vectorcall(Reader *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "Reader(data)");
        return NULL;
    }
    PyObject *data = args[0];
    PyObject *finished = PyObject_CallMethodNoArgs(self->done, s_done);
    if (finished == NULL)
        return NULL;
    int is_finished = PyObject_IsTrue(finished);
    Py_DECREF(finished);
    if (is_finished)
        return is_finished < 0 ? NULL : Py_NewRef(Py_None);
    if (!PyBytes_CheckExact(data))
        return PyObject_CallOneArg(self->handler, data);
    PyObject *actions = self->client ? client_feed(self->session, data) : server_feed(self->session, data);
    if (actions == Py_None) {
        Py_DECREF(actions);
        return PyObject_CallOneArg(self->handler, data);
    }
    self->reads++;
    if (actions == NULL)
        return reader_failed(self);
    int applied = steady_apply(self->emit, self->server_transport, self->client_transport, actions);
    if (applied < 0) {
        Py_DECREF(actions);
        return reader_failed(self);
    }
    int terminated = 0;
    if (applied && self->client) {
        PyObject *t = PyObject_GetAttr(self->session, s_terminated);
        terminated = t == NULL ? -1 : PyObject_IsTrue(t);
        Py_XDECREF(t);
        if (terminated < 0) {
            Py_DECREF(actions);
            return reader_failed(self);
        }
    }
    PyObject *r;
    if (applied && !terminated) {
        r = Py_NewRef(Py_None);
    } else {
        PyObject *call[2] = {actions, applied ? Py_True : Py_False};
        r = PyObject_Vectorcall(self->rest, call, 2, NULL);
    }
    Py_DECREF(actions);
    return r;
}

static PyObject *Reader_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    if (require_configured() < 0)
        return NULL;
    PyObject *session, *done, *emit, *server_transport, *client_transport, *handler, *rest, *fail;
    int client;
    if (!PyArg_ParseTuple(args, "OpOOOOOOO:Reader", &session, &client, &done, &emit, &server_transport,
                          &client_transport, &handler, &rest, &fail))
        return NULL;
    Reader *self = (Reader *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->session = Py_NewRef(session);
    self->done = Py_NewRef(done);
    self->emit = Py_NewRef(emit);
    self->server_transport = Py_NewRef(server_transport);
    self->client_transport = Py_NewRef(client_transport);
    self->handler = Py_NewRef(handler);
    self->rest = Py_NewRef(rest);
    self->fail = Py_NewRef(fail);
    self->client = client;
    self->vectorcall = (vectorcallfunc)Reader_vectorcall;
    return (PyObject *)self;
}

static int Reader_traverse(Reader *self, visitproc visit, void *arg) {
    Py_VISIT(self->session);
    Py_VISIT(self->done);
    Py_VISIT(self->emit);
    Py_VISIT(self->server_transport);
    Py_VISIT(self->client_transport);
    Py_VISIT(self->handler);
    Py_VISIT(self->rest);
    Py_VISIT(self->fail);
    return 0;
}

static int Reader_clear(Reader *self) {
    Py_CLEAR(self->session);
    Py_CLEAR(self->done);
    Py_CLEAR(self->emit);
    Py_CLEAR(self->server_transport);
    Py_CLEAR(self->client_transport);
    Py_CLEAR(self->handler);
    Py_CLEAR(self->rest);
    Py_CLEAR(self->fail);
    return 0;
}

static void Reader_dealloc(Reader *self) {
    PyObject_GC_UnTrack(self);
    Reader_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Reader_get_reads(Reader *self, void *unused) {
    return PyLong_FromLongLong(self->reads);
}

static PyGetSetDef Reader_getset[] = {
    {"reads", (getter)Reader_get_reads, NULL, "reads fed here (the Python handler counts those handed to it)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "enforcer.postgres._pglanes.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Reader(session, client, done, emit, server_transport, client_transport, handler, rest, fail)(data): "
              "a leg's data_received after the hand-over.",
    .tp_new = Reader_new,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_traverse = (traverseproc)Reader_traverse,
    .tp_clear = (inquiry)Reader_clear,
    .tp_vectorcall_offset = offsetof(Reader, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_getset = Reader_getset,
};

/* ---- statement shapes ------------------------------------------------------------------------ */

static inline int is_digit(int c) { return c >= '0' && c <= '9'; }
static inline int is_word(int c) { return is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }

/* number_shape(sql) -> sqlclass.statement_shape(sql) for a text its regex path takes with no
 * quote character (every number literal replaced by the constant mark, "F" in front), or None
 * for any other text (non-ASCII, quotes, comments, backslashes, named dollar quotes, NUL, the
 * mark itself): sqlclass then shapes it in Python. The number rule is sqlclass._NUMBER:
 * (?<![\w$.])(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![\w.]) with ASCII classes. Shorter
 * matches than the longest one all end before a digit, '.', 'e' or 'E', which the lookahead
 * refuses, so the longest one decides. */
static PyObject *number_shape(PyObject *module, PyObject *sql) {
    if (!PyUnicode_CheckExact(sql) || !PyUnicode_IS_ASCII(sql))
        Py_RETURN_NONE;
    const unsigned char *s = PyUnicode_1BYTE_DATA(sql);
    Py_ssize_t n = PyUnicode_GET_LENGTH(sql);
    for (Py_ssize_t i = 0; i < n; i++) {
        int c = s[i];
        if (c == '\'' || c == '"' || c == '\\' || c == 0 || c == 1 ||
            (c == '-' && i + 1 < n && s[i + 1] == '-') || (c == '/' && i + 1 < n && s[i + 1] == '*') ||
            (c == '$' && !(i + 1 < n && is_digit(s[i + 1]))))
            Py_RETURN_NONE;
    }
    PyObject *out = PyUnicode_New(n + 1, 127);
    if (out == NULL)
        return NULL;
    Py_UCS1 *o = PyUnicode_1BYTE_DATA(out);
    Py_ssize_t len = 0, i = 0;
    o[len++] = 'F';
    while (i < n) {
        int c = s[i];
        int starts = is_digit(c) || (c == '.' && i + 1 < n && is_digit(s[i + 1]));
        if (starts && i > 0) {
            int b = s[i - 1];
            starts = !(is_word(b) || b == '$' || b == '.');
        }
        if (starts) {
            Py_ssize_t j = i + 1;
            while (j < n && is_digit(s[j]))
                j++;
            if (is_digit(c) && j < n && s[j] == '.') {
                j++;
                while (j < n && is_digit(s[j]))
                    j++;
            }
            if (j < n && (s[j] == 'e' || s[j] == 'E')) {
                Py_ssize_t k = j + 1;
                if (k < n && (s[k] == '+' || s[k] == '-'))
                    k++;
                if (k < n && is_digit(s[k])) {
                    while (k < n && is_digit(s[k]))
                        k++;
                    j = k;
                }
            }
            if (j == n || !(is_word(s[j]) || s[j] == '.')) {
                o[len++] = 1;
                i = j;
                continue;
            }
        }
        o[len++] = (Py_UCS1)c;
        i++;
    }
    if (len == n + 1)
        return out;
    PyObject *shaped = PyUnicode_Substring(out, 0, len);
    Py_DECREF(out);
    return shaped;
}

/* ---- module -------------------------------------------------------------------------------- */

static PyObject *configure(PyObject *module, PyObject *args) {
    PyObject *portal, *result, *bind_expect, *sync_expect, *event_kind, *not_executed, *to_server, *to_client,
        *ready, *binary_value_text;
    if (!PyArg_ParseTuple(args, "OOO!O!OUOOUO", &portal, &result, &PyTuple_Type, &bind_expect, &PyTuple_Type,
                          &sync_expect, &event_kind, &not_executed, &to_server, &to_client, &ready,
                          &binary_value_text))
        return NULL;
    /* the lanes set _Result's and _Portal's slots themselves: the classes must have exactly those */
    /* offsets are taken only with the classes they belong to: a refused call changes nothing */
    Py_ssize_t result_offsets[N_RESULT_SLOTS], portal_offsets[N_PORTAL_SLOTS];
    if (check_slots(result, RESULT_SLOTS, N_RESULT_SLOTS, result_slot_names, result_offsets) < 0 ||
        check_slots(portal, PORTAL_SLOTS, N_PORTAL_SLOTS, portal_slot_names, portal_offsets) < 0)
        return NULL;
    memcpy(result_slot_offsets, result_offsets, sizeof result_offsets);
    memcpy(portal_slot_offsets, portal_offsets, sizeof portal_offsets);
    Py_XSETREF(BinaryValueText, Py_NewRef(binary_value_text));
    Py_XSETREF(Portal, Py_NewRef(portal));
    Py_XSETREF(Result, Py_NewRef(result));
    Py_XSETREF(BindExpect, Py_NewRef(bind_expect));
    Py_XSETREF(SyncExpect, Py_NewRef(sync_expect));
    Py_XSETREF(EventKind, Py_NewRef(event_kind));
    Py_XSETREF(NotExecuted, Py_NewRef(not_executed));
    Py_XSETREF(ToServer, Py_NewRef(to_server));
    Py_XSETREF(ToClient, Py_NewRef(to_client));
    Py_XSETREF(Ready, Py_NewRef(ready));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(Portal, Result, bind_expect, sync_expect, EVENT, not_executed_message, TO_SERVER, TO_CLIENT, READY, "
     "binary_value_text)"},
    {"number_shape", number_shape, METH_O,
     "number_shape(sql) -> sqlclass.statement_shape(sql) for a quote-free ASCII text, else None"},
    {"apply_steady", (PyCFunction)(void (*)(void))apply_steady, METH_FASTCALL,
     "apply_steady(emit, server_transport, client_transport, actions) -> bool: the shell's steady state"},
    {"feed_client", (PyCFunction)(void (*)(void))feed_client, METH_FASTCALL,
     "feed_client(session, data) -> actions, or None when the read is not one the lane starts on"},
    {"feed_server", (PyCFunction)(void (*)(void))feed_server, METH_FASTCALL,
     "feed_server(session, data) -> actions, or None when the read is not one the lane starts on"},
    {"client_lane", (PyCFunction)(void (*)(void))client_lane, METH_FASTCALL,
     "client_lane(session, buf, pos, limit, out) -> position of the first message left to Python"},
    {"server_lane", (PyCFunction)(void (*)(void))server_lane, METH_FASTCALL,
     "server_lane(session, buf, pos, out) -> position of the first message left to Python"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_pglanes", "Steady-state Postgres message loops (see session.py).", -1, methods,
};

#define INTERN(var, text)                                  \
    do {                                                   \
        if ((var = PyUnicode_InternFromString(text)) == NULL) \
            return NULL;                                   \
    } while (0)

PyMODINIT_FUNC PyInit__pglanes(void) {
    INTERN(s_statements, "statements");
    INTERN(s_param_types, "param_types");
    INTERN(s_client_batch, "_client_batch");
    INTERN(s_server_batch, "_server_batch");
    INTERN(s_statements_map, "_statements");
    INTERN(s_portals, "_portals");
    INTERN(s_unnamed_portal, "_unnamed_portal");
    INTERN(s_expect, "_expect");
    INTERN(s_results, "_results");
    INTERN(s_clock, "clock");
    INTERN(s_record, "record");
    INTERN(s_text, "text");
    INTERN(s_statement, "statement");
    INTERN(s_index, "index");
    INTERN(s_rows, "rows");
    INTERN(s_nbytes, "nbytes");
    INTERN(s_start_ns, "start_ns");
    INTERN(s_batch, "batch");
    INTERN(s_refusal, "refusal");
    INTERN(s_transaction_status, "transaction_status");
    INTERN(s_append, "append");
    INTERN(s_popleft, "popleft");
    INTERN(s_params, "params");
    INTERN(s_statement_index, "statement_index");
    INTERN(s_portal, "portal");
    INTERN(s_command_tag, "command_tag");
    INTERN(s_bytes, "bytes");
    INTERN(s_duration_ns, "duration_ns");
    INTERN(s_sqlstate, "sqlstate");
    INTERN(s_error, "error");
    INTERN(s_phase, "phase");
    INTERN(s_masking, "masking");
    INTERN(s_pending, "_pending");
    INTERN(s_cbig, "_cbig");
    INTERN(s_cbuf, "_cbuf");
    INTERN(s_sbig, "_sbig");
    INTERN(s_sbuf, "_sbuf");
    INTERN(s_discard_until_sync, "_discard_until_sync");
    INTERN(s_withhold, "_withhold");
    INTERN(s_max_message_bytes, "max_message_bytes");
    INTERN(s_bytes_in, "bytes_in");
    INTERN(s_bytes_out, "bytes_out");
    INTERN(s_process_messages, "_process_messages");
    INTERN(s_server_from, "_server_from");
    INTERN(s_decide, "decide");
    INTERN(s_shape_memo, "shape_memo");
    INTERN(s_policy, "policy");
    INTERN(s_version, "version");
    INTERN(s_identity, "identity");
    INTERN(s_identity_attrs, "identity_attrs");
    INTERN(s_write, "write");
    INTERN(s_writelines, "writelines");
    INTERN(s_is_closing, "is_closing");
    INTERN(s_allowed, "allowed");
    INTERN(s_simple_record, "simple_record");
    INTERN(PgStatement, "pg.statement");
    INTERN(PgResult, "pg.result");
    INTERN(PortalSuspendedTag, "PORTAL SUSPENDED");
    INTERN(EmptyTag, "");
    INTERN(s_done, "done");
    INTERN(s_terminated, "_terminated");     /* behind the terminated property: no frame */
    if (PyType_Ready(&ReaderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ReaderType);
    if (PyModule_AddObject(m, "Reader", (PyObject *)&ReaderType) < 0) {
        Py_DECREF(&ReaderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
