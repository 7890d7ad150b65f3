/* The span worker's common spans, assembled in C: sipwatch.otlp_encode.SpanEncoder's
 * tx_flat (a transaction's CLIENT span) and call_flat (a call's SERVER span without RTP
 * figures or B2BUA legs), protobuf and OTLP/JSON, from the record tuples the proxy sends.
 *
 * In Python these cost ~57k instructions a span, most of it building part lists, packing
 * integers, hex and joins. The parts that carry text from the network (Call-ID, From, To,
 * Request-URI, method, host, status message) are still encoded by the Python encoder, once per
 * call or per distinct value, into its caches (masking and JSON escaping stay there, with
 * orjson); this module looks those cached parts up in the same dicts (calling the encoder's
 * method on a miss, exactly as Python does) and writes the per-span parts itself: ids, times,
 * events, figures, lengths.
 *
 * The span worker encodes into the encoder's outbox (add, take): the spans of the next delivery
 * go straight into two buffers, laid out as the OTLP request and the spans-file line hold them,
 * and a take copies each out once with the request's head and the line's head and tail. Before,
 * each span became two bytes objects and a tuple, appended to two lists that the delivery then
 * joined: in process (SIPp-shaped calls, 4 spans each), 7.45 -> 6.73 us a call for decoding,
 * encoding and both joins.
 *
 * It answers only for the types the proxy sends (ints, floats, None, tuples, lists). For any
 * other shape of a tuple or of one of its fields it runs the Python reference method instead,
 * so a hostile or malformed tuple gets exactly the Python result or exception. Lengths are
 * computed from the parts (any size), buffers grow as needed, every failure is an exception.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define TWO64 18446744073709551616.0
#define FLAG_HAS_IS_REMOTE 0x100
#define FLAG_IS_REMOTE 0x200

/* -- a growable output buffer ------------------------------------------------------------ */
typedef struct {
    char *p;
    Py_ssize_t len, cap;
} Buf;

static int buf_grow(Buf *b, Py_ssize_t more)
{
    if (more > PY_SSIZE_T_MAX / 2 - b->len) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + more)
        cap *= 2;
    char *p = PyMem_Realloc(b->p, (size_t)cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline int put(Buf *b, const char *s, Py_ssize_t n)
{
    if (b->cap - b->len < n && buf_grow(b, n) < 0)
        return -1;
    memcpy(b->p + b->len, s, (size_t)n);
    b->len += n;
    return 0;
}

#define PUTS(b, lit) put((b), (lit), (Py_ssize_t)(sizeof(lit) - 1))

/* a bytes object's content (the encoder's cached parts are bytes; anything else is a bug) */
static inline int put_bytes(Buf *b, PyObject *o)
{
    if (!PyBytes_Check(o)) {
        PyErr_SetString(PyExc_SystemError, "otlp encoder part is not bytes");
        return -1;
    }
    return put(b, PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o));
}

static int put_u64_dec(Buf *b, uint64_t v)
{
    /* two digits a step (times are 19 digits: a third of this module's own work, one at a time) */
    static const char pairs[] =
        "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
        "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
        "8081828384858687888990919293949596979899";
    char tmp[24];
    int i = 24;
    while (v >= 100) {
        unsigned k = (unsigned)(v % 100) * 2;
        v /= 100;
        tmp[--i] = pairs[k + 1];
        tmp[--i] = pairs[k];
    }
    if (v >= 10) {
        tmp[--i] = pairs[v * 2 + 1];
        tmp[--i] = pairs[v * 2];
    } else {
        tmp[--i] = (char)('0' + v);
    }
    return put(b, tmp + i, 24 - i);
}

static int put_hex(Buf *b, const unsigned char *s, int n)
{
    static const char digits[] = "0123456789abcdef";
    char tmp[64];
    for (int i = 0; i < n; i++) {
        tmp[2 * i] = digits[s[i] >> 4];
        tmp[2 * i + 1] = digits[s[i] & 15];
    }
    return put(b, tmp, 2 * n);
}

static int put_fixed64(Buf *b, uint64_t v)
{
    unsigned char tmp[8];
    for (int i = 0; i < 8; i++)
        tmp[i] = (unsigned char)(v >> (8 * i));
    return put(b, (const char *)tmp, 8);
}

static void be64(unsigned char *out, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        out[i] = (unsigned char)v;
        v >>= 8;
    }
}

static int varint_len(uint64_t n)
{
    int k = 1;
    while (n > 0x7f) {
        n >>= 7;
        k++;
    }
    return k;
}

static void varint_write(char *out, uint64_t n)
{
    while (n > 0x7f) {
        *out++ = (char)((n & 0x7f) | 0x80);
        n >>= 7;
    }
    *out = (char)n;
}

/* -- values of the tuples ------------------------------------------------------------------ */

/* int(x * 1e9) for the fixed64 fields: 1 and *out when x is a float whose nanoseconds fit in
 * an unsigned 64-bit integer, 0 when it is not (Python then raises, or handles the type) */
static int nanos(PyObject *o, uint64_t *out)
{
    if (!PyFloat_CheckExact(o))
        return 0;
    double x = PyFloat_AS_DOUBLE(o) * 1e9;
    if (!(x > -1.0 && x < TWO64))
        return 0;
    *out = x <= 0.0 ? 0 : (uint64_t)x;
    return 1;
}

/* an id that int.to_bytes(8, "big") takes: 1 and *out, or 0 (not an int, or out of range) */
static int id64(PyObject *o, uint64_t *out)
{
    if (!PyLong_Check(o))
        return 0;
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *out = (uint64_t)v;
    return 1;
}

/* a parent span id: as id64, and None (no parent, as 0: both are false to ``if parent``) */
static int parent64(PyObject *o, uint64_t *out)
{
    if (o == Py_None) {
        *out = 0;
        return 1;
    }
    return id64(o, out);
}

/* round(x, nd) and orjson.dumps of the result, for the figures the spans carry. Python's round
 * converts through the correctly rounded decimal string of nd places (dtoa mode 3), as
 * PyOS_double_to_string(x, 'f', nd) does; such a decimal with at most 15 significant digits is
 * what repr (and orjson, which writes repr's digits in plain notation from 1e-5 up to 1e16)
 * shows of the rounded double, trailing zeros dropped. Other values (huge, tiny, not finite)
 * go through Python: 0 is returned with *slow set. */
typedef struct {
    double value;
    char json[40];
    Py_ssize_t json_len;
    PyObject *slow; /* (float, bytes) from the encoder's Python helper, or NULL */
} Figure;

/* figure() without a decimal string, for most values: y = x * 10^nd (exact to half an ulp,
 * below 6e-8 under 1e9) rounds as the exact product does unless its fraction lies within 1e-6
 * of a half, so n, the nearest integer, is what round() finds, and n / 10^nd (two exact
 * operands, one correctly rounded division) the float it returns; its repr is n's digits with
 * the point put back and trailing zeros dropped. 0 when the value is left to figure()'s
 * general way (near a half, large, below 1e-4 but not zero, not finite). */
static int figure_fast(double x, int nd, Figure *f)
{
    double scale = nd == 3 ? 1e3 : 1e6;
    long long unit = nd == 3 ? 1000 : 1000000;
    double y = x * scale;
    if (!(y > -1e9 && y < 1e9))
        return 0;
    double n = floor(y), d = y - n;
    if (!(d < 0.499999 || d > 0.500001))
        return 0;
    if (d > 0.5)
        n += 1.0;
    long long k = (long long)n, a = k < 0 ? -k : k;
    if (k != 0 && a * 10000 < unit) /* below 1e-4: repr switches to an exponent */
        return 0;
    int neg = k < 0 || (k == 0 && signbit(x));
    f->value = k == 0 ? copysign(0.0, x) : n / scale;
    /* sign, integer part (at most 9 digits), point, nd fraction digits less trailing zeros */
    char digits[12];
    int nd_int = 0;
    long long ip = a / unit, fp = a % unit;
    do {
        digits[nd_int++] = (char)('0' + ip % 10);
        ip /= 10;
    } while (ip);
    char *w = f->json;
    if (neg)
        *w++ = '-';
    while (nd_int)
        *w++ = digits[--nd_int];
    *w++ = '.';
    char frac[6];
    for (int i = nd - 1; i >= 0; i--) {
        frac[i] = (char)('0' + fp % 10);
        fp /= 10;
    }
    int keep = nd;
    while (keep > 1 && frac[keep - 1] == '0')
        keep--;
    memcpy(w, frac, (size_t)keep);
    w += keep;
    f->json_len = (Py_ssize_t)(w - f->json);
    return 1;
}

static int figure(PyObject *round_json, double x, int nd, Figure *f)
{
    f->slow = NULL;
    if (figure_fast(x, nd, f))
        return 0;
    double limit = nd == 3 ? 1e12 : 1e9;
    if (isfinite(x) && fabs(x) < limit) {
        char *s = PyOS_double_to_string(x, 'f', nd, 0, NULL);
        if (s == NULL)
            return -1;
        double r = PyOS_string_to_double(s, NULL, NULL);
        if (r == -1.0 && PyErr_Occurred()) {
            PyMem_Free(s);
            return -1;
        }
        size_t n = strlen(s);
        if ((r == 0.0 || fabs(r) >= 1e-4) && n < sizeof(f->json)) {
            while (n > 2 && s[n - 1] == '0' && s[n - 2] != '.')
                n--;
            memcpy(f->json, s, n);
            f->json_len = (Py_ssize_t)n;
            f->value = r;
            PyMem_Free(s);
            return 0;
        }
        PyMem_Free(s);
    }
    PyObject *args[2];
    args[0] = PyFloat_FromDouble(x);
    if (args[0] == NULL)
        return -1;
    args[1] = PyLong_FromLong(nd);
    if (args[1] == NULL) {
        Py_DECREF(args[0]);
        return -1;
    }
    PyObject *got = PyObject_Vectorcall(round_json, args, 2, NULL);
    Py_DECREF(args[0]);
    Py_DECREF(args[1]);
    if (got == NULL)
        return -1;
    if (!PyTuple_CheckExact(got) || PyTuple_GET_SIZE(got) != 2 || !PyFloat_Check(PyTuple_GET_ITEM(got, 0))
        || !PyBytes_Check(PyTuple_GET_ITEM(got, 1))) {
        Py_DECREF(got);
        PyErr_SetString(PyExc_SystemError, "round_json must return (float, bytes)");
        return -1;
    }
    f->value = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(got, 0));
    f->slow = got;
    return 0;
}

static int put_figure_json(Buf *b, const Figure *f)
{
    if (f->slow)
        return put_bytes(b, PyTuple_GET_ITEM(f->slow, 1));
    return put(b, f->json, f->json_len);
}

static int put_double(Buf *b, double v)
{
    unsigned char tmp[8];
    if (PyFloat_Pack8(v, (char *)tmp, 1) < 0)
        return -1;
    return put(b, (const char *)tmp, 8);
}

/* -- the encoder ---------------------------------------------------------------------------- */
enum {
    R_PARTIES, R_PARTY, R_HOPS, R_HOP, R_FINALS, R_FINAL, R_EVENTS, R_EVENT_PARTS, R_CALL_PARTS,
    R_CALL_PART, R_STR, R_MASKED, R_ATTR, R_RTT, R_SETUP_MS, R_ANSWER_MS, R_DURATION_S, R_INVITE,
    R_CALL_HEAD, R_TX_PY, R_CALL_PY, R_ENCODE_PY, R_ROUND_JSON, R_MASK_URI, R_MASK_MODE, R_CALL_ID_MASK,
    R_CALL_ID_KEY, R_FROM_KEY, R_PARTY_MAX, R_MASKED_HEADS, R_PARTY_BY_TRACE, R_RESOURCE_FIELD, R_SCOPE_FIELD,
    R_SCHEMA_FIELD, R_JSON_HEAD, R_JSON_TAIL, R_COUNT
};

static const char *const ref_names[R_COUNT] = {
    "_parties", "_party", "_hops", "_hop", "_finals", "_final", "_events", "_event_parts", "_call_parts",
    "_call_part", "_str", "_masked", "attr", "_rtt", "_setup_ms", "_answer_ms", "_duration_s", "_invite",
    "_call_span_head", "tx_flat_py", "call_flat_py", "encode_py", "round_json", "_mask_uri", "mask_mode",
    "call_id_mask", "_call_id_key", "_from_key", "_party_max", "_masked_heads", "_party_by_trace",
    "_resource_field", "_scope_field", "_schema_field", "_json_head", "_json_tail",
};

/* The hop, final, event and call-part caches are dicts keyed by tuples of values, and a lookup
 * built the key tuple, hashed it (a tuple's hash is not kept: each time, with a peer tuple inside
 * it) and compared it item by item: ~600 instructions, several times a span (callgrind). The
 * worker's read hands out the same object for the same packed value (its memo), so most spans
 * come with the very objects the last one of their kind had: a small direct-mapped table keyed by
 * the objects' addresses, holding references to them (an address is not reused while the slot
 * holds its object), answers those without the dict. Only immutable values take part (bytes, str,
 * int, float, None, bool, and tuples of those), so the same objects mean equal keys; anything
 * else, and every miss here, goes to the dict as before, and what it answers is kept here. */
#define ID_SLOTS 64 /* a power of two */
#define ID_KEYS 4
enum { ID_HOPS, ID_FINALS, ID_EVENTS, ID_CALL_PARTS, ID_CACHES };

typedef struct {
    PyObject *key[ID_KEYS];
    PyObject *value;
} IdSlot;

typedef struct {
    PyObject_HEAD
    PyObject *ref[R_COUNT];
    PyObject *ruri_key; /* "sip.request.uri": the key _masked caches the Request-URI under */
    PyObject *retrans_key; /* "sip.retransmissions" */
    PyObject *to_key; /* "sip.to": the key _masked caches the To under */
    PyObject *udp; /* "udp": a call's transport when its first peer names none */
    Py_ssize_t party_max;
    Py_ssize_t heads_hits, heads_stored; /* of the masked heads since they were last emptied */
    Py_ssize_t heads_paused; /* values still to go without the masked heads (they were not hitting) */
    Buf pb, js;
    int busy; /* the buffers are in use (a callback that came back here takes the Python path) */
    /* the outbox: the spans gathered for the next delivery, as the request and the JSON line
     * will hold them (ScopeSpans.spans fields one after the other; JSON objects between commas) */
    Buf opb, ojs;
    Py_ssize_t n_out;
    /* in front of the hop, final, event and call-part caches: the last values found, by the
     * identity of their key's objects (see cached) */
    IdSlot ids[ID_CACHES][ID_SLOTS];
} Encoder;

static int encoder_traverse(Encoder *self, visitproc visit, void *arg)
{
    for (int i = 0; i < R_COUNT; i++)
        Py_VISIT(self->ref[i]);
    for (int c = 0; c < ID_CACHES; c++) {
        for (int i = 0; i < ID_SLOTS; i++) {
            for (int k = 0; k < ID_KEYS; k++)
                Py_VISIT(self->ids[c][i].key[k]);
            Py_VISIT(self->ids[c][i].value);
        }
    }
    return 0;
}

static void id_slot_clear(IdSlot *slot)
{
    for (int k = 0; k < ID_KEYS; k++)
        Py_CLEAR(slot->key[k]);
    Py_CLEAR(slot->value);
}

static int encoder_clear(Encoder *self)
{
    for (int i = 0; i < R_COUNT; i++)
        Py_CLEAR(self->ref[i]);
    Py_CLEAR(self->ruri_key);
    Py_CLEAR(self->retrans_key);
    Py_CLEAR(self->to_key);
    Py_CLEAR(self->udp);
    for (int c = 0; c < ID_CACHES; c++) {
        for (int i = 0; i < ID_SLOTS; i++)
            id_slot_clear(&self->ids[c][i]);
    }
    return 0;
}

static void encoder_dealloc(Encoder *self)
{
    PyObject_GC_UnTrack(self);
    encoder_clear(self);
    PyMem_Free(self->pb.p);
    PyMem_Free(self->js.p);
    PyMem_Free(self->opb.p);
    PyMem_Free(self->ojs.p);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int encoder_init(Encoder *self, PyObject *args, PyObject *kwds)
{
    PyObject *enc;
    if (!PyArg_ParseTuple(args, "O:Encoder", &enc))
        return -1;
    encoder_clear(self);
    for (int i = 0; i < R_COUNT; i++) {
        self->ref[i] = PyObject_GetAttrString(enc, ref_names[i]);
        if (self->ref[i] == NULL)
            return -1;
    }
    const int dicts[] = {R_PARTIES, R_HOPS, R_FINALS, R_EVENTS, R_CALL_PARTS, R_STR, R_MASKED_HEADS,
                         R_PARTY_BY_TRACE};
    for (size_t i = 0; i < sizeof(dicts) / sizeof(dicts[0]); i++) {
        if (!PyDict_CheckExact(self->ref[dicts[i]])) {
            PyErr_Format(PyExc_TypeError, "%s must be a dict", ref_names[dicts[i]]);
            return -1;
        }
    }
    const int pairs[] = {R_RTT, R_SETUP_MS, R_ANSWER_MS, R_DURATION_S, R_INVITE, R_CALL_HEAD, R_CALL_ID_KEY,
                         R_FROM_KEY};
    for (size_t i = 0; i < sizeof(pairs) / sizeof(pairs[0]); i++) {
        PyObject *o = self->ref[pairs[i]];
        if (!PyTuple_CheckExact(o) || PyTuple_GET_SIZE(o) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(o, 0))
            || !PyBytes_Check(PyTuple_GET_ITEM(o, 1))) {
            PyErr_Format(PyExc_TypeError, "%s must be a pair of bytes", ref_names[pairs[i]]);
            return -1;
        }
    }
    const int fixed[] = {R_RESOURCE_FIELD, R_SCOPE_FIELD, R_SCHEMA_FIELD, R_JSON_HEAD, R_JSON_TAIL};
    for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]); i++) {
        if (!PyBytes_CheckExact(self->ref[fixed[i]])) {
            PyErr_Format(PyExc_TypeError, "%s must be bytes", ref_names[fixed[i]]);
            return -1;
        }
    }
    self->ruri_key = PyUnicode_InternFromString("sip.request.uri");
    self->retrans_key = PyUnicode_InternFromString("sip.retransmissions");
    self->to_key = PyUnicode_InternFromString("sip.to");
    self->udp = PyUnicode_InternFromString("udp");
    if (self->ruri_key == NULL || self->retrans_key == NULL || self->to_key == NULL || self->udp == NULL)
        return -1;
    self->party_max = PyLong_AsSsize_t(self->ref[R_PARTY_MAX]);
    if (self->party_max == -1 && PyErr_Occurred())
        return -1;
    return 0;
}

/* a value whose object, while it lives, always compares equal to what it did: an exact bytes,
 * str, int, float, bool or None, or (one level) an exact tuple of those */
static int immutable_scalar(PyObject *o)
{
    return o == Py_None || PyBytes_CheckExact(o) || PyUnicode_CheckExact(o) || PyLong_CheckExact(o)
        || PyFloat_CheckExact(o) || PyBool_Check(o);
}

static int immutable_key(PyObject *o)
{
    if (immutable_scalar(o))
        return 1;
    if (!PyTuple_CheckExact(o))
        return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(o); i++) {
        if (!immutable_scalar(PyTuple_GET_ITEM(o, i)))
            return 0;
    }
    return 1;
}

/* the slot of the identity table ids for the key objects args[:nargs], or NULL when one of them
 * could change its value (then only the dict is asked) */
static IdSlot *id_slot(IdSlot *ids, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t h = 0x9E3779B97F4A7C15ULL;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        if (!immutable_key(args[i]))
            return NULL;
        h = (h ^ (uint64_t)(uintptr_t)args[i]) * 0xBF58476D1CE4E5B9ULL;
        h ^= h >> 29;
    }
    return &ids[h & (ID_SLOTS - 1)];
}

/* the slot's value (a new reference) when it was kept for these very objects, else NULL */
static PyObject *id_get(IdSlot *slot, PyObject *const *args, Py_ssize_t nargs)
{
    if (slot->value == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        if (slot->key[i] != args[i])
            return NULL;
    }
    Py_INCREF(slot->value);
    return slot->value;
}

static void id_put(IdSlot *slot, PyObject *const *args, Py_ssize_t nargs, PyObject *value)
{
    IdSlot old = *slot;
    for (Py_ssize_t i = 0; i < ID_KEYS; i++) {
        slot->key[i] = i < nargs ? args[i] : NULL;
        Py_XINCREF(slot->key[i]);
    }
    Py_INCREF(value);
    slot->value = value;
    id_slot_clear(&old); /* (last: the slot is whole before anything is freed) */
}

static PyObject *cached_dict(Encoder *self, int cache, int miss, PyObject *const *args, Py_ssize_t nargs,
                             Py_ssize_t n);

/* cache.get(key) or miss(*args): a new reference, checked to be a tuple of n items; the key is
 * the tuple of the arguments, or the one argument itself (as the Python methods key their caches:
 * _event_parts by the status alone) */
static PyObject *cached(Encoder *self, int cache, int miss, PyObject *const *args, Py_ssize_t nargs,
                        Py_ssize_t n)
{
    int which = cache == R_HOPS ? ID_HOPS : cache == R_FINALS ? ID_FINALS : cache == R_EVENTS ? ID_EVENTS
        : cache == R_CALL_PARTS ? ID_CALL_PARTS : -1;
    IdSlot *slot = which >= 0 && nargs <= ID_KEYS ? id_slot(self->ids[which], args, nargs) : NULL;
    PyObject *got = slot != NULL ? id_get(slot, args, nargs) : NULL;
    if (got != NULL)
        return got;
    got = cached_dict(self, cache, miss, args, nargs, n);
    if (got != NULL && slot != NULL)
        id_put(slot, args, nargs, got);
    return got;
}

/* (cached, through the dict) */
static PyObject *cached_dict(Encoder *self, int cache, int miss, PyObject *const *args, Py_ssize_t nargs,
                             Py_ssize_t n)
{
    PyObject *key;
    if (nargs == 1) {
        key = args[0];
        Py_INCREF(key);
    } else {
        key = PyTuple_New(nargs);
        if (key == NULL)
            return NULL;
        for (Py_ssize_t i = 0; i < nargs; i++) {
            Py_INCREF(args[i]);
            PyTuple_SET_ITEM(key, i, args[i]);
        }
    }
    PyObject *got = PyDict_GetItemWithError(self->ref[cache], key);
    Py_DECREF(key);
    if (got != NULL && PyObject_IsTrue(got) == 1) {
        Py_INCREF(got);
    } else {
        if (PyErr_Occurred())
            return NULL;
        got = PyObject_Vectorcall(self->ref[miss], args, (size_t)nargs, NULL);
        if (got == NULL)
            return NULL;
    }
    if (!PyTuple_CheckExact(got) || PyTuple_GET_SIZE(got) != n) {
        Py_DECREF(got);
        PyErr_Format(PyExc_SystemError, "%s returned an unexpected shape", ref_names[miss]);
        return NULL;
    }
    return got;
}

/* a (pb, json) pair: p is a tuple of two bytes */
static int as_pair(PyObject *p, PyObject **pb, PyObject **js)
{
    if (!PyTuple_CheckExact(p) || PyTuple_GET_SIZE(p) < 2 || !PyBytes_Check(PyTuple_GET_ITEM(p, 0))
        || !PyBytes_Check(PyTuple_GET_ITEM(p, 1))) {
        PyErr_SetString(PyExc_SystemError, "otlp encoder part is not a pair of bytes");
        return -1;
    }
    *pb = PyTuple_GET_ITEM(p, 0);
    *js = PyTuple_GET_ITEM(p, 1);
    return 0;
}

/* item i of tuple t as a (pb, json) pair */
static int pair_of(PyObject *t, Py_ssize_t i, PyObject **pb, PyObject **js)
{
    return as_pair(PyTuple_GET_ITEM(t, i), pb, js);
}

/* the masked string attribute (key, value) from the encoder's string cache, or built by its
 * ``masked`` method on a miss (which fills the cache): a new reference */
static PyObject *masked_attr(Encoder *self, PyObject *key, PyObject *value)
{
    PyObject *k = PyTuple_Pack(2, key, value);
    if (k == NULL)
        return NULL;
    PyObject *got = PyDict_GetItemWithError(self->ref[R_STR], k);
    Py_DECREF(k);
    if (got != NULL && PyObject_IsTrue(got) == 1) {
        Py_INCREF(got);
        return got;
    }
    if (PyErr_Occurred())
        return NULL;
    PyObject *args[2] = {key, value};
    return PyObject_Vectorcall(self->ref[R_MASKED], args, 2, NULL);
}

/* the retransmissions attribute of a span (the encoder's cached ``attr``): a new reference in
 * *retr, its two parts borrowed in *pb and *js */
static int retrans_attr(Encoder *self, PyObject *retrans, PyObject **retr, PyObject **pb, PyObject **js)
{
    PyObject *aargs[2] = {self->retrans_key, retrans};
    *retr = PyObject_Vectorcall(self->ref[R_ATTR], aargs, 2, NULL);
    if (*retr == NULL)
        return -1;
    return as_pair(*retr, pb, js);
}

static PyObject *python_path(Encoder *self, int which, PyObject *t)
{
    return PyObject_Vectorcall(self->ref[which], &t, 1, NULL);
}

/* the span as a ScopeSpans.spans field: tag 2, varint length, then the body written in
 * self->pb from offset 10 on (room left in front for the tag and the length); *n its size */
static const char *span_field(Encoder *self, Py_ssize_t *n)
{
    Buf *pb = &self->pb;
    uint64_t body = (uint64_t)(pb->len - 10);
    int k = varint_len(body);
    char *start = pb->p + 10 - 1 - k;
    start[0] = 0x12;
    varint_write(start + 1, body);
    *n = (Py_ssize_t)(1 + k) + pb->len - 10;
    return start;
}

/* (bytes(a), bytes(b)), a new tuple */
static PyObject *two_bytes(const char *a, Py_ssize_t na, const char *b, Py_ssize_t nb)
{
    PyObject *x = PyBytes_FromStringAndSize(a, na);
    if (x == NULL)
        return NULL;
    PyObject *y = PyBytes_FromStringAndSize(b, nb);
    if (y == NULL) {
        Py_DECREF(x);
        return NULL;
    }
    PyObject *t = PyTuple_New(2);
    if (t == NULL) {
        Py_DECREF(x);
        Py_DECREF(y);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, x);
    PyTuple_SET_ITEM(t, 1, y);
    return t;
}

/* the span as new bytes: (ScopeSpans.spans field, JSON object) */
static PyObject *finish(Encoder *self)
{
    Py_ssize_t n;
    const char *field = span_field(self, &n);
    return two_bytes(field, n, self->js.p, self->js.len);
}

/* the span just written into the outbox instead of new bytes objects: Py_None (a new
 * reference), or NULL with the outbox as it was */
static PyObject *finish_into(Encoder *self)
{
    Buf *js = &self->js;
    Py_ssize_t n;
    const char *field = span_field(self, &n);
    Py_ssize_t at_pb = self->opb.len, at_js = self->ojs.len;
    if (put(&self->opb, field, n) < 0
        || (self->n_out && PUTS(&self->ojs, ",") < 0) || put(&self->ojs, js->p, js->len) < 0) {
        self->opb.len = at_pb;
        self->ojs.len = at_js;
        return NULL;
    }
    self->n_out++;
    Py_RETURN_NONE;
}

static int begin(Encoder *self)
{
    self->pb.len = 0;
    self->js.len = 0;
    if (put(&self->pb, "\0\0\0\0\0\0\0\0\0\0", 10) < 0)
        return -1;
    return 0;
}

static int put_flags(Buf *pb, int remote)
{
    uint32_t v = FLAG_HAS_IS_REMOTE | (remote ? FLAG_IS_REMOTE : 0);
    char tmp[6] = {(char)0x85, 0x01, (char)(v & 0xff), (char)((v >> 8) & 0xff), 0, 0};
    return put(pb, tmp, 6);
}

static int put_ids(Buf *pb, const char *trace16, uint64_t span, uint64_t parent)
{
    unsigned char tmp[8];
    if (PUTS(pb, "\x0a\x10") < 0 || put(pb, trace16, 16) < 0 || PUTS(pb, "\x12\x08") < 0)
        return -1;
    be64(tmp, span);
    if (put(pb, (const char *)tmp, 8) < 0)
        return -1;
    if (parent) {
        be64(tmp, parent);
        if (PUTS(pb, "\x22\x08") < 0 || put(pb, (const char *)tmp, 8) < 0)
            return -1;
    }
    return 0;
}

static int put_times(Buf *pb, uint64_t start, uint64_t end)
{
    return PUTS(pb, "\x39") < 0 || put_fixed64(pb, start) < 0 || PUTS(pb, "\x41") < 0
        || put_fixed64(pb, end) < 0 ? -1 : 0;
}

/* JSON members of one attribute, after a comma unless it is the first */
static int put_attr_js(Buf *js, PyObject *part, int *first)
{
    if (!*first && PUTS(js, ",") < 0)
        return -1;
    *first = 0;
    return put_bytes(js, part);
}

/* a double attribute from its prefix pair and the figure: pb prefix + 8 bytes, JSON prefix +
 * number + "}}" */
static int put_double_attr(Buf *pb, Buf *js, PyObject *prefix, const Figure *f, int *first)
{
    if (put_bytes(pb, PyTuple_GET_ITEM(prefix, 0)) < 0 || put_double(pb, f->value) < 0)
        return -1;
    if (put_attr_js(js, PyTuple_GET_ITEM(prefix, 1), first) < 0 || put_figure_json(js, f) < 0)
        return -1;
    return PUTS(js, "}}");
}

/* -- a call's parties: SpanEncoder._party ----------------------------------------------------- */

/* does any of the 8 bytes of w need escaping in a JSON string (< 0x20, '"' or '\\')?
 * (the borrow tricks are exact for "some byte is": a borrow starts only at a byte that is) */
static inline int word_needs_escape(uint64_t w)
{
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    uint64_t ctl = (w - ones * 0x20) & ~w;
    uint64_t q = w ^ (ones * 0x22), bs = w ^ (ones * 0x5c);
    q = (q - ones) & ~q;
    bs = (bs - ones) & ~bs;
    return ((ctl | q | bs) & highs) != 0;
}

static inline int byte_needs_escape(unsigned char c)
{
    return c < 0x20 || c == '"' || c == '\\';
}

/* orjson.dumps of a str, from its UTF-8 s[0:n]: quotes, backslash and control characters
 * escaped (\b \t \n \f \r by name, the others as \u00xx), everything else as it is.
 * Clean runs are found 8 bytes at a time and copied whole: byte by byte, in two passes, this
 * was the span worker's costliest function (the spans file's and the summaries' strings). */
static int put_json_string(Buf *b, const char *s, Py_ssize_t n)
{
    static const char digits[] = "0123456789abcdef";
    if (n > (PY_SSIZE_T_MAX - 2) / 6) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t most = 6 * n + 2; /* every byte escaped as \u00XX, and the quotes */
    if (b->cap - b->len < most && buf_grow(b, most) < 0)
        return -1;
    char *o = b->p + b->len;
    *o++ = '"';
    Py_ssize_t i = 0;
    while (i < n) {
        Py_ssize_t j = i;
        while (j + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + j, 8);
            if (word_needs_escape(w))
                break;
            j += 8;
        }
        while (j < n && !byte_needs_escape((unsigned char)s[j]))
            j++;
        memcpy(o, s + i, (size_t)(j - i));
        o += j - i;
        if (j >= n)
            break;
        unsigned char c = (unsigned char)s[j];
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\t': *o++ = 't'; break;
        case '\n': *o++ = 'n'; break;
        case '\f': *o++ = 'f'; break;
        case '\r': *o++ = 'r'; break;
        default:
            *o++ = 'u';
            *o++ = '0';
            *o++ = '0';
            *o++ = digits[c >> 4];
            *o++ = digits[c & 15];
        }
        i = j + 1;
    }
    *o++ = '"';
    b->len = o - b->p;
    return 0;
}

static int put_varint(Buf *b, uint64_t n)
{
    char tmp[10];
    int k = varint_len(n);
    varint_write(tmp, n);
    return put(b, tmp, k);
}

/* (a, b, c, d, e): a, b, c borrowed (a reference added), d and e stolen (released on failure) */
static PyObject *tuple_steal5(PyObject *a, PyObject *b, PyObject *c, PyObject *d, PyObject *e)
{
    PyObject *t = PyTuple_New(5);
    if (t == NULL) {
        Py_DECREF(d);
        Py_DECREF(e);
        return NULL;
    }
    Py_INCREF(a);
    Py_INCREF(b);
    Py_INCREF(c);
    PyTuple_SET_ITEM(t, 0, a);
    PyTuple_SET_ITEM(t, 1, b);
    PyTuple_SET_ITEM(t, 2, c);
    PyTuple_SET_ITEM(t, 3, d);
    PyTuple_SET_ITEM(t, 4, e);
    return t;
}

/* SpanEncoder._encode_attr(key, s) of a str: (Span.attributes field, JSON KeyValue) */
static PyObject *str_attr(PyObject *key, PyObject *s)
{
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(s, &n);
    if (u == NULL)
        return NULL; /* (a lone surrogate: UnicodeEncodeError, as str.encode raises) */
    PyObject *kpb = PyTuple_GET_ITEM(key, 0), *kjs = PyTuple_GET_ITEM(key, 1);
    uint64_t value_len = 1 + (uint64_t)varint_len((uint64_t)n) + (uint64_t)n; /* AnyValue body */
    uint64_t kv_len = (uint64_t)PyBytes_GET_SIZE(kpb) + 1 + (uint64_t)varint_len(value_len) + value_len;
    Buf pb = {0}, js = {0};
    PyObject *out = NULL;
    if (PUTS(&pb, "\x4a") < 0 || put_varint(&pb, kv_len) < 0 || put_bytes(&pb, kpb) < 0 || PUTS(&pb, "\x12") < 0
        || put_varint(&pb, value_len) < 0 || PUTS(&pb, "\x0a") < 0 || put_varint(&pb, (uint64_t)n) < 0
        || put(&pb, u, n) < 0)
        goto done;
    if (put_bytes(&js, kjs) < 0 || PUTS(&js, "\"stringValue\":") < 0 || put_json_string(&js, u, n) < 0
        || PUTS(&js, "}}") < 0)
        goto done;
    out = two_bytes(pb.p, pb.len, js.p, js.len);
done:
    PyMem_Free(pb.p);
    PyMem_Free(js.p);
    return out;
}

/* trace_id.to_bytes(16, "big"): 0, or -1 when it is not an int of 128 bits (no error set) */
static int trace_bytes(PyObject *v, unsigned char *out)
{
    if (!PyLong_Check(v))
        return -1;
#if PY_VERSION_HEX >= 0x030D0000
    Py_ssize_t need = PyLong_AsNativeBytes(v, out, 16, Py_ASNATIVEBYTES_BIG_ENDIAN
                                           | Py_ASNATIVEBYTES_UNSIGNED_BUFFER | Py_ASNATIVEBYTES_REJECT_NEGATIVE);
    if (need < 0 || need > 16) {
        PyErr_Clear();
        return -1;
    }
#else
    if (_PyLong_AsByteArray((PyLongObject *)v, out, 16, 0, 0) < 0) {
        PyErr_Clear();
        return -1;
    }
#endif
    return 0;
}

/* -- masked From/To values whose head repeats -------------------------------------------------
 * A caller's From comes back with a new tag every call, so neither the party cache nor the
 * masking module's memo of whole values ever hits on it, and each call paid a Python call of
 * mask_uri. Here the masked head (everything before the last ";tag=") is remembered instead:
 * for a value made of one name-addr (no ':' before its '<', a '>' after it, no ',' after that)
 * and a tag holding none of ";?&,", mask_uri keeps the tag as it is and masks the head alone,
 * so the value masks to the masked head plus the tag's text. A head is remembered only from
 * mask_uri's own output for a whole value, and only when that output ends with the tag's text. */
#define MASKED_HEADS_MAX 4096 /* remembered heads; emptied when full (a cache, not a leak) */
#define MASKED_HEAD_MAX_LEN 1024 /* longer heads are not remembered */
/* masking.SHOWN_MAX: mask_uri cuts a value of more characters than this, so the masked head plus
 * the tag's text would be the wrong answer; a value of more bytes goes to mask_uri itself */
#define MASKED_VALUE_MAX 1024
/* when the heads fill up with fewer hits than one in HEADS_MIN_HIT_RATIO stores (callers whose
 * user part changes with every call, as well as the tag), the next HEADS_PAUSE values go straight
 * to mask_uri: storing heads that never come back costs more than it saves */
#define HEADS_MIN_HIT_RATIO 8
#define HEADS_PAUSE (16 * MASKED_HEADS_MAX)

/* the offset of the last ";tag=" of s when it is > 0 and what follows it holds none of ";?&,";
 * else -1 */
static Py_ssize_t tag_cut(const char *s, Py_ssize_t n)
{
    Py_ssize_t cut = -1;
    for (Py_ssize_t i = n - 5; i > 0; i--) {
        if (s[i] == ';' && memcmp(s + i, ";tag=", 5) == 0) {
            cut = i;
            break;
        }
    }
    if (cut < 0)
        return -1;
    for (Py_ssize_t i = cut + 5; i < n; i++) {
        char c = s[i];
        if (c == ';' || c == '?' || c == '&' || c == ',')
            return -1;
    }
    return cut;
}

/* s[0:cut] is one name-addr with header parameters: no ':' before the first '<', a '>' after
 * it, no ',' after that '>' */
static int one_name_addr(const char *s, Py_ssize_t cut)
{
    const char *lt = memchr(s, '<', (size_t)cut);
    if (lt == NULL || memchr(s, ':', (size_t)(lt - s)) != NULL)
        return 0;
    const char *gt = memchr(lt + 1, '>', (size_t)(cut - (lt + 1 - s)));
    if (gt == NULL)
        return 0;
    return memchr(gt + 1, ',', (size_t)(cut - (gt + 1 - s))) == NULL;
}

/* mask_uri(uri, mask_mode) (a new reference), through the remembered masked heads */
static PyObject *masked_uri(Encoder *self, PyObject *uri)
{
    PyObject *margs[2] = {uri, self->ref[R_MASK_MODE]};
    if (!PyBytes_CheckExact(uri))
        return PyObject_Vectorcall(self->ref[R_MASK_URI], margs, 2, NULL);
    const char *s = PyBytes_AS_STRING(uri);
    Py_ssize_t n = PyBytes_GET_SIZE(uri);
    if (self->heads_paused > 0) {
        self->heads_paused--;
        return PyObject_Vectorcall(self->ref[R_MASK_URI], margs, 2, NULL);
    }
    if (n > MASKED_VALUE_MAX)
        return PyObject_Vectorcall(self->ref[R_MASK_URI], margs, 2, NULL);
    Py_ssize_t cut = tag_cut(s, n);
    if (cut <= 0 || cut > MASKED_HEAD_MAX_LEN)
        return PyObject_Vectorcall(self->ref[R_MASK_URI], margs, 2, NULL);
    PyObject *heads = self->ref[R_MASKED_HEADS];
    PyObject *head = PyBytes_FromStringAndSize(s, cut);
    if (head == NULL)
        return NULL;
    PyObject *out = NULL, *tail = NULL;
    PyObject *masked_head = PyDict_GetItemWithError(heads, head); /* borrowed */
    Py_ssize_t k = cut;
    while (k < n && !((unsigned char)s[k] & 0x80))
        k++;
    if (masked_head != NULL && k < n) { /* a tag not in ASCII: mask_uri folds it (masking._fold) */
        out = PyObject_Vectorcall(self->ref[R_MASK_URI], margs, 2, NULL);
        goto done;
    }
    if (masked_head != NULL && PyUnicode_CheckExact(masked_head)) {
        tail = PyUnicode_DecodeUTF8(s + cut, n - cut, "replace"); /* ';' is ASCII: the parts decode as the whole */
        if (tail != NULL)
            out = PyUnicode_Concat(masked_head, tail);
        self->heads_hits++;
        goto done;
    }
    if (PyErr_Occurred())
        goto done;
    out = PyObject_Vectorcall(self->ref[R_MASK_URI], margs, 2, NULL);
    if (out == NULL || !PyUnicode_CheckExact(out) || !one_name_addr(s, cut))
        goto done;
    tail = PyUnicode_DecodeUTF8(s + cut, n - cut, "replace");
    if (tail == NULL) {
        Py_CLEAR(out);
        goto done;
    }
    Py_ssize_t tail_len = PyUnicode_GET_LENGTH(tail), out_len = PyUnicode_GET_LENGTH(out);
    Py_ssize_t ends = PyUnicode_Tailmatch(out, tail, 0, out_len, 1);
    if (ends < 0) {
        Py_CLEAR(out);
        goto done;
    }
    if (ends == 1) {
        PyObject *mh = PyUnicode_Substring(out, 0, out_len - tail_len);
        if (mh == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        if (PyDict_GET_SIZE(heads) >= MASKED_HEADS_MAX) {
            PyDict_Clear(heads);
            if (self->heads_hits * HEADS_MIN_HIT_RATIO < self->heads_stored)
                self->heads_paused = HEADS_PAUSE;
            self->heads_hits = self->heads_stored = 0;
        }
        self->heads_stored++;
        int rc = PyDict_SetItem(heads, head, mh);
        Py_DECREF(mh);
        if (rc < 0)
            Py_CLEAR(out);
    }
done:
    Py_DECREF(head);
    Py_XDECREF(tail);
    return out;
}

/* the party of a call (masked Call-ID, From and To attributes, trace id as bytes and hex),
 * built as SpanEncoder._party does and kept in its cache; Python builds what is not plain */
static PyObject *party_miss(Encoder *self, PyObject *const *args)
{
    PyObject *trace_id = args[0], *call_id = args[1], *from_uri = args[2], *to_uri = args[3];
    PyObject *mask = self->ref[R_CALL_ID_MASK];
    unsigned char tb[16];
    if ((mask == Py_None && !PyBytes_CheckExact(call_id)) || trace_bytes(trace_id, tb) < 0)
        return PyObject_Vectorcall(self->ref[R_PARTY], args, 4, NULL);
    PyObject *shown = NULL, *masked_from = NULL, *to = NULL, *cid = NULL, *frm = NULL, *got = NULL;
    if (mask == Py_None)
        shown = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(call_id), PyBytes_GET_SIZE(call_id), "replace");
    else
        shown = PyObject_Vectorcall(mask, &call_id, 1, NULL);
    if (shown == NULL)
        goto done;
    masked_from = masked_uri(self, from_uri);
    if (masked_from == NULL)
        goto done;
    if (!PyUnicode_CheckExact(shown) || !PyUnicode_CheckExact(masked_from)) {
        got = PyObject_Vectorcall(self->ref[R_PARTY], args, 4, NULL);
        goto done;
    }
    to = masked_attr(self, self->to_key, to_uri);
    if (to == NULL)
        goto done;
    cid = str_attr(self->ref[R_CALL_ID_KEY], shown);
    if (cid == NULL)
        goto done;
    frm = str_attr(self->ref[R_FROM_KEY], masked_from);
    if (frm == NULL)
        goto done;
    char hex[32];
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) {
        hex[2 * i] = digits[tb[i] >> 4];
        hex[2 * i + 1] = digits[tb[i] & 15];
    }
    PyObject *tbo = PyBytes_FromStringAndSize((const char *)tb, 16);
    PyObject *hexo = tbo ? PyBytes_FromStringAndSize(hex, 32) : NULL;
    if (hexo != NULL) /* (steals tbo and hexo; Py_BuildValue's format parsing was 3% of the worker) */
        got = tuple_steal5(cid, frm, to, tbo, hexo);
    else
        Py_XDECREF(tbo);
done:
    Py_XDECREF(shown);
    Py_XDECREF(masked_from);
    Py_XDECREF(to);
    Py_XDECREF(cid);
    Py_XDECREF(frm);
    return got;
}

/* the same bytes (the frames' values are copies: equal, rarely the same object) */
static int same_bytes(PyObject *a, PyObject *b)
{
    return a == b || (PyBytes_GET_SIZE(a) == PyBytes_GET_SIZE(b)
                      && memcmp(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(a)) == 0);
}

/* a party (a new reference) checked to be a tuple of 5; NULL (the reference dropped) when not */
static PyObject *party_checked(PyObject *got)
{
    if (got != NULL && (!PyTuple_CheckExact(got) || PyTuple_GET_SIZE(got) != 5)) {
        Py_DECREF(got);
        PyErr_SetString(PyExc_SystemError, "_party returned an unexpected shape");
        return NULL;
    }
    return got;
}

/* self._parties.get(key) or the party built now (a new reference, a tuple of 5) */
static PyObject *party_keyed(Encoder *self, PyObject *const *args)
{
    PyObject *key = PyTuple_Pack(4, args[0], args[1], args[2], args[3]);
    if (key == NULL)
        return NULL;
    PyObject *got = PyDict_GetItemWithError(self->ref[R_PARTIES], key);
    Py_DECREF(key);
    if (got != NULL && PyObject_IsTrue(got) == 1) {
        Py_INCREF(got);
    } else {
        if (PyErr_Occurred())
            return NULL;
        return party_checked(party_miss(self, args));
    }
    return party_checked(got);
}

/* the party of (trace id, Call-ID, From, To): a call's spans come with its trace id, so its party
 * is remembered under the trace id (with the three values it was built from, compared on a hit)
 * and found without a key tuple or hashes of the three values; other shapes: party_keyed */
static PyObject *party_of(Encoder *self, PyObject *const *args)
{
    PyObject *by_trace = self->ref[R_PARTY_BY_TRACE];
    int plain = PyLong_CheckExact(args[0]) && PyBytes_CheckExact(args[1]) && PyBytes_CheckExact(args[2])
        && PyBytes_CheckExact(args[3]);
    if (plain) {
        PyObject *e = PyDict_GetItemWithError(by_trace, args[0]); /* borrowed */
        if (e != NULL && same_bytes(PyTuple_GET_ITEM(e, 0), args[1]) && same_bytes(PyTuple_GET_ITEM(e, 1), args[2])
            && same_bytes(PyTuple_GET_ITEM(e, 2), args[3])) {
            PyObject *got = PyTuple_GET_ITEM(e, 3);
            Py_INCREF(got);
            return got;
        }
        if (e == NULL && PyErr_Occurred())
            return NULL;
    }
    /* plain values on a miss by trace id: built now. The keyed cache is only filled by the
     * Python path (values of other shapes), and the same values make the same party, so its
     * lookup (a 4-tuple, the hashes of three strings) would only cost: ~0.9k instructions a call, callgrind */
    PyObject *got = plain ? party_checked(party_miss(self, args)) : party_keyed(self, args);
    if (got == NULL || !plain)
        return got;
    PyObject *entry = PyTuple_Pack(4, args[1], args[2], args[3], got);
    if (entry == NULL) {
        Py_DECREF(got);
        return NULL;
    }
    if (PyDict_GET_SIZE(by_trace) >= self->party_max)
        PyDict_Clear(by_trace);
    int rc = PyDict_SetItem(by_trace, args[0], entry);
    Py_DECREF(entry);
    if (rc < 0)
        Py_CLEAR(got);
    return got;
}

/* tx_flat: a transaction's CLIENT span */
static PyObject *tx_fast(Encoder *self, PyObject *t, int into)
{
    if (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) != 20 || self->busy)
        return python_path(self, R_TX_PY, t);
    PyObject *const *f = &PyTuple_GET_ITEM(t, 0);
    PyObject *method = f[4], *cseq = f[5], *direction = f[6], *peer = f[7], *status = f[8];
    PyObject *t_first = f[10], *retrans = f[12], *timed_out = f[13], *events = f[14];
    uint64_t span, parent, call_span = 0, start, end;
    int call_span_ok = 0;
    /* the shapes handled here (anything else: the Python reference) */
    if (!id64(f[2], &span) || !parent64(f[3], &parent) || !nanos(f[9], &start) || !nanos(f[11], &end))
        return python_path(self, R_TX_PY, t);
    if (t_first != Py_None && !PyFloat_CheckExact(t_first))
        return python_path(self, R_TX_PY, t);
    if (!PyLong_Check(f[15]))
        return python_path(self, R_TX_PY, t);
    call_span_ok = id64(f[15], &call_span); /* (an int out of range differs from any parent) */
    Py_ssize_t n_events = 0;
    PyObject *const *ev = NULL;
    if (events != Py_None) {
        if (PyList_CheckExact(events)) {
            n_events = PyList_GET_SIZE(events);
            ev = &PyList_GET_ITEM(events, 0);
        } else if (PyTuple_CheckExact(events)) {
            n_events = PyTuple_GET_SIZE(events);
            ev = &PyTuple_GET_ITEM(events, 0);
        } else {
            return python_path(self, R_TX_PY, t);
        }
        for (Py_ssize_t i = 0; i < n_events; i++) {
            PyObject *e = ev[i];
            if (!((PyTuple_CheckExact(e) && PyTuple_GET_SIZE(e) == 2)
                  || (PyList_CheckExact(e) && PyList_GET_SIZE(e) == 2)))
                return python_path(self, R_TX_PY, t);
            PyObject *s = PySequence_Fast_GET_ITEM(e, 0), *et = PySequence_Fast_GET_ITEM(e, 1);
            if (!PyLong_Check(s))
                return python_path(self, R_TX_PY, t);
            int overflow;
            long long sv = PyLong_AsLongLongAndOverflow(s, &overflow);
            uint64_t ns;
            if ((overflow < 0 || (overflow == 0 && sv < 200)) && !nanos(et, &ns))
                return python_path(self, R_TX_PY, t);
        }
    }
    int is_call = PyObject_IsTrue(f[16]);
    int has_status = PyObject_IsTrue(status);
    int has_retrans = PyObject_IsTrue(retrans);
    if (is_call < 0 || has_status < 0 || has_retrans < 0)
        return NULL;

    /* the cached parts (strong references: a miss may empty another cache) */
    PyObject *party = NULL, *hop = NULL, *fin = NULL, *retr = NULL, *result = NULL;
    Figure rtt = {0};
    PyObject *pargs[4] = {f[1], f[17], f[18], f[19]};
    party = party_of(self, pargs);
    if (party == NULL)
        goto done;
    PyObject *hargs[4] = {method, cseq, direction, peer};
    hop = cached(self, R_HOPS, R_HOP, hargs, 4, 6);
    if (hop == NULL)
        goto done;
    PyObject *fargs[2] = {status, timed_out};
    fin = cached(self, R_FINALS, R_FINAL, fargs, 2, 3);
    if (fin == NULL)
        goto done;
    if (t_first != Py_None
        && figure(self->ref[R_ROUND_JSON], (PyFloat_AS_DOUBLE(t_first) - PyFloat_AS_DOUBLE(f[9])) * 1000.0, 3,
                  &rtt) < 0)
        goto done;
    PyObject *r_pb = NULL, *r_js = NULL;
    if (has_retrans && retrans_attr(self, retrans, &retr, &r_pb, &r_js) < 0)
        goto done;
    PyObject *cid_pb, *cid_js, *from_pb, *from_js, *to_pb, *to_js, *code_pb, *code_js, *err_pb, *err_js;
    PyObject *st_pb, *st_js;
    PyObject *tb = PyTuple_GET_ITEM(party, 3), *th = PyTuple_GET_ITEM(party, 4);
    if (pair_of(party, 0, &cid_pb, &cid_js) < 0 || pair_of(party, 1, &from_pb, &from_js) < 0
        || pair_of(party, 2, &to_pb, &to_js) < 0 || pair_of(fin, 0, &code_pb, &code_js) < 0
        || pair_of(fin, 1, &err_pb, &err_js) < 0 || pair_of(fin, 2, &st_pb, &st_js) < 0)
        goto done;
    for (int i = 0; i < 6; i++) {
        if (!PyBytes_Check(PyTuple_GET_ITEM(hop, i))) {
            PyErr_SetString(PyExc_SystemError, "hop part is not bytes");
            goto done;
        }
    }
    if (!PyBytes_Check(tb) || PyBytes_GET_SIZE(tb) != 16 || !PyBytes_Check(th)) {
        PyErr_SetString(PyExc_SystemError, "party trace id is not 16 bytes");
        goto done;
    }
    int remote = parent != 0 && (!is_call || !call_span_ok || parent != call_span);

    self->busy = 1;
    Buf *pb = &self->pb, *js = &self->js;
    unsigned char sb[8], pab[8];
    be64(sb, span);
    be64(pab, parent);
    int first = 1;
    if (begin(self) < 0 || put_ids(pb, PyBytes_AS_STRING(tb), span, parent) < 0
        || put_bytes(pb, PyTuple_GET_ITEM(hop, 4)) < 0 || put_times(pb, start, end) < 0
        || put_bytes(pb, PyTuple_GET_ITEM(hop, 0)) < 0 || put_bytes(pb, cid_pb) < 0
        || put_bytes(pb, PyTuple_GET_ITEM(hop, 2)) < 0)
        goto unbusy;
    /* JSON up to the attributes */
    if (PUTS(js, "{\"traceId\":\"") < 0 || put_bytes(js, th) < 0 || PUTS(js, "\",\"spanId\":\"") < 0
        || put_hex(js, sb, 8) < 0 || PUTS(js, "\",\"flags\":") < 0
        || put_u64_dec(js, FLAG_HAS_IS_REMOTE | (remote ? FLAG_IS_REMOTE : 0)) < 0
        || put_bytes(js, PyTuple_GET_ITEM(hop, 5)) < 0 || put_u64_dec(js, start) < 0
        || PUTS(js, "\",\"endTimeUnixNano\":\"") < 0 || put_u64_dec(js, end) < 0
        || PUTS(js, "\",\"attributes\":[") < 0 || put_attr_js(js, PyTuple_GET_ITEM(hop, 1), &first) < 0
        || put_attr_js(js, cid_js, &first) < 0 || put_attr_js(js, PyTuple_GET_ITEM(hop, 3), &first) < 0)
        goto unbusy;
    if (!is_call && (put_bytes(pb, from_pb) < 0 || put_bytes(pb, to_pb) < 0 || put_attr_js(js, from_js, &first) < 0
                     || put_attr_js(js, to_js, &first) < 0))
        goto unbusy;
    if (has_status && (put_bytes(pb, code_pb) < 0 || put_attr_js(js, code_js, &first) < 0))
        goto unbusy;
    if (t_first != Py_None && put_double_attr(pb, js, self->ref[R_RTT], &rtt, &first) < 0)
        goto unbusy;
    if (retr && (put_bytes(pb, r_pb) < 0 || put_attr_js(js, r_js, &first) < 0))
        goto unbusy;
    if (PyBytes_GET_SIZE(err_pb) && (put_bytes(pb, err_pb) < 0 || put_attr_js(js, err_js, &first) < 0))
        goto unbusy;
    if (PUTS(js, "],\"status\":") < 0 || put_bytes(js, st_js) < 0)
        goto unbusy;
    if (parent && (PUTS(js, ",\"parentSpanId\":\"") < 0 || put_hex(js, pab, 8) < 0 || PUTS(js, "\"") < 0))
        goto unbusy;
    /* events: provisional responses (the JSON ends with them) */
    int any = 0;
    for (Py_ssize_t i = 0; i < n_events; i++) {
        PyObject *e = ev[i];
        PyObject *s = PySequence_Fast_GET_ITEM(e, 0), *et = PySequence_Fast_GET_ITEM(e, 1);
        int overflow;
        long long sv = PyLong_AsLongLongAndOverflow(s, &overflow);
        if (!(overflow < 0 || (overflow == 0 && sv < 200)))
            continue;
        uint64_t ns = 0;  /* (nanos checked every event's time above; set all the same) */
        nanos(et, &ns);
        PyObject *parts = cached(self, R_EVENTS, R_EVENT_PARTS, &s, 1, 3);
        if (parts == NULL)
            goto unbusy;
        PyObject *e0 = PyTuple_GET_ITEM(parts, 0), *e1 = PyTuple_GET_ITEM(parts, 1), *e2 = PyTuple_GET_ITEM(parts, 2);
        int bad = put_bytes(pb, e0) < 0 || put_fixed64(pb, ns) < 0 || put_bytes(pb, e1) < 0
            || (any ? PUTS(js, ",{\"timeUnixNano\":\"") : PUTS(js, ",\"events\":[{\"timeUnixNano\":\"")) < 0
            || put_u64_dec(js, ns) < 0 || put_bytes(js, e2) < 0;
        Py_DECREF(parts);
        if (bad)
            goto unbusy;
        any = 1;
    }
    if ((any && PUTS(js, "]") < 0) || PUTS(js, "}") < 0)
        goto unbusy;
    if (put_bytes(pb, st_pb) < 0 || put_flags(pb, remote) < 0)
        goto unbusy;
    result = into ? finish_into(self) : finish(self);
unbusy:
    self->busy = 0;
done:
    Py_XDECREF(party);
    Py_XDECREF(hop);
    Py_XDECREF(fin);
    Py_XDECREF(retr);
    Py_XDECREF(rtt.slow);
    return result;
}

/* call_flat: a call's SERVER span, the proxy's common one (no RTP figures, no B2BUA legs) */
static PyObject *call_fast(Encoder *self, PyObject *t, int into)
{
    if (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) != 19 || self->busy)
        return python_path(self, R_CALL_PY, t);
    PyObject *const *f = &PyTuple_GET_ITEM(t, 0);
    PyObject *trace_id = f[1], *ruri = f[7], *outcome = f[8], *status = f[9], *t_setup = f[11];
    PyObject *t_answer = f[12], *retrans = f[14], *first_peer = f[16];
    uint64_t span, parent, start, end;
    if (f[15] != Py_None || f[18] != Py_None || !PyLong_Check(trace_id) || !id64(f[2], &span)
        || !parent64(f[3], &parent) || !nanos(f[10], &start) || !nanos(f[13], &end)
        || (t_setup != Py_None && !PyFloat_CheckExact(t_setup)) || (t_answer != Py_None && !PyFloat_CheckExact(t_answer)))
        return python_path(self, R_CALL_PY, t);
    PyObject *transport = NULL;
    if (first_peer == Py_None || (PyTuple_CheckExact(first_peer) && PyTuple_GET_SIZE(first_peer) <= 2))
        transport = NULL; /* "udp" */
    else if (PyTuple_CheckExact(first_peer))
        transport = PyTuple_GET_ITEM(first_peer, 2);
    else
        return python_path(self, R_CALL_PY, t);
    double t_start = PyFloat_AS_DOUBLE(f[10]), t_end = PyFloat_AS_DOUBLE(f[13]);
    int has_retrans = PyObject_IsTrue(retrans);
    if (has_retrans < 0)
        return NULL;

    PyObject *party = NULL, *head = NULL, *ru = NULL, *retr = NULL, *result = NULL;
    Figure setup = {0}, answer = {0}, duration = {0};
    PyObject *pargs[4] = {trace_id, f[4], f[5], f[6]};
    party = party_of(self, pargs);
    if (party == NULL)
        goto done;
    if (transport == NULL)
        transport = self->udp; /* (one object: the call parts' lookup by identity finds it) */
    PyObject *hargs[3] = {outcome, status, transport};
    head = cached(self, R_CALL_PARTS, R_CALL_PART, hargs, 3, 5);
    if (head == NULL)
        goto done;
    ru = masked_attr(self, self->ruri_key, ruri);
    if (ru == NULL)
        goto done;
    if (!PyTuple_CheckExact(ru) || PyTuple_GET_SIZE(ru) != 2) {
        PyErr_SetString(PyExc_SystemError, "_masked returned an unexpected shape");
        goto done;
    }
    if (t_setup != Py_None
        && figure(self->ref[R_ROUND_JSON], (PyFloat_AS_DOUBLE(t_setup) - t_start) * 1000.0, 3, &setup) < 0)
        goto done;
    if (t_answer != Py_None
        && (figure(self->ref[R_ROUND_JSON], (PyFloat_AS_DOUBLE(t_answer) - t_start) * 1000.0, 3, &answer) < 0
            || figure(self->ref[R_ROUND_JSON], t_end - PyFloat_AS_DOUBLE(t_answer), 6, &duration) < 0))
        goto done;
    PyObject *r_pb = NULL, *r_js = NULL;
    if (has_retrans && retrans_attr(self, retrans, &retr, &r_pb, &r_js) < 0)
        goto done;
    PyObject *cid_pb, *cid_js, *from_pb, *from_js, *to_pb, *to_js, *ru_pb, *ru_js, *st_pb, *st_js;
    PyObject *tb = PyTuple_GET_ITEM(party, 3), *th = PyTuple_GET_ITEM(party, 4);
    if (pair_of(party, 0, &cid_pb, &cid_js) < 0 || pair_of(party, 1, &from_pb, &from_js) < 0
        || pair_of(party, 2, &to_pb, &to_js) < 0 || pair_of(head, 4, &st_pb, &st_js) < 0)
        goto done;
    ru_pb = PyTuple_GET_ITEM(ru, 0);
    ru_js = PyTuple_GET_ITEM(ru, 1);
    for (int i = 0; i < 4; i++) {
        if (!PyBytes_Check(PyTuple_GET_ITEM(head, i))) {
            PyErr_SetString(PyExc_SystemError, "call part is not bytes");
            goto done;
        }
    }
    if (!PyBytes_Check(tb) || PyBytes_GET_SIZE(tb) != 16 || !PyBytes_Check(th) || !PyBytes_Check(ru_pb)
        || !PyBytes_Check(ru_js)) {
        PyErr_SetString(PyExc_SystemError, "call span part of an unexpected type");
        goto done;
    }
    int remote = parent != 0;
    PyObject *invite = self->ref[R_INVITE], *name_kind = self->ref[R_CALL_HEAD];

    self->busy = 1;
    Buf *pb = &self->pb, *js = &self->js;
    unsigned char sb[8], pab[8];
    be64(sb, span);
    be64(pab, parent);
    int first = 1;
    if (begin(self) < 0 || put_ids(pb, PyBytes_AS_STRING(tb), span, parent) < 0
        || put_bytes(pb, PyTuple_GET_ITEM(name_kind, 0)) < 0 || put_times(pb, start, end) < 0
        || put_bytes(pb, PyTuple_GET_ITEM(invite, 0)) < 0 || put_bytes(pb, cid_pb) < 0
        || put_bytes(pb, from_pb) < 0 || put_bytes(pb, to_pb) < 0 || put_bytes(pb, ru_pb) < 0
        || put_bytes(pb, PyTuple_GET_ITEM(head, 0)) < 0)
        goto unbusy;
    if (PUTS(js, "{\"traceId\":\"") < 0 || put_bytes(js, th) < 0 || PUTS(js, "\",\"spanId\":\"") < 0
        || put_hex(js, sb, 8) < 0 || PUTS(js, "\",\"flags\":") < 0
        || put_u64_dec(js, FLAG_HAS_IS_REMOTE | (remote ? FLAG_IS_REMOTE : 0)) < 0
        || put_bytes(js, PyTuple_GET_ITEM(name_kind, 1)) < 0 || put_u64_dec(js, start) < 0
        || PUTS(js, "\",\"endTimeUnixNano\":\"") < 0 || put_u64_dec(js, end) < 0
        || PUTS(js, "\",\"attributes\":[") < 0 || put_attr_js(js, PyTuple_GET_ITEM(invite, 1), &first) < 0
        || put_attr_js(js, cid_js, &first) < 0 || put_attr_js(js, from_js, &first) < 0
        || put_attr_js(js, to_js, &first) < 0 || put_attr_js(js, ru_js, &first) < 0
        || put_attr_js(js, PyTuple_GET_ITEM(head, 1), &first) < 0)
        goto unbusy;
    if (t_setup != Py_None && put_double_attr(pb, js, self->ref[R_SETUP_MS], &setup, &first) < 0)
        goto unbusy;
    if (t_answer != Py_None && (put_double_attr(pb, js, self->ref[R_ANSWER_MS], &answer, &first) < 0
                                || put_double_attr(pb, js, self->ref[R_DURATION_S], &duration, &first) < 0))
        goto unbusy;
    if (retr && (put_bytes(pb, r_pb) < 0 || put_attr_js(js, r_js, &first) < 0))
        goto unbusy;
    if (PyBytes_GET_SIZE(PyTuple_GET_ITEM(head, 2))
        && (put_bytes(pb, PyTuple_GET_ITEM(head, 2)) < 0 || put_attr_js(js, PyTuple_GET_ITEM(head, 3), &first) < 0))
        goto unbusy;
    if (PUTS(js, "],\"status\":") < 0 || put_bytes(js, st_js) < 0)
        goto unbusy;
    if (parent && (PUTS(js, ",\"parentSpanId\":\"") < 0 || put_hex(js, pab, 8) < 0 || PUTS(js, "\"") < 0))
        goto unbusy;
    if (PUTS(js, "}") < 0 || put_bytes(pb, st_pb) < 0 || put_flags(pb, remote) < 0)
        goto unbusy;
    result = into ? finish_into(self) : finish(self);
unbusy:
    self->busy = 0;
done:
    Py_XDECREF(party);
    Py_XDECREF(head);
    Py_XDECREF(ru);
    Py_XDECREF(retr);
    Py_XDECREF(setup.slow);
    Py_XDECREF(answer.slow);
    Py_XDECREF(duration.slow);
    return result;
}

static PyObject *encoder_tx(Encoder *self, PyObject *t)
{
    return tx_fast(self, t, 0);
}

static PyObject *encoder_call(Encoder *self, PyObject *t)
{
    return call_fast(self, t, 0);
}

/* one item of a frame onto pbs/lines; 1 when it failed with an Exception (counted), 0 when
 * appended, -1 on an error that must propagate (not an Exception, e.g. KeyboardInterrupt) */
/* 0: a transaction tuple tx_fast takes, 1: a call tuple call_fast takes (no B2BUA legs), -1:
 * anything else, for the Python loop */
static int fast_kind(PyObject *t)
{
    if (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) == 0 || !PyLong_CheckExact(PyTuple_GET_ITEM(t, 0)))
        return -1;
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(t, 0));
    if (kind == -1 && PyErr_Occurred()) {
        PyErr_Clear(); /* a huge kind */
        return -1;
    }
    if (kind == 0 && PyTuple_GET_SIZE(t) == 20)
        return 0;
    if (kind == 1 && PyTuple_GET_SIZE(t) == 19 && PyTuple_GET_ITEM(t, 18) == Py_None)
        return 1;
    return -1;
}

/* one item of a frame onto pbs/lines, or into the outbox when pbs is NULL (below) */
static int frame_item(Encoder *self, PyObject *t, PyObject *pbs, PyObject *lines);

/* tuples[i:] through frame_item (into the outbox while it holds fewer than limit spans and fewer
 * than max_bytes of protobuf spans, when pbs is NULL), failures added to *failed: the index of
 * the first item not taken, -1 on error */
static Py_ssize_t frame_items(Encoder *self, PyObject *tuples, Py_ssize_t i, PyObject *pbs, PyObject *lines,
                              Py_ssize_t limit, Py_ssize_t max_bytes, Py_ssize_t *failed)
{
    for (; i < PyList_GET_SIZE(tuples) && (pbs != NULL || (self->n_out < limit && self->opb.len < max_bytes)); i++) {
        PyObject *t = PyList_GET_ITEM(tuples, i);
        Py_INCREF(t);
        int k = frame_item(self, t, pbs, lines);
        Py_DECREF(t);
        if (k < 0)
            return -1;
        *failed += k;
    }
    return i;
}

static PyObject *encoder_frame(Encoder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "frame(tuples, pbs, lines) takes 3 arguments");
        return NULL;
    }
    PyObject *tuples = args[0], *pbs = args[1], *lines = args[2];
    if (!PyList_Check(tuples) || !PyList_Check(pbs) || !PyList_Check(lines)) {
        PyErr_SetString(PyExc_TypeError, "frame(tuples, pbs, lines) takes three lists");
        return NULL;
    }
    Py_ssize_t failed = 0;
    if (frame_items(self, tuples, 0, pbs, lines, 0, 0, &failed) < 0)
        return NULL;
    return PyLong_FromSsize_t(failed);
}

/* -- the outbox ---------------------------------------------------------------------------- */

/* a (pb, json) pair of bytes from the Python path into the outbox: 0, 1 when it is not such a
 * pair (counted as a failure, as SpanEncoder.add_py finds when joining), -1 on no memory */
static int out_pair(Encoder *self, PyObject *pair)
{
    if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(pair, 0))
        || !PyBytes_Check(PyTuple_GET_ITEM(pair, 1)))
        return 1;
    PyObject *p = PyTuple_GET_ITEM(pair, 0), *j = PyTuple_GET_ITEM(pair, 1);
    Py_ssize_t at_pb = self->opb.len, at_js = self->ojs.len;
    if (put_bytes(&self->opb, p) < 0 || (self->n_out && PUTS(&self->ojs, ",") < 0) || put_bytes(&self->ojs, j) < 0) {
        self->opb.len = at_pb;
        self->ojs.len = at_js;
        return -1;
    }
    self->n_out++;
    return 0;
}

/* one item of a frame onto pbs/lines, or into the outbox when pbs is NULL; 1 when it failed
 * with an Exception (counted), 0 when added, -1 on an error that must propagate (not an
 * Exception, e.g. KeyboardInterrupt) */
static int frame_item(Encoder *self, PyObject *t, PyObject *pbs, PyObject *lines)
{
    int into = pbs == NULL;
    PyObject *got = NULL;
    int kind = fast_kind(t);
    if (kind == 0) {
        got = tx_fast(self, t, into);
    } else if (kind == 1) {
        got = call_fast(self, t, into);
    } else {
        /* anything else (leg groups, odd shapes): the Python loop on this one item; into the
         * outbox, its spans (a call and its leg setup) are then moved there */
        PyObject *one = PyTuple_Pack(1, t), *n = NULL;
        PyObject *p = into ? PyList_New(0) : (Py_INCREF(pbs), pbs);
        PyObject *j = into ? PyList_New(0) : (Py_INCREF(lines), lines);
        int k = -1;
        if (one != NULL && p != NULL && j != NULL) {
            PyObject *args[3] = {one, p, j};
            n = PyObject_Vectorcall(self->ref[R_ENCODE_PY], args, 3, NULL);
        }
        if (n != NULL) {
            long failed = PyLong_AsLong(n);
            k = failed == -1 && PyErr_Occurred() ? -1 : (int)failed;
            for (Py_ssize_t i = 0; into && k >= 0 && i < PyList_GET_SIZE(p) && i < PyList_GET_SIZE(j); i++) {
                PyObject *pair = PyTuple_Pack(2, PyList_GET_ITEM(p, i), PyList_GET_ITEM(j, i));
                int r = pair == NULL ? -1 : out_pair(self, pair);
                Py_XDECREF(pair);
                k = r < 0 ? -1 : k + r;
            }
        }
        Py_XDECREF(one);
        Py_XDECREF(p);
        Py_XDECREF(j);
        Py_XDECREF(n);
        return k;
    }
    if (got == NULL)
        return PyErr_ExceptionMatches(PyExc_Exception) ? (PyErr_Clear(), 1) : -1;
    int rc;
    if (got == Py_None) { /* (into the outbox already) */
        rc = 0;
    } else if (into) { /* the Python path answers with a pair */
        rc = out_pair(self, got);
    } else if (!PyTuple_CheckExact(got) || PyTuple_GET_SIZE(got) != 2) {
        rc = 1;
    } else {
        rc = PyList_Append(pbs, PyTuple_GET_ITEM(got, 0)) < 0 || PyList_Append(lines, PyTuple_GET_ITEM(got, 1)) < 0
            ? -1 : 0;
    }
    Py_DECREF(got);
    return rc;
}

/* add(tuples, start, limit[, max_bytes]): tuples[start:] into the outbox until it holds limit
 * spans, or max_bytes of protobuf spans (no bound without it) */
static PyObject *encoder_add(Encoder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if ((nargs != 3 && nargs != 4) || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "add(tuples: list, start, limit, max_bytes=None)");
        return NULL;
    }
    PyObject *tuples = args[0];
    Py_ssize_t i = PyLong_AsSsize_t(args[1]), limit = PyLong_AsSsize_t(args[2]), max_bytes = PY_SSIZE_T_MAX;
    if ((i == -1 || limit == -1) && PyErr_Occurred())
        return NULL;
    if (nargs == 4 && args[3] != Py_None) {
        max_bytes = PyLong_AsSsize_t(args[3]);
        if (max_bytes == -1 && PyErr_Occurred())
            return NULL;
    }
    if (i < 0)
        i = 0;
    Py_ssize_t failed = 0;
    i = frame_items(self, tuples, i, NULL, NULL, limit, max_bytes, &failed);
    if (i < 0)
        return NULL;
    return Py_BuildValue("(nn)", i, failed);
}

static PyObject *encoder_held(Encoder *self, PyObject *unused)
{
    return PyLong_FromSsize_t(self->n_out);
}

/* a buffer that held a huge delivery gives its memory back */
static void out_reset(Buf *b)
{
    b->len = 0;
    if (b->cap > (16 << 20)) {
        PyMem_Free(b->p);
        b->p = NULL;
        b->cap = 0;
    }
}

/* take(want_request, want_line) -> (spans, request or None, line or None), the outbox emptied:
 * SpanEncoder.request / json_line of the spans it held, each built with one copy */
static PyObject *encoder_take(Encoder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "take(want_request, want_line)");
        return NULL;
    }
    int want_request = PyObject_IsTrue(args[0]), want_line = PyObject_IsTrue(args[1]);
    if (want_request < 0 || want_line < 0)
        return NULL;
    Py_ssize_t n = self->n_out;
    PyObject *request = NULL, *line = NULL, *out = NULL;
    if (n && want_request) {
        PyObject *res = self->ref[R_RESOURCE_FIELD], *scope = self->ref[R_SCOPE_FIELD], *schema = self->ref[R_SCHEMA_FIELD];
        uint64_t scope_len = (uint64_t)PyBytes_GET_SIZE(scope) + (uint64_t)self->opb.len;
        uint64_t rs_len = (uint64_t)PyBytes_GET_SIZE(res) + 1 + (uint64_t)varint_len(scope_len) + scope_len
            + (uint64_t)PyBytes_GET_SIZE(schema);
        uint64_t total = 1 + (uint64_t)varint_len(rs_len) + rs_len;
        if (total > (uint64_t)PY_SSIZE_T_MAX) {
            PyErr_NoMemory();
            goto done;
        }
        request = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
        if (request == NULL)
            goto done;
        char *w = PyBytes_AS_STRING(request);
        *w++ = 0x0a;
        varint_write(w, rs_len);
        w += varint_len(rs_len);
        memcpy(w, PyBytes_AS_STRING(res), (size_t)PyBytes_GET_SIZE(res));
        w += PyBytes_GET_SIZE(res);
        *w++ = 0x12;
        varint_write(w, scope_len);
        w += varint_len(scope_len);
        memcpy(w, PyBytes_AS_STRING(scope), (size_t)PyBytes_GET_SIZE(scope));
        w += PyBytes_GET_SIZE(scope);
        memcpy(w, self->opb.p, (size_t)self->opb.len);
        w += self->opb.len;
        memcpy(w, PyBytes_AS_STRING(schema), (size_t)PyBytes_GET_SIZE(schema));
    }
    if (n && want_line) {
        PyObject *head = self->ref[R_JSON_HEAD], *tail = self->ref[R_JSON_TAIL];
        Py_ssize_t hn = PyBytes_GET_SIZE(head), tn = PyBytes_GET_SIZE(tail);
        line = PyBytes_FromStringAndSize(NULL, hn + self->ojs.len + tn);
        if (line == NULL)
            goto done;
        char *w = PyBytes_AS_STRING(line);
        memcpy(w, PyBytes_AS_STRING(head), (size_t)hn);
        memcpy(w + hn, self->ojs.p, (size_t)self->ojs.len);
        memcpy(w + hn + self->ojs.len, PyBytes_AS_STRING(tail), (size_t)tn);
    }
    out = Py_BuildValue("(nOO)", n, request ? request : Py_None, line ? line : Py_None);
    if (out != NULL) {
        self->n_out = 0;
        out_reset(&self->opb);
        out_reset(&self->ojs);
    }
done:
    Py_XDECREF(request);
    Py_XDECREF(line);
    return out;
}

static PyMethodDef encoder_methods[] = {
    {"tx", (PyCFunction)encoder_tx, METH_O, "tx(t) -> SpanEncoder.tx_flat(t): (pb, json) of a transaction span"},
    {"call", (PyCFunction)encoder_call, METH_O, "call(t) -> SpanEncoder.call_flat(t): (pb, json) of a call span"},
    {"frame", (PyCFunction)(void (*)(void))encoder_frame, METH_FASTCALL,
     "frame(tuples, pbs, lines) -> SpanEncoder.encode_py: the spans of a frame appended, failures counted"},
    {"add", (PyCFunction)(void (*)(void))encoder_add, METH_FASTCALL,
     "add(tuples, start, limit) -> SpanEncoder.add_py: (next index, failures), spans into the outbox"},
    {"take", (PyCFunction)(void (*)(void))encoder_take, METH_FASTCALL,
     "take(want_request, want_line) -> SpanEncoder.take_py: (spans, request, line), the outbox emptied"},
    {"held", (PyCFunction)encoder_held, METH_NOARGS, "held() -> spans in the outbox"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sipwatch._otlpenc.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Encoder(span_encoder): the C assembly of span_encoder's common spans, over its caches",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)encoder_init,
    .tp_dealloc = (destructor)encoder_dealloc,
    .tp_traverse = (traverseproc)encoder_traverse,
    .tp_clear = (inquiry)encoder_clear,
    .tp_methods = encoder_methods,
};

/* -- a call's summary line ---------------------------------------------------------------------
 * The span worker writes each call's summary line (sipwatch.logs.JsonLog.call_summary_of):
 * built as a dict of ~25 fields and three per transaction, then orjson, it cost ~6 us a call in
 * process, more than all four of its spans. Here the same bytes are written straight from the
 * summary tuple (sipwatch.summary.summary_tuple), for its common shape only: the caller has
 * masked the texts (Call-ID, From, To, Request-URI) and made the timestamp; anything else (a
 * B2BUA leg group, a method that is not ASCII bytes, a value of another type, an int beyond 64
 * bits, a str orjson would refuse) gives None, and the caller builds the line as before. */

/* an int as orjson writes it: 0, or -1 (not an int of at most 64 bits: the caller's way) */
static int put_int_json(Buf *b, PyObject *o)
{
    if (!PyLong_CheckExact(o))
        return -1;
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return -1;
    }
    if (v < 0) {
        if (PUTS(b, "-") < 0)
            return -1;
        return put_u64_dec(b, (uint64_t)0 - (uint64_t)v);
    }
    return put_u64_dec(b, (uint64_t)v);
}

/* ``status or None`` */
static int put_status_json(Buf *b, PyObject *o)
{
    if (PyLong_CheckExact(o)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (v == 0 && !overflow)
            return PUTS(b, "null");
        PyErr_Clear();
    }
    return put_int_json(b, o);
}

/* a str as orjson writes it; -1 for a str it refuses (surrogates) or another type */
static int put_str_json(Buf *b, PyObject *o)
{
    if (!PyUnicode_CheckExact(o))
        return -1;
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(o, &n);
    if (u == NULL) {
        PyErr_Clear();
        return -1;
    }
    return put_json_string(b, u, n);
}

/* sipwatch.summary._ms(a, b) (scale 1000) or _seconds(a, b) (scale 1) as orjson writes it:
 * null when either is None; -1 for other types */
static int put_span_json(Buf *b, PyObject *round_json, PyObject *a, PyObject *z, double scale)
{
    if (a == Py_None || z == Py_None)
        return PUTS(b, "null");
    if (!PyFloat_CheckExact(a) || !PyFloat_CheckExact(z))
        return -1;
    Figure f = {0};
    if (figure(round_json, (PyFloat_AS_DOUBLE(z) - PyFloat_AS_DOUBLE(a)) * scale, 3, &f) < 0) {
        PyErr_Clear();
        return -1;
    }
    int rc = put_figure_json(b, &f);
    Py_XDECREF(f.slow);
    return rc;
}

static int put_tx_json(Buf *b, PyObject *round_json, PyObject *x)
{
    if (!PyTuple_CheckExact(x) || PyTuple_GET_SIZE(x) != 9)
        return -1;
    PyObject *const *f = &PyTuple_GET_ITEM(x, 0);
    PyObject *method = f[0], *timed_out = f[7];
    if (!PyBytes_CheckExact(method) || (timed_out != Py_True && timed_out != Py_False))
        return -1;
    const char *m = PyBytes_AS_STRING(method);
    Py_ssize_t mn = PyBytes_GET_SIZE(method);
    for (Py_ssize_t i = 0; i < mn; i++) {
        if ((unsigned char)m[i] >= 0x80) /* decoded with "replace": the caller's way */
            return -1;
    }
    if (PUTS(b, "{\"method\":") < 0 || put_json_string(b, m, mn) < 0 || PUTS(b, ",\"cseq\":") < 0
        || put_int_json(b, f[1]) < 0 || PUTS(b, ",\"status\":") < 0 || put_status_json(b, f[2]) < 0
        || PUTS(b, ",\"rtt_ms\":") < 0 || put_span_json(b, round_json, f[3], f[4], 1000.0) < 0
        || PUTS(b, ",\"final_ms\":") < 0)
        return -1;
    if (f[4] == Py_None ? PUTS(b, "null") < 0 : put_span_json(b, round_json, f[3], f[5], 1000.0) < 0)
        return -1;
    if (PUTS(b, ",\"retransmissions\":") < 0 || put_int_json(b, f[6]) < 0
        || (timed_out == Py_True ? PUTS(b, ",\"timed_out\":true") : PUTS(b, ",\"timed_out\":false")) < 0
        || PUTS(b, ",\"transport\":") < 0 || put_str_json(b, f[8]) < 0 || PUTS(b, "}") < 0)
        return -1;
    return 0;
}

/* summary_line(t, stamp, head, call_sid, frm, to, ruri, outcomes, round_json) -> bytes or None */
static PyObject *module_summary_line(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "summary_line takes 9 arguments");
        return NULL;
    }
    PyObject *t = args[0], *stamp = args[1], *head = args[2], *call_sid = args[3], *frm = args[4];
    PyObject *to = args[5], *ruri = args[6], *outcomes = args[7], *round_json = args[8];
    if (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) != 15 || !PyBytes_CheckExact(head)
        || !PyTuple_CheckExact(outcomes))
        Py_RETURN_NONE;
    PyObject *const *f = &PyTuple_GET_ITEM(t, 0);
    PyObject *txs = f[13];
    if (f[14] != Py_None || !(PyList_CheckExact(txs) || PyTuple_CheckExact(txs)) || !PyLong_CheckExact(f[3]))
        Py_RETURN_NONE;
    unsigned char tb[16];
    if (trace_bytes(f[1], tb) < 0)
        Py_RETURN_NONE;
    int overflow;
    long outcome = PyLong_AsLongAndOverflow(f[3], &overflow);
    if (overflow || (outcome == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *outcome_json = NULL;
    if (outcome >= 0) {
        if (outcome >= PyTuple_GET_SIZE(outcomes) || !PyBytes_Check(PyTuple_GET_ITEM(outcomes, outcome)))
            Py_RETURN_NONE;
        outcome_json = PyTuple_GET_ITEM(outcomes, outcome);
    }
    Buf b = {0};
    PyObject *out = NULL;
    int bad = PUTS(&b, "{\"timestamp\":") < 0 || put_str_json(&b, stamp) < 0 || put_bytes(&b, head) < 0
        || put_str_json(&b, call_sid) < 0 || PUTS(&b, ",\"trace_id\":\"") < 0 || put_hex(&b, tb, 16) < 0
        || PUTS(&b, "\",\"message\":\"call finished\",\"event\":\"call_summary\",\"outcome\":") < 0
        || (outcome_json ? put_bytes(&b, outcome_json) : PUTS(&b, "null")) < 0
        || PUTS(&b, ",\"final_status\":") < 0 || put_status_json(&b, f[4]) < 0
        || PUTS(&b, ",\"setup_ms\":") < 0 || put_span_json(&b, round_json, f[5], f[6], 1000.0) < 0
        || PUTS(&b, ",\"answer_ms\":") < 0 || put_span_json(&b, round_json, f[5], f[7], 1000.0) < 0
        || PUTS(&b, ",\"duration_s\":") < 0 || put_span_json(&b, round_json, f[7], f[2], 1.0) < 0
        || PUTS(&b, ",\"retransmissions\":") < 0 || put_int_json(&b, f[8]) < 0
        || PUTS(&b, ",\"from\":") < 0 || put_str_json(&b, frm) < 0
        || PUTS(&b, ",\"to\":") < 0 || put_str_json(&b, to) < 0
        || PUTS(&b, ",\"request_uri\":") < 0 || put_str_json(&b, ruri) < 0
        || PUTS(&b, ",\"ended_by\":") < 0
        || (f[12] == Py_None ? PUTS(&b, "null") : put_str_json(&b, f[12])) < 0
        || PUTS(&b, ",\"transactions\":[") < 0;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(txs);
    for (Py_ssize_t i = 0; !bad && i < n; i++)
        bad = (i && PUTS(&b, ",") < 0) || put_tx_json(&b, round_json, PySequence_Fast_GET_ITEM(txs, i)) < 0;
    if (!bad && PUTS(&b, "]}") == 0)
        out = PyBytes_FromStringAndSize(b.p, b.len);
    PyMem_Free(b.p);
    if (out == NULL) {
        if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_Exception))
            return NULL; /* (KeyboardInterrupt and the like go on) */
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return out;
}

/* figure(x, nd, round_json) -> (value, JSON): a figure as the spans carry it (for the tests) */
/* -- log timestamps ----------------------------------------------------------------------------
 * stamp(t) -> sipwatch.logs._stamp_float(t): RFC 3339 UTC with microseconds of a float time
 * 0 <= t < STAMP_MAX, or None for anything else. The same steps in the same machine doubles: the
 * fraction of the second scaled to microseconds, rounded half to even (round's way), a full
 * million carried into the next second; the date and time of day formatted once per second. In
 * compiled Python it was ~2.4k instructions a call summary (callgrind), a tenth of the line. */
#define STAMP_MAX 253402300799.0 /* 9999-12-31T23:59:59 */

static double stamp_second = -1.0;
static char stamp_prefix[21]; /* "YYYY-MM-DDTHH:MM:SS." */

static PyObject *module_stamp(PyObject *mod, PyObject *arg)
{
    if (!PyFloat_CheckExact(arg))
        Py_RETURN_NONE;
    double t = PyFloat_AS_DOUBLE(arg);
    if (!(t >= 0.0 && t < STAMP_MAX))
        Py_RETURN_NONE;
    double second = floor(t);
    double f = (t - second) * 1e6;
    double whole = floor(f);
    double d = f - whole;
    long micro = (long)whole;
    if (d > 0.5 || (d == 0.5 && micro % 2 == 1))
        micro += 1;
    if (micro >= 1000000) {
        second += 1.0;
        micro -= 1000000;
    }
    if (second != stamp_second) {
        time_t secs = (time_t)second;
        struct tm tm;
        if (gmtime_r(&secs, &tm) == NULL)
            Py_RETURN_NONE;
        snprintf(stamp_prefix, sizeof(stamp_prefix), "%04d-%02d-%02dT%02d:%02d:%02d.", tm.tm_year + 1900,
                 tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
        stamp_second = second;
    }
    PyObject *out = PyUnicode_New(27, 127);
    if (out == NULL)
        return NULL;
    char *w = (char *)PyUnicode_1BYTE_DATA(out);
    memcpy(w, stamp_prefix, 20);
    for (int k = 25; k >= 20; k--) {
        w[k] = (char)('0' + micro % 10);
        micro /= 10;
    }
    w[26] = 'Z';
    return out;
}

static PyObject *module_figure(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyFloat_Check(args[0]) || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "figure(x: float, nd: 3 or 6, round_json)");
        return NULL;
    }
    long nd = PyLong_AsLong(args[1]);
    if (nd != 3 && nd != 6) {
        PyErr_SetString(PyExc_ValueError, "figure: nd is 3 or 6");
        return NULL;
    }
    Figure f = {0};
    if (figure(args[2], PyFloat_AS_DOUBLE(args[0]), (int)nd, &f) < 0)
        return NULL;
    PyObject *out = f.slow ? Py_BuildValue("(dO)", f.value, PyTuple_GET_ITEM(f.slow, 1))
                           : Py_BuildValue("(dy#)", f.value, f.json, f.json_len);
    Py_XDECREF(f.slow);
    return out;
}

/* -- the hand-off's frames: pack_frame / unpack_frame ------------------------------------------
 * The proxy hands its span and summary tuples to the worker as frames. marshal wrote them at
 * ~0.55 µs a tuple on the event loop (its generic dispatch per value, and ints past 2^31 -- the
 * ids -- written 15 bits at a time); this writes the few kinds the tuples hold, each as a tag
 * byte and its value, little-endian:
 *   None, True, False: the tag alone; int: 8 bytes (signed 64-bit) or 16 (0 <= v < 2^128,
 *   big-endian as trace_bytes writes a trace id);
 *   float: 8 bytes (its bits); bytes and str (UTF-8): u32 length and the bytes;
 *   tuple and list: u32 count and the items, at most PACK_DEPTH deep.
 * Anything else (another type, a subclass, a str marshal writes with surrogates, a bigger int)
 * and pack_frame answers None: the proxy writes that frame with marshal, as before. unpack_frame
 * gives back values equal to the packed ones, type for type, and raises ValueError for bytes
 * that are not a whole packed value (every length is checked against what is left). */
/* P_U64: an int in 2**63..2**64-1 (half of all span ids: random 64 bits), 8 bytes; as P_U128 it
 * went through the interpreter's byte-array conversion both ways (~150 instructions a value) */
enum { P_NONE = 1, P_TRUE, P_FALSE, P_INT, P_U128, P_FLOAT, P_BYTES, P_STR, P_TUPLE, P_LIST, P_U64 };
#define PACK_DEPTH 16
#define FRAME_ROOM_MAX (1 << 20) /* pack_frame's buffer is kept up to this size */

/* a tag and the low `width` (4 or 8) bytes of u, little-endian, written in place (bytes
 * assembled on the stack and copied cost a stalled load each: a third of the packing) */
static inline int put_tag_le(Buf *b, int tag, uint64_t u, int width)
{
    if (b->cap - b->len < 1 + width && buf_grow(b, 1 + width) < 0)
        return -1;
    unsigned char *o = (unsigned char *)b->p + b->len;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    u = __builtin_bswap64(u); /* (the low bytes first in memory, as on a little-endian machine) */
#endif
    o[0] = (unsigned char)tag;
    memcpy(o + 1, &u, (size_t)width);
    b->len += 1 + width;
    return 0;
}

/* a tag, a u32 length and the n bytes of s; 1 when n does not fit in the length */
static inline int put_tag_sized(Buf *b, int tag, const char *s, Py_ssize_t n)
{
    if (n > 0xFFFFFFFFLL)
        return 1;
    return put_tag_le(b, tag, (uint64_t)n, 4) < 0 || put(b, s, n) < 0 ? -1 : 0;
}

/* 0 when the int o (past 2**63) is sure not to fit in 64 bits: counted before converting, since
 * the overflow PyLong_AsUnsignedLongLong raises (made, matched, cleared) cost ~1.5k instructions
 * for every trace id a frame packs, a third of the loop's packing (callgrind) */
static inline int fits_u64(PyObject *o)
{
#if PY_VERSION_HEX < 0x030E0000
    size_t bits = _PyLong_NumBits(o);
    if (bits == (size_t)-1) {
        PyErr_Clear();
        return 0;
    }
    return bits <= 64;
#else
    (void)o;
    return 1; /* (the conversion decides) */
#endif
}

/* 0: packed; 1: a value this format does not take; -1: an error (memory) */
static int pack_value(Buf *b, PyObject *o, int depth)
{
    if (o == Py_None || o == Py_True || o == Py_False) {
        if (b->cap - b->len < 1 && buf_grow(b, 1) < 0)
            return -1;
        b->p[b->len++] = (char)(o == Py_None ? P_NONE : o == Py_True ? P_TRUE : P_FALSE);
        return 0;
    }
    PyTypeObject *t = Py_TYPE(o);
    if (t == &PyLong_Type) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (!overflow) {
            if (v == -1 && PyErr_Occurred())
                return -1;
            return put_tag_le(b, P_INT, (uint64_t)v, 8);
        }
        if (overflow > 0 && fits_u64(o)) {
            unsigned long long u = PyLong_AsUnsignedLongLong(o);
            if (!(u == (unsigned long long)-1 && PyErr_Occurred()))
                return put_tag_le(b, P_U64, (uint64_t)u, 8);
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                return -1;
            PyErr_Clear(); /* (past 64 bits) */
        }
        unsigned char h[17] = {P_U128};
        if (overflow < 0 || trace_bytes(o, h + 1) < 0) /* (16 bytes big-endian, as a trace id) */
            return 1;
        return put(b, (const char *)h, 17);
    }
    if (t == &PyFloat_Type) {
        double d = PyFloat_AS_DOUBLE(o);
        uint64_t u;
        memcpy(&u, &d, 8);
        return put_tag_le(b, P_FLOAT, u, 8);
    }
    if (t == &PyBytes_Type)
        return put_tag_sized(b, P_BYTES, PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o));
    if (t == &PyUnicode_Type) {
        Py_ssize_t n;
        const char *u = PyUnicode_AsUTF8AndSize(o, &n);
        if (u == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
                return -1;
            PyErr_Clear();
            return 1;
        }
        return put_tag_sized(b, P_STR, u, n);
    }
    if (t == &PyTuple_Type || t == &PyList_Type) {
        if (depth >= PACK_DEPTH)
            return 1;
        int is_tuple = t == &PyTuple_Type;
        Py_ssize_t n = is_tuple ? PyTuple_GET_SIZE(o) : PyList_GET_SIZE(o);
        if (n > 0xFFFFFFFFLL)
            return 1;
        if (put_tag_le(b, is_tuple ? P_TUPLE : P_LIST, (uint64_t)n, 4) < 0)
            return -1;
        /* (nothing here runs Python code: a list cannot change while it is written) */
        for (Py_ssize_t i = 0; i < n; i++) {
            int rc = pack_value(b, is_tuple ? PyTuple_GET_ITEM(o, i) : PyList_GET_ITEM(o, i), depth + 1);
            if (rc)
                return rc;
        }
        return 0;
    }
    return 1;
}

/* pack_frame(value) -> bytes, or None when value holds something this format does not take */
static PyObject *module_pack_frame(PyObject *mod, PyObject *value)
{
    /* one buffer for every frame, kept (up to FRAME_ROOM_MAX): in cache and never grown again */
    static Buf b = {0};
    b.len = 0;
    int rc = pack_value(&b, value, 0);
    PyObject *out = rc == 0 ? PyBytes_FromStringAndSize(b.p, b.len) : NULL;
    if (b.cap > FRAME_ROOM_MAX) {
        PyMem_Free(b.p);
        b.p = NULL;
        b.cap = 0;
    }
    if (rc > 0)
        Py_RETURN_NONE;
    return out;
}

typedef struct {
    const unsigned char *p;
    Py_ssize_t len, pos;
} Reader;

static PyObject *bad_frame(void)
{
    PyErr_SetString(PyExc_ValueError, "not a packed frame");
    return NULL;
}

/* 8 bytes, little-endian, as put_tag_le wrote them: one load (the loop of byte shifts it was
 * compiled as is ~25 instructions, for every time and int of a frame) */
static inline uint64_t le64(const unsigned char *p)
{
    uint64_t u;
    memcpy(&u, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    u = __builtin_bswap64(u);
#endif
    return u;
}

/* The worker's read keeps the short values it made in a small direct-mapped memo and hands the
 * same object out again for the same packed bytes: a call's trace id, its parent span id, its
 * Call-ID, From and To, the peers, methods and directions come back in each of its records and
 * in its summary, and making and freeing a new object for each was most of the read's cost
 * (allocation and deallocation about a quarter of the live worker's samples). The encoder's
 * caches also find a hash already computed on a value they met before. The values are immutable
 * (bytes, ASCII str, int), so sharing one changes nothing a reader can see; floats (times) are
 * left out, as are longer values and str that is not ASCII (compared here by its bytes). */
#define MEMO_SLOTS 1024      /* a power of two */
#define MEMO_MAX_LEN 192     /* bytes of a value kept at most */

#define MEMO_TUPLE_MAX 48 /* packed bytes of a small tuple kept at most (below) */

typedef struct {
    uint64_t hash;
    int tag;
    Py_ssize_t n;
    /* an int's or a small tuple's packed bytes (str and bytes: their object's own) */
    unsigned char key[MEMO_TUPLE_MAX];
    PyObject *obj;
} MemoSlot;

static MemoSlot memo[MEMO_SLOTS];

static inline uint64_t memo_hash(int tag, const unsigned char *s, Py_ssize_t n)
{
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ ((uint64_t)tag << 56) ^ (uint64_t)n;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        h = (h ^ w) * 0xBF58476D1CE4E5B9ULL;
        h ^= h >> 31;
    }
    if (i < n) {
        /* the rest: the last 8 bytes again when there are 8 (a fixed-size load), else byte by
         * byte (a variable-length copy through the stack stalled on its reload) */
        uint64_t w = 0;
        if (n >= 8) {
            memcpy(&w, s + n - 8, 8);
        } else {
            for (Py_ssize_t k = n - 1; k >= i; k--)
                w = (w << 8) | s[k];
        }
        h = (h ^ w) * 0x94D049BB133111EBULL;
        h ^= h >> 29;
    }
    return h;
}

/* the memo's object for (tag, s[:n]) when it holds one (a new reference), else NULL */
static inline PyObject *memo_get(MemoSlot *m, uint64_t h, int tag, const unsigned char *s, Py_ssize_t n)
{
    if (m->obj == NULL || m->hash != h || m->tag != tag || m->n != n)
        return NULL;
    const void *have = tag == P_BYTES ? (const void *)PyBytes_AS_STRING(m->obj)
        : tag == P_STR ? (const void *)PyUnicode_1BYTE_DATA(m->obj) : (const void *)m->key;
    if (memcmp(have, s, (size_t)n) != 0)
        return NULL;
    Py_INCREF(m->obj);
    return m->obj;
}

static inline void memo_put(MemoSlot *m, uint64_t h, int tag, const unsigned char *s, Py_ssize_t n, PyObject *o)
{
    if (tag == P_STR && !PyUnicode_IS_ASCII(o))
        return;
    PyObject *old = m->obj;
    m->hash = h;
    m->tag = tag;
    m->n = n;
    if (tag == P_INT || tag == P_U64 || tag == P_U128 || tag == P_TUPLE)
        memcpy(m->key, s, (size_t)n);
    Py_INCREF(o);
    m->obj = o;
    Py_XDECREF(old); /* (last: freeing it runs no Python code, but the slot is whole first) */
}

/* the value of a memo's kind (tag, s[:n]): from the memo, or made by make(s, n) and kept */
static PyObject *memo_value(int tag, const unsigned char *s, Py_ssize_t n, PyObject *(*make)(const unsigned char *, Py_ssize_t))
{
    if (n > MEMO_MAX_LEN)
        return make(s, n);
    uint64_t h = memo_hash(tag, s, n);
    MemoSlot *m = &memo[h & (MEMO_SLOTS - 1)];
    PyObject *o = memo_get(m, h, tag, s, n);
    if (o != NULL)
        return o;
    o = make(s, n);
    if (o != NULL)
        memo_put(m, h, tag, s, n, o);
    return o;
}

static PyObject *make_int(const unsigned char *s, Py_ssize_t n)
{
    (void)n;
    return PyLong_FromLongLong((long long)le64(s));
}

static PyObject *make_u64(const unsigned char *s, Py_ssize_t n)
{
    (void)n;
    return PyLong_FromUnsignedLongLong((unsigned long long)le64(s));
}

static PyObject *make_u128(const unsigned char *s, Py_ssize_t n)
{
    (void)n;
#if PY_VERSION_HEX >= 0x030D0000
    return PyLong_FromUnsignedNativeBytes(s, 16, Py_ASNATIVEBYTES_BIG_ENDIAN);
#else
    return _PyLong_FromByteArray(s, 16, 0, 0);
#endif
}

static PyObject *make_bytes(const unsigned char *s, Py_ssize_t n)
{
    return PyBytes_FromStringAndSize((const char *)s, n);
}

static PyObject *make_str(const unsigned char *s, Py_ssize_t n)
{
    return PyUnicode_DecodeUTF8((const char *)s, n, "strict");
}

static PyObject *unpack_value(Reader *r, int depth);

/* a packed count or size: 4 bytes, little-endian */
static inline Py_ssize_t le32(const unsigned char *q)
{
    uint32_t u;
    memcpy(&u, q, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    u = __builtin_bswap32(u);
#endif
    return (Py_ssize_t)u;
}

/* The scalars most values are (times, small ints, None), read inline: 1 with the value in *out
 * (NULL: out of memory) and the reader past it, or 0 (nothing read) for anything else, a
 * truncated one included. unpack_value's call, bounds checks and switch for each of ~140 values
 * a call were a quarter of the read's own instructions (callgrind). */
static inline int fast_scalar(Reader *r, PyObject **out)
{
    Py_ssize_t pos = r->pos;
    if (pos >= r->len)
        return 0;
    int tag = r->p[pos];
    if (tag == P_NONE) {
        r->pos = pos + 1;
        *out = Py_NewRef(Py_None);
        return 1;
    }
    if ((tag != P_FLOAT && tag != P_INT) || r->len - pos < 9)
        return 0;
    uint64_t u = le64(r->p + pos + 1);
    if (tag == P_FLOAT) {
        double d;
        memcpy(&d, &u, 8);
        *out = PyFloat_FromDouble(d);
    } else if (u + 5 <= 261) { /* -5..256: the interpreter's own small ints */
        *out = PyLong_FromLongLong((long long)u);
    } else {
        return 0;
    }
    r->pos = pos + 9;
    return 1;
}

/* the n items of a tuple or list seq (made empty) read into it: 0, or -1 (an error set) */
static int unpack_items(Reader *r, int depth, PyObject *seq, Py_ssize_t n)
{
    PyObject **items = PyTuple_CheckExact(seq) ? &PyTuple_GET_ITEM(seq, 0) : ((PyListObject *)seq)->ob_item;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item;
        if (!fast_scalar(r, &item))
            item = unpack_value(r, depth + 1);
        if (item == NULL)
            return -1;
        items[i] = item;
    }
    return 0;
}

/* A peer comes as a small tuple, (host, port), with every span: it is kept in the memo as well,
 * by its packed bytes, when its n items (at most 4) are all short scalars other than floats (None,
 * bools, ints, bytes, str: immutable, so one tuple object can stand for all of them). The end of
 * such a tuple (its position after the last item), or 0 for any other (read as before). */
static Py_ssize_t small_tuple_end(const Reader *r, Py_ssize_t n)
{
    if (n > 4)
        return 0;
    Py_ssize_t pos = r->pos, start = r->pos - 5;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (pos >= r->len)
            return 0;
        int tag = r->p[pos++];
        Py_ssize_t size;
        if (tag == P_NONE || tag == P_TRUE || tag == P_FALSE) {
            size = 0;
        } else if (tag == P_INT || tag == P_U64) {
            size = 8;
        } else if (tag == P_U128) {
            size = 16;
        } else if (tag == P_BYTES || tag == P_STR) {
            if (r->len - pos < 4)
                return 0;
            size = 4 + le32(r->p + pos);
        } else {
            return 0;
        }
        if (size > r->len - pos || pos + size - start > MEMO_TUPLE_MAX)
            return 0;
        pos += size;
    }
    return pos;
}

/* the small tuple of n items packed in s[:k] (tag and count first; the reader at its first
 * item): the memo's, or read now and kept */
static PyObject *memo_tuple(Reader *r, int depth, Py_ssize_t n, const unsigned char *s, Py_ssize_t k)
{
    uint64_t h = memo_hash(P_TUPLE, s, k);
    MemoSlot *m = &memo[h & (MEMO_SLOTS - 1)];
    PyObject *o = memo_get(m, h, P_TUPLE, s, k);
    if (o != NULL) {
        r->pos = (s - r->p) + k;
        return o;
    }
    o = PyTuple_New(n);
    if (o == NULL || unpack_items(r, depth, o, n) < 0) {
        Py_XDECREF(o);
        return NULL;
    }
    memo_put(m, h, P_TUPLE, s, k, o);
    return o;
}

static PyObject *unpack_value(Reader *r, int depth)
{
    PyObject *scalar;
    if (fast_scalar(r, &scalar))
        return scalar;
    if (r->pos >= r->len)
        return bad_frame();
    int tag = r->p[r->pos++];
    Py_ssize_t left = r->len - r->pos;
    const unsigned char *q = r->p + r->pos;
    switch (tag) {
    case P_TRUE: Py_RETURN_TRUE;
    case P_FALSE: Py_RETURN_FALSE;
    case P_INT: /* (one of -5..256 was read above) */
        if (left < 8)
            return bad_frame();
        r->pos += 8;
        return memo_value(P_INT, q, 8, make_int);
    case P_U64:
        if (left < 8)
            return bad_frame();
        r->pos += 8;
        return memo_value(P_U64, q, 8, make_u64);
    case P_U128:
        if (left < 16)
            return bad_frame();
        r->pos += 16;
        return memo_value(P_U128, q, 16, make_u128);
    case P_FLOAT: /* (a whole one, and None, were read above: here it is cut short) */
        return bad_frame();
    case P_BYTES:
    case P_STR:
    case P_TUPLE:
    case P_LIST: {
        if (left < 4)
            return bad_frame();
        Py_ssize_t n = le32(q);
        r->pos += 4;
        left -= 4;
        if (tag == P_BYTES || tag == P_STR) {
            if (n > left)
                return bad_frame();
            const unsigned char *s = r->p + r->pos;
            r->pos += n;
            return memo_value(tag, s, n, tag == P_BYTES ? make_bytes : make_str);
        }
        if (n > left || depth >= PACK_DEPTH) /* (each item takes a byte at least) */
            return bad_frame();
        if (tag == P_TUPLE) {
            Py_ssize_t end = small_tuple_end(r, n);
            if (end > 0) /* from its packed bytes, tag and count included */
                return memo_tuple(r, depth, n, r->p + r->pos - 5, end - (r->pos - 5));
        }
        PyObject *seq = tag == P_TUPLE ? PyTuple_New(n) : PyList_New(n);
        if (seq == NULL || unpack_items(r, depth, seq, n) < 0) {
            Py_XDECREF(seq);
            return NULL;
        }
        return seq;
    }
    default:
        return bad_frame();
    }
}

/* unpack_frame(buffer) -> the value pack_frame packed (ValueError: not a whole packed value) */
static PyObject *module_unpack_frame(PyObject *mod, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Reader r = {(const unsigned char *)view.buf, view.len, 0};
    PyObject *out = unpack_value(&r, 0);
    if (out != NULL && r.pos != r.len) {
        Py_DECREF(out);
        out = bad_frame();
    }
    if (out == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear();
        out = bad_frame();
    }
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef module_methods[] = {
    {"pack_frame", (PyCFunction)module_pack_frame, METH_O,
     "pack_frame(value) -> the hand-off frame's bytes, or None: a value this format does not take"},
    {"unpack_frame", (PyCFunction)module_unpack_frame, METH_O,
     "unpack_frame(buffer) -> the value pack_frame packed (ValueError: not a whole packed value)"},
    {"summary_line", (PyCFunction)(void (*)(void))module_summary_line, METH_FASTCALL,
     "summary_line(t, stamp, head, call_sid, frm, to, ruri, outcomes, round_json) -> the line or None"},
    {"stamp", (PyCFunction)module_stamp, METH_O,
     "stamp(t) -> sipwatch.logs._stamp_float(t) of a float 0 <= t < 253402300799, else None"},
    {"figure", (PyCFunction)(void (*)(void))module_figure, METH_FASTCALL,
     "figure(x, nd, round_json) -> (round(x, nd), its JSON) as the C spans write it"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef otlpenc_module = {
    PyModuleDef_HEAD_INIT, "_otlpenc",
    "C assembly of the span worker's common OTLP spans (protobuf and OTLP/JSON).", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__otlpenc(void)
{
    if (PyType_Ready(&EncoderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&otlpenc_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&EncoderType);
    if (PyModule_AddObject(m, "Encoder", (PyObject *)&EncoderType) < 0) {
        Py_DECREF(&EncoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
