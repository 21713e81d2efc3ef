/* The S13 ECR fast path (part of the eir.lists._lookup module; the Python side is
 * eir.interfaces.s13.S13Application.answer_run, called by eir.diameter.peer).
 *
 * answer_ecrs(messages, start, end, max_avps, templates, hot_lookup, decide, day, answers)
 *     -> (out: bytes, stop: int, records: list)
 *
 * Answers messages[start:stop], each a whole Diameter message (bytes) as
 * eir.diameter.codec.Framer cut it, and stops at the first one it does not take (or at
 * `end`): the caller hands that one to the generic path, then may call again after it. It
 * takes only a plain ME-Identity-Check-Request that the generic path would answer with a
 * verdict (2001 + Equipment-Status, or 5422), and answers it byte for byte as the generic
 * path would (eir.interfaces.s13.S13Application.handle_request):
 *
 *   - header: version 1, the length of the bytes object, flags exactly R|P (no E, no T, no
 *     reserved bit), command 324, application 16777252;
 *   - AVPs (cut as eir.diameter.codec.decode_avps cuts them: the same length checks, the
 *     padding skipped unread), at most `max_avps` at every depth of grouping
 *     (diameter.max_avps_per_message), each one of: Session-Id (ASCII), DRMP (0..15),
 *     Vendor-Specific-Application-Id { Vendor-Id } [ Auth-Application-Id ]
 *     [ Acct-Application-Id ] (Unsigned32 each), Auth-Session-State (0, 1), Origin-Host,
 *     Origin-Realm, Destination-Host, Destination-Realm, Route-Record (DiameterIdentity
 *     as eir.diameter.dictionary.IDENTITY matches one), User-Name (an IMSI: 5 to 15 ASCII
 *     digits), Terminal-Information (3GPP) [ IMEI ] [ Software-Version ] [ 3GPP2-MEID ] with
 *     an IMEI of 14 to 16 ASCII digits and an ASCII Software-Version; each at most once
 *     but Route-Record; the required ones present (S13 ECR grammar, TS 29.272 §5.2.4.1).
 *
 * Anything else -- another command, a T-flag retransmission (the duplicate cache's),
 * Proxy-Info (echoed by the generic path), an AVP not listed, any value the generic path
 * would refuse or must judge (non-ASCII strings) -- stops the run. So the fast path's
 * answers are a subset of the generic path's, never a different answer; the differential
 * tests (tests/test_fast_path.py, tests/fuzz: fast_path) hold it to that.
 *
 * The verdict is RuleSet.decide's: `hot_lookup` is Snapshot.hot_lookup (what decide asks
 * first); when it is the C ExactIndex's lookup() it is called here directly, and a verdict
 * it gives is decide's. Otherwise (NotImplemented, None: ranges, TAC rules, grandfathering,
 * the unknown policy; or no C index) `decide(imei, imsi, day)` is called. An exception there
 * stops the run before that message (the generic path answers it, 5012 if it raises again).
 *
 * `templates`: the four answer bodies after the Session-Id, by status (WHITELISTED,
 * BLACKLISTED, GREYLISTED, None = 5422), eir.interfaces.s13's. `records`: per answered
 * request (imei, imsi or None, verdict, Origin-Host bytes, answer bytes or None): what the
 * caller feeds to observations, counters, audit and (`answers` true) the duplicate cache.
 */
#include "_lookup.h"
#include <stdint.h>
#include <string.h>

#define ECR_COMMAND 324u
#define S13_APPLICATION 16777252u
#define VENDOR_3GPP 10415u
#define REQUEST_PROXIABLE 0xC0u  /* header flags R|P: nothing else set */
#define PROXIABLE 0x40u
#define AVP_VENDOR_BIT 0x80000000u  /* in an AVP's flags-and-length word */
#define MANDATORY 0x40u
#define SESSION_ID_CODE 263u

enum {
    SESSION_ID, DRMP, VENDOR_SPECIFIC_APPLICATION_ID, AUTH_SESSION_STATE, ORIGIN_HOST,
    ORIGIN_REALM, DESTINATION_HOST, DESTINATION_REALM, TERMINAL_INFORMATION, USER_NAME,
    IMEI, SOFTWARE_VERSION, MEID, VENDOR_ID, AUTH_APPLICATION_ID, ACCT_APPLICATION_ID,
    FIELD_COUNT
};

typedef struct {
    const uint8_t *data;  /* NULL: absent */
    uint32_t length;
} Span;

typedef struct {
    uint32_t code, vendor;
    const uint8_t *data;
    uint32_t length;
} Avp;

static inline uint32_t
be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* The next AVP of [*pos, end), as decode_avps cuts it; 0 where it raises AvpLengthError. */
static inline int
next_avp(const uint8_t **pos, const uint8_t *end, Avp *avp)
{
    const uint8_t *p = *pos;
    size_t left = (size_t)(end - p);
    if (left < 8)
        return 0;
    uint32_t word = be32(p + 4);
    uint32_t length = word & 0xFFFFFFu;
    avp->code = be32(p);
    if (word & AVP_VENDOR_BIT) {
        if (left < 12 || length < 12 || length > left)
            return 0;
        avp->vendor = be32(p + 8);
        avp->data = p + 12;
        avp->length = length - 12;
    } else {
        if (length < 8 || length > left)
            return 0;
        avp->vendor = 0;
        avp->data = p + 8;
        avp->length = length - 8;
    }
    size_t padded = ((size_t)length + 3) & ~(size_t)3;
    *pos = padded >= left ? end : p + padded;  /* decode_avps: `while pos < end` */
    return 1;
}

static inline int
is_ascii(const Avp *avp)
{
    for (uint32_t i = 0; i < avp->length; i++)
        if (avp->data[i] & 0x80)
            return 0;
    return 1;
}

static inline int
all_digits(const uint8_t *data, uint32_t length)
{
    for (uint32_t i = 0; i < length; i++)
        if ((unsigned)(data[i] - '0') > 9)
            return 0;
    return 1;
}

/* An Enumerated value (4 bytes) of at most `highest` (the values are 0..highest). */
static inline int
enumerated(const Avp *avp, uint32_t highest)
{
    return avp->length == 4 && be32(avp->data) <= highest;
}

/* A DiameterIdentity as eir.diameter.dictionary.IDENTITY matches one: 1 to 255 bytes,
 * dot-separated labels of 1 to 63 letters, digits, '_' and '-', no label starting or ending
 * with '-', no empty label, no trailing dot. */
static int
valid_identity(const uint8_t *p, uint32_t n)
{
    if (n < 1 || n > 255)
        return 0;
    uint32_t label = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t c = p[i];
        if (c == '.') {
            if (label == 0 || p[i - 1] == '-' || i == n - 1)
                return 0;
            label = 0;
            continue;
        }
        if (c == '-') {
            if (label == 0)
                return 0;
        } else if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                     (c >= '0' && c <= '9') || c == '_')) {
            return 0;
        }
        if (++label > 63)
            return 0;
    }
    return p[n - 1] != '-';
}

/* Record `avp` in fields[field]; 0 when it is there already (5009 in the generic path). */
static inline int
keep(Span *fields, int field, const Avp *avp)
{
    if (fields[field].data != NULL)
        return 0;
    fields[field].data = avp->data;
    fields[field].length = avp->length;
    return 1;
}

/* The children of Vendor-Specific-Application-Id; *count: AVPs so far (all depths). */
static int
application_id_ok(const Avp *group, long *count, long max_avps)
{
    Span fields[FIELD_COUNT] = {{NULL, 0}};
    const uint8_t *p = group->data, *end = group->data + group->length;
    Avp avp;
    while (p < end) {
        if (!next_avp(&p, end, &avp) || ++*count > max_avps || avp.vendor != 0 ||
                avp.length != 4)
            return 0;
        int field;
        switch (avp.code) {
        case 266: field = VENDOR_ID; break;
        case 258: field = AUTH_APPLICATION_ID; break;
        case 259: field = ACCT_APPLICATION_ID; break;
        default: return 0;
        }
        if (!keep(fields, field, &avp))
            return 0;
    }
    return fields[VENDOR_ID].data != NULL;
}

/* The children of Terminal-Information: an IMEI of 14 to 16 digits, kept in fields[IMEI]. */
static int
terminal_ok(const Avp *group, Span *fields, long *count, long max_avps)
{
    const uint8_t *p = group->data, *end = group->data + group->length;
    Avp avp;
    while (p < end) {
        if (!next_avp(&p, end, &avp) || ++*count > max_avps || avp.vendor != VENDOR_3GPP)
            return 0;
        int field;
        switch (avp.code) {
        case 1402:
            if (avp.length < 14 || avp.length > 16 || !all_digits(avp.data, avp.length))
                return 0;
            field = IMEI;
            break;
        case 1403:
            if (!is_ascii(&avp))
                return 0;
            field = SOFTWARE_VERSION;
            break;
        case 1471: field = MEID; break;
        default: return 0;
        }
        if (!keep(fields, field, &avp))
            return 0;
    }
    return fields[IMEI].data != NULL;
}

/* A plain ECR the fast path answers (see the top of this file): its AVPs in `fields`. */
static int
parse_ecr(const uint8_t *raw, Py_ssize_t size, long max_avps, Span *fields)
{
    if (size < 20 || raw[0] != 1 || (be32(raw) & 0xFFFFFFu) != (uint32_t)size ||
            be32(raw + 4) != ((REQUEST_PROXIABLE << 24) | ECR_COMMAND) ||
            be32(raw + 8) != S13_APPLICATION)
        return 0;
    memset(fields, 0, FIELD_COUNT * sizeof(Span));
    long count = 0;
    const uint8_t *p = raw + 20, *end = raw + size;
    Avp avp;
    while (p < end) {
        if (!next_avp(&p, end, &avp) || ++count > max_avps)
            return 0;
        int field;
        if (avp.vendor == VENDOR_3GPP && avp.code == 1401) {
            if (fields[TERMINAL_INFORMATION].data != NULL ||
                    !terminal_ok(&avp, fields, &count, max_avps))
                return 0;
            field = TERMINAL_INFORMATION;
        } else if (avp.vendor != 0) {
            return 0;
        } else {
            switch (avp.code) {
            case SESSION_ID_CODE:
                if (!is_ascii(&avp))
                    return 0;
                field = SESSION_ID;
                break;
            case 301:
                if (!enumerated(&avp, 15))
                    return 0;
                field = DRMP;
                break;
            case 260:
                if (fields[VENDOR_SPECIFIC_APPLICATION_ID].data != NULL ||
                        !application_id_ok(&avp, &count, max_avps))
                    return 0;
                field = VENDOR_SPECIFIC_APPLICATION_ID;
                break;
            case 277:
                if (!enumerated(&avp, 1))
                    return 0;
                field = AUTH_SESSION_STATE;
                break;
            case 264: field = ORIGIN_HOST; goto identity;
            case 296: field = ORIGIN_REALM; goto identity;
            case 293: field = DESTINATION_HOST; goto identity;
            case 283: field = DESTINATION_REALM; goto identity;
            case 282:  /* Route-Record: any number of them */
                if (!valid_identity(avp.data, avp.length))
                    return 0;
                continue;
            case 1:
                if (avp.length < 5 || avp.length > 15 || !all_digits(avp.data, avp.length))
                    return 0;
                field = USER_NAME;
                break;
            default:
                return 0;
            identity:
                if (!valid_identity(avp.data, avp.length))
                    return 0;
                break;
            }
        }
        if (!keep(fields, field, &avp))
            return 0;
    }
    return fields[SESSION_ID].data && fields[AUTH_SESSION_STATE].data &&
           fields[ORIGIN_HOST].data && fields[ORIGIN_REALM].data &&
           fields[DESTINATION_REALM].data && fields[TERMINAL_INFORMATION].data;
}

/* A growing output buffer. */
typedef struct {
    char *data;
    size_t length, capacity;
} Buffer;

static char *
buffer_room(Buffer *buffer, size_t more)
{
    if (buffer->length + more > buffer->capacity) {
        size_t capacity = buffer->capacity ? buffer->capacity : 4096;
        while (capacity < buffer->length + more)
            capacity *= 2;
        char *data = PyMem_Realloc(buffer->data, capacity);
        if (data == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        buffer->data = data;
        buffer->capacity = capacity;
    }
    return buffer->data + buffer->length;
}

/* decide's verdict for one request (a new reference), or NULL without an exception set
 * when the generic path must answer (an exception was raised). */
static PyObject *
verdict_for(PyObject *index, PyObject *decide, PyObject *imei, PyObject *imsi, PyObject *day)
{
    PyObject *args[3] = {imei, imsi, day};
    if (index != NULL) {
        PyObject *verdict = eir_exact_lookup(index, args, 3);
        if (verdict == NULL) {
            PyErr_Clear();
            return NULL;
        }
        if (verdict != Py_None && verdict != Py_NotImplemented)
            return verdict;
        Py_DECREF(verdict);
    }
    PyObject *verdict = PyObject_Vectorcall(decide, args, 3, NULL);
    if (verdict == NULL)
        PyErr_Clear();
    return verdict;
}

/* The template index of a verdict's status: 0..2 (EquipmentStatus), 3 (None), -1 else. */
static int
status_index(PyObject *verdict)
{
    PyObject *status = PyObject_GetAttrString(verdict, "status");
    if (status == NULL) {
        PyErr_Clear();
        return -1;
    }
    int index = -1;
    if (status == Py_None) {
        index = 3;
    } else if (PyLong_Check(status)) {
        long value = PyLong_AsLong(status);
        if (value >= 0 && value <= 2)
            index = (int)value;
        else
            PyErr_Clear();
    }
    Py_DECREF(status);
    return index;
}

static PyObject *
answer_ecrs(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "answer_ecrs() takes 9 arguments (messages, start, "
                        "end, max_avps, templates, hot_lookup, decide, day, answers)");
        return NULL;
    }
    PyObject *messages = args[0], *templates = args[4], *decide = args[6], *day = args[7];
    if (!PyList_Check(messages) || !PyTuple_Check(templates) ||
            PyTuple_GET_SIZE(templates) != 4 || !PyLong_Check(day)) {
        PyErr_SetString(PyExc_TypeError, "answer_ecrs(): messages must be a list, templates "
                        "a tuple of 4 bytes, day an int");
        return NULL;
    }
    for (int i = 0; i < 4; i++) {
        if (!PyBytes_Check(PyTuple_GET_ITEM(templates, i))) {
            PyErr_SetString(PyExc_TypeError, "answer_ecrs(): templates must be bytes");
            return NULL;
        }
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]), end = PyLong_AsSsize_t(args[2]);
    long max_avps = PyLong_AsLong(args[3]);
    int want_answers = PyObject_IsTrue(args[8]);
    if (PyErr_Occurred() || want_answers < 0)
        return NULL;
    if (end > PyList_GET_SIZE(messages))
        end = PyList_GET_SIZE(messages);
    if (start < 0)
        start = 0;
    PyObject *index = args[5] == Py_None ? NULL : eir_exact_index_of(args[5]);

    Buffer out = {NULL, 0, 0};
    PyObject *records = PyList_New(0);
    if (records == NULL)
        return NULL;
    Span fields[FIELD_COUNT];
    Py_ssize_t at = start;
    for (; at < end; at++) {
        PyObject *message = PyList_GET_ITEM(messages, at);
        if (!PyBytes_CheckExact(message))
            break;
        const uint8_t *raw = (const uint8_t *)PyBytes_AS_STRING(message);
        if (!parse_ecr(raw, PyBytes_GET_SIZE(message), max_avps, fields))
            break;
        PyObject *imei = PyUnicode_FromStringAndSize((const char *)fields[IMEI].data, 14);
        if (imei == NULL)
            goto error;
        PyObject *imsi = Py_None;
        Py_INCREF(imsi);
        if (fields[USER_NAME].data != NULL) {
            Py_DECREF(imsi);
            imsi = PyUnicode_FromStringAndSize((const char *)fields[USER_NAME].data,
                                               fields[USER_NAME].length);
            if (imsi == NULL) {
                Py_DECREF(imei);
                goto error;
            }
        }
        PyObject *verdict = verdict_for(index, decide, imei, imsi, day);
        int status = verdict == NULL ? -1 : status_index(verdict);
        if (status < 0) {
            Py_XDECREF(verdict);
            Py_DECREF(imei);
            Py_DECREF(imsi);
            break;  /* the generic path answers it */
        }
        /* The answer: header, Session-Id (flags M, as S13Application encodes it), template */
        PyObject *template = PyTuple_GET_ITEM(templates, status);
        uint32_t session_length = fields[SESSION_ID].length;
        size_t session_padded = ((size_t)session_length + 3) & ~(size_t)3;
        size_t length = 20 + 8 + session_padded + (size_t)PyBytes_GET_SIZE(template);
        char *answer = buffer_room(&out, length);
        PyObject *origin_host = answer == NULL ? NULL : PyBytes_FromStringAndSize(
            (const char *)fields[ORIGIN_HOST].data, fields[ORIGIN_HOST].length);
        if (origin_host == NULL) {
            Py_DECREF(verdict);
            Py_DECREF(imei);
            Py_DECREF(imsi);
            goto error;
        }
        uint8_t *w = (uint8_t *)answer;
        uint32_t words[2] = {0x01000000u | (uint32_t)length, (PROXIABLE << 24) | ECR_COMMAND};
        for (int i = 0; i < 2; i++) {
            w[4 * i] = (uint8_t)(words[i] >> 24);
            w[4 * i + 1] = (uint8_t)(words[i] >> 16);
            w[4 * i + 2] = (uint8_t)(words[i] >> 8);
            w[4 * i + 3] = (uint8_t)words[i];
        }
        memcpy(w + 8, raw + 8, 12);  /* application, Hop-by-Hop, End-to-End */
        uint32_t avp_length = 8 + session_length;
        uint8_t head[8] = {0, 0, SESSION_ID_CODE >> 8, SESSION_ID_CODE & 0xFF, MANDATORY,
                           (uint8_t)(avp_length >> 16), (uint8_t)(avp_length >> 8),
                           (uint8_t)avp_length};
        memcpy(w + 20, head, 8);
        memcpy(w + 28, fields[SESSION_ID].data, session_length);
        memset(w + 28 + session_length, 0, session_padded - session_length);
        memcpy(w + 28 + session_padded, PyBytes_AS_STRING(template),
               (size_t)PyBytes_GET_SIZE(template));
        PyObject *answer_bytes = Py_None;
        Py_INCREF(answer_bytes);
        if (want_answers) {
            Py_DECREF(answer_bytes);
            answer_bytes = PyBytes_FromStringAndSize(answer, (Py_ssize_t)length);
        }
        PyObject *record = answer_bytes == NULL ? NULL : PyTuple_New(5);
        if (record == NULL) {
            Py_XDECREF(answer_bytes);
            Py_DECREF(origin_host);
            Py_DECREF(verdict);
            Py_DECREF(imei);
            Py_DECREF(imsi);
            goto error;
        }
        PyTuple_SET_ITEM(record, 0, imei);
        PyTuple_SET_ITEM(record, 1, imsi);
        PyTuple_SET_ITEM(record, 2, verdict);
        PyTuple_SET_ITEM(record, 3, origin_host);
        PyTuple_SET_ITEM(record, 4, answer_bytes);
        int appended = PyList_Append(records, record);
        Py_DECREF(record);
        if (appended < 0)
            goto error;
        out.length += length;
    }
    PyObject *out_bytes = PyBytes_FromStringAndSize(out.data ? out.data : "",
                                                    (Py_ssize_t)out.length);
    PyMem_Free(out.data);
    if (out_bytes == NULL) {
        Py_DECREF(records);
        return NULL;
    }
    PyObject *result = Py_BuildValue("(NnN)", out_bytes, at, records);
    return result;

error:
    PyMem_Free(out.data);
    Py_DECREF(records);
    return NULL;
}

PyMethodDef eir_ecr_methods[] = {
    {"answer_ecrs", (PyCFunction)(void (*)(void))answer_ecrs, METH_FASTCALL,
     "answer_ecrs(messages, start, end, max_avps, templates, hot_lookup, decide, day, "
     "answers) -> (out, stop, records): the S13 ECR fast path (see eir/lists/_ecr.c)."},
    {NULL, NULL, 0, NULL},
};
