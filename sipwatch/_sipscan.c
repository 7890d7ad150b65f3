/* The header scan of sipwatch.sipmsg.parse for the common message, in one C call.
 *
 * Python's parse makes about a dozen bytes-method calls per message plus a slice and a dict
 * lookup per header line; under mypyc that call overhead was most of the parser's cost. This
 * module does the same cut in one pass and answers only for the plain shape: the head ends at
 * the first CRLF CRLF, every line end in it is CRLF, it holds printable ASCII and HT only, no
 * line after the first starts with SP/HT (a fold), and every header line's name, as written up
 * to and including its first colon, is a key of the caller's name table. For anything else it
 * returns None and the caller takes its general path, which raises the errors and handles the
 * unusual shapes. Such a message is accepted identically in the strict and the observer mode,
 * so the mode is not an argument.
 *
 * Hostile input: every index stays below len(data), the cost is linear in the head (two passes
 * and one dict lookup per line), and every failure but an out-of-memory one is a None. The
 * first pass tests eight bytes at a time where it can (one byte at a time, it was a third of
 * this function's instructions) and goes straight to the first byte that is not plain.
 *
 * Beside the scan, the few other per-message steps of the proxy that cost more as Python calls
 * than as one C call: what a request's headers say (request_fields, first_of), its MACs
 * (BLAKE2b, mac_hex) and the hex ids of its trace header (hex_join). And one step off the hot
 * path that runs once per call and misses every memo: masking a caller's From (mask_name_addr).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <string.h>

/* An ordinary head byte: printable ASCII or HT. */
static inline int plain_byte(unsigned char c)
{
    return (c >= 0x20 && c < 0x7f) || c == '\t';
}

/* Eight head bytes at once: zero when all are printable ASCII (0x20-0x7e), else a mask with the
 * high bit of (at least) the first other byte set. The tests are the "some byte is less than n" /
 * "some byte is zero" word tricks: a borrow can mark a byte above a marked one, never below, so
 * the lowest mark is exact. */
static inline uint64_t odd_bytes(uint64_t x)
{
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    const uint64_t del = x ^ (ones * 0x7f);
    const uint64_t below_space = (x - ones * 0x20) & ~x & highs;
    const uint64_t is_del = (del - ones) & ~del & highs;
    return (x & highs) | below_space | is_del;
}

#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
/* the first byte in memory is the lowest of the word: skip straight to the first marked one */
#define PLAIN_PREFIX(mask) ((Py_ssize_t)(__builtin_ctzll(mask) >> 3))
#else
#define PLAIN_PREFIX(mask) ((Py_ssize_t)0)
#endif

/* Validate the head and find where it ends. Returns the index of the first CRLF CRLF and the
 * number of lines in it (start line included), or -1 when the message is not the plain shape
 * or has more than max_lines lines. Colons are looked for by the caller, line by line. */
/* (inlined into each caller, split_plain and sipscan_response: as one out-of-line function it
 * cost every message ~170 more instructions) */
#if defined(__GNUC__)
#define HOT_INLINE inline __attribute__((always_inline))
#else
#define HOT_INLINE inline
#endif

static HOT_INLINE Py_ssize_t scan_head(const unsigned char *s, Py_ssize_t n, Py_ssize_t max_lines,
                            Py_ssize_t *n_lines)
{
    Py_ssize_t p = 0, lines = 1;
    while (p < n) {
        if (n - p >= 8) {
            uint64_t x;
            memcpy(&x, s + p, 8);
            const uint64_t odd = odd_bytes(x);
            if (odd == 0) {
                p += 8;
                continue;
            }
            p += PLAIN_PREFIX(odd); /* (less than 8: the marked byte is in this word) */
        }
        if (plain_byte(s[p])) {
            p++;
            continue;
        }
        /* anything else must be the CR of a CR LF line end */
        if (s[p] != '\r' || n - p < 2 || s[p + 1] != '\n')
            return -1;
        if (n - p >= 4 && s[p + 2] == '\r' && s[p + 3] == '\n') {
            *n_lines = lines;
            return p;
        }
        p += 2;
        /* the next line: a fold (SP/HT first) and the end of data without CRLF CRLF are not
         * the plain shape */
        if (p >= n || s[p] == ' ' || s[p] == '\t')
            return -1;
        if (++lines > max_lines)
            return -1;
    }
    return -1;
}

static inline void strip_range(const unsigned char *s, Py_ssize_t *a, Py_ssize_t *b);
static PyObject *bytes_of(const unsigned char *s, Py_ssize_t a, Py_ssize_t b);

/* The canonical name of the spelling s[0:len] ("Name:", colon included) in the caller's table:
 * a borrowed reference, or NULL (with an exception set only when that is not a miss).
 *
 * Looking the spelling up in the dict needs a bytes key made, hashed and freed for every header
 * line: about half of a plain message's scan. Up to CPython 3.11 a dict's version tag changes
 * with every change of any dict, so a small cache of the answers, emptied whenever the table is
 * another object or its version moved, gives the dict's answer without asking it. */
#if PY_VERSION_HEX < 0x030C0000
#define NAME_SLOTS 128
#define NAME_SLOT_BYTES 32
static struct name_slot {
    Py_ssize_t len; /* 0: empty */
    char key[NAME_SLOT_BYTES];
    PyObject *name; /* strong */
} name_slots[NAME_SLOTS];
static PyObject *name_table; /* strong */
static uint64_t name_table_version;

static void name_cache_reset(PyObject *table)
{
    for (int i = 0; i < NAME_SLOTS; i++) {
        name_slots[i].len = 0;
        Py_CLEAR(name_slots[i].name);
    }
    Py_INCREF(table);
    Py_XSETREF(name_table, table);
    name_table_version = ((PyDictObject *)table)->ma_version_tag;
}
#endif

static HOT_INLINE PyObject *canonical_name(PyObject *table, const unsigned char *s, Py_ssize_t len)
{
#if PY_VERSION_HEX < 0x030C0000
    struct name_slot *slot = NULL;
    if (len <= NAME_SLOT_BYTES) {
        if (table != name_table || ((PyDictObject *)table)->ma_version_tag != name_table_version)
            name_cache_reset(table);
        uint32_t h = 2166136261u; /* FNV-1a */
        for (Py_ssize_t i = 0; i < len; i++)
            h = (h ^ s[i]) * 16777619u;
        slot = &name_slots[(h ^ (h >> 16)) & (NAME_SLOTS - 1)];
        if (slot->len == len && memcmp(slot->key, s, (size_t)len) == 0)
            return slot->name;
    }
#endif
    PyObject *key = PyBytes_FromStringAndSize((const char *)s, len);
    if (key == NULL)
        return NULL;
    PyObject *name = PyDict_GetItemWithError(table, key); /* borrowed */
    Py_DECREF(key);
#if PY_VERSION_HEX < 0x030C0000
    /* (a key's __eq__ could have changed the table meanwhile: keep only an answer of this version) */
    if (name != NULL && slot != NULL && table == name_table &&
        ((PyDictObject *)table)->ma_version_tag == name_table_version) {
        Py_INCREF(name);
        Py_XSETREF(slot->name, name);
        memcpy(slot->key, s, (size_t)len);
        slot->len = len;
    }
#endif
    return name;
}

/* The cut of a plain message: 1 with start, lines, names and body set (new references), 0 when
 * the message is not the plain shape, -1 with an exception set (out of memory). */
static int split_plain(PyObject *data, PyObject *table, Py_ssize_t max_lines, PyObject **start_out,
                       PyObject **lines_out, PyObject **names_out, PyObject **body_out)
{
    if (!PyBytes_CheckExact(data) || max_lines < 1)
        return 0;
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(data);
    const Py_ssize_t n = PyBytes_GET_SIZE(data);
    Py_ssize_t n_lines = 0;
    const Py_ssize_t head_end = scan_head(s, n, max_lines, &n_lines);
    if (head_end < 0)
        return 0;

    /* From here the head s[0:head_end] is known to be lines of printable ASCII/HT separated
     * by CR LF, every CR being the first byte of a CR LF. */
    PyObject *start = NULL, *lines = NULL, *names = NULL, *body = NULL;
    int result = -1;
    const Py_ssize_t n_headers = n_lines - 1;
    lines = PyList_New(n_headers);
    names = PyList_New(n_headers);
    if (lines == NULL || names == NULL)
        goto done;

    const unsigned char *cr = memchr(s, '\r', (size_t)head_end);
    Py_ssize_t end = cr ? cr - s : head_end;
    start = PyBytes_FromStringAndSize((const char *)s, end);
    if (start == NULL)
        goto done;
    Py_ssize_t pos = end + 2;
    for (Py_ssize_t k = 0; k < n_headers; k++) {
        if (pos > head_end) { /* cannot happen after scan_head; kept as a bound */
            result = 0;
            goto done;
        }
        cr = memchr(s + pos, '\r', (size_t)(head_end - pos));
        end = cr ? cr - s : head_end;
        const unsigned char *colon = memchr(s + pos, ':', (size_t)(end - pos));
        if (colon == NULL || colon == s + pos) {
            result = 0;
            goto done;
        }
        PyObject *name = canonical_name(table, s + pos, colon - (s + pos) + 1); /* borrowed */
        if (name == NULL) {
            if (PyErr_Occurred()) {
                if (PyErr_ExceptionMatches(PyExc_MemoryError))
                    goto done;
                PyErr_Clear();
            }
            result = 0;
            goto done;
        }
        Py_INCREF(name);
        PyList_SET_ITEM(names, k, name);
        PyObject *line = PyBytes_FromStringAndSize((const char *)(s + pos), end - pos);
        if (line == NULL)
            goto done;
        PyList_SET_ITEM(lines, k, line);
        pos = end + 2;
    }
    body = PyBytes_FromStringAndSize((const char *)(s + head_end + 4), n - head_end - 4);
    if (body == NULL)
        goto done;
    *start_out = start;
    *lines_out = lines;
    *names_out = names;
    *body_out = body;
    return 1;
done:
    Py_XDECREF(start);
    Py_XDECREF(lines);
    Py_XDECREF(names);
    return result;
}

/* 0 when a FASTCALL function got ``want`` arguments, else -1 with a TypeError saying ``usage`` */
static int arg_count(Py_ssize_t nargs, Py_ssize_t want, const char *usage)
{
    if (nargs != want) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    return 0;
}

static int split_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *usage,
                      Py_ssize_t *max_lines)
{
    if (arg_count(nargs, want, usage) < 0)
        return -1;
    if (!PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "names must be a dict");
        return -1;
    }
    *max_lines = PyLong_AsSsize_t(args[2]);
    if (*max_lines == -1 && PyErr_Occurred())
        return -1;
    return 0;
}

/* split(data, names, max_lines) -> (start, lines, names, body) or None */
static PyObject *
sipscan_split(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Py_ssize_t max_lines;
    if (split_args(args, nargs, 3, "split(data, names, max_lines) takes 3 arguments", &max_lines) < 0)
        return NULL;
    PyObject *start, *lines, *names, *body;
    const int r = split_plain(args[0], args[1], max_lines, &start, &lines, &names, &body);
    if (r <= 0) {
        if (r < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    PyObject *result = PyTuple_Pack(4, start, lines, names, body);
    Py_DECREF(start);
    Py_DECREF(lines);
    Py_DECREF(names);
    Py_DECREF(body);
    return result;
}

static inline int all_digits(const unsigned char *s, Py_ssize_t a, Py_ssize_t b)
{
    if (a >= b)
        return 0;
    for (Py_ssize_t i = a; i < b; i++)
        if (s[i] < '0' || s[i] > '9')
            return 0;
    return 1;
}

/* parse(data, names, max_lines, max_cl_digits, check_length)
 *   -> (start, method, uri, status, lines, names, body, truncated) or None
 * sipmsg.parse of a plain message (see split) whose start line and Content-Length that
 * function accepts: the same parts, with the start line of a status line without reason phrase
 * given its SP and the body cut to Content-Length (check_length only). None for every other
 * message, the ones sipmsg.parse refuses among them: the caller parses those itself. */
static PyObject *
sipscan_parse(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Py_ssize_t max_lines;
    if (split_args(args, nargs, 5, "parse(data, names, max_lines, max_cl_digits, check_length) takes 5 arguments",
                   &max_lines) < 0)
        return NULL;
    const Py_ssize_t max_digits = PyLong_AsSsize_t(args[3]);
    if (max_digits == -1 && PyErr_Occurred())
        return NULL;
    const int check_length = PyObject_IsTrue(args[4]);
    if (check_length < 0)
        return NULL;
    PyObject *start, *lines, *names, *body;
    const int r = split_plain(args[0], args[1], max_lines, &start, &lines, &names, &body);
    if (r <= 0) {
        if (r < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    PyObject *method = NULL, *uri = NULL, *status = NULL, *result = NULL, *truncated = Py_False;
    int plain = 0;
    /* the start line (RFC 3261 §7.1/§7.2), as sipmsg.parse checks it */
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(start);
    const Py_ssize_t n = PyBytes_GET_SIZE(start);
    if (n >= 7 && memcmp(s, "SIP/2.0", 7) == 0) {
        if (n < 11 || s[7] != ' ' || !all_digits(s, 8, 11) || (n > 11 && s[11] != ' ') || s[8] == '0')
            goto out; /* also "SIP/2.0 099": a status below 100 */
        status = PyLong_FromLong((s[8] - '0') * 100 + (s[9] - '0') * 10 + (s[10] - '0'));
        if (status == NULL)
            goto out;
        if (n == 11) { /* "SIP/2.0 500": the SP before the (empty) reason phrase is added */
            PyObject *repaired = PyBytes_FromStringAndSize(NULL, 12);
            if (repaired == NULL)
                goto out;
            memcpy(PyBytes_AS_STRING(repaired), s, 11);
            PyBytes_AS_STRING(repaired)[11] = ' ';
            Py_SETREF(start, repaired);
        }
        method = Py_None;
        Py_INCREF(method);
        uri = Py_None;
        Py_INCREF(uri);
    }
    else {
        const unsigned char *sp1 = memchr(s, ' ', (size_t)n);
        if (sp1 == NULL)
            goto out;
        const Py_ssize_t m_end = sp1 - s, u_start = m_end + 1;
        const unsigned char *sp2 = memchr(s + u_start, ' ', (size_t)(n - u_start));
        if (sp2 == NULL)
            goto out;
        const Py_ssize_t u_end = sp2 - s;
        if (n - u_end - 1 != 7 || memcmp(s + u_end + 1, "SIP/2.0", 7) != 0)
            goto out; /* (a third SP would be in these 7 bytes) */
        if (u_end == u_start || memchr(s + u_start, '\t', (size_t)(u_end - u_start)) != NULL || m_end == 0)
            goto out;
        for (Py_ssize_t i = 0; i < m_end; i++)
            if (!((s[i] >= 'A' && s[i] <= 'Z') || (s[i] >= 'a' && s[i] <= 'z')))
                goto out;
        method = bytes_of(s, 0, m_end);
        uri = method ? bytes_of(s, u_start, u_end) : NULL;
        status = uri ? PyLong_FromLong(0) : NULL;
        if (status == NULL)
            goto out;
    }
    if (check_length) {
        /* one Content-Length, all digits, no longer than max_digits, no more than the body */
        Py_ssize_t at = -1;
        for (Py_ssize_t k = 0; k < PyList_GET_SIZE(names); k++) {
            PyObject *name = PyList_GET_ITEM(names, k);
            if (!PyBytes_Check(name))
                goto out; /* (the caller's table holds bytes; anything else is its business) */
            if (PyBytes_GET_SIZE(name) == 14 && memcmp(PyBytes_AS_STRING(name), "content-length", 14) == 0) {
                if (at >= 0)
                    goto out;
                at = k;
            }
        }
        if (at >= 0) {
            PyObject *line = PyList_GET_ITEM(lines, at);
            const unsigned char *ls = (const unsigned char *)PyBytes_AS_STRING(line);
            const unsigned char *colon = memchr(ls, ':', (size_t)PyBytes_GET_SIZE(line));
            if (colon == NULL)
                goto out;
            Py_ssize_t a = colon - ls + 1, b = PyBytes_GET_SIZE(line);
            strip_range(ls, &a, &b);
            if (!all_digits(ls, a, b) || b - a > max_digits || b - a > 18)
                goto out;
            long long cl = 0;
            for (Py_ssize_t i = a; i < b; i++)
                cl = cl * 10 + (ls[i] - '0');
            const Py_ssize_t body_len = PyBytes_GET_SIZE(body);
            if (cl > (long long)body_len)
                goto out;
            if (cl < (long long)body_len) {
                PyObject *cut = PyBytes_FromStringAndSize(PyBytes_AS_STRING(body), (Py_ssize_t)cl);
                if (cut == NULL)
                    goto out;
                Py_SETREF(body, cut);
                truncated = Py_True;
            }
        }
    }
    plain = 1;
    result = PyTuple_Pack(8, start, method, uri, status, lines, names, body, truncated);
out:
    Py_DECREF(start);
    Py_DECREF(lines);
    Py_DECREF(names);
    Py_DECREF(body);
    Py_XDECREF(method);
    Py_XDECREF(uri);
    Py_XDECREF(status);
    if (!plain && !PyErr_Occurred())
        Py_RETURN_NONE;
    return result;
}

/* ---- header values -------------------------------------------------------------------------
 * The functions below do, in one C call each, what sipmsg's header accessors did with several
 * bytes-method calls (each of which costs more under mypyc than the work it does). Each gives
 * exactly the Python function's result; where the Python function raises SipParseError, the C
 * function returns None and the caller runs the Python function, which raises. */

/* bytes.strip()'s whitespace: SP, HT, LF, VT, FF, CR (Py_ISSPACE). */
static inline int ascii_space(unsigned char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r');
}

static inline unsigned char ascii_lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

static inline unsigned char ascii_upper(unsigned char c)
{
    return (c >= 'a' && c <= 'z') ? (unsigned char)(c - 32) : c;
}

/* Narrow [*a, *b) of s to its stripped part. */
static inline void strip_range(const unsigned char *s, Py_ssize_t *a, Py_ssize_t *b)
{
    while (*a < *b && ascii_space(s[*a]))
        (*a)++;
    while (*b > *a && ascii_space(s[*b - 1]))
        (*b)--;
}

static PyObject *bytes_of(const unsigned char *s, Py_ssize_t a, Py_ssize_t b)
{
    return PyBytes_FromStringAndSize((const char *)(s + a), b - a);
}

static PyObject *lower_bytes_of(const unsigned char *s, Py_ssize_t a, Py_ssize_t b)
{
    PyObject *out = PyBytes_FromStringAndSize(NULL, b - a);
    if (out == NULL)
        return NULL;
    unsigned char *d = (unsigned char *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = a; i < b; i++)
        *d++ = ascii_lower(s[i]);
    return out;
}

static int need_bytes(PyObject *o, const char *what)
{
    if (PyBytes_Check(o))
        return 0;
    PyErr_Format(PyExc_TypeError, "%s must be bytes, not %.100s", what, Py_TYPE(o)->tp_name);
    return -1;
}

/* names.index(name, start) or -1; -2 with an exception set. The names the parser stores are
 * bytes, compared by identity, then length and bytes; anything else as list.index would. */
static Py_ssize_t find_name(PyObject *names, PyObject *name, Py_ssize_t start)
{
    const int plain = PyBytes_CheckExact(name);
    const char *nb = plain ? PyBytes_AS_STRING(name) : NULL;
    const Py_ssize_t nl = plain ? PyBytes_GET_SIZE(name) : 0;
    if (start < 0) { /* from the end, as list.index counts it */
        start += PyList_GET_SIZE(names);
        if (start < 0)
            start = 0;
    }
    for (Py_ssize_t i = start; i < PyList_GET_SIZE(names); i++) {
        PyObject *item = PyList_GET_ITEM(names, i);
        if (item == name)
            return i;
        if (plain && PyBytes_CheckExact(item)) {
            if (PyBytes_GET_SIZE(item) == nl && memcmp(PyBytes_AS_STRING(item), nb, (size_t)nl) == 0)
                return i;
            continue;
        }
        Py_INCREF(item);
        int r = PyObject_RichCompareBool(item, name, Py_EQ);
        Py_DECREF(item);
        if (r < 0)
            return -2;
        if (r)
            return i;
    }
    return -1;
}

/* SipMessage.value_at of one line: the value after the first colon, stripped; folded lines
 * (with LF) joined as the Python code joins them: each LF-separated piece stripped, pieces
 * joined with one SP, the whole stripped. No colon: ValueError, as bytes.index raises. */
static PyObject *line_value(PyObject *line)
{
    if (need_bytes(line, "header line") < 0)
        return NULL;
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(line);
    const Py_ssize_t n = PyBytes_GET_SIZE(line);
    const unsigned char *colon = memchr(s, ':', (size_t)n);
    if (colon == NULL) {
        PyErr_SetString(PyExc_ValueError, "subsection not found");
        return NULL;
    }
    Py_ssize_t a = colon - s + 1, b = n;
    if (memchr(s + a, '\n', (size_t)(b - a)) == NULL) {
        strip_range(s, &a, &b);
        return bytes_of(s, a, b);
    }
    unsigned char *buf = PyMem_Malloc((size_t)(b - a) + 1);
    if (buf == NULL)
        return PyErr_NoMemory();
    Py_ssize_t len = 0, p = a;
    for (;;) {
        const unsigned char *lf = memchr(s + p, '\n', (size_t)(b - p));
        Py_ssize_t pa = p, pb = lf ? lf - s : b;
        const Py_ssize_t next = pb + 1;
        strip_range(s, &pa, &pb);
        memcpy(buf + len, s + pa, (size_t)(pb - pa));
        len += pb - pa;
        if (lf == NULL)
            break;
        buf[len++] = ' ';
        p = next;
    }
    Py_ssize_t ra = 0, rb = len;
    strip_range(buf, &ra, &rb);
    PyObject *out = bytes_of(buf, ra, rb);
    PyMem_Free(buf);
    return out;
}

static int list_arg(PyObject *o, const char *what)
{
    if (PyList_Check(o))
        return 0;
    PyErr_Format(PyExc_TypeError, "%s must be a list", what);
    return -1;
}

/* index(names, name, start) -> int: names.index(name, start), or -1 */
static PyObject *
sipscan_index(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (arg_count(nargs, 3, "index(names, name, start) takes 3 arguments") < 0)
        return NULL;
    if (list_arg(args[0], "names") < 0)
        return NULL;
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t i = find_name(args[0], args[1], start);
    if (i == -2)
        return NULL;
    return PyLong_FromSsize_t(i);
}

/* first_of(names, wanted) -> int: the first index of names holding one of the tuple wanted
 * (compared as index compares), or -1. One pass for "is any of these headers there". */
static PyObject *
sipscan_first_of(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (arg_count(nargs, 2, "first_of(names, wanted) takes 2 arguments") < 0 || list_arg(args[0], "names") < 0)
        return NULL;
    PyObject *names = args[0], *wanted = args[1];
    if (!PyTuple_Check(wanted)) {
        PyErr_SetString(PyExc_TypeError, "wanted must be a tuple");
        return NULL;
    }
    const Py_ssize_t k = PyTuple_GET_SIZE(wanted);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(names); i++) {
        PyObject *item = PyList_GET_ITEM(names, i);
        Py_INCREF(item);
        for (Py_ssize_t j = 0; j < k; j++) {
            PyObject *name = PyTuple_GET_ITEM(wanted, j);
            int r;
            if (item == name)
                r = 1;
            else if (PyBytes_CheckExact(item) && PyBytes_CheckExact(name))
                r = PyBytes_GET_SIZE(item) == PyBytes_GET_SIZE(name) &&
                    memcmp(PyBytes_AS_STRING(item), PyBytes_AS_STRING(name), (size_t)PyBytes_GET_SIZE(name)) == 0;
            else if ((r = PyObject_RichCompareBool(item, name, Py_EQ)) < 0) {
                Py_DECREF(item);
                return NULL;
            }
            if (r) {
                Py_DECREF(item);
                return PyLong_FromSsize_t(i);
            }
        }
        Py_DECREF(item);
        if (i >= PyList_GET_SIZE(names))
            break;
    }
    return PyLong_FromSsize_t(-1);
}

/* value(line) -> bytes: SipMessage.value_at of that line */
static PyObject *
sipscan_value(PyObject *module, PyObject *line)
{
    (void)module;
    return line_value(line);
}

/* get(lines, names, name) -> bytes or None: SipMessage.get */
static PyObject *
sipscan_get(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (arg_count(nargs, 3, "get(lines, names, name) takes 3 arguments") < 0)
        return NULL;
    if (list_arg(args[0], "lines") < 0 || list_arg(args[1], "names") < 0)
        return NULL;
    Py_ssize_t i = find_name(args[1], args[2], 0);
    if (i == -2)
        return NULL;
    if (i < 0)
        Py_RETURN_NONE;
    if (i >= PyList_GET_SIZE(args[0])) {
        PyErr_SetString(PyExc_IndexError, "list index out of range");
        return NULL;
    }
    PyObject *line = PyList_GET_ITEM(args[0], i);
    Py_INCREF(line);
    PyObject *out = line_value(line);
    Py_DECREF(line);
    return out;
}

/* One element of a comma-separated value s[pos:n], as split_values cuts it (sipscan_split_values
 * and the response pass below): after a run of separators, a run of quoted strings, <...> and
 * bytes other than , " <, ending at a comma or at the end. Returns 1 with the stripped element in [*a, *b) (maybe empty) and the
 * position after its comma in *next, 0 when only separators are left, -1 where the split
 * raises (an unclosed quote or <). */
static int value_element(const unsigned char *s, Py_ssize_t n, Py_ssize_t pos, Py_ssize_t *a, Py_ssize_t *b,
                         Py_ssize_t *next)
{
    Py_ssize_t p = pos;
    while (p < n && (ascii_space(s[p]) || s[p] == ','))
        p++;
    const Py_ssize_t first = p;
    while (p < n) {
        const unsigned char c = s[p];
        if (c == ',')
            break;
        if (c == '"') {
            Py_ssize_t q = p + 1;
            while (q < n && s[q] != '"') {
                if (s[q] == '\\') {
                    if (q + 1 >= n || s[q + 1] == '\n')
                        break;
                    q += 2;
                }
                else
                    q++;
            }
            if (q >= n || s[q] != '"')
                break;
            p = q + 1;
        }
        else if (c == '<') {
            const unsigned char *gt = memchr(s + p + 1, '>', (size_t)(n - p - 1));
            if (gt == NULL)
                break;
            p = gt - s + 1;
        }
        else
            p++;
    }
    if (p == first)
        return p == n ? 0 : -1;
    if (p < n && s[p] != ',')
        return -1;
    *a = first;
    *b = p;
    strip_range(s, a, b);
    *next = p + 1;
    return 1;
}

/* split_values(value, limit) -> list, or None where the Python split raises (an unclosed
 * quote or <, more than limit values when limit is not 0). The same cut as sipmsg's _ELEMENT
 * pattern: after a run of separators (ASCII whitespace, commas), an element is a run of quoted
 * strings (backslash escapes any byte but LF), <...> and bytes other than , " <; it must end
 * at a comma or at the end; it is kept stripped, when not empty. */
static PyObject *
sipscan_split_values(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (arg_count(nargs, 2, "split_values(value, limit) takes 2 arguments") < 0)
        return NULL;
    PyObject *value = args[0];
    if (need_bytes(value, "value") < 0)
        return NULL;
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(value);
    const Py_ssize_t n = PyBytes_GET_SIZE(value);
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    if (memchr(s, ',', (size_t)n) == NULL) {
        if (PyList_Append(out, value) < 0)
            goto fail;
        return out;
    }
    Py_ssize_t pos = 0;
    while (pos < n) {
        Py_ssize_t a, b;
        const int got = value_element(s, n, pos, &a, &b, &pos);
        if (got == 0)
            break; /* only separators left */
        if (got < 0)
            goto raises;
        if (a < b) {
            PyObject *v = bytes_of(s, a, b);
            if (v == NULL)
                goto fail;
            int r = PyList_Append(out, v);
            Py_DECREF(v);
            if (r < 0)
                goto fail;
            if (limit != 0 && PyList_GET_SIZE(out) > limit)
                goto raises;
        }
    }
    return out;
raises:
    Py_DECREF(out);
    Py_RETURN_NONE;
fail:
    Py_DECREF(out);
    return NULL;
}

/* Parameters ";a=1;b;c=2" of s[a:b] into a new dict, as sipmsg.parse_params. */
static PyObject *params_of(const unsigned char *s, Py_ssize_t a, Py_ssize_t b)
{
    PyObject *out = PyDict_New();
    if (out == NULL)
        return NULL;
    Py_ssize_t p = a;
    for (;;) {
        const unsigned char *semi = memchr(s + p, ';', (size_t)(b - p));
        const Py_ssize_t end = semi ? semi - s : b;
        const unsigned char *eq = memchr(s + p, '=', (size_t)(end - p));
        PyObject *key = NULL, *val = NULL;
        if (eq != NULL) {
            Py_ssize_t ka = p, kb = eq - s, va = kb + 1, vb = end;
            strip_range(s, &ka, &kb);
            strip_range(s, &va, &vb);
            key = lower_bytes_of(s, ka, kb);
            val = key ? bytes_of(s, va, vb) : NULL;
        }
        else {
            Py_ssize_t ka = p, kb = end;
            strip_range(s, &ka, &kb);
            if (ka < kb) {
                key = lower_bytes_of(s, ka, kb);
                val = Py_None;
                Py_INCREF(val);
            }
        }
        if (eq != NULL || key != NULL || val != NULL) {
            if (key == NULL || val == NULL || PyDict_SetItem(out, key, val) < 0) {
                Py_XDECREF(key);
                Py_XDECREF(val);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(key);
            Py_DECREF(val);
        }
        if (semi == NULL)
            break;
        p = end + 1;
    }
    return out;
}

/* parse_params(s) -> dict: sipmsg.parse_params */
static PyObject *
sipscan_parse_params(PyObject *module, PyObject *arg)
{
    (void)module;
    if (need_bytes(arg, "s") < 0)
        return NULL;
    return params_of((const unsigned char *)PyBytes_AS_STRING(arg), 0, PyBytes_GET_SIZE(arg));
}

/* Where header_tag finds the tag of the value s[va:vb]: 1 with [*a, *b) set (stripped, not
 * empty), else 0. The first ";tag=" (any case) after the last '>' counts, up to the next ';'. */
static int tag_span(const unsigned char *s, Py_ssize_t va, Py_ssize_t vb, Py_ssize_t *a, Py_ssize_t *b)
{
    Py_ssize_t t = vb;
    while (t > va && s[t - 1] != '>')
        t--;
    /* t: the start of the tail (va when there is no '>') */
    for (Py_ssize_t i = t; i + 5 <= vb; i++) {
        if (s[i] == ';' && ascii_lower(s[i + 1]) == 't' && ascii_lower(s[i + 2]) == 'a' &&
            ascii_lower(s[i + 3]) == 'g' && s[i + 4] == '=') {
            *a = i + 5;
            *b = vb;
            const unsigned char *semi = memchr(s + *a, ';', (size_t)(vb - *a));
            if (semi != NULL)
                *b = semi - s;
            strip_range(s, a, b);
            return *a < *b;
        }
    }
    return 0;
}

/* header_tag(value) -> bytes or None: sipmsg.header_tag */
static PyObject *
sipscan_header_tag(PyObject *module, PyObject *value)
{
    (void)module;
    if (value == Py_None)
        Py_RETURN_NONE;
    if (need_bytes(value, "value") < 0)
        return NULL;
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(value);
    Py_ssize_t a, b;
    if (!tag_span(s, 0, PyBytes_GET_SIZE(value), &a, &b))
        Py_RETURN_NONE;
    return bytes_of(s, a, b);
}

/* SipMessage.cseq of the value s[a:b]: 1 with the number and where the method is ([*ma, *mb),
 * letters only), 0 where cseq raises (no number, more than 10 digits or 2**31 or more, no
 * method, anything after it). */
static int cseq_span(const unsigned char *s, Py_ssize_t a, Py_ssize_t b, long long *number,
                     Py_ssize_t *ma, Py_ssize_t *mb)
{
    Py_ssize_t p = a;
    while (p < b && ascii_space(s[p]))
        p++;
    const Py_ssize_t da = p;
    long long v = 0;
    while (p < b && s[p] >= '0' && s[p] <= '9') {
        if (p - da >= 10)
            return 0; /* more than 10 digits: out of range */
        v = v * 10 + (s[p] - '0');
        p++;
    }
    if (p == da || p >= b || !ascii_space(s[p]) || v >= (1LL << 31))
        return 0;
    while (p < b && ascii_space(s[p]))
        p++;
    *ma = p;
    while (p < b && ((s[p] >= 'A' && s[p] <= 'Z') || (s[p] >= 'a' && s[p] <= 'z')))
        p++;
    *mb = p;
    while (p < b && ascii_space(s[p]))
        p++;
    if (*mb == *ma || p != b)
        return 0;
    *number = v;
    return 1;
}

/* cseq(value) -> (int, bytes) or None: SipMessage.cseq of that value, None where it raises */
static PyObject *
sipscan_cseq(PyObject *module, PyObject *value)
{
    (void)module;
    if (need_bytes(value, "value") < 0)
        return NULL;
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(value);
    long long number;
    Py_ssize_t ma, mb;
    if (!cseq_span(s, 0, PyBytes_GET_SIZE(value), &number, &ma, &mb))
        Py_RETURN_NONE;
    PyObject *method = PyBytes_FromStringAndSize(NULL, mb - ma);
    if (method == NULL)
        return NULL;
    unsigned char *d = (unsigned char *)PyBytes_AS_STRING(method);
    for (Py_ssize_t i = ma; i < mb; i++)
        *d++ = ascii_upper(s[i]);
    PyObject *num = PyLong_FromLongLong(number);
    if (num == NULL) {
        Py_DECREF(method);
        return NULL;
    }
    PyObject *out = PyTuple_Pack(2, num, method);
    Py_DECREF(num);
    Py_DECREF(method);
    return out;
}

/* request_fields(lines, names)
 *   -> (via_i, via_value, next_via_i, call_id, cseq_number, CSEQ_METHOD, from_value, to_value,
 *       from_tag, to_tag, max_forwards_i, hops, route_i) or None
 * What the proxy reads of every request, in one pass over the names: the first Via line's index
 * and value and the index of the next Via line (-1: none), Call-ID, CSeq (as SipMessage.cseq), From and To
 * (first of each, as SipMessage.get) with their tags (as header_tag), the index of the first
 * Max-Forwards line (-1: none) and the number it holds as the proxy reads it (its value when
 * that is 1-3 ASCII digits, else 256; -1 without the line), and the first Route line's index. None when one of Via, Call-ID (or it is empty),
 * CSeq (or SipMessage.cseq raises for it), From, To is missing, or a name is not bytes: the
 * caller then reads them one by one and raises as it always did. */
static PyObject *
sipscan_request_fields(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (arg_count(nargs, 2, "request_fields(lines, names) takes 2 arguments") < 0 ||
            list_arg(args[0], "lines") < 0 || list_arg(args[1], "names") < 0)
        return NULL;
    PyObject *lines = args[0], *names = args[1];
    const Py_ssize_t n = PyList_GET_SIZE(names);
    if (PyList_GET_SIZE(lines) < n)
        Py_RETURN_NONE;
    Py_ssize_t via = -1, via2 = -1, cid = -1, cseq = -1, from = -1, to = -1, mf = -1, route = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(names, i);
        if (!PyBytes_CheckExact(item))
            Py_RETURN_NONE;
        const char *s = PyBytes_AS_STRING(item);
        switch (PyBytes_GET_SIZE(item)) {
        case 2:
            if (to < 0 && memcmp(s, "to", 2) == 0)
                to = i;
            break;
        case 3:
            if (memcmp(s, "via", 3) == 0) {
                if (via < 0)
                    via = i;
                else if (via2 < 0)
                    via2 = i;
            }
            break;
        case 4:
            if (cseq < 0 && memcmp(s, "cseq", 4) == 0)
                cseq = i;
            else if (from < 0 && memcmp(s, "from", 4) == 0)
                from = i;
            break;
        case 5:
            if (route < 0 && memcmp(s, "route", 5) == 0)
                route = i;
            break;
        case 7:
            if (cid < 0 && memcmp(s, "call-id", 7) == 0)
                cid = i;
            break;
        case 12:
            if (mf < 0 && memcmp(s, "max-forwards", 12) == 0)
                mf = i;
            break;
        }
    }
    if (via < 0 || cid < 0 || cseq < 0 || from < 0 || to < 0)
        Py_RETURN_NONE;
    PyObject *via_value = NULL, *call_id = NULL, *cseq_value = NULL, *cseq_parts = NULL;
    PyObject *from_value = NULL, *to_value = NULL, *from_tag = NULL, *to_tag = NULL;
    PyObject *result = NULL;
    if ((call_id = line_value(PyList_GET_ITEM(lines, cid))) == NULL)
        goto done;
    if (PyBytes_GET_SIZE(call_id) == 0) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    if ((cseq_value = line_value(PyList_GET_ITEM(lines, cseq))) == NULL ||
            (cseq_parts = sipscan_cseq(NULL, cseq_value)) == NULL)
        goto done;
    if (cseq_parts == Py_None) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    if ((via_value = line_value(PyList_GET_ITEM(lines, via))) == NULL ||
            (from_value = line_value(PyList_GET_ITEM(lines, from))) == NULL ||
            (to_value = line_value(PyList_GET_ITEM(lines, to))) == NULL ||
            (from_tag = sipscan_header_tag(NULL, from_value)) == NULL ||
            (to_tag = sipscan_header_tag(NULL, to_value)) == NULL)
        goto done;
    long hops = -1;
    if (mf >= 0) {
        PyObject *line = PyList_GET_ITEM(lines, mf);
        if (need_bytes(line, "header line") < 0)
            goto done;
        const unsigned char *ls = (const unsigned char *)PyBytes_AS_STRING(line);
        const Py_ssize_t ln = PyBytes_GET_SIZE(line);
        const unsigned char *colon = memchr(ls, ':', (size_t)ln);
        if (colon == NULL || memchr(colon, '\n', (size_t)(ln - (colon - ls))) != NULL) {
            hops = -1; /* (no colon, or folded: the caller reads it itself) */
        }
        else {
            Py_ssize_t a = colon - ls + 1, b = ln;
            strip_range(ls, &a, &b);
            hops = 256;
            if (b - a >= 1 && all_digits(ls, a, b)) {
                while (b - a > 1 && ls[a] == '0')
                    a++; /* "0070" is 70: 1*DIGIT (RFC 3261 §25.1) */
            }
            if (b - a >= 1 && b - a <= 3 && all_digits(ls, a, b)) {
                hops = 0;
                for (Py_ssize_t q = a; q < b; q++)
                    hops = hops * 10 + (ls[q] - '0');
            }
        }
    }
    PyObject *via_index = PyLong_FromSsize_t(via), *mf_index = PyLong_FromSsize_t(mf);
    PyObject *route_index = PyLong_FromSsize_t(route), *hops_value = PyLong_FromLong(hops);
    PyObject *via2_index = PyLong_FromSsize_t(via2);
    if (via_index != NULL && mf_index != NULL && route_index != NULL && hops_value != NULL &&
            via2_index != NULL && (result = PyTuple_New(13)) != NULL) {
        PyObject *items[13] = {via_index, via_value, via2_index, call_id,
                               PyTuple_GET_ITEM(cseq_parts, 0), PyTuple_GET_ITEM(cseq_parts, 1), from_value,
                               to_value, from_tag, to_tag, mf_index, hops_value, route_index};
        for (int k = 0; k < 13; k++) {
            Py_INCREF(items[k]);
            PyTuple_SET_ITEM(result, k, items[k]);
        }
    }
    Py_XDECREF(via_index);
    Py_XDECREF(mf_index);
    Py_XDECREF(route_index);
    Py_XDECREF(hops_value);
    Py_XDECREF(via2_index);
done:
    Py_XDECREF(via_value);
    Py_XDECREF(call_id);
    Py_XDECREF(cseq_value);
    Py_XDECREF(cseq_parts);
    Py_XDECREF(from_value);
    Py_XDECREF(to_value);
    Py_XDECREF(from_tag);
    Py_XDECREF(to_tag);
    return result;
}

/* via(value) -> (transport, host, port or None, params) or None: the parts sipmsg.parse_via
 * builds its Via from, for a value spelled "SIP/2.0/<transport> <sent-by>[;params]"; None for
 * any other spelling and wherever parse_via raises. */
static PyObject *
sipscan_via(PyObject *module, PyObject *value)
{
    (void)module;
    if (need_bytes(value, "value") < 0)
        return NULL;
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(value);
    const Py_ssize_t n = PyBytes_GET_SIZE(value);
    const unsigned char *sp = memchr(s, ' ', (size_t)n);
    if (sp == NULL)
        Py_RETURN_NONE;
    const Py_ssize_t proto_end = sp - s;
    if (proto_end < 8 || memcmp(s, "SIP/2.0/", 8) != 0)
        Py_RETURN_NONE;
    Py_ssize_t ra = proto_end + 1, rb = n;
    strip_range(s, &ra, &rb);
    if (ra == rb)
        Py_RETURN_NONE;
    const unsigned char *semi = memchr(s + ra, ';', (size_t)(rb - ra));
    Py_ssize_t ha = ra, hb = semi ? semi - s : rb;
    strip_range(s, &ha, &hb);
    /* split_hostport: "[v6]:port" or "host:port"; no port is None */
    Py_ssize_t host_end, pa, pb = hb;
    if (ha < hb && s[ha] == '[') {
        const unsigned char *close = memchr(s + ha, ']', (size_t)(hb - ha));
        if (close == NULL)
            Py_RETURN_NONE;
        host_end = close - s + 1;
        pa = (host_end < hb && s[host_end] == ':') ? host_end + 1 : hb;
    }
    else {
        const unsigned char *colon = memchr(s + ha, ':', (size_t)(hb - ha));
        host_end = colon ? colon - s : hb;
        pa = colon ? host_end + 1 : hb;
    }
    if (host_end == ha)
        Py_RETURN_NONE; /* no host: parse_via raises */
    long port = 0;
    if (pa < pb) {
        if (pb - pa > 5)
            Py_RETURN_NONE;
        for (Py_ssize_t i = pa; i < pb; i++) {
            if (s[i] < '0' || s[i] > '9')
                Py_RETURN_NONE;
            port = port * 10 + (s[i] - '0');
        }
        if (port <= 0 || port >= 65536)
            Py_RETURN_NONE;
    }
    PyObject *transport = NULL, *host = NULL, *port_obj = NULL, *params = NULL, *out = NULL;
    if (proto_end - 8 == 3 && memcmp(s + 8, "UDP", 3) == 0)
        transport = bytes_of(s, 8, proto_end);
    else {
        transport = PyBytes_FromStringAndSize(NULL, proto_end - 8);
        if (transport != NULL) {
            unsigned char *d = (unsigned char *)PyBytes_AS_STRING(transport);
            for (Py_ssize_t i = 8; i < proto_end; i++)
                *d++ = ascii_upper(s[i]);
        }
    }
    if (transport == NULL)
        goto done;
    host = bytes_of(s, ha, host_end);
    if (host == NULL)
        goto done;
    if (pa < pb)
        port_obj = PyLong_FromLong(port);
    else {
        port_obj = Py_None;
        Py_INCREF(port_obj);
    }
    if (port_obj == NULL)
        goto done;
    params = semi ? params_of(s, semi - s, rb) : PyDict_New();
    if (params == NULL)
        goto done;
    out = PyTuple_Pack(4, transport, host, port_obj, params);
done:
    Py_XDECREF(transport);
    Py_XDECREF(host);
    Py_XDECREF(port_obj);
    Py_XDECREF(params);
    return out;
}

/* serialize(start, lines, body) -> start CRLF lines joined by CRLF, CRLF CRLF, body (SipMessage.to_bytes
 * in one allocation); None when a part is not bytes (the caller's join decides what that means). */
static PyObject *
sipscan_serialize(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (arg_count(nargs, 3, "serialize(start, lines, body) takes 3 arguments") < 0)
        return NULL;
    PyObject *start = args[0], *lines = args[1], *body = args[2];
    if (!PyBytes_CheckExact(start) || !PyList_Check(lines) || !PyBytes_CheckExact(body))
        Py_RETURN_NONE;
    const Py_ssize_t k = PyList_GET_SIZE(lines);
    Py_ssize_t total = PyBytes_GET_SIZE(start) + PyBytes_GET_SIZE(body) + 6;
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *line = PyList_GET_ITEM(lines, i);
        if (!PyBytes_CheckExact(line))
            Py_RETURN_NONE;
        const Py_ssize_t add = PyBytes_GET_SIZE(line) + (i > 0 ? 2 : 0);
        if (total > PY_SSIZE_T_MAX - add)
            return PyErr_NoMemory();
        total += add;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        return NULL;
    char *d = PyBytes_AS_STRING(out);
    memcpy(d, PyBytes_AS_STRING(start), (size_t)PyBytes_GET_SIZE(start));
    d += PyBytes_GET_SIZE(start);
    *d++ = '\r';
    *d++ = '\n';
    for (Py_ssize_t i = 0; i < k; i++) { /* (no code runs meanwhile: the list cannot change) */
        PyObject *line = PyList_GET_ITEM(lines, i);
        if (i > 0) {
            *d++ = '\r';
            *d++ = '\n';
        }
        memcpy(d, PyBytes_AS_STRING(line), (size_t)PyBytes_GET_SIZE(line));
        d += PyBytes_GET_SIZE(line);
    }
    memcpy(d, "\r\n\r\n", 4);
    d += 4;
    memcpy(d, PyBytes_AS_STRING(body), (size_t)PyBytes_GET_SIZE(body));
    return out;
}

/* ---- BLAKE2b (RFC 7693) for the proxy's MACs ------------------------------------------------
 * The core computes one or two short keyed BLAKE2b digests per forwarded request (branch MAC,
 * Record-Route MAC; the loop tag beside them is the interpreter's own hash). Through hashlib
 * each is a copy of a keyed object, a join of the parts, an update, a digest and a hexlify: five
 * calls and four objects around one or two compressions. Here a prepared state (the chaining
 * value after the key block) and the parts go in, the hex digest of the parts joined by a
 * separator comes out, in one call. The digests are exactly hashlib.blake2b's (the tests compare
 * them over many lengths and keys). */
static const uint64_t b2_iv[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const uint8_t b2_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

static inline uint64_t b2_rotr(uint64_t x, int n)
{
    return (x >> n) | (x << (64 - n));
}

static inline uint64_t b2_load(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;  /* (compilers make this one load on little-endian machines) */
}

#define B2_G(a, b, c, d, x, y)                 \
    do {                                       \
        v[a] = v[a] + v[b] + (x);              \
        v[d] = b2_rotr(v[d] ^ v[a], 32);       \
        v[c] = v[c] + v[d];                    \
        v[b] = b2_rotr(v[b] ^ v[c], 24);       \
        v[a] = v[a] + v[b] + (y);              \
        v[d] = b2_rotr(v[d] ^ v[a], 16);       \
        v[c] = v[c] + v[d];                    \
        v[b] = b2_rotr(v[b] ^ v[c], 63);       \
    } while (0)

/* RFC 7693 §3.2: compress one 128-byte block into h; t is the byte count so far (< 2**64 here) */
static void b2_compress(uint64_t h[8], const unsigned char block[128], uint64_t t, int last)
{
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++)
        m[i] = b2_load(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = b2_iv[i];
    }
    v[12] ^= t;
    if (last)
        v[14] = ~v[14];
    /* the rounds written out, so every message word index is a constant */
#define B2_ROUND(r)                                                    \
    do {                                                               \
        B2_G(0, 4, 8, 12, m[b2_sigma[r][0]], m[b2_sigma[r][1]]);      \
        B2_G(1, 5, 9, 13, m[b2_sigma[r][2]], m[b2_sigma[r][3]]);      \
        B2_G(2, 6, 10, 14, m[b2_sigma[r][4]], m[b2_sigma[r][5]]);     \
        B2_G(3, 7, 11, 15, m[b2_sigma[r][6]], m[b2_sigma[r][7]]);     \
        B2_G(0, 5, 10, 15, m[b2_sigma[r][8]], m[b2_sigma[r][9]]);     \
        B2_G(1, 6, 11, 12, m[b2_sigma[r][10]], m[b2_sigma[r][11]]);   \
        B2_G(2, 7, 8, 13, m[b2_sigma[r][12]], m[b2_sigma[r][13]]);    \
        B2_G(3, 4, 9, 14, m[b2_sigma[r][14]], m[b2_sigma[r][15]]);    \
    } while (0)
    B2_ROUND(0); B2_ROUND(1); B2_ROUND(2); B2_ROUND(3); B2_ROUND(4); B2_ROUND(5);
    B2_ROUND(6); B2_ROUND(7); B2_ROUND(8); B2_ROUND(9); B2_ROUND(10); B2_ROUND(11);
#undef B2_ROUND
    for (int i = 0; i < 8; i++)
        h[i] ^= v[i] ^ v[i + 8];
}

/* A prepared state as bytes: h[8] (little-endian words), then the byte count t (8 bytes), then
 * the digest size (1 byte). */
#define B2_STATE_SIZE 73

static void b2_store(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* blake2b_state(key, digest_size) -> the state mac_hex continues from: BLAKE2b's parameter block
 * for that digest size and key length, and the key block compressed when there is a key */
static PyObject *
sipscan_blake2b_state(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (arg_count(nargs, 2, "blake2b_state(key, digest_size) takes 2 arguments") < 0 ||
            need_bytes(args[0], "key") < 0)
        return NULL;
    const Py_ssize_t klen = PyBytes_GET_SIZE(args[0]);
    const long outlen = PyLong_AsLong(args[1]);
    if (outlen == -1 && PyErr_Occurred())
        return NULL;
    if (klen > 64 || outlen < 1 || outlen > 64) {
        PyErr_SetString(PyExc_ValueError, "key of at most 64 bytes, digest_size 1-64");
        return NULL;
    }
    uint64_t h[8];
    memcpy(h, b2_iv, sizeof h);
    h[0] ^= 0x01010000ULL ^ ((uint64_t)klen << 8) ^ (uint64_t)outlen;
    uint64_t t = 0;
    if (klen) {
        unsigned char block[128] = {0};
        memcpy(block, PyBytes_AS_STRING(args[0]), (size_t)klen);
        t = 128;
        b2_compress(h, block, t, 0);
    }
    unsigned char out[B2_STATE_SIZE];
    for (int i = 0; i < 8; i++)
        b2_store(out + 8 * i, h[i]);
    b2_store(out + 64, t);
    out[72] = (unsigned char)outlen;
    return PyBytes_FromStringAndSize((const char *)out, B2_STATE_SIZE);
}

/* the n bytes at src as 2n lower-case hex digits at d */
static void put_hex(char *d, const unsigned char *src, int n)
{
    static const char hexdigits[] = "0123456789abcdef";
    for (int i = 0; i < n; i++) {
        d[2 * i] = hexdigits[src[i] >> 4];
        d[2 * i + 1] = hexdigits[src[i] & 15];
    }
}

/* A keyed digest in progress, continued from a state of blake2b_state: mac_start, mac_absorb,
 * mac_hex_end (the C callers here and sipscan_mac_hex share it). */
typedef struct {
    uint64_t h[8], t;
    int outlen;
    size_t fill;  /* bytes in block; a full block is compressed only once more bytes follow */
    unsigned char block[128];
} Mac;

/* 0, or -1 when st is not a blake2b_state */
static int mac_start(Mac *m, const unsigned char *st, Py_ssize_t st_len)
{
    if (st_len != B2_STATE_SIZE || st[72] < 1 || st[72] > 64)
        return -1;
    for (int i = 0; i < 8; i++)
        m->h[i] = b2_load(st + 8 * i);
    m->t = b2_load(st + 64);
    m->outlen = st[72];
    m->fill = 0;
    return 0;
}

static void mac_absorb(Mac *m, const char *p, size_t len)
{
    while (len) {
        if (m->fill == 128) {
            m->t += 128;
            b2_compress(m->h, m->block, m->t, 0);
            m->fill = 0;
        }
        size_t take = 128 - m->fill < len ? 128 - m->fill : len;
        memcpy(m->block + m->fill, p, take);
        m->fill += take;
        p += take;
        len -= take;
    }
}

/* the digest as 2 * outlen lower-case hex digits at out (room for 128); their number, or 0 when
 * nothing was absorbed (then hashlib must do it: a keyed digest of nothing compresses the key
 * block as the last one) */
static int mac_hex_end(Mac *m, char *out)
{
    if (m->fill == 0)
        return 0;
    memset(m->block + m->fill, 0, 128 - m->fill);
    m->t += m->fill;
    b2_compress(m->h, m->block, m->t, 1);
    unsigned char digest[64];
    for (int i = 0; i < 8; i++)
        b2_store(digest + 8 * i, m->h[i]);
    put_hex(out, digest, m->outlen);
    return 2 * m->outlen;
}

/* mac_hex(state, sep, parts) -> hex of the BLAKE2b digest of sep.join(parts), continued from a
 * state of blake2b_state; None when the parts are empty (see mac_hex_end) */
static PyObject *
sipscan_mac_hex(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (arg_count(nargs, 3, "mac_hex(state, sep, parts) takes 3 arguments") < 0 ||
            need_bytes(args[0], "state") < 0 || need_bytes(args[1], "sep") < 0)
        return NULL;
    PyObject *parts = args[2];
    if (!PyTuple_Check(parts) && !PyList_Check(parts)) {
        PyErr_SetString(PyExc_TypeError, "parts must be a tuple or a list");
        return NULL;
    }
    Mac m;
    if (mac_start(&m, (const unsigned char *)PyBytes_AS_STRING(args[0]), PyBytes_GET_SIZE(args[0])) < 0) {
        PyErr_SetString(PyExc_ValueError, "not a blake2b_state");
        return NULL;
    }
    PyObject **items = PySequence_Fast_ITEMS(parts);
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(parts);
    for (Py_ssize_t k = 0; k < n; k++) {
        if (need_bytes(items[k], "each part") < 0)
            return NULL;
        if (k)
            mac_absorb(&m, PyBytes_AS_STRING(args[1]), (size_t)PyBytes_GET_SIZE(args[1]));
        mac_absorb(&m, PyBytes_AS_STRING(items[k]), (size_t)PyBytes_GET_SIZE(items[k]));
    }
    char hex[128];
    const int len = mac_hex_end(&m, hex);
    if (len == 0)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(hex, len);
}

/* hmac_state(block) -> the state of an unkeyed BLAKE2b-512 that has absorbed ``block`` (128 bytes:
 * HMAC's key block XOR ipad or opad, RFC 2104), for mask_call_id */
static PyObject *
sipscan_hmac_state(PyObject *module, PyObject *block)
{
    (void)module;
    if (need_bytes(block, "block") < 0)
        return NULL;
    if (PyBytes_GET_SIZE(block) != 128) {
        PyErr_SetString(PyExc_ValueError, "block of 128 bytes");
        return NULL;
    }
    uint64_t h[8];
    memcpy(h, b2_iv, sizeof h);
    h[0] ^= 0x01010000ULL ^ 64;
    b2_compress(h, (const unsigned char *)PyBytes_AS_STRING(block), 128, 0);
    unsigned char out[B2_STATE_SIZE];
    for (int i = 0; i < 8; i++)
        b2_store(out + 8 * i, h[i]);
    b2_store(out + 64, 128);
    out[72] = 64;
    return PyBytes_FromStringAndSize((const char *)out, B2_STATE_SIZE);
}

/* the 64-byte digest of the message p[0:len] (len >= 1) continued from a hmac_state */
static void b2_digest_from(const unsigned char *st, const unsigned char *p, size_t len, unsigned char out[64])
{
    uint64_t h[8];
    for (int i = 0; i < 8; i++)
        h[i] = b2_load(st + 8 * i);
    uint64_t t = b2_load(st + 64);
    unsigned char block[128];
    while (len > 128) {
        memcpy(block, p, 128);
        t += 128;
        b2_compress(h, block, t, 0);
        p += 128;
        len -= 128;
    }
    memset(block, 0, 128);
    memcpy(block, p, len);
    t += len;
    b2_compress(h, block, t, 1);
    for (int i = 0; i < 8; i++)
        b2_store(out + 8 * i, h[i]);
}

/* how CallIdMasker's digits mode sees a Call-ID: -1 not ASCII (the Python path decides), 1 it
 * holds a run of 6+ digits (masked, the keyed hash appended), 0 nothing to mask (shown as it is) */
static int call_id_digit_runs(const unsigned char *s, Py_ssize_t n)
{
    int masked = 0;
    Py_ssize_t run = 0; /* digits in a row so far */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (s[i] >= 0x80)
            return -1;
        run = s[i] >= '0' && s[i] <= '9' ? run + 1 : 0;
        masked |= run >= 6;
    }
    return masked;
}

/* mask_call_id(raw, inner, outer, hash_only) -> masking.CallIdMasker._mask of a plain ASCII Call-ID:
 * runs of 6+ digits masked but their last 4, then "~" and 16 hex of HMAC-BLAKE2b(raw) when
 * something was masked (the text as is when nothing was); with hash_only, "h-" and 32 hex of it.
 * inner/outer: hmac_state of the key block XOR ipad/opad. None for an empty or non-ASCII
 * Call-ID (the Python path decides those). */
static PyObject *
sipscan_mask_call_id(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (arg_count(nargs, 4, "mask_call_id(raw, inner, outer, hash_only) takes 4 arguments") < 0 ||
            need_bytes(args[0], "raw") < 0 || need_bytes(args[1], "inner") < 0 ||
            need_bytes(args[2], "outer") < 0)
        return NULL;
    if (PyBytes_GET_SIZE(args[1]) != B2_STATE_SIZE || PyBytes_GET_SIZE(args[2]) != B2_STATE_SIZE ||
            ((const unsigned char *)PyBytes_AS_STRING(args[1]))[72] != 64 ||
            ((const unsigned char *)PyBytes_AS_STRING(args[2]))[72] != 64) {
        PyErr_SetString(PyExc_ValueError, "not a hmac_state");
        return NULL;
    }
    const int hash_only = PyObject_IsTrue(args[3]);
    if (hash_only < 0)
        return NULL;
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    const Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    if (n == 0)
        Py_RETURN_NONE;
    if (!hash_only) {
        const int runs = call_id_digit_runs(raw, n);
        if (runs < 0)
            Py_RETURN_NONE;
        if (runs == 0)
            return PyUnicode_DecodeASCII((const char *)raw, n, NULL);
    }
    unsigned char inner[64], outer[64];
    b2_digest_from((const unsigned char *)PyBytes_AS_STRING(args[1]), raw, (size_t)n, inner);
    b2_digest_from((const unsigned char *)PyBytes_AS_STRING(args[2]), inner, 64, outer);
    const int hex_bytes = hash_only ? 16 : 8;
    const Py_ssize_t head = hash_only ? 2 : n + 1;
    PyObject *out = PyUnicode_New(head + 2 * hex_bytes, 127);
    if (out == NULL)
        return NULL;
    unsigned char *d = PyUnicode_1BYTE_DATA(out);
    if (hash_only) {
        d[0] = 'h';
        d[1] = '-';
    } else {
        Py_ssize_t start = 0;
        for (Py_ssize_t i = 0; i <= n; i++) {
            if (i < n && raw[i] >= '0' && raw[i] <= '9')
                continue;
            /* raw[start:i] is a run of digits (maybe empty) followed by raw[i] */
            const Py_ssize_t run = i - start;
            for (Py_ssize_t j = start; j < i; j++)
                d[j] = run >= 6 && j < i - 4 ? '*' : raw[j];
            if (i < n)
                d[i] = raw[i];
            start = i + 1;
        }
        d[n] = '~';
    }
    put_hex((char *)d + head, outer, hex_bytes);
    return out;
}

/* plain_call_id(raw) -> the Call-ID as text when masking.CallIdMasker's digits mode shows it as it
 * is (ASCII, no run of 6+ digits), else None. The usual Call-ID: one scan, instead of the
 * translate() and find() the check costs in Python (two method calls; ~5% of the live span
 * worker, which masks each Call-ID twice: its spans' and its summary's). */
static PyObject *
sipscan_plain_call_id(PyObject *module, PyObject *raw)
{
    (void)module;
    if (need_bytes(raw, "raw") < 0)
        return NULL;
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(raw);
    const Py_ssize_t n = PyBytes_GET_SIZE(raw);
    if (call_id_digit_runs(s, n) != 0)
        Py_RETURN_NONE;
    return PyUnicode_DecodeASCII((const char *)s, n, NULL);
}

/* hex_join(head, value, digits, tail) -> head + b"%0{digits}x" % value + tail, for 0 <= value <
 * 16**digits and digits 1-32; None for any other value (the caller formats it itself). The
 * trace header's ids: bytes % formatting of an int goes through a str and costs more than the
 * rest of the line. */
static PyObject *
sipscan_hex_join(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (arg_count(nargs, 4, "hex_join(head, value, digits, tail) takes 4 arguments") < 0 ||
            need_bytes(args[0], "head") < 0 || need_bytes(args[3], "tail") < 0)
        return NULL;
    PyObject *value = args[1];
    if (!PyLong_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "value must be an int");
        return NULL;
    }
    const long digits = PyLong_AsLong(args[2]);
    if (digits == -1 && PyErr_Occurred())
        return NULL;
    if (digits < 1 || digits > 32 || Py_SIZE(value) < 0)
        Py_RETURN_NONE;
    /* the value as two 64-bit halves; more digits than asked for: None */
    uint64_t lo, hi = 0;
    if (digits <= 16) {
        lo = (uint64_t)PyLong_AsUnsignedLongLong(value);
        if (lo == (uint64_t)-1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                return NULL;
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        if (digits < 16 && (lo >> (4 * digits)) != 0)
            Py_RETURN_NONE;
    }
    else {
        lo = (uint64_t)PyLong_AsUnsignedLongLongMask(value);
        if (lo == (uint64_t)-1 && PyErr_Occurred())
            return NULL;
        PyObject *shift = PyLong_FromLong(64);
        if (shift == NULL)
            return NULL;
        PyObject *high = PyNumber_Rshift(value, shift);
        Py_DECREF(shift);
        if (high == NULL)
            return NULL;
        hi = (uint64_t)PyLong_AsUnsignedLongLong(high);
        Py_DECREF(high);
        if (hi == (uint64_t)-1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                return NULL;
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        if (digits < 32 && (hi >> (4 * (digits - 16))) != 0)
            Py_RETURN_NONE;
    }
    const Py_ssize_t hlen = PyBytes_GET_SIZE(args[0]), tlen = PyBytes_GET_SIZE(args[3]);
    PyObject *out = PyBytes_FromStringAndSize(NULL, hlen + digits + tlen);
    if (out == NULL)
        return NULL;
    char *d = PyBytes_AS_STRING(out);
    memcpy(d, PyBytes_AS_STRING(args[0]), (size_t)hlen);
    static const char hexdigits[] = "0123456789abcdef";
    char *x = d + hlen;
    for (long i = 0; i < digits; i++) {
        const long shift = 4 * (digits - 1 - i);
        const uint64_t word = shift >= 64 ? hi : lo;
        x[i] = hexdigits[(word >> (shift & 63)) & 15];
    }
    memcpy(x + digits, PyBytes_AS_STRING(args[3]), (size_t)tlen);
    return out;
}

/* ---- responses on one pass over the datagram ------------------------------------------------
 * What ProxyCore._response reads of the common response (the answer to a request this proxy
 * forwarded), and the response with its top Via value removed, straight from the datagram:
 * no line list, no SipMessage, no re-join. Only a message sipmsg.parse would cut in C (see
 * split_plain: the same head scan and the same name table) and whose every part this function
 * reads as the proxy reads it qualifies; for anything else it answers None and the caller
 * takes its full path, which raises the errors and handles the unusual shapes. */

#define RESPONSE_MAX_VIAS 127

/* a header line of the datagram: where it starts and ends, and where its value is (stripped) */
struct line_at {
    Py_ssize_t start, end, va, vb;
};

static int name_is(PyObject *name, const char *want, Py_ssize_t len)
{
    return PyBytes_GET_SIZE(name) == len && memcmp(PyBytes_AS_STRING(name), want, (size_t)len) == 0;
}

/* the headers the one-pass functions read, as header_at names them */
enum { H_OTHER, H_VIA, H_FROM, H_TO, H_CALL_ID, H_CSEQ, H_CONTENT_LENGTH, H_NOT_PLAIN = -1, H_ERROR = -2 };

/* The header line of the plain head s[0:head_end] (scan_head passed) that starts at *pos: where
 * it is and where its value is (stripped) in *line, which of the headers above it is by its
 * canonical name in the caller's table, and *pos moved to the next line. H_NOT_PLAIN when the
 * line has no colon, an empty name or one not in the table (split_plain refuses it too),
 * H_ERROR with an exception set when memory ran out. */
static HOT_INLINE int header_at(PyObject *table, const unsigned char *s, Py_ssize_t head_end, Py_ssize_t *pos,
                                struct line_at *line)
{
    const Py_ssize_t at = *pos;
    if (at > head_end)
        return H_NOT_PLAIN; /* (cannot happen after scan_head) */
    const unsigned char *cr = memchr(s + at, '\r', (size_t)(head_end - at));
    const Py_ssize_t end = cr ? cr - s : head_end;
    const unsigned char *colon = memchr(s + at, ':', (size_t)(end - at));
    if (colon == NULL || colon == s + at)
        return H_NOT_PLAIN;
    PyObject *name = canonical_name(table, s + at, colon - (s + at) + 1); /* borrowed */
    if (name == NULL) {
        if (PyErr_Occurred()) {
            if (PyErr_ExceptionMatches(PyExc_MemoryError))
                return H_ERROR;
            PyErr_Clear();
        }
        return H_NOT_PLAIN;
    }
    if (!PyBytes_CheckExact(name))
        return H_NOT_PLAIN;
    line->start = at;
    line->end = end;
    line->va = colon - s + 1;
    line->vb = end;
    strip_range(s, &line->va, &line->vb);
    *pos = end + 2;
    switch (PyBytes_GET_SIZE(name)) {
    case 2:
        return name_is(name, "to", 2) ? H_TO : H_OTHER;
    case 3:
        return name_is(name, "via", 3) ? H_VIA : H_OTHER;
    case 4:
        return name_is(name, "cseq", 4) ? H_CSEQ : name_is(name, "from", 4) ? H_FROM : H_OTHER;
    case 7:
        return name_is(name, "call-id", 7) ? H_CALL_ID : H_OTHER;
    case 14:
        return name_is(name, "content-length", 14) ? H_CONTENT_LENGTH : H_OTHER;
    }
    return H_OTHER;
}

/* The Content-Length s[cl.va:cl.vb] as sipscan_parse checks it against body_len bytes of body:
 * its value, or -1 where parse would not cut the message in C. */
static long long content_length_of(const unsigned char *s, const struct line_at *cl, Py_ssize_t max_digits,
                                   Py_ssize_t body_len)
{
    if (!all_digits(s, cl->va, cl->vb) || cl->vb - cl->va > max_digits || cl->vb - cl->va > 18)
        return -1;
    long long v = 0;
    for (Py_ssize_t i = cl->va; i < cl->vb; i++)
        v = v * 10 + (s[i] - '0');
    return v > (long long)body_len ? -1 : v;
}

/* response(data, names, own_via_head, prefix_len, max_lines, max_cl_digits, max_vias, max_size)
 *   -> (status, branch, next_via, call_id, cseq_number, CSEQ_METHOD, to_tag, out, truncated) or None
 * See the block comment above; the qualifying message, beside sipscan_parse's plain shape:
 * data at most max_size bytes; a status line "SIP/2.0 NNN <reason>" with NNN 100-699; one
 * Call-ID (not empty), one CSeq (as sipscan_cseq reads it), one To, at most one Content-Length
 * (as sipscan_parse checks it); the first Via header's value starting with this proxy's own
 * Via exactly as ProxyCore._own_branch accepts it (own_via_head, its last prefix_len bytes the
 * branch prefix; the TCP spelling too), then either more values in that header (split as
 * split_values splits them, at most max_vias in all) or a next Via header whose value splits
 * into at least one. ``next_via`` is the value below ours as _response reads it, ``to_tag``
 * header_tag of the To value, ``out`` SipMessage.to_bytes after _response's edit (the rest of
 * the Via values joined by ", " after "Via: ", or the Via line gone), with the body cut to
 * Content-Length (``truncated``). */
static PyObject *
sipscan_response(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (arg_count(nargs, 8, "response(data, names, own_via_head, prefix_len, max_lines, max_cl_digits, "
                            "max_vias, max_size) takes 8 arguments") < 0)
        return NULL;
    PyObject *data = args[0], *table = args[1], *head = args[2];
    /* the status line first (every request is turned away here), as sipscan_parse reads it but
     * for the repair of a missing reason phrase */
    if (!PyBytes_CheckExact(data))
        Py_RETURN_NONE;
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(data);
    const Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (n < 12 || memcmp(s, "SIP/2.0 ", 8) != 0 || !all_digits(s, 8, 11) || s[11] != ' ' ||
            s[8] < '1' || s[8] > '6')
        Py_RETURN_NONE;
    const long status = (s[8] - '0') * 100 + (s[9] - '0') * 10 + (s[10] - '0');
    if (!PyDict_Check(table)) {
        PyErr_SetString(PyExc_TypeError, "names must be a dict");
        return NULL;
    }
    if (need_bytes(head, "own_via_head") < 0)
        return NULL;
    Py_ssize_t ints[5]; /* prefix_len, max_lines, max_cl_digits, max_vias, max_size */
    for (int i = 0; i < 5; i++)
        if ((ints[i] = PyLong_AsSsize_t(args[3 + i])) == -1 && PyErr_Occurred())
            return NULL;
    const Py_ssize_t prefix_len = ints[0], max_lines = ints[1], max_digits = ints[2];
    const Py_ssize_t max_vias = ints[3], max_size = ints[4];
    if (max_lines < 1 || max_vias < 1 || max_vias > RESPONSE_MAX_VIAS)
        Py_RETURN_NONE;
    const unsigned char *h = (const unsigned char *)PyBytes_AS_STRING(head);
    const Py_ssize_t hl = PyBytes_GET_SIZE(head);
    if (n > max_size || hl < 11 || prefix_len < 0 || prefix_len > hl)
        Py_RETURN_NONE;
    Py_ssize_t n_lines = 0;
    const Py_ssize_t head_end = scan_head(s, n, max_lines, &n_lines);
    if (head_end < 0)
        Py_RETURN_NONE;

    /* the header lines: every name in the table (as split_plain requires), the ones read found */
    struct line_at via = {-1, -1, 0, 0}, via2 = {-1, -1, 0, 0}, cid = {-1, -1, 0, 0};
    struct line_at cseq = {-1, -1, 0, 0}, to = {-1, -1, 0, 0}, cl = {-1, -1, 0, 0};
    int n_cid = 0, n_cseq = 0, n_to = 0, n_cl = 0;
    const unsigned char *cr = memchr(s, '\r', (size_t)head_end);
    Py_ssize_t pos = (cr ? cr - s : head_end) + 2;
    for (Py_ssize_t k = 1; k < n_lines; k++) {
        struct line_at line;
        switch (header_at(table, s, head_end, &pos, &line)) {
        case H_ERROR:
            return NULL;
        case H_NOT_PLAIN:
            Py_RETURN_NONE;
        case H_TO:
            to = line;
            n_to++;
            break;
        case H_VIA:
            if (via.start < 0)
                via = line;
            else if (via2.start < 0)
                via2 = line;
            break;
        case H_CSEQ:
            cseq = line;
            n_cseq++;
            break;
        case H_CALL_ID:
            cid = line;
            n_cid++;
            break;
        case H_CONTENT_LENGTH:
            cl = line;
            n_cl++;
            break;
        }
    }
    if (via.start < 0 || n_cid != 1 || n_cseq != 1 || n_to != 1 || n_cl > 1 || cid.va == cid.vb)
        Py_RETURN_NONE;

    /* Content-Length, as sipscan_parse checks it */
    const Py_ssize_t body_at = head_end + 4, body_len = n - body_at;
    Py_ssize_t body_keep = body_len;
    if (n_cl) {
        const long long v = content_length_of(s, &cl, max_digits, body_len);
        if (v < 0)
            Py_RETURN_NONE;
        body_keep = (Py_ssize_t)v;
    }

    /* our Via first, as _own_branch accepts it: own_via_head (or its TCP spelling), a branch
     * of letters, digits and dots after the prefix, ";rport"; then a comma or the end */
    const Py_ssize_t va = via.va, vb = via.vb;
    Py_ssize_t e = va;
    while (e < vb && s[e] != ',' && s[e] != '"' && s[e] != '<')
        e++;
    if (e < vb && s[e] != ',')
        Py_RETURN_NONE;
    Py_ssize_t own_a = va, own_b = e;
    strip_range(s, &own_a, &own_b);
    if (own_a != va || own_b - va - 6 <= hl || memcmp(s + own_b - 6, ";rport", 6) != 0)
        Py_RETURN_NONE;
    if (memcmp(s + va, h, (size_t)hl) != 0 &&
            !(memcmp(s + va, "SIP/2.0/TCP", 11) == 0 && memcmp(s + va + 11, h + 11, (size_t)(hl - 11)) == 0))
        Py_RETURN_NONE;
    int alnum = 0;
    for (Py_ssize_t i = va + hl; i < own_b - 6; i++) {
        const unsigned char c = s[i];
        if ((c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'))
            alnum = 1;
        else if (c != '.')
            Py_RETURN_NONE;
    }
    if (!alnum)
        Py_RETURN_NONE;
    const Py_ssize_t branch_a = va + hl - prefix_len, branch_b = own_b - 6;

    /* the values after ours in the same header, as split_values(value, max_vias) cuts them */
    Py_ssize_t rest_a[RESPONSE_MAX_VIAS], rest_b[RESPONSE_MAX_VIAS];
    Py_ssize_t n_rest = 0, rest_len = 0;
    if (e < vb) {
        Py_ssize_t p = e + 1;
        for (;;) {
            Py_ssize_t a, b, next;
            const int r = value_element(s, vb, p, &a, &b, &next);
            if (r < 0)
                Py_RETURN_NONE;
            if (r == 0)
                break;
            if (a < b) {
                if (n_rest + 1 >= max_vias) /* ours and this one: more than max_vias values */
                    Py_RETURN_NONE;
                rest_a[n_rest] = a;
                rest_b[n_rest] = b;
                rest_len += (b - a) + (n_rest ? 2 : 0);
                n_rest++;
            }
            if (next >= vb)
                break;
            p = next;
        }
    }
    /* the value below ours: the next one in this header, else the first of the next Via header */
    Py_ssize_t next_a, next_b;
    if (n_rest) {
        next_a = rest_a[0];
        next_b = rest_b[0];
    }
    else {
        if (via2.start < 0)
            Py_RETURN_NONE;
        next_a = via2.va;
        next_b = via2.vb;
        if (memchr(s + via2.va, ',', (size_t)(via2.vb - via2.va)) != NULL) {
            /* the whole value is split (an error anywhere in it raises), the first element kept */
            Py_ssize_t p = via2.va, a, b, next;
            int found = 0;
            for (;;) {
                const int r = value_element(s, via2.vb, p, &a, &b, &next);
                if (r < 0)
                    Py_RETURN_NONE;
                if (r == 0)
                    break;
                if (a < b && !found) {
                    next_a = a;
                    next_b = b;
                    found = 1;
                }
                if (next >= via2.vb)
                    break;
                p = next;
            }
            if (!found)
                Py_RETURN_NONE;
        }
        if (next_a == next_b)
            Py_RETURN_NONE;
    }

    /* CSeq, as sipscan_cseq reads it; the To tag, as sipscan_header_tag reads it */
    long long number;
    Py_ssize_t ma, mb;
    if (!cseq_span(s, cseq.va, cseq.vb, &number, &ma, &mb))
        Py_RETURN_NONE;
    Py_ssize_t tag_a = -1, tag_b = -1;
    if (!tag_span(s, to.va, to.vb, &tag_a, &tag_b))
        tag_a = -1;

    /* the output: the datagram with our Via value (or the whole Via line) cut out */
    Py_ssize_t out_len;
    if (n_rest)
        out_len = via.start + 5 + rest_len + (body_at - via.end) + body_keep;
    else
        out_len = (via.start - 2) + (body_at - via.end) + body_keep;
    PyObject *out = PyBytes_FromStringAndSize(NULL, out_len);
    if (out == NULL)
        return NULL;
    char *d = PyBytes_AS_STRING(out);
    if (n_rest) {
        memcpy(d, s, (size_t)via.start);
        d += via.start;
        memcpy(d, "Via: ", 5);
        d += 5;
        for (Py_ssize_t i = 0; i < n_rest; i++) {
            if (i) {
                memcpy(d, ", ", 2);
                d += 2;
            }
            memcpy(d, s + rest_a[i], (size_t)(rest_b[i] - rest_a[i]));
            d += rest_b[i] - rest_a[i];
        }
    }
    else {
        memcpy(d, s, (size_t)(via.start - 2));
        d += via.start - 2;
    }
    memcpy(d, s + via.end, (size_t)(body_at - via.end + body_keep));

    PyObject *status_obj = PyLong_FromLong(status);
    PyObject *branch = bytes_of(s, branch_a, branch_b);
    PyObject *next_via = bytes_of(s, next_a, next_b);
    PyObject *call_id = bytes_of(s, cid.va, cid.vb);
    PyObject *cseq_n = PyLong_FromLongLong(number);
    PyObject *method = PyBytes_FromStringAndSize(NULL, mb - ma);
    if (method != NULL) {
        unsigned char *m = (unsigned char *)PyBytes_AS_STRING(method);
        for (Py_ssize_t i = ma; i < mb; i++)
            *m++ = ascii_upper(s[i]);
    }
    PyObject *to_tag = tag_a >= 0 ? bytes_of(s, tag_a, tag_b) : Py_NewRef(Py_None);
    PyObject *result = NULL;
    if (status_obj && branch && next_via && call_id && cseq_n && method && to_tag)
        result = PyTuple_Pack(9, status_obj, branch, next_via, call_id, cseq_n, method, to_tag, out,
                              body_keep < body_len ? Py_True : Py_False);
    Py_XDECREF(status_obj);
    Py_XDECREF(branch);
    Py_XDECREF(next_via);
    Py_XDECREF(call_id);
    Py_XDECREF(cseq_n);
    Py_XDECREF(method);
    Py_XDECREF(to_tag);
    Py_DECREF(out);
    return result;
}

/* ---- refusals on one pass over the datagram -------------------------------------------------
 * Past its capacity the proxy turns new INVITEs away with 503 + Retry-After (sipwatch.overload),
 * and each refused call still costs the INVITE and the ACK of the 503. Through the full path
 * that is two parses into line lists and most of ProxyCore._request; here it is one pass over
 * each datagram, read as the full path reads it. As with response(), only the plain shape
 * qualifies (sipscan_parse's, plus what is listed below); everything else is None and goes the
 * full path, which raises the errors and answers the unusual shapes. Two callers: refusal()
 * for ProxyCore._fast_refusal, and refuse_raw() for the UDP pump (sipwatch/_udppump.c), which
 * refuses the plainest of these without a Python object per datagram. */

#define REFUSAL_KEPT 5 /* the lines a refusal copies: Via, From, To, Call-ID, CSeq, one of each */

struct refusal {
    int is_ack, has_from_tag;
    struct line_at via, cid;
    struct line_at kept[REFUSAL_KEPT]; /* the copied lines in their order */
    int kept_kind[REFUSAL_KEPT];
    long long cseq;
    Py_ssize_t fa, fb, ta, tb; /* the From tag (when has_from_tag) and the To tag (an ACK's) */
};

/* The request's shape (see sipscan_refusal) read into *r: 1; 0 for any other shape; -1 with an
 * exception set (memory). */
static int refusal_scan(PyObject *table, const unsigned char *s, Py_ssize_t n, Py_ssize_t max_lines,
                        Py_ssize_t max_cl_digits, Py_ssize_t max_size, struct refusal *r)
{
    if (max_lines < 1 || n > max_size)
        return 0;
    /* the request line, as sipscan_parse reads it, for these two methods only */
    Py_ssize_t u_start;
    if (n >= 7 && memcmp(s, "INVITE ", 7) == 0) {
        r->is_ack = 0;
        u_start = 7;
    }
    else if (n >= 4 && memcmp(s, "ACK ", 4) == 0) {
        r->is_ack = 1;
        u_start = 4;
    }
    else
        return 0;
    Py_ssize_t n_lines = 0;
    const Py_ssize_t head_end = scan_head(s, n, max_lines, &n_lines);
    if (head_end < 0)
        return 0;
    const unsigned char *cr = memchr(s, '\r', (size_t)head_end);
    const Py_ssize_t start_end = cr ? cr - s : head_end;
    const unsigned char *sp2 = memchr(s + u_start, ' ', (size_t)(start_end - u_start));
    if (sp2 == NULL)
        return 0;
    const Py_ssize_t u_end = sp2 - s;
    if (start_end - u_end - 1 != 7 || memcmp(s + u_end + 1, "SIP/2.0", 7) != 0 || u_end == u_start ||
            memchr(s + u_start, '\t', (size_t)(u_end - u_start)) != NULL)
        return 0;

    /* the header lines */
    struct line_at via = {-1, -1, 0, 0}, from = via, to = via, cid = via, cseq = via, cl = via;
    int counts[H_CONTENT_LENGTH + 1] = {0};
    int n_kept = 0;
    Py_ssize_t pos = start_end + 2;
    for (Py_ssize_t k = 1; k < n_lines; k++) {
        struct line_at line;
        const int kind = header_at(table, s, head_end, &pos, &line);
        if (kind == H_ERROR)
            return -1;
        if (kind == H_NOT_PLAIN)
            return 0;
        if (kind == H_OTHER)
            continue;
        if (++counts[kind] > 1)
            return 0;
        switch (kind) {
        case H_VIA: via = line; break;
        case H_FROM: from = line; break;
        case H_TO: to = line; break;
        case H_CALL_ID: cid = line; break;
        case H_CSEQ: cseq = line; break;
        case H_CONTENT_LENGTH: cl = line; continue;
        }
        r->kept[n_kept] = line;
        r->kept_kind[n_kept++] = kind;
    }
    if (n_kept != REFUSAL_KEPT || cid.va == cid.vb || via.va == via.vb)
        return 0;
    const Py_ssize_t body_len = n - (head_end + 4);
    if (counts[H_CONTENT_LENGTH] && content_length_of(s, &cl, max_cl_digits, body_len) != (long long)body_len)
        return 0;
    for (Py_ssize_t i = via.va; i < via.vb; i++)
        if (s[i] == ',' || s[i] == '"' || s[i] == '<')
            return 0;
    Py_ssize_t ma, mb;
    if (!cseq_span(s, cseq.va, cseq.vb, &r->cseq, &ma, &mb) || mb - ma != u_start - 1 ||
            memcmp(s + ma, s, (size_t)(mb - ma)) != 0)
        return 0;
    r->has_from_tag = tag_span(s, from.va, from.vb, &r->fa, &r->fb);
    const int has_to_tag = tag_span(s, to.va, to.vb, &r->ta, &r->tb);
    if (r->is_ack ? !has_to_tag || r->tb - r->ta < 2 || s[r->ta] != 's' || s[r->ta + 1] != 'w' : has_to_tag)
        return 0;
    r->via = via;
    r->cid = cid;
    return 1;
}

/* The To tag this proxy gives its own responses (ProxyCore._local_tag) after its "sw": the MAC
 * of (b"t", Call-ID, From tag or b"") joined by "|", as hex at out (room for 128); the number of
 * digits, or -1 when st is not a blake2b_state. */
static int refusal_mac(const unsigned char *s, const struct refusal *r, const unsigned char *st,
                       Py_ssize_t st_len, char *out)
{
    Mac m;
    if (mac_start(&m, st, st_len) < 0)
        return -1;
    mac_absorb(&m, "t|", 2);
    mac_absorb(&m, (const char *)s + r->cid.va, (size_t)(r->cid.vb - r->cid.va));
    mac_absorb(&m, "|", 1);
    if (r->has_from_tag)
        mac_absorb(&m, (const char *)s + r->fa, (size_t)(r->fb - r->fa));
    return mac_hex_end(&m, out);
}

/* An ACK's To tag is "sw" and this MAC (compared in constant time, as hmac.compare_digest does) */
static int refusal_ack_is_ours(const unsigned char *s, const struct refusal *r, const char *mac, int mac_len)
{
    if (r->tb - r->ta != 2 + mac_len)
        return 0;
    unsigned char diff = 0;
    for (int i = 0; i < mac_len; i++)
        diff |= (unsigned char)(s[r->ta + 2 + i] ^ (unsigned char)mac[i]);
    return diff == 0;
}

/* The 503 around its Via value (ProxyCore._reply): ``head`` is the status line, the copied lines
 * before the Via line (each after a CRLF) and CRLF "Via: "; ``tail`` the copied lines after it,
 * the To line given ";tag=sw" + mac, extra when not empty, "Content-Length: 0" and the blank
 * line. Their lengths in *head_len and *tail_len; written where head and tail are not NULL. */
static void refusal_text(const unsigned char *s, const struct refusal *r, const char *mac, int mac_len,
                         const char *status, Py_ssize_t status_len, const char *extra, Py_ssize_t extra_len,
                         char *head, Py_ssize_t *head_len, char *tail, Py_ssize_t *tail_len)
{
    static const char content_length[] = "\r\nContent-Length: 0\r\n\r\n";
    const Py_ssize_t cl_len = (Py_ssize_t)sizeof(content_length) - 1;
    int via_at = 0;
    for (int i = 0; i < REFUSAL_KEPT; i++)
        if (r->kept_kind[i] == H_VIA)
            via_at = i;
    Py_ssize_t hl = status_len + 2 + 5, tl = (extra_len ? 2 + extra_len : 0) + cl_len;
    for (int i = 0; i < REFUSAL_KEPT; i++) {
        const Py_ssize_t len = 2 + r->kept[i].end - r->kept[i].start + (r->kept_kind[i] == H_TO ? 7 + mac_len : 0);
        if (i < via_at)
            hl += len;
        else if (i > via_at)
            tl += len;
    }
    *head_len = hl;
    *tail_len = tl;
    if (head == NULL || tail == NULL)
        return;
    char *h = head, *t = tail;
    memcpy(h, status, (size_t)status_len);
    h += status_len;
    for (int i = 0; i < REFUSAL_KEPT; i++) {
        if (i == via_at)
            continue;
        char *d = i < via_at ? h : t;
        const struct line_at *k = &r->kept[i];
        memcpy(d, "\r\n", 2);
        d += 2;
        memcpy(d, s + k->start, (size_t)(k->end - k->start));
        d += k->end - k->start;
        if (r->kept_kind[i] == H_TO) {
            memcpy(d, ";tag=sw", 7);
            memcpy(d + 7, mac, (size_t)mac_len);
            d += 7 + mac_len;
        }
        if (i < via_at)
            h = d;
        else
            t = d;
    }
    memcpy(h, "\r\nVia: ", 7);
    if (extra_len) {
        memcpy(t, "\r\n", 2);
        t += 2;
        memcpy(t, extra, (size_t)extra_len);
        t += extra_len;
    }
    memcpy(t, content_length, (size_t)cl_len);
}

/* refusal(data, names, max_lines, max_cl_digits, max_size, mac_state, status_line, extra)
 *   -> (is_ack, via_value, call_id, cseq_number, head, tail) or None
 * A request "INVITE <uri> SIP/2.0" or "ACK <uri> SIP/2.0" of the plain shape, at most max_size
 * bytes, with one each of Via (one value: no ',', '"' or '<' in it), From, To, Call-ID (not
 * empty) and CSeq (as sipscan_cseq reads it, its method the request's, in capitals), at most one
 * Content-Length, equal to the body's length. An INVITE must have no To tag: ``head`` and
 * ``tail`` are then ProxyCore._reply's response around the stamped Via value (refusal_text),
 * its To tag "sw" + mac_hex(mac_state, "|", (b"t", call_id, from_tag or b"")). An ACK must have
 * the To tag such a refusal gave, "sw" and that MAC (compared in constant time): head and tail
 * are then None. The tags are read as header_tag reads them; the caller checks that mac_state
 * is its key's. */
static PyObject *
sipscan_refusal(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Py_ssize_t ints[3]; /* max_lines, max_cl_digits, max_size */
    if (split_args(args, nargs, 8, "refusal(data, names, max_lines, max_cl_digits, max_size, mac_state, "
                                   "status_line, extra) takes 8 arguments", &ints[0]) < 0)
        return NULL;
    PyObject *data = args[0], *table = args[1];
    if (!PyBytes_CheckExact(data))
        Py_RETURN_NONE;
    if (need_bytes(args[5], "mac_state") < 0 || need_bytes(args[6], "status_line") < 0 ||
            need_bytes(args[7], "extra") < 0)
        return NULL;
    for (int i = 1; i < 3; i++)
        if ((ints[i] = PyLong_AsSsize_t(args[2 + i])) == -1 && PyErr_Occurred())
            return NULL;
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(data);
    struct refusal r;
    const int got = refusal_scan(table, s, PyBytes_GET_SIZE(data), ints[0], ints[1], ints[2], &r);
    if (got <= 0) {
        if (got < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    char mac[128];
    const int mac_len = refusal_mac(s, &r, (const unsigned char *)PyBytes_AS_STRING(args[5]),
                                    PyBytes_GET_SIZE(args[5]), mac);
    if (mac_len < 0) {
        PyErr_SetString(PyExc_ValueError, "not a blake2b_state");
        return NULL;
    }
    PyObject *head = NULL, *tail = NULL, *via_value = NULL, *call_id = NULL, *cseq_number = NULL, *result = NULL;
    if (r.is_ack) {
        if (!refusal_ack_is_ours(s, &r, mac, mac_len))
            Py_RETURN_NONE;
        head = Py_NewRef(Py_None);
        tail = Py_NewRef(Py_None);
    }
    else {
        const char *status = PyBytes_AS_STRING(args[6]), *extra = PyBytes_AS_STRING(args[7]);
        const Py_ssize_t status_len = PyBytes_GET_SIZE(args[6]), extra_len = PyBytes_GET_SIZE(args[7]);
        Py_ssize_t head_len, tail_len;
        refusal_text(s, &r, mac, mac_len, status, status_len, extra, extra_len, NULL, &head_len, NULL, &tail_len);
        head = PyBytes_FromStringAndSize(NULL, head_len);
        tail = PyBytes_FromStringAndSize(NULL, tail_len);
        if (head == NULL || tail == NULL)
            goto done;
        refusal_text(s, &r, mac, mac_len, status, status_len, extra, extra_len, PyBytes_AS_STRING(head), &head_len,
                     PyBytes_AS_STRING(tail), &tail_len);
    }
    via_value = bytes_of(s, r.via.va, r.via.vb);
    call_id = bytes_of(s, r.cid.va, r.cid.vb);
    cseq_number = PyLong_FromLongLong(r.cseq);
    if (via_value != NULL && call_id != NULL && cseq_number != NULL)
        result = PyTuple_Pack(6, r.is_ack ? Py_True : Py_False, via_value, call_id, cseq_number, head, tail);
done:
    Py_XDECREF(head);
    Py_XDECREF(tail);
    Py_XDECREF(via_value);
    Py_XDECREF(call_id);
    Py_XDECREF(cseq_number);
    return result;
}

/* The plainest Via, where the pump refuses in C: "SIP/2.0/UDP " then an IPv4 dotted quad (no
 * leading zeros: ipaddress's canonical text), an optional ":port" (1-65535, at most 5 digits),
 * then ";name" or ";name=value" parameters with no space or control byte in them (names token
 * characters, values not empty), no "received" and no "rport" with a value (both of which
 * ProxyCore._stamp_source rewrites: the Python path does), at most one valueless "rport"
 * (names in any case, as parse_via lowercases them). sipmsg.parse_via takes every such value.
 * 1 with the parts in *v; 0 for anything else. */
struct plain_via {
    unsigned char ip[4];
    long port;            /* 0: none written */
    Py_ssize_t rport_end; /* where "=<port>" goes (the end of the rport name), -1 without rport */
};

static int token_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c != 0 && strchr("-.!%*_+`'~", c) != NULL);
}

static int name_is_ci(const unsigned char *s, Py_ssize_t len, const char *want)
{
    const Py_ssize_t n = (Py_ssize_t)strlen(want);
    if (len != n)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (ascii_lower(s[i]) != (unsigned char)want[i])
            return 0;
    return 1;
}

static int plain_via(const unsigned char *s, Py_ssize_t a, Py_ssize_t b, struct plain_via *v)
{
    if (b - a < 12 + 7 || memcmp(s + a, "SIP/2.0/UDP ", 12) != 0)
        return 0;
    Py_ssize_t i = a + 12;
    for (int k = 0; k < 4; k++) {
        if (k) {
            if (i >= b || s[i] != '.')
                return 0;
            i++;
        }
        const Py_ssize_t d0 = i;
        int val = 0;
        while (i < b && i - d0 < 3 && s[i] >= '0' && s[i] <= '9')
            val = val * 10 + (s[i++] - '0');
        if (i == d0 || val > 255 || (s[d0] == '0' && i - d0 > 1))
            return 0;
        v->ip[k] = (unsigned char)val;
    }
    v->port = 0;
    if (i < b && s[i] == ':') {
        const Py_ssize_t d0 = ++i;
        long port = 0;
        while (i < b && i - d0 < 5 && s[i] >= '0' && s[i] <= '9')
            port = port * 10 + (s[i++] - '0');
        if (i == d0 || port < 1 || port > 65535)
            return 0;
        v->port = port;
    }
    v->rport_end = -1;
    while (i < b) {
        if (s[i] != ';')
            return 0;
        const Py_ssize_t na = ++i;
        while (i < b && token_char(s[i]))
            i++;
        const Py_ssize_t nb = i;
        int valued = 0;
        if (nb == na)
            return 0;
        if (i < b && s[i] == '=') {
            const Py_ssize_t v0 = ++i;
            while (i < b && s[i] > ' ' && s[i] < 127 && s[i] != ';')
                i++;
            if (i == v0)
                return 0;
            valued = 1;
        }
        if (i < b && s[i] != ';')
            return 0;
        if (name_is_ci(s + na, nb - na, "received"))
            return 0;
        if (name_is_ci(s + na, nb - na, "rport")) {
            if (valued || v->rport_end >= 0)
                return 0;
            v->rport_end = nb;
        }
    }
    return 1;
}

/* refuse_raw: what ProxyCore._fast_refusal does with a datagram of this shape, for a caller
 * holding the bytes in its own buffer (the UDP pump), exported to it as the capsule
 * "sipwatch._sipscan._refuse_raw" (its signature: REFUSE_RAW_ARGS, kept in step with the
 * pump's). limits: max_lines, max_cl_digits, max_size; src: the source's IPv4 address (network
 * order) and port. Only refusal_scan's shape with a plain_via, a valid mac_state, and for an
 * INVITE a 503 no larger than the request; the Python path does the rest, the same way:
 *   INVITE: 1, the 503 at out (ProxyCore._reply, its Via stamped as _stamp_source stamps it:
 *     ";rport" filled with the source port, ";received=<source>" added when the Via's address
 *     is another), result = {0, Call-ID start, Call-ID end, length, port it goes to on the
 *     source's address (_reply_to: the source port with rport, else the Via's, else 5060),
 *     CSeq number};
 *   ACK with this proxy's tag: 1, result = {1, Call-ID start, Call-ID end, 0, 0, CSeq number};
 *   anything else: 0; -1 with an exception set (memory). */
#define REFUSE_RAW_ARGS PyObject *table, const unsigned char *s, Py_ssize_t n, const Py_ssize_t limits[3], \
    const unsigned char *mac_state, Py_ssize_t state_len, const char *status, Py_ssize_t status_len, \
    const char *extra, Py_ssize_t extra_len, const unsigned char src_ip[4], int src_port, char *out, \
    Py_ssize_t cap, Py_ssize_t result[6]
static int refuse_raw(REFUSE_RAW_ARGS)
{
    struct refusal r;
    const int got = refusal_scan(table, s, n, limits[0], limits[1], limits[2], &r);
    if (got <= 0)
        return got;
    struct plain_via v;
    if (!plain_via(s, r.via.va, r.via.vb, &v))
        return 0;
    char mac[128];
    const int mac_len = refusal_mac(s, &r, mac_state, state_len, mac);
    if (mac_len <= 0)
        return 0;
    result[0] = r.is_ack;
    result[1] = r.cid.va;
    result[2] = r.cid.vb;
    result[3] = result[4] = 0;
    result[5] = (Py_ssize_t)r.cseq;
    if (r.is_ack)
        return refusal_ack_is_ours(s, &r, mac, mac_len);
    Py_ssize_t head_len, tail_len;
    refusal_text(s, &r, mac, mac_len, status, status_len, extra, extra_len, NULL, &head_len, NULL, &tail_len);
    char port_text[8], ip_text[INET_ADDRSTRLEN];
    const int port_len = v.rport_end >= 0 ? snprintf(port_text, sizeof port_text, "%d", src_port) : 0;
    const int received = memcmp(v.ip, src_ip, 4) != 0;
    if (received && inet_ntop(AF_INET, src_ip, ip_text, sizeof ip_text) == NULL)
        return 0;
    const Py_ssize_t ip_len = received ? (Py_ssize_t)strlen(ip_text) : 0;
    const Py_ssize_t via_len = r.via.vb - r.via.va + (v.rport_end >= 0 ? 1 + port_len : 0) +
                               (received ? 10 + ip_len : 0);
    const Py_ssize_t total = head_len + via_len + tail_len;
    if (total > n || total > cap)
        return 0;
    refusal_text(s, &r, mac, mac_len, status, status_len, extra, extra_len, out, &head_len,
                 out + head_len + via_len, &tail_len);
    char *d = out + head_len;
    if (v.rport_end >= 0) {
        memcpy(d, s + r.via.va, (size_t)(v.rport_end - r.via.va));
        d += v.rport_end - r.via.va;
        *d++ = '=';
        memcpy(d, port_text, (size_t)port_len);
        d += port_len;
        memcpy(d, s + v.rport_end, (size_t)(r.via.vb - v.rport_end));
        d += r.via.vb - v.rport_end;
    }
    else {
        memcpy(d, s + r.via.va, (size_t)(r.via.vb - r.via.va));
        d += r.via.vb - r.via.va;
    }
    if (received) {
        memcpy(d, ";received=", 10);
        memcpy(d + 10, ip_text, (size_t)ip_len);
    }
    result[3] = total;
    result[4] = v.rport_end >= 0 ? src_port : v.port ? v.port : 5060;
    return 1;
}

/* mask_name_addr(value, full) -> (text, tag_at) or None
 * The plain From/To of masking._mask_remembered in one pass, without the regex, the decode and the
 * slices: a caller's From is new with every call, so its masking misses every memo. None unless
 * value is ASCII and fully matches
 *     ([^:<0-9]*)<((?i:sips?):)([^;@>]*)@([^;?@>]*)>(;tag=[^;?&,]*)?
 * (each part ends at the first byte it may not hold, so the match is one scan; 'tag' is case-
 * sensitive and CR/LF are bytes like any other). Else the value as text with its user part (the
 * third group) masked: "***" when full, else as masking._mask_digits does an ASCII text (fewer
 * than 3 digits: as it is; 3-4: every digit '*'; more: every digit but the last four '*'), and
 * tag_at, where ";tag=" starts, or -1 without it. */
static PyObject *
sipscan_mask_name_addr(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (arg_count(nargs, 2, "mask_name_addr(value, full) takes 2 arguments") < 0 ||
            need_bytes(args[0], "value") < 0)
        return NULL;
    const int full = PyObject_IsTrue(args[1]);
    if (full < 0)
        return NULL;
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    const Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    unsigned char seen = 0; /* every byte scanned, or-ed: its high bit says "not ASCII" */
    Py_ssize_t p = 0;
    /* the display name: up to the '<', no ':' or digit before it */
    while (p < n && s[p] != '<' && s[p] != ':' && !(s[p] >= '0' && s[p] <= '9'))
        seen |= s[p++];
    if (p >= n || s[p] != '<')
        Py_RETURN_NONE;
    p++;
    /* sip: or sips:, any case */
    if (n - p < 4 || ascii_lower(s[p]) != 's' || ascii_lower(s[p + 1]) != 'i' || ascii_lower(s[p + 2]) != 'p')
        Py_RETURN_NONE;
    p += 3;
    if (ascii_lower(s[p]) == 's')
        p++;
    if (p >= n || s[p] != ':')
        Py_RETURN_NONE;
    p++;
    /* the user part, up to the '@' */
    const Py_ssize_t user_at = p;
    Py_ssize_t digits = 0;
    while (p < n && s[p] != '@' && s[p] != ';' && s[p] != '>') {
        digits += s[p] >= '0' && s[p] <= '9';
        seen |= s[p++];
    }
    if (p >= n || s[p] != '@')
        Py_RETURN_NONE;
    const Py_ssize_t user_end = p++;
    /* host and port, up to the '>' */
    while (p < n && s[p] != '>' && s[p] != ';' && s[p] != '?' && s[p] != '@')
        seen |= s[p++];
    if (p >= n || s[p] != '>')
        Py_RETURN_NONE;
    p++;
    /* nothing after the '>', or one ";tag=" that runs to the end */
    Py_ssize_t tag_at = -1;
    if (p < n) {
        if (n - p < 5 || memcmp(s + p, ";tag=", 5) != 0)
            Py_RETURN_NONE;
        tag_at = p;
        for (p += 5; p < n; p++) {
            const unsigned char c = s[p];
            if (c == ';' || c == '?' || c == '&' || c == ',')
                Py_RETURN_NONE;
            seen |= c;
        }
    }
    if (seen & 0x80)
        Py_RETURN_NONE;
    const Py_ssize_t user_len = user_end - user_at;
    const Py_ssize_t masked_len = full ? 3 : user_len;
    PyObject *text = PyUnicode_New(n - user_len + masked_len, 127);
    if (text == NULL)
        return NULL;
    Py_UCS1 *d = PyUnicode_1BYTE_DATA(text);
    memcpy(d, s, (size_t)user_at);
    d += user_at;
    if (full) {
        memcpy(d, "***", 3);
        d += 3;
    } else {
        /* the digits to hide: all of 3 or 4, all but the last four of more, none of fewer */
        Py_ssize_t hide = digits < 3 ? 0 : digits <= 4 ? digits : digits - 4;
        for (Py_ssize_t i = user_at; i < user_end; i++) {
            const unsigned char c = s[i];
            if (hide > 0 && c >= '0' && c <= '9') {
                *d++ = '*';
                hide--;
            } else {
                *d++ = c;
            }
        }
    }
    memcpy(d, s + user_end, (size_t)(n - user_end));
    PyObject *at = PyLong_FromSsize_t(tag_at);
    if (at == NULL) {
        Py_DECREF(text);
        return NULL;
    }
    PyObject *out = PyTuple_New(2);
    if (out == NULL) {
        Py_DECREF(text);
        Py_DECREF(at);
        return NULL;
    }
    PyTuple_SET_ITEM(out, 0, text);
    PyTuple_SET_ITEM(out, 1, at);
    return out;
}

/* set_rport(value, port) -> core._set_rport(value, port): the first ";rport" parameter (name in any
 * case) that has no value gets "=port"; without one, ";rport=port" is appended. One pass over
 * the Via value instead of a lowered copy and a search loop; the port is 0-65535. */
static PyObject *
sipscan_set_rport(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (arg_count(nargs, 2, "set_rport(value, port) takes 2 arguments") < 0 || need_bytes(args[0], "value") < 0)
        return NULL;
    const long port = PyLong_AsLong(args[1]);
    if (port == -1 && PyErr_Occurred())
        return NULL;
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "port out of range");
        return NULL;
    }
    const char *v = PyBytes_AS_STRING(args[0]);
    const Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t at = n;  /* where "=port" goes; n: appended, with ";rport" before it */
    int append_name = 1;
    for (Py_ssize_t i = 0; i + 6 <= n; i++) {
        if (v[i] != ';' || (v[i + 1] | 0x20) != 'r' || (v[i + 2] | 0x20) != 'p' || (v[i + 3] | 0x20) != 'o' ||
                (v[i + 4] | 0x20) != 'r' || (v[i + 5] | 0x20) != 't')
            continue;
        const char c = i + 6 < n ? v[i + 6] : ';';
        if (c == ';' || c == ' ' || c == '\t' || c == ',') {
            at = i + 6;
            append_name = 0;
            break;
        }
    }
    char digits[8];  /* (by hand: snprintf costs more than the rest of this function) */
    int dn = 0;
    long rest = port;
    do {
        digits[7 - dn++] = (char)('0' + rest % 10);
        rest /= 10;
    } while (rest);
    const Py_ssize_t add = (append_name ? 6 : 0) + 1 + dn;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n + add);
    if (out == NULL)
        return NULL;
    char *d = PyBytes_AS_STRING(out);
    memcpy(d, v, (size_t)at);
    char *w = d + at;
    if (append_name) {
        memcpy(w, ";rport", 6);
        w += 6;
    }
    *w++ = '=';
    memcpy(w, digits + 8 - dn, (size_t)dn);
    w += dn;
    memcpy(w, v + at, (size_t)(n - at));
    return out;
}

/* -- stream framing (sipwatch.framing) --------------------------------------------------------
 * The framer's two scans of a header section, each one pass over a bytearray: where the header
 * section ends, and its Content-Length lines. Run per message of SIP over TCP, where the Python
 * searches (bytes.find of 2-3 byte needles, a lower-cased copy) were ~5 us a message compiled. */

static int bytearray_arg(PyObject *o, const char *what)
{
    if (PyByteArray_Check(o))
        return 0;
    PyErr_Format(PyExc_TypeError, "%s must be a bytearray, not %.100s", what, Py_TYPE(o)->tp_name);
    return -1;
}

/* head_end(buf, start) -> (end, sep): the first LF at or after start that begins LF LF (sep 2)
 * or LF CR LF (sep 3), as framing.StreamFramer finds the end of a header section; (-1, 0) when
 * there is none. One memchr pass, stopping at the match. */
static PyObject *
sipscan_head_end(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (arg_count(nargs, 2, "head_end(buf, start) takes 2 arguments") < 0 || bytearray_arg(args[0], "buf") < 0)
        return NULL;
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    const unsigned char *s = (const unsigned char *)PyByteArray_AS_STRING(args[0]);
    const Py_ssize_t n = PyByteArray_GET_SIZE(args[0]);
    Py_ssize_t i = start < 0 ? 0 : start;
    while (i < n) {
        const unsigned char *nl = memchr(s + i, '\n', (size_t)(n - i));
        if (nl == NULL)
            break;
        i = nl - s;
        if (i + 1 < n && s[i + 1] == '\n')
            return Py_BuildValue("(ni)", i, 2);
        if (i + 2 < n && s[i + 1] == '\r' && s[i + 2] == '\n')
            return Py_BuildValue("(ni)", i, 3);
        i++;
    }
    return Py_BuildValue("(ni)", (Py_ssize_t)-1, 0);
}

/* content_lengths(buf, end) -> list of bytes: the values of buf[:end]'s Content-Length lines
 * (compact form "l"), as re.findall(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*([^\n]*)") gives
 * them: at every line start (0, and after each LF), the name in any ASCII case, blanks, a colon,
 * blanks, then the rest of the line up to LF or end. One pass. */
static PyObject *
sipscan_content_lengths(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (arg_count(nargs, 2, "content_lengths(buf, end) takes 2 arguments") < 0 ||
            bytearray_arg(args[0], "buf") < 0)
        return NULL;
    Py_ssize_t end = PyLong_AsSsize_t(args[1]);
    if (end == -1 && PyErr_Occurred())
        return NULL;
    const unsigned char *s = (const unsigned char *)PyByteArray_AS_STRING(args[0]);
    if (end > PyByteArray_GET_SIZE(args[0]))
        end = PyByteArray_GET_SIZE(args[0]);
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    static const char name[] = "content-length";
    const Py_ssize_t name_len = (Py_ssize_t)sizeof(name) - 1;
    Py_ssize_t line = 0;
    while (line < end) {
        Py_ssize_t i = line;
        if (end - i >= name_len) {
            Py_ssize_t k = 0;
            while (k < name_len && ascii_lower(s[i + k]) == (unsigned char)name[k])
                k++;
            if (k == name_len)
                i += name_len;
        }
        if (i == line && ascii_lower(s[i]) == 'l')
            i++;
        const unsigned char *nl = memchr(s + line, '\n', (size_t)(end - line));
        const Py_ssize_t line_end = nl == NULL ? end : nl - s;
        if (i > line) {  /* a name: blanks, a colon, blanks, the value */
            while (i < line_end && (s[i] == ' ' || s[i] == '\t'))
                i++;
            if (i < line_end && s[i] == ':') {
                i++;
                while (i < line_end && (s[i] == ' ' || s[i] == '\t'))
                    i++;
                PyObject *value = PyBytes_FromStringAndSize((const char *)s + i, line_end - i);
                if (value == NULL || PyList_Append(out, value) < 0) {
                    Py_XDECREF(value);
                    Py_DECREF(out);
                    return NULL;
                }
                Py_DECREF(value);
            }
        }
        line = line_end + 1;
    }
    return out;
}

static PyMethodDef sipscan_methods[] = {
    {"set_rport", (PyCFunction)(void (*)(void))sipscan_set_rport, METH_FASTCALL,
     "set_rport(value, port) -> the Via value with its first empty rport filled (or one added)"},
    {"serialize", (PyCFunction)(void (*)(void))sipscan_serialize, METH_FASTCALL,
     "serialize(start, lines, body) -> SipMessage.to_bytes of those parts, or None when one is not bytes"},
    {"split", (PyCFunction)(void (*)(void))sipscan_split, METH_FASTCALL,
     "split(data, names, max_lines) -> (start, lines, names, body) or None\n\n"
     "The start line, header lines and body of a plain SIP message (CRLF line ends, printable\n"
     "ASCII head, no folds, at most max_lines lines, every 'Name:' a key of names, whose values\n"
     "are returned as the names); None for any other message."},
    {"parse", (PyCFunction)(void (*)(void))sipscan_parse, METH_FASTCALL,
     "parse(data, names, max_lines, max_cl_digits, check_length)\n"
     "-> (start, method, uri, status, lines, names, body, truncated) of a plain message sipmsg.parse\n"
     "accepts, else None"},
    {"index", (PyCFunction)(void (*)(void))sipscan_index, METH_FASTCALL,
     "index(names, name, start) -> names.index(name, start), or -1 when it is not there"},
    {"first_of", (PyCFunction)(void (*)(void))sipscan_first_of, METH_FASTCALL,
     "first_of(names, wanted) -> the first index of names holding one of the tuple wanted, or -1"},
    {"value", (PyCFunction)sipscan_value, METH_O,
     "value(line) -> SipMessage.value_at of that header line"},
    {"get", (PyCFunction)(void (*)(void))sipscan_get, METH_FASTCALL,
     "get(lines, names, name) -> SipMessage.get: the first such header's value, or None"},
    {"split_values", (PyCFunction)(void (*)(void))sipscan_split_values, METH_FASTCALL,
     "split_values(value, limit) -> sipmsg.split_values, or None where that raises"},
    {"parse_params", (PyCFunction)sipscan_parse_params, METH_O, "parse_params(s) -> sipmsg.parse_params"},
    {"header_tag", (PyCFunction)sipscan_header_tag, METH_O, "header_tag(value) -> sipmsg.header_tag"},
    {"cseq", (PyCFunction)sipscan_cseq, METH_O,
     "cseq(value) -> (number, METHOD) as SipMessage.cseq, or None where that raises"},
    {"via", (PyCFunction)sipscan_via, METH_O,
     "via(value) -> (transport, host, port, params) of a plain Via value, or None"},
    {"blake2b_state", (PyCFunction)(void (*)(void))sipscan_blake2b_state, METH_FASTCALL,
     "blake2b_state(key, digest_size) -> the prepared BLAKE2b state mac_hex continues from"},
    {"request_fields", (PyCFunction)(void (*)(void))sipscan_request_fields, METH_FASTCALL,
     "request_fields(lines, names) -> (via_i, via_value, next_via_i, call_id, cseq_number, CSEQ_METHOD,\n"
     "from_value, to_value, from_tag, to_tag, max_forwards_i, hops, route_i), or None when one of Via,\n"
     "Call-ID, CSeq, From, To is missing or unreadable"},
    {"hex_join", (PyCFunction)(void (*)(void))sipscan_hex_join, METH_FASTCALL,
     "hex_join(head, value, digits, tail) -> head + b'%0{digits}x' % value + tail, or None when\n"
     "value is negative or needs more digits (digits 1-32)"},
    {"mac_hex", (PyCFunction)(void (*)(void))sipscan_mac_hex, METH_FASTCALL,
     "mac_hex(state, sep, parts) -> hexlify(blake2b(sep.join(parts)).digest()) from a\n"
     "blake2b_state (its key and digest size), or None when sep.join(parts) is empty"},
    {"hmac_state", (PyCFunction)sipscan_hmac_state, METH_O,
     "hmac_state(block) -> the state of an unkeyed BLAKE2b-512 that absorbed a 128-byte block"},
    {"mask_call_id", (PyCFunction)(void (*)(void))sipscan_mask_call_id, METH_FASTCALL,
     "mask_call_id(raw, inner, outer, hash_only) -> masking.CallIdMasker._mask of an ASCII Call-ID\n"
     "(HMAC-BLAKE2b from hmac_state states), or None for an empty or non-ASCII one"},
    {"plain_call_id", (PyCFunction)sipscan_plain_call_id, METH_O,
     "plain_call_id(raw) -> the Call-ID as text when CallIdMasker's digits mode shows it as it is\n"
     "(ASCII, no run of 6+ digits), else None"},
    {"mask_name_addr", (PyCFunction)(void (*)(void))sipscan_mask_name_addr, METH_FASTCALL,
     "mask_name_addr(value, full) -> (text, tag_at) of masking._mask_remembered's plain ASCII From/To\n"
     "(user part masked, where ';tag=' starts or -1), or None for any other value"},
    {"response", (PyCFunction)(void (*)(void))sipscan_response, METH_FASTCALL,
     "response(data, names, own_via_head, prefix_len, max_lines, max_cl_digits, max_vias, max_size)\n"
     "-> (status, branch, next_via, call_id, cseq_number, CSEQ_METHOD, to_tag, out, truncated) of a\n"
     "response to a request this proxy forwarded, in the common shape; else None"},
    {"refusal", (PyCFunction)(void (*)(void))sipscan_refusal, METH_FASTCALL,
     "refusal(data, names, max_lines, max_cl_digits, max_size, mac_state, status_line, extra)\n"
     "-> (is_ack, via_value, call_id, cseq_number, head, tail) of a new INVITE (its refusal around the stamped Via value) or\n"
     "of the ACK of such a refusal (its To tag the proxy's MAC), in the common shape; else None"},
    {"head_end", (PyCFunction)(void (*)(void))sipscan_head_end, METH_FASTCALL,
     "head_end(buf, start) -> (end, sep): the first LF LF (sep 2) or LF CR LF (sep 3) of a bytearray\n"
     "at or after start, or (-1, 0)"},
    {"content_lengths", (PyCFunction)(void (*)(void))sipscan_content_lengths, METH_FASTCALL,
     "content_lengths(buf, end) -> the values of buf[:end]'s Content-Length lines (a bytearray), as\n"
     "re.findall(rb'(?im)^(?:content-length|l)[ \\t]*:[ \\t]*([^\\n]*)', buf[:end])"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef sipscan_module = {
    PyModuleDef_HEAD_INIT, "_sipscan",
    "C scan of the common SIP message head for sipwatch.sipmsg.parse, the proxy's MACs and ids,\n"
    "and the masking of a plain From/To.", -1,
    sipscan_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__sipscan(void)
{
    PyObject *m = PyModule_Create(&sipscan_module);
    if (m == NULL)
        return NULL;
    /* refuse_raw for the UDP pump (a C caller: see refuse_raw) */
    PyObject *raw = PyCapsule_New((void *)refuse_raw, "sipwatch._sipscan._refuse_raw", NULL);
    if (raw == NULL || PyModule_AddObject(m, "_refuse_raw", raw) < 0) {
        Py_XDECREF(raw);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
