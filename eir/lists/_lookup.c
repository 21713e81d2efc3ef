/* eir.lists._lookup: the IMEI+IMSI and exact-IMEI levels of a snapshot lookup (eir.lists.snapshot), in C.
 *
 * ExactIndex(tac, tac_start, imei_key, imei_set_hi=None, imei_fence=None, *, pair_imei=None,
 *            pair_imsi=None, pair_set=None, resolve=None, set_count=0, wider=False)
 * holds buffer references to the snapshot's sections (memoryviews into its mmap or bytes).
 *
 *   index(imei: int)        the exact entry's attribute set index, or -1 when the IMEI has none.
 *                           Same search as the pure-Python path: binary search of the TAC in the
 *                           sorted TAC array, then the lower bound of (SNR << 12) in that TAC's
 *                           keys (through the coarse fence and the fence).
 *   index.pair(imei, imsi)  (ints) the set of the IMEI+IMSI entry, -1 when there is none, -2
 *                           when several entries match (the caller combines them).
 *   index.lookup(imei, imsi, day)
 *                           Snapshot.lookup in one call, from the request's strings: the
 *                           verdict of the IMEI+IMSI entry, else of the exact entry, else None;
 *                           NotImplemented when the Python path must answer (an IMEI that is
 *                           not plain ASCII digits, several IMEI+IMSI entries matching, a set
 *                           index out of range, or no verdict here while the snapshot has
 *                           ranges or TAC rules: wider=True). Verdicts come from
 *                           resolve(set, level, day) and are kept per (set, level) until `day`
 *                           changes: set_count sets.
 *
 * Why: with the exact search in C, what was left of a request's cost was the Python around
 * it (int() of both strings, the bisection of pair_imei over a memoryview, the verdict
 * cache's dict and tuple) and the memory misses of the searches; lookup() does the first in C
 * and cuts and overlaps the second (see "Memory misses" below). Optional: eir.lists.snapshot falls back to
 * the Python path when this module is not built.
 */
#include "_lookup.h"
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SNR_DIGITS 1000000ULL
#define SET_LOW_BITS 12
#define SET_LOW_MASK ((1u << SET_LOW_BITS) - 1u)
#define FENCE_STRIDE 64  /* imei_fence[k] == imei_key[64 * k] (eir.lists.snapshot.FENCE_STRIDE) */
#define COARSE_STRIDE 64  /* coarse_fence[j]: imei_fence[64 j]; pair_fence[j]: pair_imei[64 j] */

/* Precedence levels, as eir.lists.snapshot numbers them (IMEI_IMSI, IMEI): resolve's argument. */
#define LEVEL_IMEI_IMSI 0
#define LEVEL_IMEI 1

typedef struct {
    PyObject_HEAD
    Py_buffer tac, tac_start, key, set_hi, fence, pair_imei_view, pair_imsi_view, pair_set_view;
    int have_tac, have_tac_start, have_key, have_set_hi, have_fence, have_pairs;
    const uint32_t *tacs;
    const uint64_t *starts;
    const uint32_t *keys;
    const uint8_t *hi;
    const uint32_t *fences;
    Py_ssize_t tac_count, key_count;
    /* Every 64th imei_fence entry (every 4096th key) plus one, 0 until read: filled by the
     * searches like pair_fence below, for the same reason. A search inside a large TAC then
     * reads this small array and one 256-byte block of imei_fence instead of ~10 scattered
     * lines of it. */
    uint64_t *coarse_fence;
    size_t coarse_bytes;  /* its mapping's size (see fence_alloc) */
    /* IMEI+IMSI entries, sorted by IMEI (then IMSI) */
    const uint64_t *pair_imei, *pair_imsi;
    const uint32_t *pair_set;
    Py_ssize_t pair_count;
    /* Every 64th pair IMEI plus one, 0 until a search has read it: what imei_fence is to
     * imei_key, but the file has no such section, and building it at open would read the
     * whole of pair_imei (start-up would grow with the list, and the whole section would
     * count in the server's RSS). Filled by the searches that pass through, it holds the
     * probes every search makes after a few thousand lookups: a search then reads this
     * small array (1/64 of pair_imei) and one 512-byte block instead of ~10 scattered
     * cache lines (and pages) of pair_imei. See fence_alloc for its memory. */
    uint64_t *pair_fence;
    size_t pair_fence_bytes;
    /* The verdict cache of lookup(): verdicts[set * 2 + level] (a new reference, or NULL
     * while not yet asked) for verdict_day. It holds only Verdicts and None, and `resolve`
     * only the snapshot's attribute tables, none of which refers back to this object: no
     * cycle, so the type needs no GC support. */
    PyObject *resolve;
    PyObject **verdicts;
    Py_ssize_t set_count;
    long long verdict_day;
    /* The snapshot has levels below the exact IMEI (ranges, TAC rules): lookup() returns
     * NotImplemented instead of None when neither of its levels decides. */
    int wider;
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

#define HUGE_PAGE ((size_t)2 << 20)
#define HUGE_FROM ((size_t)256 << 10)

/* Zeroed memory for a coarse fence (*bytes: the mapping's size, for fence_free). Every
 * lookup reads these at random, among misses over mappings of hundreds of MB that keep the
 * TLB full: from 256 kB on (a pair fence from ~2 million pairs, a coarse fence from ~130
 * million keys) they are asked for in transparent huge pages, two entries of the TLB
 * instead of hundreds (where THP is enabled or set to madvise). Anonymous zero pages cost
 * nothing until written. */
static uint64_t *
fence_alloc(size_t items, size_t *bytes)
{
    size_t size = items * sizeof(uint64_t);
    size_t unit = size >= HUGE_FROM ? HUGE_PAGE : (size_t)sysconf(_SC_PAGESIZE);
    *bytes = (size + unit - 1) / unit * unit;
    void *memory = mmap(NULL, *bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                        -1, 0);
    if (memory == MAP_FAILED) {
        *bytes = 0;
        return NULL;
    }
#ifdef MADV_HUGEPAGE
    if (unit == HUGE_PAGE)
        madvise(memory, *bytes, MADV_HUGEPAGE);  /* a hint: failing is harmless */
#endif
    return memory;
}

static void
fence_free(uint64_t *fence, size_t bytes)
{
    if (fence != NULL)
        munmap(fence, bytes);
}

static void
clear_verdicts(ExactIndex *self)
{
    if (self->verdicts == NULL)
        return;
    for (Py_ssize_t i = 0; i < 2 * self->set_count; i++)
        Py_CLEAR(self->verdicts[i]);
}

static void
release(ExactIndex *self)
{
    if (self->have_tac) { PyBuffer_Release(&self->tac); self->have_tac = 0; }
    if (self->have_tac_start) { PyBuffer_Release(&self->tac_start); self->have_tac_start = 0; }
    if (self->have_key) { PyBuffer_Release(&self->key); self->have_key = 0; }
    if (self->have_set_hi) { PyBuffer_Release(&self->set_hi); self->have_set_hi = 0; }
    if (self->have_fence) { PyBuffer_Release(&self->fence); self->have_fence = 0; }
    if (self->have_pairs) {
        PyBuffer_Release(&self->pair_imei_view);
        PyBuffer_Release(&self->pair_imsi_view);
        PyBuffer_Release(&self->pair_set_view);
        self->have_pairs = 0;
    }
    /* Everything lookup() reads: after release() it finds nothing. */
    self->tacs = NULL; self->starts = NULL; self->keys = NULL; self->hi = NULL;
    self->fences = NULL;
    self->tac_count = 0; self->key_count = 0;
    fence_free(self->coarse_fence, self->coarse_bytes);
    self->coarse_fence = NULL;
    self->pair_imei = NULL; self->pair_imsi = NULL; self->pair_set = NULL;
    self->pair_count = 0;
    fence_free(self->pair_fence, self->pair_fence_bytes);
    self->pair_fence = NULL;
    clear_verdicts(self);
    PyMem_Free(self->verdicts);
    self->verdicts = NULL;
    self->set_count = 0;
    self->wider = 0;
    Py_CLEAR(self->resolve);
}

/* The three pair sections, all given or none. */
static int
get_pairs(ExactIndex *self, PyObject *imei, PyObject *imsi, PyObject *set)
{
    if (imei == Py_None && imsi == Py_None && set == Py_None)
        return 0;
    if (imei == Py_None || imsi == Py_None || set == Py_None) {
        PyErr_SetString(PyExc_TypeError, "pair_imei, pair_imsi and pair_set go together");
        return -1;
    }
    if (get_buffer(imei, &self->pair_imei_view, 8, "pair_imei") < 0)
        return -1;
    if (get_buffer(imsi, &self->pair_imsi_view, 8, "pair_imsi") < 0) {
        PyBuffer_Release(&self->pair_imei_view);
        return -1;
    }
    if (get_buffer(set, &self->pair_set_view, 4, "pair_set") < 0) {
        PyBuffer_Release(&self->pair_imei_view);
        PyBuffer_Release(&self->pair_imsi_view);
        return -1;
    }
    self->have_pairs = 1;
    self->pair_count = self->pair_imei_view.len / 8;
    if (self->pair_imsi_view.len / 8 != self->pair_count ||
            self->pair_set_view.len / 4 != self->pair_count) {
        PyErr_SetString(PyExc_ValueError, "pair_imei, pair_imsi and pair_set differ in length");
        return -1;
    }
    self->pair_imei = (const uint64_t *)self->pair_imei_view.buf;
    self->pair_imsi = (const uint64_t *)self->pair_imsi_view.buf;
    self->pair_set = (const uint32_t *)self->pair_set_view.buf;
    self->pair_fence = fence_alloc(
        (size_t)(self->pair_count + COARSE_STRIDE - 1) / COARSE_STRIDE + 1,
        &self->pair_fence_bytes);
    if (self->pair_fence == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static int
ExactIndex_init(ExactIndex *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"tac", "tac_start", "imei_key", "imei_set_hi", "imei_fence",
                               "pair_imei", "pair_imsi", "pair_set", "resolve", "set_count",
                               "wider", NULL};
    PyObject *tac, *tac_start, *key, *set_hi = Py_None, *fence = Py_None;
    PyObject *pair_imei = Py_None, *pair_imsi = Py_None, *pair_set = Py_None;
    PyObject *resolve = Py_None;
    Py_ssize_t set_count = 0;
    int wider = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|OO$OOOOnp:ExactIndex", keywords,
                                     &tac, &tac_start, &key, &set_hi, &fence, &pair_imei,
                                     &pair_imsi, &pair_set, &resolve, &set_count, &wider))
        return -1;
    release(self);  /* __init__ called twice */
    if (resolve != Py_None && !PyCallable_Check(resolve)) {
        PyErr_SetString(PyExc_TypeError, "resolve must be callable");
        return -1;
    }
    if (set_count < 0 || set_count > ((Py_ssize_t)1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "set_count out of range");
        return -1;
    }
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
    if (self->have_fence) {
        Py_ssize_t fence_count = self->fence.len / 4;
        self->coarse_fence = fence_alloc(
            (size_t)(fence_count + COARSE_STRIDE - 1) / COARSE_STRIDE + 1, &self->coarse_bytes);
        if (self->coarse_fence == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    if (get_pairs(self, pair_imei, pair_imsi, pair_set) < 0)
        return -1;
    if (resolve != Py_None) {
        self->verdicts = PyMem_Calloc(2 * (size_t)set_count + 1, sizeof(PyObject *));
        if (self->verdicts == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->set_count = set_count;
        self->wider = wider;
        self->verdict_day = -1;
        Py_INCREF(resolve);
        self->resolve = resolve;
    }
    return 0;
}

static void
ExactIndex_dealloc(ExactIndex *self)
{
    release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Memory misses. At national scale a lookup's cost is its misses, cache and TLB (in a VM a
 * TLB miss is a two-level page walk): imei_key and pair_imei are hundreds of MB, read at
 * random. Each search reads small arrays that stay in cache (the TAC directory, the coarse
 * fences below, filled as lookups pass), then blocks of large arrays: one 256-byte block
 * of imei_fence, then one of imei_key; one 512-byte block of pair_imei. The searches are
 * split into steps that end by prefetching the next block, and lookup() interleaves the
 * steps of the exact and the pair search, so that their misses overlap instead of following
 * each other. */

/* Prefetch [first, last) of an array, one call per 64-byte line. */
static inline void
prefetch_lines(const void *first, const void *last)
{
    for (const char *line = first; line < (const char *)last; line += 64)
        __builtin_prefetch(line);
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

/* The first index in [low, high) whose value is >= wanted (high if none). */
static inline Py_ssize_t
lower_bound64(const uint64_t *values, Py_ssize_t low, Py_ssize_t high, uint64_t wanted)
{
    Py_ssize_t count = high - low;
    while (count > 0) {
        Py_ssize_t half = count >> 1;
        if (values[low + half] < wanted) {
            low += half + 1;
            count -= half + 1;
        } else {
            count = half;
        }
    }
    return low;
}

/* The lower bound of `wanted` in values[first, end) lies in the range [*low, *high) found
 * here through a coarse fence: coarse[j] is values[64 j] plus one, or 0 until a search has
 * read it (then it is read from `values` and kept). The first j whose entry is >= wanted
 * bounds it: values[64 (j - 1)] < wanted <= values[64 j], at most 64 items. `wide`: the
 * values are uint64 (pair_imei), else uint32 (imei_fence); a constant at each call, so the
 * compiler drops the other branch. A value of UINT64_MAX is kept as 0, so read again each
 * time: still right. The searches run with the GIL held: no concurrent fill. */
static inline void
coarse_search(uint64_t *coarse, const void *values, int wide, Py_ssize_t first,
              Py_ssize_t end, uint64_t wanted, Py_ssize_t *low, Py_ssize_t *high)
{
    Py_ssize_t first_j = (first + COARSE_STRIDE - 1) / COARSE_STRIDE,
               end_j = (end + COARSE_STRIDE - 1) / COARSE_STRIDE;
    Py_ssize_t j = first_j, count = end_j - first_j;
    while (count > 0) {
        Py_ssize_t half = count >> 1, middle = j + half;
        uint64_t stored = coarse[middle];
        if (stored == 0) {
            stored = 1 + (wide ? ((const uint64_t *)values)[COARSE_STRIDE * middle]
                               : ((const uint32_t *)values)[COARSE_STRIDE * middle]);
            coarse[middle] = stored;
        }
        if (stored - 1 < wanted) {
            j = middle + 1;
            count -= half + 1;
        } else {
            count = half;
        }
    }
    *low = j > first_j ? (j - 1) * COARSE_STRIDE : first;
    *high = j < end_j ? j * COARSE_STRIDE : end;
}

/* An exact search in progress: the IMEI's TAC spans imei_key[first, last) and fences
 * [first_fence, end_fence); the fence that bounds its key is in [fence_low, fence_high),
 * then its key in imei_key[low, high). */
typedef struct {
    uint64_t first, last, low, high;
    Py_ssize_t first_fence, end_fence, fence_low, fence_high;
    uint32_t snr;
} ExactSearch;

/* Step 1: find the IMEI's TAC and, through the coarse fence (a few probes in a small array
 * that stays in cache), the 256-byte block of imei_fence to search; prefetch it. 0 when the
 * TAC has no exact entry. */
static inline int
exact_locate_fences(const ExactIndex *self, uint64_t imei, ExactSearch *search)
{
    uint64_t tac64 = imei / SNR_DIGITS;
    if (tac64 > UINT32_MAX || self->keys == NULL)
        return 0;
    uint32_t tac = (uint32_t)tac64;
    /* lower bound of tac in tacs */
    const uint32_t *tacs = self->tacs;
    Py_ssize_t low = (Py_ssize_t)lower_bound(tacs, 0, (uint64_t)self->tac_count, tac);
    if (low >= self->tac_count || tacs[low] != tac)
        return 0;
    search->snr = (uint32_t)(imei - tac64 * SNR_DIGITS);
    search->first = search->low = self->starts[low];
    search->last = search->high = self->starts[low + 1];
    search->first_fence = search->end_fence = 0;
    if (self->fences != NULL && search->first < search->last) {
        search->first_fence = (Py_ssize_t)((search->first + FENCE_STRIDE - 1) / FENCE_STRIDE);
        search->end_fence = (Py_ssize_t)((search->last + FENCE_STRIDE - 1) / FENCE_STRIDE);
        coarse_search(self->coarse_fence, self->fences, 0, search->first_fence,
                      search->end_fence, search->snr << SET_LOW_BITS, &search->fence_low,
                      &search->fence_high);
        prefetch_lines(self->fences + search->fence_low, self->fences + search->fence_high);
    }
    return 1;
}

/* Step 2: the first fence >= the wanted key among the TAC's (fence k is key 64k) bounds a
 * block of at most 64 keys; prefetch it. Without a fence (format 1) the block is the TAC. */
static inline void
exact_locate_keys(const ExactIndex *self, ExactSearch *search)
{
    if (search->first_fence == search->end_fence)
        return;
    uint64_t k = lower_bound(self->fences, (uint64_t)search->fence_low,
                             (uint64_t)(search->fence_high - search->fence_low),
                             search->snr << SET_LOW_BITS);
    search->low = k > (uint64_t)search->first_fence ? (k - 1) * FENCE_STRIDE : search->first;
    search->high = k < (uint64_t)search->end_fence ? k * FENCE_STRIDE : search->last;
    prefetch_lines(self->keys + search->low, self->keys + search->high);
}

/* Step 3: the attribute set of the exact entry, or -1. */
static inline long
exact_in_block(const ExactIndex *self, const ExactSearch *search)
{
    const uint32_t *keys = self->keys;
    uint64_t lo = lower_bound(keys, search->low, search->high - search->low,
                              search->snr << SET_LOW_BITS);
    if (lo >= search->last || (keys[lo] >> SET_LOW_BITS) != search->snr)
        return -1;
    long member = (long)(keys[lo] & SET_LOW_MASK);
    if (self->hi)
        member |= (long)self->hi[lo] << SET_LOW_BITS;
    return member;
}

static inline long
exact_find(const ExactIndex *self, uint64_t imei)
{
    ExactSearch search;
    if (!exact_locate_fences(self, imei, &search))
        return -1;
    exact_locate_keys(self, &search);
    return exact_in_block(self, &search);
}

/* Locate (and prefetch) the block of pair_imei [*low, *high) that holds the lower bound of
 * `imei`: at most 64 entries, found through the pair fence. */
static inline void
pair_block(const ExactIndex *self, uint64_t imei, Py_ssize_t *low, Py_ssize_t *high)
{
    coarse_search(self->pair_fence, self->pair_imei, 1, 0, self->pair_count, imei, low, high);
    prefetch_lines(self->pair_imei + *low, self->pair_imei + *high);
}

#define PAIR_NONE (-1)
#define PAIR_SEVERAL (-2)

/* The set of the IMEI+IMSI entry for (imei, imsi), searched from its located block;
 * PAIR_NONE, or PAIR_SEVERAL when more than one entry matches (a compiled snapshot merges
 * those, but the Python path can combine them: the caller hands it over). The entries of
 * one IMEI are its paired IMSIs, a handful: scanned like the Python path does. */
static inline long
pair_in_block(const ExactIndex *self, uint64_t imei, uint64_t imsi, Py_ssize_t low,
              Py_ssize_t high)
{
    const uint64_t *imeis = self->pair_imei;
    Py_ssize_t count = self->pair_count;
    long found = PAIR_NONE;
    for (Py_ssize_t i = lower_bound64(imeis, low, high, imei); i < count && imeis[i] == imei;
         i++) {
        if (self->pair_imsi[i] == imsi) {
            if (found != PAIR_NONE)
                return PAIR_SEVERAL;
            found = (long)self->pair_set[i];
        }
    }
    return found;
}

static inline long
pair_find(const ExactIndex *self, uint64_t imei, uint64_t imsi)
{
    Py_ssize_t low, high;
    pair_block(self, imei, &low, &high);
    return pair_in_block(self, imei, imsi, low, high);
}

/* A str of 1 to 19 ASCII digits as a number (what int() gives for it), or -1 for anything
 * else: then the Python path parses it, with int()'s own rules and errors. */
static inline long long
imei_number(PyObject *text)
{
    if (!PyUnicode_CheckExact(text) || !PyUnicode_IS_ASCII(text))
        return -1;
    Py_ssize_t length = PyUnicode_GET_LENGTH(text);
    if (length < 1 || length > 19)
        return -1;
    const Py_UCS1 *digits = PyUnicode_1BYTE_DATA(text);
    long long value = 0;
    for (Py_ssize_t i = 0; i < length; i++) {
        unsigned digit = (unsigned)digits[i] - '0';
        if (digit > 9)
            return -1;
        value = value * 10 + digit;
    }
    return value;
}

/* The IMSI as Snapshot.lookup reads it into *value: a str of ASCII digits is its value
 * (leading zeros and all, as int() reads it), anything else is no IMSI (0), and so is a value
 * beyond uint64, which no entry can hold (it pairs with nothing either way). Returns -1 for
 * a type the Python path must judge (not str, not None). */
static inline int
imsi_number(PyObject *text, uint64_t *value)
{
    *value = 0;
    if (text == Py_None)
        return 0;
    if (!PyUnicode_CheckExact(text))
        return -1;
    if (!PyUnicode_IS_ASCII(text))
        return 0;
    Py_ssize_t length = PyUnicode_GET_LENGTH(text);
    const Py_UCS1 *digits = PyUnicode_1BYTE_DATA(text);
    uint64_t number = 0;
    for (Py_ssize_t i = 0; i < length; i++) {
        unsigned digit = (unsigned)digits[i] - '0';
        if (digit > 9 || number > (UINT64_MAX - digit) / 10)
            return 0;  /* not all digits, or too large: pairs with nothing */
        number = number * 10 + digit;
    }
    *value = number;
    return 0;
}

/* The cached verdict of (set, level) on `day` as a new reference (a Verdict or None); NULL
 * with an exception set. */
static PyObject *
verdict_of(ExactIndex *self, long member, int level, long long day, PyObject *day_object)
{
    if (day != self->verdict_day) {  /* a registry entry's status depends on the day */
        clear_verdicts(self);
        self->verdict_day = day;
    }
    PyObject **slot = &self->verdicts[2 * member + level];
    if (*slot == NULL) {
        PyObject *verdict = PyObject_CallFunction(self->resolve, "liO", member, level,
                                                  day_object);
        if (verdict == NULL)
            return NULL;
        if (self->verdicts == NULL || day != self->verdict_day || member >= self->set_count) {
            /* resolve() ran Python code that released or re-initialised this index, or
             * asked for another day: answer without caching */
            return verdict;
        }
        slot = &self->verdicts[2 * member + level];
        Py_XSETREF(*slot, verdict);
    }
    Py_INCREF(*slot);
    return *slot;
}

static PyObject *
ExactIndex_lookup(ExactIndex *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "lookup() takes exactly 3 arguments (imei, imsi, day)");
        return NULL;
    }
    long long imei = imei_number(args[0]);
    /* no resolve (built without, or released), an IMEI or a day the Python path must read */
    if (self->resolve == NULL || imei < 0 || !PyLong_CheckExact(args[2]))
        Py_RETURN_NOTIMPLEMENTED;
    int day_overflow = 0;
    long long day = PyLong_AsLongLongAndOverflow(args[2], &day_overflow);
    if (day_overflow || day < 0)
        Py_RETURN_NOTIMPLEMENTED;
    uint64_t imsi = 0;
    if (self->pair_count > 0 && imsi_number(args[1], &imsi) < 0)
        Py_RETURN_NOTIMPLEMENTED;
    /* The steps of both searches interleaved (see "Memory misses" above): each step's
     * prefetch is in flight while the other search takes its next step. */
    ExactSearch search;
    int has_tac = exact_locate_fences(self, (uint64_t)imei, &search);
    Py_ssize_t pair_low = 0, pair_high = 0;
    if (imsi != 0)
        pair_block(self, (uint64_t)imei, &pair_low, &pair_high);
    if (has_tac)
        exact_locate_keys(self, &search);
    if (imsi != 0) {
        long member = pair_in_block(self, (uint64_t)imei, imsi, pair_low, pair_high);
        if (member == PAIR_SEVERAL || member >= self->set_count)
            Py_RETURN_NOTIMPLEMENTED;
        if (member >= 0) {
            PyObject *verdict = verdict_of(self, member, LEVEL_IMEI_IMSI, day, args[2]);
            if (verdict != Py_None)
                return verdict;  /* or NULL: the error */
            Py_DECREF(verdict);  /* no status from the pair: the IMEI alone decides */
            /* resolve() may have run Python code that released or re-initialised this
             * index: search again (rare: a pair with no status that day) */
            has_tac = exact_locate_fences(self, (uint64_t)imei, &search);
            if (has_tac)
                exact_locate_keys(self, &search);
        }
    }
    long member = has_tac ? exact_in_block(self, &search) : -1;
    if (member >= self->set_count)
        Py_RETURN_NOTIMPLEMENTED;
    if (member >= 0) {
        PyObject *verdict = verdict_of(self, member, LEVEL_IMEI, day, args[2]);
        if (verdict != Py_None || !self->wider)
            return verdict;  /* or NULL: the error */
        Py_DECREF(verdict);
    }
    if (self->wider)
        Py_RETURN_NOTIMPLEMENTED;  /* the ranges and TAC rules are the Python path's */
    Py_RETURN_NONE;
}

PyObject *
eir_exact_lookup(PyObject *index, PyObject *const *args, Py_ssize_t nargs)
{
    return ExactIndex_lookup((ExactIndex *)index, args, nargs);
}

static PyObject *
ExactIndex_pair(ExactIndex *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyLong_Check(args[0]) || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "pair() takes two ints (imei, imsi)");
        return NULL;
    }
    int overflow_imei = 0, overflow_imsi = 0;
    long long imei = PyLong_AsLongLongAndOverflow(args[0], &overflow_imei);
    if (imei == -1 && PyErr_Occurred())
        return NULL;
    unsigned long long imsi = 0;
    long long signed_imsi = PyLong_AsLongLongAndOverflow(args[1], &overflow_imsi);
    if (signed_imsi == -1 && PyErr_Occurred())
        return NULL;
    if (overflow_imsi > 0) {  /* above LLONG_MAX: still a uint64 IMSI maybe */
        imsi = PyLong_AsUnsignedLongLong(args[1]);
        if (imsi == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return PyLong_FromLong(PAIR_NONE);
        }
    } else if (overflow_imsi < 0 || signed_imsi < 0) {
        return PyLong_FromLong(PAIR_NONE);
    } else {
        imsi = (unsigned long long)signed_imsi;
    }
    if (overflow_imei || imei < 0 || self->pair_count == 0)
        return PyLong_FromLong(PAIR_NONE);
    return PyLong_FromLong(pair_find(self, (uint64_t)imei, (uint64_t)imsi));
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
    if (overflow || value < 0 || self->keys == NULL)
        return PyLong_FromLong(-1);  /* not a 14-digit IMEI (or released): no exact entry */
    return PyLong_FromLong(exact_find(self, (uint64_t)value));
}

static PyObject *
ExactIndex_release(ExactIndex *self, PyObject *Py_UNUSED(ignored))
{
    release(self);
    Py_RETURN_NONE;
}

static PyMethodDef ExactIndex_methods[] = {
    {"release", (PyCFunction)ExactIndex_release, METH_NOARGS,
     "Release the buffers and cached verdicts (the index then finds nothing)."},
    {"pair", (PyCFunction)(void (*)(void))ExactIndex_pair, METH_FASTCALL,
     "pair(imei, imsi): the set of the IMEI+IMSI entry, -1 if none, -2 if several match."},
    {"lookup", (PyCFunction)(void (*)(void))ExactIndex_lookup, METH_FASTCALL,
     "lookup(imei, imsi, day): the IMEI+IMSI, else the exact-IMEI verdict, None, or "
     "NotImplemented (the Python path must answer)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ExactIndexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "eir.lists._lookup.ExactIndex",
    .tp_doc = PyDoc_STR("ExactIndex(tac, tac_start, imei_key, imei_set_hi=None, imei_fence=None, "
                        "*, pair_imei=None, pair_imsi=None, pair_set=None, resolve=None, "
                        "set_count=0, wider=False): call with an IMEI (int) for its attribute "
                        "set index, or -1; see pair() and lookup()."),
    .tp_basicsize = sizeof(ExactIndex),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ExactIndex_init,
    .tp_dealloc = (destructor)ExactIndex_dealloc,
    .tp_call = (ternaryfunc)ExactIndex_call,
    .tp_methods = ExactIndex_methods,
};

PyObject *
eir_exact_index_of(PyObject *lookup)
{
    if (!PyCFunction_Check(lookup))
        return NULL;
    PyObject *self = PyCFunction_GET_SELF(lookup);
    if (self == NULL || Py_TYPE(self) != &ExactIndexType)
        return NULL;
    /* the lookup() method, not another one of the index */
    if (PyCFunction_GET_FUNCTION(lookup) != (PyCFunction)(void (*)(void))ExactIndex_lookup)
        return NULL;
    return self;
}

static struct PyModuleDef lookup_module = {
    PyModuleDef_HEAD_INIT, "eir.lists._lookup",
    "IMEI+IMSI and exact-IMEI snapshot search in C (optional; eir.lists.snapshot falls back to "
    "Python), and the S13 ECR fast path (answer_ecrs, eir/lists/_ecr.c; optional too: "
    "eir.interfaces.s13 then answers every request through the generic path).", -1,
    eir_ecr_methods,
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
