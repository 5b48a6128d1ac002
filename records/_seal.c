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

static int pack_dict(Buf *b, PyObject *o, int depth) {
    if (depth > MAX_DEPTH) return too_deep();
    Py_ssize_t n = PyDict_GET_SIZE(o);
    PyObject *small_keys[32];
    PyObject *small_vals[32];
    PyObject **keys = small_keys, **vals = small_vals;
    int rc = -1;
    if (n > 32) {
        keys = PyMem_Malloc(sizeof(PyObject *) * n);
        vals = PyMem_Malloc(sizeof(PyObject *) * n);
        if (!keys || !vals) { PyErr_NoMemory(); goto done; }
    }
    /* borrowed references; the dict is not changed while we hold them (no Python code runs
       except str comparison, which cannot mutate it) */
    Py_ssize_t pos = 0, i = 0;
    PyObject *k, *v;
    while (PyDict_Next(o, &pos, &k, &v)) {
        if (!PyUnicode_Check(k)) {
            PyErr_Format(PyExc_TypeError, "map keys must all be strings, got %.100s",
                         Py_TYPE(k)->tp_name);
            goto done;
        }
        /* insertion sort: field maps are small and usually already nearly sorted */
        Py_ssize_t j = i;
        while (j > 0) {
            int c = compare_keys(keys[j - 1], k);
            if (c == -1 && PyErr_Occurred()) goto done;
            if (c <= 0) break;
            keys[j] = keys[j - 1];
            vals[j] = vals[j - 1];
            j--;
        }
        keys[j] = k;
        vals[j] = v;
        i++;
    }
    if (pack_len(b, n, 0x80, 15, 0, 0xde, 0xdf, "dict")) goto done;
    for (i = 0; i < n; i++) {
        if (pack_str(b, keys[i])) goto done;
        if (pack(b, vals[i], depth + 1)) goto done;
    }
    rc = 0;
done:
    if (keys != small_keys) PyMem_Free(keys);
    if (vals != small_vals) PyMem_Free(vals);
    return rc;
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

static PyObject *seal(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "seal(head, fields, seq, sid, ts, type, version, prev) takes 8 arguments");
        return NULL;
    }
    PyObject *head = args[0], *fields = args[1], *prev = args[7];
    if (!PyBytes_Check(head) || !PyBytes_Check(prev)) {
        PyErr_SetString(PyExc_TypeError, "head and prev must be bytes");
        return NULL;
    }
    Buf b;
    buf_init(&b);
    PyObject *out = NULL;
    Py_ssize_t fields_at, fields_end;
    if (put(&b, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head))) goto done;
    fields_at = b.len;
    if (pack_field_map(&b, fields)) goto done;
    fields_end = b.len;
    if (pack_tail(&b, args[2], args[3], args[4], args[5], args[6])) goto done;
    {
        SHA256_CTX ctx, tag_ctx;
        unsigned char tag[SHA256_DIGEST_LENGTH], digest[SHA256_DIGEST_LENGTH];
        SHA256_Init(&ctx);
        SHA256_Update(&ctx, b.data, (size_t)b.len);
        tag_ctx = ctx;
        SHA256_Final(tag, &tag_ctx);
        SHA256_Update(&ctx, PyBytes_AS_STRING(prev), (size_t)PyBytes_GET_SIZE(prev));
        SHA256_Final(digest, &ctx);
        out = Py_BuildValue("(y#y#y#)", b.data + fields_at, fields_end - fields_at,
                            (const char *)tag, (Py_ssize_t)8,
                            (const char *)digest, (Py_ssize_t)SHA256_DIGEST_LENGTH);
    }
done:
    buf_free(&b);
    return out;
}

static PyMethodDef methods[] = {
    {"encode_fields", (PyCFunction)encode_fields, METH_O,
     "Canonical msgpack of a field map (keys sorted at every depth)."},
    {"seal", (PyCFunction)(void (*)(void))seal, METH_FASTCALL,
     "seal(head, fields, seq, sid, ts, type, version, prev) -> (fields bytes, tag, hash)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "records._seal",
    "Native canonical encoding and chain hashing of events (see records/codec.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__seal(void) { return PyModule_Create(&module); }
