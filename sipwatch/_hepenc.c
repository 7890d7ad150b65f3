/* The HEP sender's per-packet work in C: the HEPv3 packet around a message and the correlation id
 * (its Call-ID) found in the message's head.
 *
 * Why it exists: with --hep-endpoint every forwarded message goes out twice more (what came in,
 * what went out), and each copy was encoded in the housekeeping tick by sipwatch.hep.Hep3Encoder
 * (struct packs and a join, 3.6 µs warm) after sipwatch.hep_sender.call_id_of had sliced the head
 * and searched it (2.6 µs warm): at 1000 calls/s the tick's HEP flush was ~39% of the proxy's
 * samples (perf), about half of it this interpreted work and half the sends. Both functions here
 * give the same bytes as the Python ones (tests/test_hep_c.py compares them on generated input,
 * and the HEP fuzz target on every input); the Python ones stay for builds without a compiler.
 *
 *   encode(head, payload, ts, payload_type, capture_id, correlation_id, auth, node) -> bytes | None
 *       ``head``: the address chunks (family .. destination port) Hep3Encoder keeps per pair;
 *       ``auth``/``node``: the auth key and node name chunks, or b"". None when the packet cannot
 *       be encoded (longer than 65535 bytes, a time or an id out of its field's range): the caller
 *       raises HepError, as the Python encoder's struct.pack does.
 *   call_id(payload) -> bytes
 *       hep_sender.call_id_of: the X-CID, Call-ID or i header's value (that order, exact spelling
 *       first, then any case and a space before the colon), in the head (up to the blank line,
 *       within the first 8192 bytes), stripped of ASCII whitespace, at most 256 bytes; b"" if none.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_HEP 65535
#define HEADER_SCAN 8192   /* as hep_sender.HEADER_SCAN */
#define VALUE_MAX 256
#define TIME_TYPE_ID 37    /* four chunks: seconds, microseconds (uint32), payload type (uint8), capture id (uint32) */

static unsigned char *put_chunk_head(unsigned char *w, unsigned type, size_t len)
{
    /* vendor 0, ``type``, the chunk's length including these 6 bytes, all big-endian */
    w[0] = 0; w[1] = 0;
    w[2] = (unsigned char)(type >> 8); w[3] = (unsigned char)type;
    w[4] = (unsigned char)(len >> 8); w[5] = (unsigned char)len;
    return w + 6;
}

static unsigned char *put_u32(unsigned char *w, uint32_t v)
{
    w[0] = (unsigned char)(v >> 24); w[1] = (unsigned char)(v >> 16);
    w[2] = (unsigned char)(v >> 8); w[3] = (unsigned char)v;
    return w + 4;
}

static PyObject *hep_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "encode() takes 8 arguments");
        return NULL;
    }
    /* the bytes-like arguments: head, payload, correlation id, auth, node */
    static const int arg_of[5] = {0, 1, 5, 6, 7};
    Py_buffer b[5];
    int got = 0;
    PyObject *out = NULL;
    for (; got < 5; got++)
        if (PyObject_GetBuffer(args[arg_of[got]], &b[got], PyBUF_SIMPLE) < 0)
            goto done;
    double ts = PyFloat_AsDouble(args[2]);
    if (ts == -1.0 && PyErr_Occurred())
        goto done;
    long long ptype = PyLong_AsLongLong(args[3]);
    if (ptype == -1 && PyErr_Occurred())
        goto done;
    long long cid = PyLong_AsLongLong(args[4]);
    if (cid == -1 && PyErr_Occurred())
        goto done;
    /* as int(ts), round((ts - sec) * 1e6) (half to even) and the carry into the next second;
     * whatever lands outside uint32 cannot be packed */
    if (!(ts > -1.0 && ts < 4294967297.0) || ptype < 0 || ptype > 255 || cid < 0 || cid > 0xFFFFFFFFLL) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    long long sec = (long long)ts;  /* (truncates toward zero, as int() does) */
    long long usec = (long long)nearbyint((ts - (double)sec) * 1e6);
    if (usec >= 1000000) {
        sec += 1;
        usec -= 1000000;
    }
    if (sec < 0 || sec > 0xFFFFFFFFLL || usec < 0) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t corr = b[2].len, total = 6 + b[0].len + TIME_TYPE_ID + (corr ? 6 + corr : 0) + b[3].len +
                      6 + b[1].len + b[4].len;
    if (total > MAX_HEP) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        goto done;
    unsigned char *w = (unsigned char *)PyBytes_AS_STRING(out);
    memcpy(w, "HEP3", 4);
    w[4] = (unsigned char)(total >> 8);
    w[5] = (unsigned char)total;
    w += 6;
    memcpy(w, b[0].buf, (size_t)b[0].len);
    w += b[0].len;
    w = put_u32(put_chunk_head(w, 9, 10), (uint32_t)sec);
    w = put_u32(put_chunk_head(w, 10, 10), (uint32_t)usec);
    w = put_chunk_head(w, 11, 7);
    *w++ = (unsigned char)ptype;
    w = put_u32(put_chunk_head(w, 12, 10), (uint32_t)cid);
    if (corr) {
        w = put_chunk_head(w, 17, (size_t)(6 + corr));
        memcpy(w, b[2].buf, (size_t)corr);
        w += corr;
    }
    memcpy(w, b[3].buf, (size_t)b[3].len);
    w += b[3].len;
    w = put_chunk_head(w, 15, (size_t)(6 + b[1].len));
    memcpy(w, b[1].buf, (size_t)b[1].len);
    w += b[1].len;
    memcpy(w, b[4].buf, (size_t)b[4].len);
done:
    for (int k = 0; k < got; k++)
        PyBuffer_Release(&b[k]);
    return out;
}

/* -- the correlation id --------------------------------------------------------------------- */

static int is_space(unsigned char c)  /* what bytes.strip() strips */
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\x0b' || c == '\x0c';
}

static unsigned char lower(unsigned char c)  /* what bytes.lower() maps: A-Z only */
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

/* First ``name`` (already lower case when ``fold``) in ``h[0:n)``, compared as bytes.lower()
 * would; -1 if none. */
static Py_ssize_t find(const unsigned char *h, Py_ssize_t n, const char *name, int fold)
{
    Py_ssize_t m = (Py_ssize_t)strlen(name);
    if (!fold) {
        const unsigned char *p = memmem(h, (size_t)n, name, (size_t)m);
        return p == NULL ? -1 : p - h;
    }
    for (Py_ssize_t i = 0; i + m <= n; i++) {
        if (h[i] != '\n')
            continue;
        Py_ssize_t j = 1;
        while (j < m && lower(h[i + j]) == (unsigned char)name[j])
            j++;
        if (j == m)
            return i;
    }
    return -1;
}

static PyObject *hep_call_id(PyObject *self, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *h = b.buf;
    Py_ssize_t n = b.len < HEADER_SCAN ? b.len : HEADER_SCAN;
    /* the header section ends at the first empty line, whatever its line ends (bare LF ones too,
     * which the proxy forwards): past it is the body, whose lines name no Call-ID */
    for (const unsigned char *nl = memchr(h, '\n', (size_t)n); nl != NULL;
            nl = memchr(nl + 1, '\n', (size_t)(n - (nl + 1 - h)))) {
        const Py_ssize_t k = nl - h;  /* (an empty line wholly inside the scan, as Python's find) */
        if ((k + 1 < n && h[k + 1] == '\n') || (k + 2 < n && h[k + 1] == '\r' && h[k + 2] == '\n')) {
            n = k;
            break;
        }
    }
    static const char *exact[] = {"\nX-CID:", "\nCall-ID:", "\ni:"};
    static const char *folded[] = {"\nx-cid:", "\ncall-id:", "\ni:", "\ncall-id :", "\ni :"};
    Py_ssize_t at = -1;
    for (int i = 0; i < 3 && at < 0; i++) {
        Py_ssize_t k = find(h, n, exact[i], 0);
        if (k >= 0)
            at = k + (Py_ssize_t)strlen(exact[i]);
    }
    for (int i = 0; i < 5 && at < 0; i++) {
        Py_ssize_t k = find(h, n, folded[i], 1);
        if (k >= 0)
            at = k + (Py_ssize_t)strlen(folded[i]);
    }
    PyObject *out;
    if (at < 0) {
        out = PyBytes_FromStringAndSize(NULL, 0);
    } else {
        const unsigned char *nl = memchr(h + at, '\n', (size_t)(n - at));
        Py_ssize_t stop = nl == NULL ? n : nl - h;
        while (at < stop && is_space(h[at]))
            at++;
        while (stop > at && is_space(h[stop - 1]))
            stop--;
        if (stop - at > VALUE_MAX)
            stop = at + VALUE_MAX;
        out = PyBytes_FromStringAndSize((const char *)h + at, stop - at);
    }
    PyBuffer_Release(&b);
    return out;
}

static PyMethodDef methods[] = {
    {"encode", (PyCFunction)(void (*)(void))hep_encode, METH_FASTCALL,
     "encode(head, payload, ts, payload_type, capture_id, correlation_id, auth, node) -> bytes | None"},
    {"call_id", hep_call_id, METH_O, "call_id(payload) -> bytes: hep_sender.call_id_of"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_hepenc",
    "The HEP sender's packet encoding and Call-ID search in C; see sipwatch/_hepenc.c.", -1, methods,
};

PyMODINIT_FUNC PyInit__hepenc(void)
{
    return PyModule_Create(&module);
}
