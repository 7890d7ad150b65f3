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
 * first pass tests eight bytes at a time where it can: one byte at a time, it was a third of
 * this function's instructions.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* An ordinary head byte: printable ASCII or HT. */
static inline int plain_byte(unsigned char c)
{
    return (c >= 0x20 && c < 0x7f) || c == '\t';
}

/* Eight head bytes at once: nonzero when all are printable ASCII (0x20-0x7e). The tests are the
 * exact "some byte is less than n" / "some byte is zero" word tricks; a word with HT, CR or
 * anything else fails and is looked at byte by byte. */
static inline int plain_word(uint64_t x)
{
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    const uint64_t del = x ^ (ones * 0x7f);
    const uint64_t below_space = (x - ones * 0x20) & ~x & highs;
    const uint64_t is_del = (del - ones) & ~del & highs;
    return ((x & highs) | below_space | is_del) == 0;
}

/* Validate the head and find where it ends. Returns the index of the first CRLF CRLF and the
 * number of lines in it (start line included), or -1 when the message is not the plain shape
 * or has more than max_lines lines. Colons are looked for by the caller, line by line. */
static Py_ssize_t scan_head(const unsigned char *s, Py_ssize_t n, Py_ssize_t max_lines,
                            Py_ssize_t *n_lines)
{
    Py_ssize_t p = 0, lines = 1;
    while (p < n) {
        if (n - p >= 8) {
            uint64_t x;
            memcpy(&x, s + p, 8);
            if (plain_word(x)) {
                p += 8;
                continue;
            }
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

/* split(data, names, max_lines) -> (start, lines, names, body) or None */
static PyObject *
sipscan_split(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "split(data, names, max_lines) takes 3 arguments");
        return NULL;
    }
    PyObject *data = args[0], *table = args[1];
    if (!PyDict_Check(table)) {
        PyErr_SetString(PyExc_TypeError, "split: names must be a dict");
        return NULL;
    }
    Py_ssize_t max_lines = PyLong_AsSsize_t(args[2]);
    if (max_lines == -1 && PyErr_Occurred())
        return NULL;
    if (!PyBytes_CheckExact(data) || max_lines < 1)
        Py_RETURN_NONE;

    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(data);
    const Py_ssize_t n = PyBytes_GET_SIZE(data);
    Py_ssize_t n_lines = 0;
    const Py_ssize_t head_end = scan_head(s, n, max_lines, &n_lines);
    if (head_end < 0)
        Py_RETURN_NONE;

    /* From here the head s[0:head_end] is known to be lines of printable ASCII/HT separated
     * by CR LF, every CR being the first byte of a CR LF. */
    PyObject *start = NULL, *lines = NULL, *names = NULL, *body = NULL, *result = NULL;
    const Py_ssize_t n_headers = n_lines - 1;
    lines = PyList_New(n_headers);
    names = PyList_New(n_headers);
    if (lines == NULL || names == NULL)
        goto fail;

    const unsigned char *cr = memchr(s, '\r', (size_t)head_end);
    Py_ssize_t end = cr ? cr - s : head_end;
    start = PyBytes_FromStringAndSize((const char *)s, end);
    if (start == NULL)
        goto fail;
    Py_ssize_t pos = end + 2;
    for (Py_ssize_t k = 0; k < n_headers; k++) {
        if (pos > head_end) /* cannot happen after scan_head; kept as a bound */
            goto not_plain;
        cr = memchr(s + pos, '\r', (size_t)(head_end - pos));
        end = cr ? cr - s : head_end;
        const unsigned char *colon = memchr(s + pos, ':', (size_t)(end - pos));
        if (colon == NULL || colon == s + pos)
            goto not_plain;
        PyObject *key = PyBytes_FromStringAndSize((const char *)(s + pos), colon - (s + pos) + 1);
        if (key == NULL)
            goto fail;
        PyObject *name = PyDict_GetItemWithError(table, key); /* borrowed */
        Py_DECREF(key);
        if (name == NULL) {
            if (PyErr_Occurred()) {
                if (!PyErr_ExceptionMatches(PyExc_MemoryError))
                    PyErr_Clear();
                else
                    goto fail;
            }
            goto not_plain;
        }
        Py_INCREF(name);
        PyList_SET_ITEM(names, k, name);
        PyObject *line = PyBytes_FromStringAndSize((const char *)(s + pos), end - pos);
        if (line == NULL)
            goto fail;
        PyList_SET_ITEM(lines, k, line);
        pos = end + 2;
    }
    body = PyBytes_FromStringAndSize((const char *)(s + head_end + 4), n - head_end - 4);
    if (body == NULL)
        goto fail;
    result = PyTuple_Pack(4, start, lines, names, body);
    /* PyTuple_Pack takes its own references; on failure result is NULL with MemoryError set */
fail:
    Py_XDECREF(start);
    Py_XDECREF(lines);
    Py_XDECREF(names);
    Py_XDECREF(body);
    return result;
not_plain:
    Py_XDECREF(start);
    Py_XDECREF(lines);
    Py_XDECREF(names);
    Py_RETURN_NONE;
}

static PyMethodDef sipscan_methods[] = {
    {"split", (PyCFunction)(void (*)(void))sipscan_split, METH_FASTCALL,
     "split(data, names, max_lines) -> (start, lines, names, body) or None\n\n"
     "The start line, header lines and body of a plain SIP message (CRLF line ends, printable\n"
     "ASCII head, no folds, at most max_lines lines, every 'Name:' a key of names, whose values\n"
     "are returned as the names); None for any other message."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef sipscan_module = {
    PyModuleDef_HEAD_INIT, "_sipscan",
    "C scan of the common SIP message head for sipwatch.sipmsg.parse.", -1, sipscan_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__sipscan(void)
{
    return PyModule_Create(&sipscan_module);
}
