/* eir._lookup: the exact-IMEI level of a snapshot lookup (eir.snapshot), in C.
 *
 * ExactIndex(tac, tac_start, imei_key, imei_set_hi=None, imei_fence=None) holds buffer references to the
 * snapshot's sections (memoryviews into its mmap or bytes); calling it with a 14-digit IMEI
 * as an int returns the entry's attribute set index, or -1 when the IMEI has no exact entry.
 * Same search as the pure-Python path: binary search of the TAC in the sorted TAC array, then
 * the lower bound of (SNR << 12) in that TAC's keys. Optional: eir.snapshot falls back to the
 * Python path when this module is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define SNR_DIGITS 1000000ULL
#define SET_LOW_BITS 12
#define SET_LOW_MASK ((1u << SET_LOW_BITS) - 1u)
#define FENCE_STRIDE 64  /* imei_fence[k] == imei_key[64 * k] (eir.snapshot.FENCE_STRIDE) */

typedef struct {
    PyObject_HEAD
    Py_buffer tac, tac_start, key, set_hi, fence;
    int have_tac, have_tac_start, have_key, have_set_hi, have_fence;
    const uint32_t *tacs;
    const uint64_t *starts;
    const uint32_t *keys;
    const uint8_t *hi;
    const uint32_t *fences;
    Py_ssize_t tac_count, key_count;
} ExactIndex;

/* Accept a C-contiguous buffer of unsigned integers of the given size: the format must be one
 * of the single-letter codes with that item size ("I", "Q", "B", or "L" where 8 bytes). */
static int
get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, const char *name)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    const char *format = view->format ? view->format : "B";
    if (format[0] == '<' || format[0] == '=' || format[0] == '@')
        format++;
    int ok = view->itemsize == itemsize && strlen(format) == 1 &&
             strchr("BHILQ", format[0]) != NULL && view->len % itemsize == 0;
    if (!ok) {
        PyErr_Format(PyExc_TypeError,
                     "%s: expected a contiguous buffer of %zd-byte unsigned integers, "
                     "got format '%s' with item size %zd", name, itemsize,
                     view->format ? view->format : "B", view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static void
release(ExactIndex *self)
{
    if (self->have_tac) { PyBuffer_Release(&self->tac); self->have_tac = 0; }
    if (self->have_tac_start) { PyBuffer_Release(&self->tac_start); self->have_tac_start = 0; }
    if (self->have_key) { PyBuffer_Release(&self->key); self->have_key = 0; }
    if (self->have_set_hi) { PyBuffer_Release(&self->set_hi); self->have_set_hi = 0; }
    if (self->have_fence) { PyBuffer_Release(&self->fence); self->have_fence = 0; }
}

static int
ExactIndex_init(ExactIndex *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"tac", "tac_start", "imei_key", "imei_set_hi", "imei_fence",
                               NULL};
    PyObject *tac, *tac_start, *key, *set_hi = Py_None, *fence = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|OO:ExactIndex", keywords,
                                     &tac, &tac_start, &key, &set_hi, &fence))
        return -1;
    release(self);  /* __init__ called twice */
    if (get_buffer(tac, &self->tac, 4, "tac") < 0)
        return -1;
    self->have_tac = 1;
    if (get_buffer(tac_start, &self->tac_start, 8, "tac_start") < 0)
        return -1;
    self->have_tac_start = 1;
    if (get_buffer(key, &self->key, 4, "imei_key") < 0)
        return -1;
    self->have_key = 1;
    if (set_hi != Py_None) {
        if (get_buffer(set_hi, &self->set_hi, 1, "imei_set_hi") < 0)
            return -1;
        self->have_set_hi = 1;
    }
    if (fence != Py_None) {
        if (get_buffer(fence, &self->fence, 4, "imei_fence") < 0)
            return -1;
        self->have_fence = 1;
    }
    self->tacs = (const uint32_t *)self->tac.buf;
    self->starts = (const uint64_t *)self->tac_start.buf;
    self->keys = (const uint32_t *)self->key.buf;
    self->hi = self->have_set_hi ? (const uint8_t *)self->set_hi.buf : NULL;
    self->fences = self->have_fence ? (const uint32_t *)self->fence.buf : NULL;
    self->tac_count = self->tac.len / 4;
    self->key_count = self->key.len / 4;
    if (self->tac_start.len / 8 != self->tac_count + 1) {
        PyErr_SetString(PyExc_ValueError, "tac_start must hold one more item than tac");
        return -1;
    }
    if (self->have_fence &&
            self->fence.len / 4 != (self->key_count + FENCE_STRIDE - 1) / FENCE_STRIDE) {
        PyErr_SetString(PyExc_ValueError, "imei_fence must hold every 64th imei_key");
        return -1;
    }
    if (self->have_set_hi && self->set_hi.len != self->key_count) {
        PyErr_SetString(PyExc_ValueError, "imei_set_hi must hold one item per imei_key");
        return -1;
    }
    /* The offsets come from a file: check them once here, not per call. */
    uint64_t previous = 0;
    for (Py_ssize_t i = 0; i <= self->tac_count; i++) {
        uint64_t start = self->starts[i];
        if (start < previous || start > (uint64_t)self->key_count) {
            PyErr_SetString(PyExc_ValueError, "tac_start is not ascending within imei_key");
            return -1;
        }
        previous = start;
    }
    return 0;
}

static void
ExactIndex_dealloc(ExactIndex *self)
{
    release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The first index in [low, low + count) whose value is >= wanted (low + count if none). */
static inline uint64_t
lower_bound(const uint32_t *values, uint64_t low, uint64_t count, uint32_t wanted)
{
    while (count > 0) {
        uint64_t half = count >> 1;
        if (values[low + half] < wanted) {
            low += half + 1;
            count -= half + 1;
        } else {
            count = half;
        }
    }
    return low;
}

static inline long
exact_find(const ExactIndex *self, uint64_t imei)
{
    uint64_t tac64 = imei / SNR_DIGITS;
    if (tac64 > UINT32_MAX)
        return -1;
    uint32_t tac = (uint32_t)tac64;
    uint32_t snr = (uint32_t)(imei - tac64 * SNR_DIGITS);
    /* lower bound of tac in tacs */
    const uint32_t *tacs = self->tacs;
    Py_ssize_t low = (Py_ssize_t)lower_bound(tacs, 0, (uint64_t)self->tac_count, tac);
    if (low >= self->tac_count || tacs[low] != tac)
        return -1;
    uint64_t first = self->starts[low], last = self->starts[low + 1];
    const uint32_t *keys = self->keys;
    uint32_t wanted = snr << SET_LOW_BITS;
    uint64_t lo = first, n = last - first;
    if (self->fences != NULL && n > 0) {
        /* The first fence >= wanted among this TAC's (fence k is key 64k) bounds a block of
         * at most 64 keys: ~14 probes in the small fence array, then one 256-byte block. */
        const uint32_t *fences = self->fences;
        uint64_t first_fence = (first + FENCE_STRIDE - 1) / FENCE_STRIDE;
        uint64_t end_fence = (last + FENCE_STRIDE - 1) / FENCE_STRIDE;
        uint64_t k = lower_bound(fences, first_fence, end_fence - first_fence, wanted);
        uint64_t block_low = k > first_fence ? (k - 1) * FENCE_STRIDE : first;
        uint64_t block_high = k < end_fence ? k * FENCE_STRIDE : last;
        lo = block_low;
        n = block_high - block_low;
    }
    lo = lower_bound(keys, lo, n, wanted);
    if (lo >= last || (keys[lo] >> SET_LOW_BITS) != snr)
        return -1;
    long member = (long)(keys[lo] & SET_LOW_MASK);
    if (self->hi)
        member |= (long)self->hi[lo] << SET_LOW_BITS;
    return member;
}

static PyObject *
ExactIndex_call(ExactIndex *self, PyObject *args, PyObject *kwds)
{
    PyObject *number;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "ExactIndex() takes no keyword arguments");
        return NULL;
    }
    if (PyTuple_GET_SIZE(args) != 1) {
        PyErr_SetString(PyExc_TypeError, "ExactIndex() takes exactly one argument (imei)");
        return NULL;
    }
    number = PyTuple_GET_ITEM(args, 0);
    if (!PyLong_Check(number)) {
        PyErr_SetString(PyExc_TypeError, "imei must be an int");
        return NULL;
    }
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(number, &overflow);
    if (value == -1 && PyErr_Occurred())
        return NULL;
    if (overflow || value < 0)
        return PyLong_FromLong(-1);  /* not a 14-digit IMEI: no exact entry */
    return PyLong_FromLong(exact_find(self, (uint64_t)value));
}

static PyObject *
ExactIndex_release(ExactIndex *self, PyObject *Py_UNUSED(ignored))
{
    release(self);
    self->tacs = NULL; self->starts = NULL; self->keys = NULL; self->hi = NULL;
    self->fences = NULL;
    self->tac_count = 0; self->key_count = 0;
    Py_RETURN_NONE;
}

static PyMethodDef ExactIndex_methods[] = {
    {"release", (PyCFunction)ExactIndex_release, METH_NOARGS,
     "Release the buffers (the index then finds nothing)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ExactIndexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "eir._lookup.ExactIndex",
    .tp_doc = PyDoc_STR("ExactIndex(tac, tac_start, imei_key, imei_set_hi=None, imei_fence=None): "
                        "call with an IMEI (int) for its attribute set index, or -1."),
    .tp_basicsize = sizeof(ExactIndex),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ExactIndex_init,
    .tp_dealloc = (destructor)ExactIndex_dealloc,
    .tp_call = (ternaryfunc)ExactIndex_call,
    .tp_methods = ExactIndex_methods,
};

static struct PyModuleDef lookup_module = {
    PyModuleDef_HEAD_INIT, "eir._lookup",
    "Exact-IMEI snapshot search in C (optional; eir.snapshot falls back to Python).", -1,
    NULL,
};

PyMODINIT_FUNC
PyInit__lookup(void)
{
    if (PyType_Ready(&ExactIndexType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&lookup_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&ExactIndexType);
    if (PyModule_AddObject(module, "ExactIndex", (PyObject *)&ExactIndexType) < 0) {
        Py_DECREF(&ExactIndexType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
