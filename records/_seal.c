/* Native sealing of events: the same bytes as records/codec.py, about ten times faster.
 *
 * encode_fields(fields)  -> canonical msgpack of a field map (records.codec.encode_fields)
 * seal(head, fields, seq, sid, ts, type, version, prev)
 *     -> (encoded fields, 8-byte content tag, 32-byte event hash)
 *        where encoding = head || encoded fields || tail(seq, sid, ts, type, version),
 *        tag = SHA-256(encoding)[:8] and hash = SHA-256(encoding || prev).
 *
 * Canonical msgpack: maps with their (str) keys sorted by code point at every depth,
 * integers in their smallest form, floats as float64, str as str (str8 allowed), bytes
 * as bin. The pure-Python encoder is the reference; tests compare the two byte for byte.
 * Errors are raised as the types msgpack raises (TypeError, ValueError, OverflowError),
 * which the callers already turn into EncodingError. */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_SUPPRESS_DEPRECATED
#include <Python.h>
#include <openssl/sha.h>
#include <string.h>
#include <time.h>

static PyObject *EncodingErrorType;    /* records.codec.EncodingError, registered at import */

#define MAX_DEPTH 64            /* as records.codec.MAX_DEPTH: deeper input is refused by both */
#define STACK_BYTES 1024

typedef struct {
    char *data;
    Py_ssize_t len, cap;
    char stack[STACK_BYTES];
} Buf;

static void buf_init(Buf *b) { b->data = b->stack; b->len = 0; b->cap = STACK_BYTES; }
static void buf_free(Buf *b) { if (b->data != b->stack) PyMem_Free(b->data); }

static int buf_reserve(Buf *b, Py_ssize_t extra) {
    if (b->len + extra <= b->cap) return 0;
    Py_ssize_t cap = b->cap * 2;
    while (cap < b->len + extra) cap *= 2;
    char *data;
    if (b->data == b->stack) {
        data = PyMem_Malloc(cap);
        if (data) memcpy(data, b->stack, b->len);
    } else {
        data = PyMem_Realloc(b->data, cap);
    }
    if (!data) { PyErr_NoMemory(); return -1; }
    b->data = data;
    b->cap = cap;
    return 0;
}

static inline int put(Buf *b, const void *src, Py_ssize_t n) {
    if (buf_reserve(b, n)) return -1;
    memcpy(b->data + b->len, src, n);
    b->len += n;
    return 0;
}

static inline int put_byte_be(Buf *b, unsigned char tag, unsigned long long v, int width) {
    unsigned char out[9];
    out[0] = tag;
    for (int i = 0; i < width; i++) out[1 + i] = (unsigned char)(v >> (8 * (width - 1 - i)));
    return put(b, out, 1 + width);
}

static int pack_uint(Buf *b, unsigned long long v) {
    unsigned char c;
    if (v < 128) { c = (unsigned char)v; return put(b, &c, 1); }
    if (v < 0x100ULL) return put_byte_be(b, 0xcc, v, 1);
    if (v < 0x10000ULL) return put_byte_be(b, 0xcd, v, 2);
    if (v < 0x100000000ULL) return put_byte_be(b, 0xce, v, 4);
    return put_byte_be(b, 0xcf, v, 8);
}

static int pack_int(Buf *b, long long v) {
    if (v >= 0) return pack_uint(b, (unsigned long long)v);
    if (v >= -32) { unsigned char c = (unsigned char)(v & 0xff); return put(b, &c, 1); }
    if (v >= -128) return put_byte_be(b, 0xd0, (unsigned long long)v, 1);
    if (v >= -32768) return put_byte_be(b, 0xd1, (unsigned long long)v, 2);
    if (v >= -2147483648LL) return put_byte_be(b, 0xd2, (unsigned long long)v, 4);
    return put_byte_be(b, 0xd3, (unsigned long long)v, 8);
}

static int pack_long(Buf *b, PyObject *o) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow > 0) {
        unsigned long long u = PyLong_AsUnsignedLongLong(o);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            PyErr_SetString(PyExc_OverflowError, "Integer value out of range");
            return -1;
        }
        return pack_uint(b, u);
    }
    if (overflow < 0) {
        PyErr_SetString(PyExc_OverflowError, "Integer value out of range");
        return -1;
    }
    return pack_int(b, v);
}

static int pack_len(Buf *b, Py_ssize_t n, unsigned char fix, Py_ssize_t fix_max,
                    unsigned char t8, unsigned char t16, unsigned char t32, const char *what) {
    if (n <= fix_max) { unsigned char c = (unsigned char)(fix | n); return put(b, &c, 1); }
    if (t8 && n < 0x100) return put_byte_be(b, t8, (unsigned long long)n, 1);
    if (n < 0x10000) return put_byte_be(b, t16, (unsigned long long)n, 2);
    if ((unsigned long long)n <= 0xffffffffULL) return put_byte_be(b, t32, (unsigned long long)n, 4);
    PyErr_Format(PyExc_ValueError, "%s is too large", what);
    return -1;
}

static int pack_str(Buf *b, PyObject *o) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(o, &n);
    if (!s) return -1;
    if (pack_len(b, n, 0xa0, 31, 0xd9, 0xda, 0xdb, "unicode string")) return -1;
    return put(b, s, n);
}

static int pack_bin(Buf *b, const char *s, Py_ssize_t n) {
    /* bin has no fix form: 0xc4 is used from length 0 */
    if (n < 0x100) { if (put_byte_be(b, 0xc4, (unsigned long long)n, 1)) return -1; }
    else if (pack_len(b, n, 0, -1, 0, 0xc5, 0xc6, "bytes object")) return -1;
    return put(b, s, n);
}

static int pack(Buf *b, PyObject *o, int depth);
static int too_deep(void);

static int compare_keys(PyObject *a, PyObject *b) {
    /* code point order, as Python's str comparison */
    return PyUnicode_Compare(a, b);
}

/* The sorted key order of recently packed map shapes. Producers build the same shapes over
   and over from the same key objects (literals, template copies), so a shape is recognised by
   the identity of its keys in insertion order, which skips sorting them again. An entry holds
   references to its keys: no other string can take one of their addresses while it exists.
   An entry also remembers the event type its keys were found valid for (Builder.emit). */
#define ORDER_SLOTS 256
#define ORDER_MAX_KEYS 32
#define ORDER_MAX_KEY_LENGTH 128
typedef struct {
    Py_ssize_t n;
    PyObject *keys[ORDER_MAX_KEYS];        /* strong references, insertion order */
    unsigned char rank[ORDER_MAX_KEYS];    /* rank[i]: insertion index of the i-th smallest key */
    PyObject *valid_type;                  /* strong reference or NULL */
} KeyOrder;
static KeyOrder *key_orders;               /* ORDER_SLOTS entries, allocated on first use */

static KeyOrder *key_order_slot(PyObject **keys, Py_ssize_t n) {
    if (key_orders == NULL) {
        key_orders = PyMem_Calloc(ORDER_SLOTS, sizeof(KeyOrder));
        if (key_orders == NULL) return NULL;     /* no cache: sort every time */
    }
    size_t h = (size_t)n;
    for (Py_ssize_t i = 0; i < n; i++) h = (h * 1000003u) ^ ((size_t)keys[i] >> 4);
    return &key_orders[(h ^ (h >> 17)) % ORDER_SLOTS];
}

static int shape_matches(const KeyOrder *slot, PyObject **keys, Py_ssize_t n) {
    return slot != NULL && slot->n == n && n > 0
        && memcmp(slot->keys, keys, sizeof(PyObject *) * n) == 0;
}

/* The keys (and values, if `vals`) of a dict, in insertion order, into arrays of its size;
   -1 with TypeError if a key is not a str. Borrowed references. */
static int dict_items(PyObject *o, PyObject **keys, PyObject **vals) {
    Py_ssize_t pos = 0, i = 0;
    PyObject *k, *v;
    while (PyDict_Next(o, &pos, &k, &v)) {
        if (!PyUnicode_Check(k)) {
            PyErr_Format(PyExc_TypeError, "map keys must all be strings, got %.100s",
                         Py_TYPE(k)->tp_name);
            return -1;
        }
        keys[i] = k;
        if (vals) vals[i] = v;
        i++;
    }
    return 0;
}

/* insertion sort of the insertion indices: field maps are small */
static int sort_ranks(PyObject **keys, Py_ssize_t n, Py_ssize_t *rank) {
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t j = i;
        while (j > 0) {
            int c = compare_keys(keys[rank[j - 1]], keys[i]);
            if (c == -1 && PyErr_Occurred()) return -1;
            if (c <= 0) break;
            rank[j] = rank[j - 1];
            j--;
        }
        rank[j] = i;
    }
    return 0;
}

/* Put a shape into its slot (replacing what was there); long keys are not kept alive. */
static void remember_shape(KeyOrder *slot, PyObject **keys, Py_ssize_t n, const Py_ssize_t *rank) {
    if (slot == NULL || n <= 0 || n > ORDER_MAX_KEYS) return;
    for (Py_ssize_t i = 0; i < n; i++)
        if (PyUnicode_GET_LENGTH(keys[i]) > ORDER_MAX_KEY_LENGTH) return;
    PyObject *old[ORDER_MAX_KEYS];
    Py_ssize_t old_n = slot->n;
    PyObject *old_type = slot->valid_type;
    memcpy(old, slot->keys, sizeof(PyObject *) * old_n);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_INCREF(keys[i]);
        slot->keys[i] = keys[i];
        slot->rank[i] = (unsigned char)rank[i];
    }
    slot->n = n;
    slot->valid_type = NULL;
    /* released last: freeing a key runs no Python code, but keep the slot whole */
    for (Py_ssize_t i = 0; i < old_n; i++) Py_DECREF(old[i]);
    Py_XDECREF(old_type);
}

/* The slot holding this shape, filled if it was not; NULL if there is no cache or the shape
   cannot be cached (the sort order is then in `rank`). -1 in *err on a comparison error. */
static KeyOrder *shape_slot(PyObject **keys, Py_ssize_t n, Py_ssize_t *rank, int *err) {
    *err = 0;
    KeyOrder *slot = n <= ORDER_MAX_KEYS ? key_order_slot(keys, n) : NULL;
    if (shape_matches(slot, keys, n)) {
        for (Py_ssize_t i = 0; i < n; i++) rank[i] = slot->rank[i];
        return slot;
    }
    if (sort_ranks(keys, n, rank)) { *err = -1; return NULL; }
    remember_shape(slot, keys, n, rank);
    return shape_matches(slot, keys, n) ? slot : NULL;
}

/* a map from its items in insertion order and their sorted ranks */
static int pack_sorted(Buf *b, PyObject **keys, PyObject **vals, const Py_ssize_t *rank,
                       Py_ssize_t n, int depth) {
    if (pack_len(b, n, 0x80, 15, 0, 0xde, 0xdf, "dict")) return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (pack_str(b, keys[rank[i]])) return -1;
        if (pack(b, vals[rank[i]], depth + 1)) return -1;
    }
    return 0;
}

static int pack_dict(Buf *b, PyObject *o, int depth) {
    if (depth > MAX_DEPTH) return too_deep();
    Py_ssize_t n = PyDict_GET_SIZE(o);
    /* borrowed references; the dict is not changed while we hold them (no Python code runs
       except str comparison, which cannot mutate it) */
    PyObject *small_items[2 * ORDER_MAX_KEYS];
    Py_ssize_t small_rank[ORDER_MAX_KEYS];
    PyObject **items = small_items;
    Py_ssize_t *rank = small_rank;
    int rc = -1, err;
    if (n > ORDER_MAX_KEYS) {
        items = PyMem_Malloc(sizeof(PyObject *) * 2 * n);
        rank = PyMem_Malloc(sizeof(Py_ssize_t) * n);
        if (!items || !rank) { PyErr_NoMemory(); goto done; }
    }
    PyObject **keys = items, **vals = items + n;      /* insertion order */
    if (dict_items(o, keys, vals)) goto done;
    shape_slot(keys, n, rank, &err);
    if (err) goto done;
    rc = pack_sorted(b, keys, vals, rank, n, depth);
done:
    if (items != small_items) PyMem_Free(items);
    if (rank != small_rank) PyMem_Free(rank);
    return rc;
}

/* ---- event validation (Builder.emit) ---------------------------------------------------------
 * The schema's rules stay in Python (records.schema.validate_fields, registered at import);
 * a field map whose shape was found valid for an event type is not checked again. */
static PyObject *Validator;

static PyObject *set_validator(PyObject *self, PyObject *fn) {
    if (fn != Py_None && !PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, "the validator must be callable or None");
        return NULL;
    }
    if (fn == Py_None) {
        Py_CLEAR(Validator);
        Py_RETURN_NONE;
    }
    Py_INCREF(fn);
    Py_XSETREF(Validator, fn);
    Py_RETURN_NONE;
}

static int call_validator(PyObject *type, PyObject *fields) {
    PyObject *r = PyObject_CallFunctionObjArgs(Validator, type, fields, NULL);
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}

/* An event's top-level field map, collected and sorted once for both its validation and its
   packing; n < 0: not prepared (the map is packed the ordinary way). */
typedef struct {
    Py_ssize_t n;
    PyObject *keys[ORDER_MAX_KEYS], *vals[ORDER_MAX_KEYS];   /* borrowed, insertion order */
    Py_ssize_t rank[ORDER_MAX_KEYS];
} SortedMap;

static int collect_sorted(PyObject *fields, Py_ssize_t n, SortedMap *top, KeyOrder **slot) {
    int err;
    if (PyDict_GET_SIZE(fields) != n || dict_items(fields, top->keys, top->vals)) return -1;
    *slot = shape_slot(top->keys, n, top->rank, &err);
    return err;
}

/* Validate an event (the registered validator, unless its field-map shape was already found
   valid for that type) and prepare its field map in `top`. May run Python code (the
   validator): call it before touching any state that must change atomically. */
static int prepare_event(PyObject *type, PyObject *fields, SortedMap *top) {
    top->n = -1;
    Py_ssize_t n = PyDict_CheckExact(fields) ? PyDict_GET_SIZE(fields) : 0;
    KeyOrder *slot = NULL;
    int sortable = n > 0 && n <= ORDER_MAX_KEYS && PyUnicode_CheckExact(type);
    if (sortable && collect_sorted(fields, n, top, &slot)) {
        PyErr_Clear();                       /* a non-str key: the validator names it */
        sortable = 0;
    }
    /* equal, not only identical: a type name with a dot is not interned, so each call site
       may pass its own copy */
    int known_valid = slot != NULL && slot->valid_type != NULL
        && (slot->valid_type == type || PyUnicode_Compare(slot->valid_type, type) == 0);
    if (Validator != NULL && !known_valid) {
        if (call_validator(type, fields)) return -1;
        if (!sortable) return 0;
        /* Python ran: the map or the cache may have changed since; collect again */
        if (collect_sorted(fields, n, top, &slot)) {
            PyErr_Clear();
            return 0;
        }
        if (slot != NULL) {
            Py_INCREF(type);
            Py_XSETREF(slot->valid_type, type);
        }
    }
    if (sortable) top->n = n;
    return 0;
}

static int too_deep(void) {
    PyErr_Format(PyExc_ValueError, "values nest deeper than %d levels", MAX_DEPTH);
    return -1;
}

/* `depth`: 0 for the field map itself, +1 per enclosing map or array; only containers
   deeper than MAX_DEPTH are refused (as in records.codec) */
static int pack(Buf *b, PyObject *o, int depth) {
    unsigned char c;
    if (o == Py_None) { c = 0xc0; return put(b, &c, 1); }
    if (o == Py_True) { c = 0xc3; return put(b, &c, 1); }
    if (o == Py_False) { c = 0xc2; return put(b, &c, 1); }
    if (PyUnicode_Check(o)) return pack_str(b, o);
    if (PyLong_Check(o)) return pack_long(b, o);
    if (PyFloat_Check(o)) {
        double d = PyFloat_AS_DOUBLE(o);
        unsigned long long bits;
        memcpy(&bits, &d, 8);
        return put_byte_be(b, 0xcb, bits, 8);
    }
    if (PyBytes_Check(o)) return pack_bin(b, PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o));
    if (PyByteArray_Check(o)) return pack_bin(b, PyByteArray_AS_STRING(o), PyByteArray_GET_SIZE(o));
    if (PyDict_Check(o)) return pack_dict(b, o, depth);
    if (PyList_Check(o) || PyTuple_Check(o)) {
        if (depth > MAX_DEPTH) return too_deep();
        PyObject *seq = o;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        if (pack_len(b, n, 0x90, 15, 0, 0xdc, 0xdd, "list")) return -1;
        for (Py_ssize_t i = 0; i < n; i++)
            if (pack(b, PySequence_Fast_GET_ITEM(seq, i), depth + 1)) return -1;
        return 0;
    }
    if (PyMemoryView_Check(o)) {
        Py_buffer view;
        if (PyObject_GetBuffer(o, &view, PyBUF_CONTIG_RO)) return -1;
        int rc = pack_bin(b, view.buf, view.len);
        PyBuffer_Release(&view);
        return rc;
    }
    PyErr_Format(PyExc_TypeError, "can not serialize '%.200s' object", Py_TYPE(o)->tp_name);
    return -1;
}

static int pack_field_map(Buf *b, PyObject *fields) {
    if (!PyDict_Check(fields)) {
        PyErr_Format(PyExc_TypeError, "fields must be a dict, got %.100s", Py_TYPE(fields)->tp_name);
        return -1;
    }
    return pack_dict(b, fields, 0);
}

static PyObject *encode_fields(PyObject *self, PyObject *fields) {
    Buf b;
    buf_init(&b);
    PyObject *out = NULL;
    if (pack_field_map(&b, fields) == 0) out = PyBytes_FromStringAndSize(b.data, b.len);
    buf_free(&b);
    return out;
}

/* the canonical encoding's tail: the top-level keys after "f", in sorted order, without the
   map header (records.codec.event_tail) */
static int pack_tail(Buf *b, PyObject *seq, PyObject *sid, PyObject *ts, PyObject *type,
                     PyObject *version) {
    if (put(b, "\xa3seq", 4) || pack(b, seq, 1)) return -1;
    if (put(b, "\xa3sid", 4) || pack(b, sid, 1)) return -1;
    if (put(b, "\xa2ts", 3) || pack(b, ts, 1)) return -1;
    if (put(b, "\xa4type", 5) || pack(b, type, 1)) return -1;
    if (put(b, "\xa1v", 2) || pack(b, version, 1)) return -1;
    return 0;
}

/* One event sealed into `fields_out` (the encoded field map), `tag` (8 bytes) and `digest`
   (32 bytes); `head`/`prev` are bytes. */
static int seal_core(PyObject *head, PyObject *fields, const SortedMap *top, PyObject *seq,
                     PyObject *sid, PyObject *ts, PyObject *type, PyObject *version, PyObject *prev,
                     PyObject **fields_out,
                     unsigned char tag[8], unsigned char digest[SHA256_DIGEST_LENGTH]) {
    if (!PyBytes_Check(head) || !PyBytes_Check(prev)) {
        PyErr_SetString(PyExc_TypeError, "head and prev must be bytes");
        return -1;
    }
    Buf b;
    buf_init(&b);
    int rc = -1;
    Py_ssize_t fields_at, fields_end;
    if (put(&b, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head))) goto done;
    fields_at = b.len;
    if (top != NULL && top->n >= 0 ? pack_sorted(&b, (PyObject **)top->keys, (PyObject **)top->vals,
                                                 top->rank, top->n, 0)
                                   : pack_field_map(&b, fields))
        goto done;
    fields_end = b.len;
    if (pack_tail(&b, seq, sid, ts, type, version)) goto done;
    {
        SHA256_CTX ctx, tag_ctx;
        unsigned char full_tag[SHA256_DIGEST_LENGTH];
        SHA256_Init(&ctx);
        SHA256_Update(&ctx, b.data, (size_t)b.len);
        tag_ctx = ctx;
        SHA256_Final(full_tag, &tag_ctx);
        memcpy(tag, full_tag, 8);
        SHA256_Update(&ctx, PyBytes_AS_STRING(prev), (size_t)PyBytes_GET_SIZE(prev));
        SHA256_Final(digest, &ctx);
    }
    *fields_out = PyBytes_FromStringAndSize(b.data + fields_at, fields_end - fields_at);
    if (*fields_out) rc = 0;
done:
    buf_free(&b);
    return rc;
}

static PyObject *seal(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "seal(head, fields, seq, sid, ts, type, version, prev) takes 8 arguments");
        return NULL;
    }
    PyObject *encoded;
    unsigned char tag[8], digest[SHA256_DIGEST_LENGTH];
    if (seal_core(args[0], args[1], NULL, args[2], args[3], args[4], args[5], args[6], args[7],
                  &encoded, tag, digest))
        return NULL;
    PyObject *out = Py_BuildValue("(Ny#y#)", encoded, (const char *)tag, (Py_ssize_t)8,
                                  (const char *)digest, (Py_ssize_t)SHA256_DIGEST_LENGTH);
    return out;
}

/* ---- Builder: the columns of one batch, filled one sealed event at a time -------------------
 * records.batch.BatchBuilder derives from it (body/finish stay in Python); the pure-Python
 * twin is records.batch._PyBuilderCore. add() changes nothing when it raises. */

typedef struct {
    PyObject_HEAD
    PyObject *agent_id, *head, *prev_hash, *last_hash, *version;
    PyObject *first_seq;           /* int */
    PyObject *last_ts;             /* int */
    PyObject *ts_deltas, *sid_index, *type_index, *fields, *hashes;   /* lists */
    PyObject *sids, *types;        /* dict: value -> index in first-seen order */
    PyObject *tags;                /* bytearray: 8 bytes per event */
    int closed;                    /* close() was called: no more events */
    Py_ssize_t limit;              /* emit() takes no more events at this many (0: no limit) */
} Builder;

static int Builder_traverse(Builder *self, visitproc visit, void *arg) {
    Py_VISIT(self->ts_deltas); Py_VISIT(self->sid_index); Py_VISIT(self->type_index);
    Py_VISIT(self->fields); Py_VISIT(self->hashes); Py_VISIT(self->sids); Py_VISIT(self->types);
    return 0;
}

static int Builder_clear(Builder *self) {
    Py_CLEAR(self->agent_id); Py_CLEAR(self->head); Py_CLEAR(self->prev_hash);
    Py_CLEAR(self->last_hash); Py_CLEAR(self->version); Py_CLEAR(self->first_seq);
    Py_CLEAR(self->last_ts); Py_CLEAR(self->ts_deltas); Py_CLEAR(self->sid_index);
    Py_CLEAR(self->type_index); Py_CLEAR(self->fields); Py_CLEAR(self->hashes);
    Py_CLEAR(self->sids); Py_CLEAR(self->types); Py_CLEAR(self->tags);
    return 0;
}

static void Builder_dealloc(Builder *self) {
    PyObject_GC_UnTrack(self);
    Builder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Builder_init(Builder *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"agent_id", "prev_hash", "first_seq", "head", "version", NULL};
    PyObject *agent_id, *prev_hash, *first_seq, *head, *version;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "UO!O!O!O!", names, &agent_id, &PyBytes_Type,
                                     &prev_hash, &PyLong_Type, &first_seq, &PyBytes_Type, &head,
                                     &PyLong_Type, &version))
        return -1;
    Builder_clear(self);
    Py_INCREF(agent_id); self->agent_id = agent_id;
    Py_INCREF(head); self->head = head;
    Py_INCREF(prev_hash); self->prev_hash = prev_hash;
    Py_INCREF(prev_hash); self->last_hash = prev_hash;
    Py_INCREF(version); self->version = version;
    Py_INCREF(first_seq); self->first_seq = first_seq;
    self->last_ts = PyLong_FromLong(0);
    self->ts_deltas = PyList_New(0); self->sid_index = PyList_New(0);
    self->type_index = PyList_New(0); self->fields = PyList_New(0); self->hashes = PyList_New(0);
    self->sids = PyDict_New(); self->types = PyDict_New();
    self->tags = PyByteArray_FromStringAndSize(NULL, 0);
    self->closed = 0;
    self->limit = 0;
    if (!self->last_ts || !self->ts_deltas || !self->sid_index || !self->type_index
        || !self->fields || !self->hashes || !self->sids || !self->types || !self->tags)
        return -1;
    return 0;
}

/* index of `value` in `table` (dict in first-seen order), adding it if new */
static PyObject *column_index(PyObject *table, PyObject *value) {
    PyObject *index = PyDict_GetItemWithError(table, value);
    if (index) { Py_INCREF(index); return index; }
    if (PyErr_Occurred()) return NULL;
    index = PyLong_FromSsize_t(PyDict_GET_SIZE(table));
    if (!index || PyDict_SetItem(table, value, index)) { Py_XDECREF(index); return NULL; }
    return index;
}

/* A value msgpack cannot carry becomes records.codec.EncodingError naming the event, with the
   original error as its cause (as records.codec.seal_parts raises it). */
static void encoding_error(PyObject *seq, PyObject *type) {
    if (!EncodingErrorType || !(PyErr_ExceptionMatches(PyExc_TypeError)
                                || PyErr_ExceptionMatches(PyExc_ValueError)
                                || PyErr_ExceptionMatches(PyExc_OverflowError)))
        return;
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (tb) PyException_SetTraceback(v, tb);
    PyErr_Format(EncodingErrorType, "event seq=%S type=%S: cannot encode: %S", seq, type, v);
    PyObject *t2, *v2, *tb2;
    PyErr_Fetch(&t2, &v2, &tb2);
    PyErr_NormalizeException(&t2, &v2, &tb2);
    Py_INCREF(v);
    PyException_SetCause(v2, v);
    PyException_SetContext(v2, v);
    PyErr_Restore(t2, v2, tb2);
    Py_XDECREF(t);
    Py_XDECREF(tb);
}

static PyObject *set_encoding_error(PyObject *self, PyObject *cls) {
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, (PyTypeObject *)PyExc_ValueError)) {
        PyErr_SetString(PyExc_TypeError, "the encoding error must be a ValueError subclass");
        return NULL;
    }
    Py_INCREF(cls);
    Py_XSETREF(EncodingErrorType, cls);
    Py_RETURN_NONE;
}

static PyObject *now_ns(void) {
    struct timespec t;
    if (clock_gettime(CLOCK_REALTIME, &t)) return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLongLong((long long)t.tv_sec * 1000000000LL + t.tv_nsec);
}

/* Seal one event into the columns; returns its hash (new reference). Runs no Python code, so
   under the GIL it is atomic with respect to every other thread. */
static PyObject *builder_seal(Builder *self, PyObject *ts, PyObject *sid, PyObject *type,
                              PyObject *fields, const SortedMap *top) {
    if (self->closed) {
        PyErr_SetString(PyExc_RuntimeError, "the batch is closed: no event can be added");
        return NULL;
    }
    /* exact types: a str subclass could hash or compare in Python code in the lookups below */
    if ((sid != Py_None && !PyUnicode_CheckExact(sid)) || !PyUnicode_CheckExact(type)) {
        PyErr_SetString(PyExc_TypeError, "sid must be a str or None and event_type a str");
        return NULL;
    }
    PyObject *count = PyLong_FromSsize_t(PyList_GET_SIZE(self->hashes));
    PyObject *seq = count ? PyNumber_Add(self->first_seq, count) : NULL;
    Py_XDECREF(count);
    if (!seq) return NULL;
    PyObject *encoded = NULL, *delta = NULL, *sid_at = NULL, *type_at = NULL, *digest_obj = NULL;
    unsigned char tag[8], digest[SHA256_DIGEST_LENGTH];
    int sealed = seal_core(self->head, fields, top, seq, sid, ts, type, self->version, self->last_hash,
                           &encoded, tag, digest);
    if (sealed) {
        encoding_error(seq, type);
        Py_DECREF(seq);
        return NULL;
    }
    Py_DECREF(seq);
    /* everything that can fail is prepared before the first column changes */
    delta = PyNumber_Subtract(ts, self->last_ts);
    digest_obj = PyBytes_FromStringAndSize((const char *)digest, SHA256_DIGEST_LENGTH);
    if (!delta || !digest_obj) goto fail;
    Py_ssize_t sids_before = PyDict_GET_SIZE(self->sids);
    sid_at = column_index(self->sids, sid);
    if (!sid_at) goto fail;
    type_at = column_index(self->types, type);
    if (!type_at) {
        if (PyDict_GET_SIZE(self->sids) != sids_before) PyDict_DelItem(self->sids, sid);
        goto fail;
    }
    if (PyList_Append(self->ts_deltas, delta) || PyList_Append(self->sid_index, sid_at)
        || PyList_Append(self->type_index, type_at) || PyList_Append(self->fields, encoded)
        || PyList_Append(self->hashes, digest_obj)
        || PyByteArray_Resize(self->tags, PyByteArray_GET_SIZE(self->tags) + 8)) {
        /* out of memory half-way: the batch is no longer consistent; say so loudly */
        PyErr_SetString(PyExc_MemoryError, "out of memory while adding an event to a batch");
        goto fail;
    }
    memcpy(PyByteArray_AS_STRING(self->tags) + PyByteArray_GET_SIZE(self->tags) - 8, tag, 8);
    Py_INCREF(ts);
    Py_SETREF(self->last_ts, ts);
    Py_INCREF(digest_obj);
    Py_SETREF(self->last_hash, digest_obj);
    Py_DECREF(encoded); Py_DECREF(delta); Py_DECREF(sid_at); Py_DECREF(type_at);
    return digest_obj;
fail:
    Py_XDECREF(encoded); Py_XDECREF(delta); Py_XDECREF(sid_at); Py_XDECREF(type_at);
    Py_XDECREF(digest_obj);
    return NULL;
}

static PyObject *Builder_add(Builder *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "add(ts, sid, event_type, fields) takes 4 arguments");
        return NULL;
    }
    PyObject *ts = args[0];
    if (ts == Py_None) {
        /* the clock is read inside the call: timestamps follow sequence numbers */
        if (!(ts = now_ns())) return NULL;
    } else if (!PyLong_Check(ts)) {
        PyErr_SetString(PyExc_TypeError, "ts must be an int (nanoseconds) or None (now)");
        return NULL;
    } else {
        Py_INCREF(ts);
    }
    PyObject *out = builder_seal(self, ts, args[1], args[2], args[3], NULL);
    Py_DECREF(ts);
    return out;
}

static int builder_full(Builder *self) {
    return self->closed || (self->limit > 0 && PyList_GET_SIZE(self->hashes) >= self->limit);
}

/* The writer's lock-free path: validate, then seal stamped with the current time, unless the
   batch is closed or holds `limit` events (False: the caller takes its locked path). It never
   closes the batch itself: only the writer does, under its lock, so an event the locked path
   is adding can never find its batch closed half-way. */
static PyObject *Builder_emit(Builder *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "emit(sid, event_type, fields) takes 3 arguments");
        return NULL;
    }
    if (builder_full(self)) Py_RETURN_FALSE;
    SortedMap top;
    if (prepare_event(args[1], args[2], &top)) return NULL;
    if (builder_full(self)) Py_RETURN_FALSE;    /* closed or filled by another thread while Python ran */
    PyObject *ts = now_ns();
    if (!ts) return NULL;
    PyObject *digest = builder_seal(self, ts, args[0], args[1], args[2], &top);
    Py_DECREF(ts);
    if (!digest) return NULL;
    Py_DECREF(digest);
    Py_RETURN_TRUE;
}

static PyObject *Builder_close(Builder *self, PyObject *unused) {
    self->closed = 1;
    Py_RETURN_NONE;
}

/* (last sequence number, last hash) read together */
static PyObject *Builder_get_head(Builder *self, void *unused) {
    PyObject *count = PyLong_FromSsize_t(PyList_GET_SIZE(self->hashes) - 1);
    PyObject *seq = count ? PyNumber_Add(self->first_seq, count) : NULL;
    Py_XDECREF(count);
    if (!seq) return NULL;
    PyObject *hash = self->last_hash;   /* taken before the tuple is allocated (GC may run) */
    Py_INCREF(hash);
    return Py_BuildValue("(NN)", seq, hash);
}

static PyObject *Builder_get_closed(Builder *self, void *unused) {
    return PyBool_FromLong(self->closed);
}

static PyObject *Builder_get_limit(Builder *self, void *unused) {
    return PyLong_FromSsize_t(self->limit);
}

static int Builder_set_limit(Builder *self, PyObject *value, void *unused) {
    Py_ssize_t limit = value ? PyLong_AsSsize_t(value) : -1;
    if (limit < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "limit must be an int >= 0");
        return -1;
    }
    self->limit = limit;
    return 0;
}

static PyObject *Builder_columns(Builder *self, PyObject *unused) {
    PyObject *sids = PyDict_Keys(self->sids), *types = PyDict_Keys(self->types);
    PyObject *tags = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(self->tags),
                                               PyByteArray_GET_SIZE(self->tags));
    PyObject *out = NULL;
    if (sids && types && tags)
        out = PyTuple_Pack(8, self->ts_deltas, sids, self->sid_index, types, self->type_index,
                           self->fields, tags, self->hashes);
    Py_XDECREF(sids); Py_XDECREF(types); Py_XDECREF(tags);
    return out;
}

static PyObject *Builder_get_count(Builder *self, void *unused) {
    return PyLong_FromSsize_t(PyList_GET_SIZE(self->hashes));
}

static PyObject *Builder_get_last_seq(Builder *self, void *unused) {
    PyObject *count = PyLong_FromSsize_t(PyList_GET_SIZE(self->hashes) - 1);
    if (!count) return NULL;
    PyObject *out = PyNumber_Add(self->first_seq, count);
    Py_DECREF(count);
    return out;
}

#define GETTER(name) \
    static PyObject *Builder_get_##name(Builder *self, void *unused) { \
        if (!self->name) { PyErr_SetString(PyExc_AttributeError, #name); return NULL; } \
        Py_INCREF(self->name); return self->name; }
GETTER(agent_id)
GETTER(prev_hash)
GETTER(last_hash)
GETTER(first_seq)

static PyGetSetDef Builder_getset[] = {
    {"count", (getter)Builder_get_count, NULL, "events sealed so far", NULL},
    {"last_seq", (getter)Builder_get_last_seq, NULL, "sequence number of the last event", NULL},
    {"agent_id", (getter)Builder_get_agent_id, NULL, NULL, NULL},
    {"prev_hash", (getter)Builder_get_prev_hash, NULL, "hash the batch chains from", NULL},
    {"last_hash", (getter)Builder_get_last_hash, NULL, "hash of the last event", NULL},
    {"first_seq", (getter)Builder_get_first_seq, NULL, NULL, NULL},
    {"head", (getter)Builder_get_head, NULL, "(last_seq, last_hash), read together", NULL},
    {"closed", (getter)Builder_get_closed, NULL, "no event can be added any more", NULL},
    {"limit", (getter)Builder_get_limit, (setter)Builder_set_limit,
     "emit() takes no more events once the batch holds this many (0: no limit)", NULL},
    {NULL},
};

static PyMethodDef Builder_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Builder_add, METH_FASTCALL,
     "add(ts, sid, event_type, fields) -> hash: seal the next event into the columns "
     "(ts None: now)"},
    {"emit", (PyCFunction)(void (*)(void))Builder_emit, METH_FASTCALL,
     "emit(sid, event_type, fields) -> bool: validate and seal stamped now; False if closed "
     "or at its limit"},
    {"close", (PyCFunction)Builder_close, METH_NOARGS, "take no more events"},
    {"columns", (PyCFunction)Builder_columns, METH_NOARGS,
     "(ts deltas, sids, sid index, types, type index, encoded fields, tags, hashes)"},
    {NULL},
};

static PyTypeObject BuilderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "records._seal.Builder",
    .tp_basicsize = sizeof(Builder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The columns of one batch, filled one sealed event at a time.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Builder_init,
    .tp_dealloc = (destructor)Builder_dealloc,
    .tp_traverse = (traverseproc)Builder_traverse,
    .tp_clear = (inquiry)Builder_clear,
    .tp_methods = Builder_methods,
    .tp_getset = Builder_getset,
};

static PyMethodDef methods[] = {
    {"encode_fields", (PyCFunction)encode_fields, METH_O,
     "Canonical msgpack of a field map (keys sorted at every depth)."},
    {"set_encoding_error", (PyCFunction)set_encoding_error, METH_O,
     "Register the exception Builder.add raises for values it cannot encode."},
    {"set_validator", (PyCFunction)set_validator, METH_O,
     "Register validator(event_type, fields), which Builder.emit calls for a field-map shape "
     "it has not yet found valid for that type (None: no validation)."},
    {"seal", (PyCFunction)(void (*)(void))seal, METH_FASTCALL,
     "seal(head, fields, seq, sid, ts, type, version, prev) -> (fields bytes, tag, hash)"},
    {NULL, NULL, 0, NULL},
};

/* ---- Emitter: RecordWriter.emit bound to one session, for the enforcers' per-event calls ----
 * Emitter(writer, session_id)(event_type, fields) seals into writer._open (a Builder) as the
 * writer's own emit does, without a Python frame; whenever that batch does not take the event
 * (closed, full, none open, not native, an encoding to repair) it calls writer.emit, which
 * decides everything else. */

typedef struct {
    PyObject_HEAD
    PyObject *writer, *sid;
    vectorcallfunc vectorcall;
} Emitter;

static PyObject *str_open, *str_emit, *session_id_kwnames;   /* ("session_id",) */

static PyObject *Emitter_vectorcall(Emitter *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 2 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "emit(event_type, fields) takes 2 positional arguments");
        return NULL;
    }
    PyObject *batch = PyObject_GetAttr(self->writer, str_open);
    if (!batch) return NULL;
    if (PyObject_TypeCheck(batch, &BuilderType)) {
        PyObject *call[3] = {self->sid, args[0], args[1]};
        PyObject *taken = Builder_emit((Builder *)batch, call, 3);
        Py_DECREF(batch);
        if (taken == Py_True) {
            Py_DECREF(taken);
            Py_RETURN_NONE;
        }
        if (!taken) {
            if (!EncodingErrorType || !PyErr_ExceptionMatches(EncodingErrorType)) return NULL;
            PyErr_Clear();      /* the writer repairs what cannot be encoded */
        } else {
            Py_DECREF(taken);
        }
    } else {
        Py_DECREF(batch);
    }
    PyObject *emit = PyObject_GetAttr(self->writer, str_emit);
    if (!emit) return NULL;
    PyObject *call[4] = {NULL, args[0], args[1], self->sid};
    PyObject *out = PyObject_Vectorcall(emit, call + 1, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, session_id_kwnames);
    Py_DECREF(emit);
    return out;
}

static PyObject *Emitter_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *writer, *sid;
    if (!PyArg_ParseTuple(args, "OO:Emitter", &writer, &sid)) return NULL;
    Emitter *self = (Emitter *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    Py_INCREF(writer); self->writer = writer;
    Py_INCREF(sid); self->sid = sid;
    self->vectorcall = (vectorcallfunc)Emitter_vectorcall;
    return (PyObject *)self;
}

static int Emitter_traverse(Emitter *self, visitproc visit, void *arg) {
    Py_VISIT(self->writer); Py_VISIT(self->sid);
    return 0;
}

static int Emitter_clear(Emitter *self) {
    Py_CLEAR(self->writer); Py_CLEAR(self->sid);
    return 0;
}

static void Emitter_dealloc(Emitter *self) {
    PyObject_GC_UnTrack(self);
    Emitter_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Emitter_get_session_id(Emitter *self, void *unused) {
    Py_INCREF(self->sid);
    return self->sid;
}

static PyGetSetDef Emitter_getset[] = {
    {"session_id", (getter)Emitter_get_session_id, NULL, "the session every event is recorded under", NULL},
    {NULL},
};

static PyTypeObject EmitterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "records._seal.Emitter",
    .tp_basicsize = sizeof(Emitter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Emitter(writer, session_id)(event_type, fields): writer.emit(..., session_id=session_id).",
    .tp_new = Emitter_new,
    .tp_dealloc = (destructor)Emitter_dealloc,
    .tp_traverse = (traverseproc)Emitter_traverse,
    .tp_clear = (inquiry)Emitter_clear,
    .tp_vectorcall_offset = offsetof(Emitter, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_getset = Emitter_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "records._seal",
    "Native canonical encoding and chain hashing of events (see records/codec.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__seal(void) {
    if (PyType_Ready(&BuilderType) < 0 || PyType_Ready(&EmitterType) < 0) return NULL;
    if (!(str_open = PyUnicode_InternFromString("_open")) || !(str_emit = PyUnicode_InternFromString("emit"))
        || !(session_id_kwnames = Py_BuildValue("(s)", "session_id")))
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&BuilderType);
    if (PyModule_AddObject(m, "Builder", (PyObject *)&BuilderType) < 0) {
        Py_DECREF(&BuilderType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&EmitterType);
    if (PyModule_AddObject(m, "Emitter", (PyObject *)&EmitterType) < 0) {
        Py_DECREF(&EmitterType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
