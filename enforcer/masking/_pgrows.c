/* The DataRow masking loop of enforcer/masking/pgrow.py (RowPlan.py_mask_rows) without the
 * interpreter per row.
 *
 * mask_rows(plan, buf, pos, n, unchanged, cache_value_bytes) -> (data, last, end, rows, nbytes)
 *
 * The Python loop is the reference: same outputs, same counter and cache updates, same
 * exceptions. Everything that is policy rather than byte shuffling stays in Python and is
 * called back: the steps' fn (strategies, detectors), RowPlan._fill on a cache miss (the
 * cache's clear/switch-off rule), RowPlan.mask_data_row for irregular rows and RowPlan._tally
 * at the end. Arguments or plans of a shape this code does not know are handed to
 * RowPlan.py_mask_rows whole, so odd callers still get the reference's behaviour.
 *
 * The GIL is held throughout: the callbacks run Python code. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* pgrow.WHOLE / CONSTANT / DETECT; pgrow refuses this module if they ever differ */
#define KIND_WHOLE 0
#define KIND_CONSTANT 1
#define KIND_DETECT 2

static PyObject *StructError;       /* struct.error: what the reference's unpack/pack raise */
static PyObject *str_fill, *str_mask_data_row, *str_tally, *str_py_mask_rows, *str_plan,
    *str_width, *str_skipped, *str_counter, *str_values, *str_nulled;

static const char NULL_LENGTH[4] = {'\xff', '\xff', '\xff', '\xff'};

static inline int32_t read_i32(const unsigned char *p) {
    return (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3]);
}

static inline int16_t read_i16(const unsigned char *p) {
    return (int16_t)(((uint16_t)p[0] << 8) | p[1]);
}

/* The reference reads length words with struct.unpack_from on the whole buffer (not just the
 * row), so a malformed row fails with struct.error only past the buffer's end. */
static int check_word(Py_ssize_t p, Py_ssize_t buflen) {
    if (p <= buflen - 4)
        return 0;
    PyErr_Format(StructError, "unpack_from requires a buffer of at least %zd bytes for unpacking "
                 "4 bytes at offset %zd (actual buffer size is %zd)", p + 4, p, buflen);
    return -1;
}

static int check_i32(Py_ssize_t v) {
    if (v >= INT32_MIN && v <= INT32_MAX)
        return 0;
    PyErr_SetString(StructError, "'i' format requires -2147483648 <= number <= 2147483647");
    return -1;
}

/* ---- output: the masked bytes that replace buf[pos:last] ---------------------------------- */

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Out;

static int out_reserve(Out *o, Py_ssize_t extra) {
    if (o->len + extra <= o->cap)
        return 0;
    Py_ssize_t cap = o->cap ? o->cap : 4096;
    while (cap < o->len + extra) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    char *data = PyMem_Realloc(o->data, cap);
    if (!data) {
        PyErr_NoMemory();
        return -1;
    }
    o->data = data;
    o->cap = cap;
    return 0;
}

static inline int out_put(Out *o, const void *src, Py_ssize_t len) {
    if (len == 0)       /* memcpy into a buffer not yet allocated (NULL) is undefined even for 0 bytes */
        return 0;
    if (out_reserve(o, len))
        return -1;
    memcpy(o->data + o->len, src, len);
    o->len += len;
    return 0;
}

static inline void store_i32(char *dst, int32_t v) {
    uint32_t u = (uint32_t)v;
    dst[0] = (char)(u >> 24);
    dst[1] = (char)(u >> 16);
    dst[2] = (char)(u >> 8);
    dst[3] = (char)u;
}

static inline int out_put_i32(Out *o, int32_t v) {
    char word[4];
    store_i32(word, v);
    return out_put(o, word, 4);
}

/* A step's output as bytes. The reference joins its pieces with b"".join, so any bytes-like
 * object is accepted; bytes, by far the usual case, needs no buffer request. */
typedef struct {
    const char *data;
    Py_ssize_t len;
    Py_buffer view;
    int has_view;
} Value;

static int value_get(PyObject *obj, Value *v) {
    v->has_view = 0;
    if (PyBytes_Check(obj)) {
        v->data = PyBytes_AS_STRING(obj);
        v->len = PyBytes_GET_SIZE(obj);
        return 0;
    }
    if (PyObject_GetBuffer(obj, &v->view, PyBUF_SIMPLE) < 0) {
        PyErr_Format(PyExc_TypeError, "a masking step gave %.100s, not bytes or None", Py_TYPE(obj)->tp_name);
        return -1;
    }
    v->has_view = 1;
    v->data = v->view.buf;
    v->len = v->view.len;
    return 0;
}

static void value_release(Value *v) {
    if (v->has_view)
        PyBuffer_Release(&v->view);
}

/* ---- the plan: RowPlan._plan, tuples of (gap, kind, fn, constant, step, cache) ---------------- */

typedef struct {
    Py_ssize_t gap;         /* columns to skip before this one */
    int kind;
    PyObject *fn, *constant, *step, *cache;     /* borrowed: Plan.tuple keeps them alive */
    Py_ssize_t nulls;       /* NULLs met, not yet added to step.skipped */
} Step;

typedef struct {
    PyObject *tuple;        /* strong reference */
    Step *steps;
    Py_ssize_t count;
} Plan;

/* 0: loaded; 1: not the shape RowPlan._compile builds (no exception set); -1: error. */
static int plan_load(Plan *plan, PyObject *tuple) {
    plan->tuple = NULL;
    plan->steps = NULL;
    plan->count = 0;
    if (!PyTuple_CheckExact(tuple))
        return 1;
    Py_ssize_t count = PyTuple_GET_SIZE(tuple);
    Step *steps = PyMem_Calloc(count ? count : 1, sizeof(Step));
    if (!steps) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyTuple_GET_ITEM(tuple, i);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 6)
            goto unknown;
        PyObject *gap = PyTuple_GET_ITEM(item, 0), *kind = PyTuple_GET_ITEM(item, 1);
        PyObject *cache = PyTuple_GET_ITEM(item, 5);
        if (!PyLong_CheckExact(gap) || !PyLong_CheckExact(kind))
            goto unknown;
        /* a dict subclass could override get(); only plain dicts are looked up directly */
        if (cache != Py_None && !PyDict_CheckExact(cache))
            goto unknown;
        steps[i].gap = PyLong_AsSsize_t(gap);
        if (steps[i].gap == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            goto unknown;
        }
        int overflow;
        long k = PyLong_AsLongAndOverflow(kind, &overflow);
        /* the reference treats every kind but WHOLE and CONSTANT as DETECT */
        steps[i].kind = overflow ? KIND_DETECT : k == KIND_WHOLE ? KIND_WHOLE
                        : k == KIND_CONSTANT ? KIND_CONSTANT : KIND_DETECT;
        steps[i].fn = PyTuple_GET_ITEM(item, 2);
        steps[i].constant = PyTuple_GET_ITEM(item, 3);
        steps[i].step = PyTuple_GET_ITEM(item, 4);
        steps[i].cache = cache;
        steps[i].nulls = 0;
    }
    Py_INCREF(tuple);
    plan->tuple = tuple;
    plan->steps = steps;
    plan->count = count;
    return 0;
unknown:
    PyMem_Free(steps);
    return 1;
}

/* step.skipped += NULLs met: the reference counts each NULL as it goes, _tally reads the sum */
static int plan_flush_nulls(Plan *plan) {
    for (Py_ssize_t i = 0; i < plan->count; i++) {
        Step *s = &plan->steps[i];
        if (!s->nulls)
            continue;
        PyObject *old = PyObject_GetAttr(s->step, str_skipped);
        if (!old)
            return -1;
        PyObject *add = PyLong_FromSsize_t(s->nulls);
        PyObject *sum = add ? PyNumber_InPlaceAdd(old, add) : NULL;
        Py_DECREF(old);
        Py_XDECREF(add);
        if (!sum)
            return -1;
        int rc = PyObject_SetAttr(s->step, str_skipped, sum);
        Py_DECREF(sum);
        if (rc < 0)
            return -1;
        s->nulls = 0;
    }
    return 0;
}

static void plan_release(Plan *plan) {
    Py_CLEAR(plan->tuple);
    PyMem_Free(plan->steps);
    plan->steps = NULL;
    plan->count = 0;
}

/* Take `tuple` (self._plan as last read) as the plan for the rows that follow. */
static int plan_switch(Plan *plan, PyObject *tuple) {
    if (tuple == plan->tuple)
        return 0;
    Plan next;
    int rc = plan_load(&next, tuple);
    if (rc == 1)
        PyErr_SetString(PyExc_TypeError, "RowPlan._plan is not a tuple of (gap, kind, fn, constant, step, cache)");
    if (rc)
        return -1;
    if (plan_flush_nulls(plan) < 0) {
        plan_release(&next);
        return -1;
    }
    plan_release(plan);
    *plan = next;
    return 0;
}

/* ---- one masked value ---------------------------------------------------------------------- */

/* fn(value), through the step's cache like the reference. After a miss self._fill may have
 * switched a cache off and recompiled self._plan: *pending gets self._plan as it is now, and the
 * caller takes it at the end of the row (the reference rebinds its loop's plan, but the row in
 * progress keeps iterating the tuple it started with). */
static PyObject *step_result(PyObject *self, Step *s, const char *value, Py_ssize_t len,
                             Py_ssize_t cache_limit, Py_ssize_t rows, PyObject **pending) {
    PyObject *raw = PyBytes_FromStringAndSize(value, len);
    if (!raw)
        return NULL;
    PyObject *result;
    if (s->cache != Py_None && len <= cache_limit) {
        result = PyDict_GetItemWithError(s->cache, raw);
        if (result) {
            Py_INCREF(result);
        } else if (!PyErr_Occurred()) {
            PyObject *seen = PyLong_FromSsize_t(rows);
            result = seen ? PyObject_CallMethodObjArgs(self, str_fill, s->step, raw, seen, NULL) : NULL;
            Py_XDECREF(seen);
            if (result) {
                PyObject *now = PyObject_GetAttr(self, str_plan);
                if (!now) {
                    Py_CLEAR(result);
                } else {
                    Py_XSETREF(*pending, now);
                }
            }
        }
    } else {
        result = PyObject_CallOneArg(s->fn, raw);
    }
    Py_DECREF(raw);
    return result;
}

/* new, masked, nulled = result, with the reference's errors for anything else */
static int unpack_detect(PyObject *result, PyObject **parts) {
    if (PyTuple_CheckExact(result) && PyTuple_GET_SIZE(result) == 3) {
        for (int i = 0; i < 3; i++) {
            parts[i] = PyTuple_GET_ITEM(result, i);
            Py_INCREF(parts[i]);
        }
        return 0;
    }
    if (Py_TYPE(result)->tp_iter == NULL && !PySequence_Check(result)) {
        PyErr_Format(PyExc_TypeError, "cannot unpack non-iterable %.200s object", Py_TYPE(result)->tp_name);
        return -1;
    }
    PyObject *it = PyObject_GetIter(result);
    if (!it)
        return -1;
    int got = 0;
    for (; got < 3; got++) {
        parts[got] = PyIter_Next(it);
        if (!parts[got])
            break;
    }
    if (got == 3) {
        PyObject *extra = PyIter_Next(it);
        if (!extra && !PyErr_Occurred()) {
            Py_DECREF(it);
            return 0;
        }
        if (extra) {
            Py_DECREF(extra);
            PyErr_SetString(PyExc_ValueError, "too many values to unpack (expected 3)");
        }
    } else if (!PyErr_Occurred()) {
        PyErr_Format(PyExc_ValueError, "not enough values to unpack (expected 3, got %d)", got);
    }
    for (int i = 0; i < got; i++)
        Py_DECREF(parts[i]);
    Py_DECREF(it);
    return -1;
}

/* step.counter.<name> += amount, attribute by attribute as the reference does */
static int counter_add(PyObject *step, PyObject *name, PyObject *amount) {
    PyObject *counter = PyObject_GetAttr(step, str_counter);
    if (!counter)
        return -1;
    PyObject *old = PyObject_GetAttr(counter, name);
    PyObject *sum = old ? PyNumber_InPlaceAdd(old, amount) : NULL;
    Py_XDECREF(old);
    int rc = sum ? PyObject_SetAttr(counter, name, sum) : -1;
    Py_XDECREF(sum);
    Py_DECREF(counter);
    return rc;
}

/* A DETECT result: counts added, *out_new = the new value (a new reference). */
static int detect_outcome(PyObject *step, PyObject *result, PyObject **out_new) {
    PyObject *parts[3];
    if (unpack_detect(result, parts) < 0)
        return -1;
    int counted = PyObject_IsTrue(parts[1]);
    if (counted == 0)
        counted = PyObject_IsTrue(parts[2]);
    if (counted < 0 || (counted && (counter_add(step, str_values, parts[1]) < 0
                                    || counter_add(step, str_nulled, parts[2]) < 0))) {
        for (int i = 0; i < 3; i++)
            Py_DECREF(parts[i]);
        return -1;
    }
    Py_DECREF(parts[1]);
    Py_DECREF(parts[2]);
    *out_new = parts[0];
    return 0;
}

/* ---- the run ------------------------------------------------------------------------------- */

typedef struct {
    PyObject *self;
    const unsigned char *buf;
    Py_ssize_t buflen;
    Py_ssize_t last;            /* buf[last:] is not yet in out */
    Out out;
} Run;

/* A row with fewer columns than the plan covers, or no column count: RowPlan.mask_data_row. */
static int mask_irregular(Run *run, Py_ssize_t pos, Py_ssize_t end) {
    PyObject *payload = PyBytes_FromStringAndSize((const char *)run->buf + pos + 5, end - pos - 5);
    if (!payload)
        return -1;
    PyObject *masked = PyObject_CallMethodObjArgs(run->self, str_mask_data_row, payload, NULL);
    int rc = masked ? 0 : -1;
    if (masked && masked != payload) {
        Value v;
        rc = value_get(masked, &v);
        if (rc == 0) {
            rc = (check_i32(v.len + 4) < 0 || out_put(&run->out, run->buf + run->last, pos - run->last) < 0
                  || out_put(&run->out, "D", 1) < 0 || out_put_i32(&run->out, (int32_t)(v.len + 4)) < 0
                  || out_put(&run->out, v.data, v.len) < 0) ? -1 : 0;
            value_release(&v);
        }
        if (rc == 0)
            run->last = end;
    }
    Py_XDECREF(masked);
    Py_DECREF(payload);
    return rc;
}

/* A regular row buf[pos:end]: the planned columns masked, spliced between untouched slices.
 * Sets *changed when the row went into out. */
static int mask_regular(Run *run, Plan *plan, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t length,
                        PyObject *unchanged, Py_ssize_t cache_limit, Py_ssize_t rows,
                        PyObject **pending, int *changed) {
    const unsigned char *buf = run->buf;
    Out *out = &run->out;
    Py_ssize_t seg = pos + 5;       /* start of the row's bytes not yet copied */
    Py_ssize_t p = pos + 7;
    Py_ssize_t delta = 0;           /* change of the row's length */
    Py_ssize_t head = -1;           /* where the message length goes in out, once the row changed */
    *changed = 0;
    for (Py_ssize_t i = 0; i < plan->count; i++) {
        Step *s = &plan->steps[i];
        for (Py_ssize_t gap = s->gap; gap != 0; gap--) {
            if (check_word(p, run->buflen) < 0)
                return -1;
            int32_t ln = read_i32(buf + p);
            p += ln > 0 ? 4 + (Py_ssize_t)ln : 4;
        }
        if (check_word(p, run->buflen) < 0)
            return -1;
        int32_t ln = read_i32(buf + p);
        if (ln < 0) {
            p += 4;
            s->nulls++;
            continue;
        }
        Py_ssize_t vs = p + 4, ve = vs + ln;
        if (ve > end) {
            PyErr_SetString(PyExc_ValueError, "a DataRow column runs past the end of its message");
            return -1;
        }
        PyObject *masked;
        if (s->kind == KIND_CONSTANT) {
            masked = s->constant;
            Py_INCREF(masked);
        } else {
            PyObject *result = step_result(run->self, s, (const char *)buf + vs, ln, cache_limit, rows, pending);
            if (!result)
                return -1;
            if (s->kind == KIND_DETECT) {
                int rc = detect_outcome(s->step, result, &masked);
                Py_DECREF(result);
                if (rc < 0)
                    return -1;
                if (masked == unchanged) {
                    Py_DECREF(masked);
                    p = ve;
                    continue;
                }
            } else {
                masked = result;
            }
        }
        /* the row's leading bytes (and the rows before it) join out only once something changed */
        if (head < 0) {
            if (out_put(out, buf + run->last, pos + 1 - run->last) < 0 || out_reserve(out, 4) < 0) {
                Py_DECREF(masked);
                return -1;
            }
            head = out->len;
            out->len += 4;
        }
        int rc;
        if (masked == Py_None) {
            rc = (out_put(out, buf + seg, p - seg) < 0 || out_put(out, NULL_LENGTH, 4) < 0) ? -1 : 0;
            delta -= ln;
        } else {
            Value v;
            rc = value_get(masked, &v);
            if (rc == 0) {
                if (v.len == ln) {          /* same length: keep the length word */
                    rc = (out_put(out, buf + seg, vs - seg) < 0 || out_put(out, v.data, v.len) < 0) ? -1 : 0;
                } else {
                    rc = (out_put(out, buf + seg, p - seg) < 0 || check_i32(v.len) < 0
                          || out_put_i32(out, (int32_t)v.len) < 0 || out_put(out, v.data, v.len) < 0) ? -1 : 0;
                    delta += v.len - ln;
                }
                value_release(&v);
            }
        }
        Py_DECREF(masked);
        if (rc < 0)
            return -1;
        seg = p = ve;
    }
    if (head >= 0) {
        if (check_i32(length + delta) < 0)
            return -1;
        store_i32(out->data + head, (int32_t)(length + delta));
        run->last = seg;
        *changed = 1;
    }
    return 0;
}

/* self._tally(regular, regular, changed), after the NULL counts reached the steps */
static int tally(PyObject *self, Plan *plan, Py_ssize_t regular, Py_ssize_t changed) {
    if (plan_flush_nulls(plan) < 0)
        return -1;
    PyObject *r = PyLong_FromSsize_t(regular);
    PyObject *c = r ? PyLong_FromSsize_t(changed) : NULL;
    PyObject *done = c ? PyObject_CallMethodObjArgs(self, str_tally, r, r, c, NULL) : NULL;
    Py_XDECREF(r);
    Py_XDECREF(c);
    if (!done)
        return -1;
    Py_DECREF(done);
    return 0;
}

/* The reference's `finally: self._tally(...)`: runs on error too, and an error of its own
 * is raised with the first one as its context. */
static int tally_finally(PyObject *self, Plan *plan, Py_ssize_t regular, Py_ssize_t changed) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    int rc = tally(self, plan, regular, changed);
    if (!type)
        return rc;
    if (rc == 0) {
        PyErr_Restore(type, value, tb);
        return -1;
    }
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb)
        PyException_SetTraceback(value, tb);
    PyObject *type2, *value2, *tb2;
    PyErr_Fetch(&type2, &value2, &tb2);
    PyErr_NormalizeException(&type2, &value2, &tb2);
    PyException_SetContext(value2, value);      /* steals value */
    Py_DECREF(type);
    Py_XDECREF(tb);
    PyErr_Restore(type2, value2, tb2);
    return -1;
}

static int as_index(PyObject *obj, Py_ssize_t *out) {
    if (!PyLong_Check(obj))
        return 1;
    *out = PyLong_AsSsize_t(obj);
    if (*out == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 1;
    }
    return 0;
}

static PyObject *mask_rows(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "mask_rows(plan, buf, pos, n, unchanged, cache_value_bytes)");
        return NULL;
    }
    PyObject *self = args[0], *bufobj = args[1], *unchanged = args[4];
    Py_ssize_t pos, n, cache_limit, width;
    if (!PyBytes_Check(bufobj) || as_index(args[2], &pos) || as_index(args[3], &n)
        || as_index(args[5], &cache_limit))
        goto reference;
    if (pos < 0 || n > PyBytes_GET_SIZE(bufobj))
        goto reference;
    PyObject *width_obj = PyObject_GetAttr(self, str_width);
    if (!width_obj)
        return NULL;
    int odd = as_index(width_obj, &width);
    Py_DECREF(width_obj);
    if (odd)
        goto reference;
    PyObject *plan_obj = PyObject_GetAttr(self, str_plan);
    if (!plan_obj)
        return NULL;
    Plan plan;
    int loaded = plan_load(&plan, plan_obj);
    Py_DECREF(plan_obj);
    if (loaded < 0)
        return NULL;
    if (loaded == 1)
        goto reference;

    Run run = {self, (const unsigned char *)PyBytes_AS_STRING(bufobj), PyBytes_GET_SIZE(bufobj), pos, {NULL, 0, 0}};
    const unsigned char *buf = run.buf;
    Py_ssize_t start = pos, rows = 0, changed = 0, irregular = 0;
    PyObject *pending = NULL;       /* self._plan after a cache miss, for the next rows */
    int failed = 0;
    while (n - pos >= 5 && buf[pos] == 'D') {
        Py_ssize_t length = read_i32(buf + pos + 1);
        Py_ssize_t ncols = n - pos >= 7 ? read_i16(buf + pos + 5) : -1;
        Py_ssize_t end = pos + 1 + length;
        if (length < 4 || end > n)
            break;
        rows++;
        if (ncols < width || length < 6) {
            irregular++;
            if (mask_irregular(&run, pos, end) < 0) {
                failed = 1;
                break;
            }
            /* mask_data_row may have switched a cache off (and recompiled the plan) */
            PyObject *now = PyObject_GetAttr(self, str_plan);
            int rc = now ? plan_switch(&plan, now) : -1;
            Py_XDECREF(now);
            if (rc < 0) {
                failed = 1;
                break;
            }
            pos = end;
            continue;
        }
        int row_changed;
        int rc = mask_regular(&run, &plan, pos, end, length, unchanged, cache_limit, rows, &pending, &row_changed);
        if (rc == 0 && pending) {
            rc = plan_switch(&plan, pending);
            Py_CLEAR(pending);
        }
        if (rc < 0) {
            failed = 1;
            break;
        }
        changed += row_changed;
        pos = end;
    }
    Py_XDECREF(pending);
    PyObject *result = NULL;
    if (failed) {
        tally_finally(self, &plan, rows - irregular, changed);
    } else if (tally(self, &plan, rows - irregular, changed) == 0) {
        PyObject *data;
        if (run.out.len) {
            data = PyBytes_FromStringAndSize(run.out.data, run.out.len);
        } else {
            data = Py_None;
            Py_INCREF(data);
        }
        if (data)
            result = Py_BuildValue("(Nnnnn)", data, run.last, pos, rows, pos - start - rows);
    }
    PyMem_Free(run.out.data);
    plan_release(&plan);
    return result;

reference:
    return PyObject_CallMethodObjArgs(self, str_py_mask_rows, args[1], args[2], args[3], NULL);
}

static PyMethodDef methods[] = {
    {"mask_rows", (PyCFunction)(void (*)(void))mask_rows, METH_FASTCALL,
     "mask_rows(plan, buf, pos, n, unchanged, cache_value_bytes) -> (data, last, end, rows, nbytes)\n\n"
     "RowPlan.py_mask_rows(buf, pos, n) in C; `unchanged` is pgrow.UNCHANGED and\n"
     "`cache_value_bytes` pgrow.CACHE_VALUE_BYTES."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_pgrows", "Native DataRow masking loop (see enforcer/masking/pgrow.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__pgrows(void) {
    PyObject *structmod = PyImport_ImportModule("struct");
    if (!structmod)
        return NULL;
    StructError = PyObject_GetAttrString(structmod, "error");
    Py_DECREF(structmod);
    if (!StructError)
        return NULL;
#define INTERN(var, text) if (!((var) = PyUnicode_InternFromString(text))) return NULL
    INTERN(str_fill, "_fill");
    INTERN(str_mask_data_row, "mask_data_row");
    INTERN(str_tally, "_tally");
    INTERN(str_py_mask_rows, "py_mask_rows");
    INTERN(str_plan, "_plan");
    INTERN(str_width, "width");
    INTERN(str_skipped, "skipped");
    INTERN(str_counter, "counter");
    INTERN(str_values, "values");
    INTERN(str_nulled, "nulled");
#undef INTERN
    PyObject *m = PyModule_Create(&module_def);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "WHOLE", KIND_WHOLE) < 0 || PyModule_AddIntConstant(m, "CONSTANT", KIND_CONSTANT) < 0
        || PyModule_AddIntConstant(m, "DETECT", KIND_DETECT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
