/* The UDP edge's receive loop in C: read datagrams with recvmmsg, call the core, send its output.
 *
 * Why it exists: with uvloop's datagram transports, each datagram costs, besides the core's own
 * work, uvloop's receive and dispatch (inet_ntop + snprintf of the source into a new str and
 * tuple, the protocol callback run inside a context), an interpreted frame of UdpEdge.handle,
 * and per output a Python-level sendto whose address goes through uvloop's conversion cache.
 * Profiled live at 1000 calls/s with every feature on, that receive/dispatch work plus the
 * handle frame was ~13.6% of the proxy process's CPU and the send-side user work ~2% more, on a
 * total of ~36 us per message (a bare uvloop relay costs ~13 us, Kamailio ~15). Callgrind of the
 * live proxy process (all features, SIPp calls): ~13k instructions per datagram around the core's
 * ~33k with uvloop's transports, ~2.5k with this pump; ~10% fewer instructions per message in all.
 *
 * Here the loop wakes a Pump (loop.add_reader) when a socket is readable; the pump reads a
 * bounded batch with one recvmmsg (then returns, so the other socket and the timers get their
 * turn under a flood), and per datagram builds the payload bytes, takes the source (host, port)
 * tuple from a small fixed-size cache keyed by the raw sockaddr (a flood of distinct sources
 * only misses it: memory stays bounded), reads the clock with clock_gettime (the edge's
 * epoch clock: CLOCK_MONOTONIC, which is time.monotonic() on Linux, plus its offset) and makes
 * one vectorcall of core.receive_datagram(data, src, now). The common output, a list of
 * (bytes, (ip literal, port)), it sends itself: send() on the connected upstream socket when the
 * destination is the upstream, else sendto() on the listen socket; with a wiretap set (the HEP
 * sender's tap) it then calls it for the datagram and each copy, as the edge's dispatch does
 * (with HEP on every datagram had taken that Python dispatch and a Python-level sendto per
 * output). The sends come first: a tap that raises costs its copies (the edge's tap_failed
 * counts them), never the message. Everything else goes to the edge's Python dispatch method,
 * unchanged: output over TCP (core.out_tcp), destinations that are not literals of the socket's
 * family, output of another shape. Last, core.settle() when given: the accounting the core held
 * back until its output had left (see ProxyCore.settle).
 *
 * Nothing raises out of a read: a send error (and an ICMP error read from the connected socket)
 * goes to the edge's send_failed(exc), as uvloop's error_received did; an exception from the
 * core or from the Python dispatch, or a failed allocation, goes to the edge's on_error(exc)
 * (counted there), and if even that fails it is cleared: the reader callbacks always return None.
 *
 * The connected socket is watched through an epoll set of its own (sipwatch.transport), not
 * directly: libuv stops a poll watcher for good at POLLERR, which is how a pending ICMP error
 * shows on a connected UDP socket.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 32            /* datagrams per wake-up at most: the loop stays responsive */
#define BUF_SIZE 65536      /* larger than any UDP payload (IPv4 65507, IPv6 65527) */
#define SRC_CACHE 256       /* source tuples kept (a power of two) */
#define MAX_OUT 16          /* outputs per datagram handled here; more go to Python */

typedef struct {
    sa_family_t family;     /* 0: empty */
    uint16_t port;          /* network order */
    unsigned char addr[16];
    PyObject *tuple;        /* (host, port) */
} SrcEntry;

typedef struct {
    PyObject_HEAD
    int listen_fd, upstream_fd, family;
    PyObject *upstream_host;   /* str, or NULL when there is no connected socket */
    long upstream_port;
    PyObject *receive, *core, *edge, *dispatch, *send_failed, *on_error, *clock;
    PyObject *settle;          /* core.settle, called after the sends; may be NULL */
    double offset;
    int use_offset;
    char *bufs;                /* BATCH * BUF_SIZE, allocated at the first read */
    SrcEntry cache[SRC_CACHE];
} Pump;

static PyObject *str_out_tcp, *str_wiretap;

/* -- errors --------------------------------------------------------------------------------- */

/* Hand the pending exception to ``handler(exc)``; whatever happens, no exception is left set. */
static void hand_over(PyObject *handler)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type == NULL)
        return;
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL)
        PyException_SetTraceback(value, tb);
    if (handler != NULL && value != NULL) {
        PyObject *r = PyObject_CallOneArg(handler, value);
        Py_XDECREF(r);
        if (r == NULL)
            PyErr_Clear();
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

static void socket_error(Pump *p, int err)
{
    errno = err;
    PyErr_SetFromErrno(PyExc_OSError);
    hand_over(p->send_failed);
}

/* -- the source address --------------------------------------------------------------------- */

static PyObject *src_tuple(Pump *p, const struct sockaddr_storage *ss)
{
    const unsigned char *addr;
    size_t alen;
    uint16_t port;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        addr = (const unsigned char *)&a->sin_addr;
        alen = 4;
        port = a->sin_port;
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        addr = (const unsigned char *)&a->sin6_addr;
        alen = 16;
        port = a->sin6_port;
    } else {
        PyErr_Format(PyExc_ValueError, "datagram from address family %d", (int)ss->ss_family);
        return NULL;
    }
    uint32_t h = 2166136261u ^ port;
    for (size_t i = 0; i < alen; i++)
        h = (h ^ addr[i]) * 16777619u;
    h ^= h >> 15;
    SrcEntry *e = &p->cache[h & (SRC_CACHE - 1)];
    if (e->family == ss->ss_family && e->port == port && memcmp(e->addr, addr, alen) == 0) {
        Py_INCREF(e->tuple);
        return e->tuple;
    }
    char text[INET6_ADDRSTRLEN];
    if (inet_ntop(ss->ss_family, addr, text, sizeof text) == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    PyObject *t = Py_BuildValue("(si)", text, (int)ntohs(port));
    if (t == NULL)
        return NULL;
    Py_XSETREF(e->tuple, Py_NewRef(t));
    e->family = ss->ss_family;
    e->port = port;
    memcpy(e->addr, addr, alen);
    return t;
}

/* -- sending -------------------------------------------------------------------------------- */

typedef struct {
    const char *data;
    Py_ssize_t len;
    int upstream;               /* send() on the connected socket */
    struct sockaddr_storage to; /* else sendto() this on the listen socket */
    socklen_t tolen;
} Send;

/* 1: ``item`` is (bytes, (ip literal, port)) this pump can send, filled in ``s``; 0: it is not;
 * -1: an exception. */
static int plan(Pump *p, PyObject *item, Send *s)
{
    if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2)
        return 0;
    PyObject *payload = PyTuple_GET_ITEM(item, 0), *dest = PyTuple_GET_ITEM(item, 1);
    if (!PyBytes_CheckExact(payload) || !PyTuple_CheckExact(dest) || PyTuple_GET_SIZE(dest) != 2)
        return 0;
    PyObject *host = PyTuple_GET_ITEM(dest, 0), *port_obj = PyTuple_GET_ITEM(dest, 1);
    if (!PyUnicode_CheckExact(host) || !PyLong_CheckExact(port_obj))
        return 0;
    int overflow;
    long port = PyLong_AsLongAndOverflow(port_obj, &overflow);
    if (overflow || port < 0 || port > 65535)
        return 0;
    s->data = PyBytes_AS_STRING(payload);
    s->len = PyBytes_GET_SIZE(payload);
    if (p->upstream_host != NULL && port == p->upstream_port) {
        int same = host == p->upstream_host;
        if (!same) {
            int c = PyUnicode_Compare(host, p->upstream_host);
            if (c == -1 && PyErr_Occurred())
                return -1;
            same = c == 0;
        }
        if (same) {
            s->upstream = 1;
            return 1;
        }
    }
    s->upstream = 0;
    Py_ssize_t n;
    const char *text = PyUnicode_AsUTF8AndSize(host, &n);
    if (text == NULL)
        return -1;
    if ((size_t)n != strlen(text))
        return 0;
    memset(&s->to, 0, sizeof s->to);
    if (p->family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&s->to;
        if (inet_pton(AF_INET, text, &a->sin_addr) != 1)
            return 0;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        s->tolen = sizeof *a;
    } else {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&s->to;
        if (inet_pton(AF_INET6, text, &a->sin6_addr) != 1)
            return 0;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        s->tolen = sizeof *a;
    }
    return 1;
}

static void send_one(Pump *p, const Send *s)
{
    ssize_t r;
    do {
        if (s->upstream)
            r = send(p->upstream_fd, s->data, (size_t)s->len, 0);
        else
            r = sendto(p->listen_fd, s->data, (size_t)s->len, 0, (const struct sockaddr *)&s->to, s->tolen);
    } while (r < 0 && errno == EINTR);
    if (r < 0)
        socket_error(p, errno);
}

/* ``tap(payload, src, dst, now)``; 0 with an exception set if it raised. */
static int call_tap(PyObject *tap, PyObject *payload, PyObject *src, PyObject *dst, PyObject *now)
{
    PyObject *args[4] = {payload, src, dst, now};
    PyObject *r = PyObject_Vectorcall(tap, args, 4, NULL);
    if (r == NULL)
        return 0;
    Py_DECREF(r);
    return 1;
}

/* The wiretap raised: hand its exception to the edge's tap_failed (looked up only now, on this
 * rare path; with the exception held aside, as no C API call may run with one set). */
static void tap_failed(Pump *p)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *handler = p->edge != NULL ? PyObject_GetAttrString(p->edge, "tap_failed") : NULL;
    if (handler == NULL)
        PyErr_Clear();
    PyErr_Restore(type, value, tb);
    hand_over(handler);  /* with no handler it only clears */
    Py_XDECREF(handler);
}

/* Send ``out`` here when all of it is common (then the wiretap's copies, when one is set), else
 * hand it to the Python dispatch. */
static void route(Pump *p, PyObject *data, PyObject *src, PyObject *now, PyObject *out)
{
    if (p->core == NULL)
        return;  /* closed by the core's call */
    PyObject *flag = PyObject_GetAttr(p->core, str_out_tcp);
    if (flag == NULL)
        goto failed;
    int tcp = PyObject_IsTrue(flag);
    Py_DECREF(flag);
    if (tcp < 0)
        goto failed;
    int python = tcp;
    PyObject *tap = NULL;  /* the wiretap (the HEP sender's tap), when one is set */
    if (!python) {
        tap = PyObject_GetAttr(p->edge, str_wiretap);
        if (tap == NULL)
            goto failed;
        if (tap == Py_None)
            Py_CLEAR(tap);
    }
    Send sends[MAX_OUT];
    Py_ssize_t n = 0;
    if (!python) {
        if (!PyList_CheckExact(out) || PyList_GET_SIZE(out) > MAX_OUT) {
            python = 1;
        } else {
            n = PyList_GET_SIZE(out);
            for (Py_ssize_t i = 0; i < n && !python; i++) {
                int ok = plan(p, PyList_GET_ITEM(out, i), &sends[i]);
                if (ok < 0)
                    goto failed;
                python = ok == 0;
            }
        }
    }
    if (python) {
        Py_XDECREF(tap);
        PyObject *args[4] = {data, src, now, out};
        PyObject *r = PyObject_Vectorcall(p->dispatch, args, 4, NULL);
        if (r == NULL)
            goto failed;
        Py_DECREF(r);
        return;
    }
    /* the payloads stay alive: ``out`` holds them until the caller drops it */
    for (Py_ssize_t i = 0; i < n; i++)
        send_one(p, &sends[i]);
    if (tap != NULL) {  /* as the edge's dispatch: what came in, then each copy that went out */
        int ok = call_tap(tap, data, src, Py_None, now);
        for (Py_ssize_t i = 0; i < n && ok; i++) {
            PyObject *item = PyList_GET_ITEM(out, i);
            ok = call_tap(tap, PyTuple_GET_ITEM(item, 0), Py_None, PyTuple_GET_ITEM(item, 1), now);
        }
        Py_DECREF(tap);
        if (!ok)
            tap_failed(p);
    }
    return;
failed:
    Py_XDECREF(tap);
    hand_over(p->on_error);
}

/* -- reading -------------------------------------------------------------------------------- */

static PyObject *now_of(Pump *p)
{
    if (p->use_offset) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        /* as time.monotonic() rounds: nanoseconds as a double, divided once */
        double d = (double)((int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec);
        return PyFloat_FromDouble(d / 1e9 + p->offset);
    }
    return PyObject_CallNoArgs(p->clock);
}

static void one(Pump *p, const char *buf, size_t len, const struct sockaddr_storage *from)
{
    PyObject *data = NULL, *src = NULL, *now = NULL, *out = NULL;
    data = PyBytes_FromStringAndSize(buf, (Py_ssize_t)len);
    if (data == NULL)
        goto failed;
    src = src_tuple(p, from);
    if (src == NULL)
        goto failed;
    now = now_of(p);
    if (now == NULL)
        goto failed;
    PyObject *args[3] = {data, src, now};
    out = PyObject_Vectorcall(p->receive, args, 3, NULL);
    if (out == NULL)
        goto failed;
    route(p, data, src, now, out);
    goto done;
failed:
    hand_over(p->on_error);
done:
    Py_XDECREF(data);
    Py_XDECREF(src);
    Py_XDECREF(now);
    Py_XDECREF(out);
    /* the core's bookkeeping it held back for this datagram, now that the output has left */
    if (p->settle != NULL) {
        PyObject *r = PyObject_CallNoArgs(p->settle);
        if (r == NULL)
            hand_over(p->on_error);
        Py_XDECREF(r);
    }
}

static PyObject *drain(Pump *p, int fd)
{
    if (fd < 0)
        Py_RETURN_NONE;
    if (p->bufs == NULL) {
        p->bufs = PyMem_RawMalloc((size_t)BATCH * BUF_SIZE);
        if (p->bufs == NULL) {
            PyErr_NoMemory();
            hand_over(p->on_error);
            Py_RETURN_NONE;
        }
    }
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_storage from[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = p->bufs + (size_t)i * BUF_SIZE;
        iov[i].iov_len = BUF_SIZE;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &from[i];
        msgs[i].msg_hdr.msg_namelen = sizeof from[i];
    }
    int n;
    do {
        n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            socket_error(p, errno);  /* e.g. ECONNREFUSED: an ICMP error on the connected socket */
        Py_RETURN_NONE;
    }
    /* the core may close the pump (a stop from a callback): hold it until the batch is done */
    Py_INCREF(p);
    for (int i = 0; i < n && p->receive != NULL; i++)
        one(p, iov[i].iov_base, msgs[i].msg_len, &from[i]);
    Py_DECREF(p);
    Py_RETURN_NONE;
}

static PyObject *Pump_read_listen(Pump *p, PyObject *Py_UNUSED(ignored))
{
    return drain(p, p->receive == NULL ? -1 : p->listen_fd);
}

static PyObject *Pump_read_upstream(Pump *p, PyObject *Py_UNUSED(ignored))
{
    return drain(p, p->receive == NULL ? -1 : p->upstream_fd);
}

/* -- the type ------------------------------------------------------------------------------- */

static int Pump_clear(Pump *p)
{
    Py_CLEAR(p->upstream_host);
    Py_CLEAR(p->receive);
    Py_CLEAR(p->core);
    Py_CLEAR(p->edge);
    Py_CLEAR(p->dispatch);
    Py_CLEAR(p->send_failed);
    Py_CLEAR(p->on_error);
    Py_CLEAR(p->clock);
    Py_CLEAR(p->settle);
    for (int i = 0; i < SRC_CACHE; i++) {
        Py_CLEAR(p->cache[i].tuple);
        p->cache[i].family = 0;
    }
    return 0;
}

static PyObject *Pump_close(Pump *p, PyObject *Py_UNUSED(ignored))
{
    Pump_clear(p);
    p->listen_fd = p->upstream_fd = -1;
    PyMem_RawFree(p->bufs);
    p->bufs = NULL;
    Py_RETURN_NONE;
}

static int Pump_traverse(Pump *p, visitproc visit, void *arg)
{
    Py_VISIT(p->upstream_host);
    Py_VISIT(p->receive);
    Py_VISIT(p->core);
    Py_VISIT(p->edge);
    Py_VISIT(p->dispatch);
    Py_VISIT(p->send_failed);
    Py_VISIT(p->on_error);
    Py_VISIT(p->clock);
    Py_VISIT(p->settle);
    for (int i = 0; i < SRC_CACHE; i++)
        Py_VISIT(p->cache[i].tuple);
    return 0;
}

static void Pump_dealloc(Pump *p)
{
    PyObject_GC_UnTrack(p);
    Pump_clear(p);
    PyMem_RawFree(p->bufs);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static int Pump_init(Pump *p, PyObject *args, PyObject *kwargs)
{
    static char *kw[] = {"listen_fd", "upstream_fd", "upstream", "receive", "core", "edge", "dispatch",
                         "send_failed", "on_error", "clock", "settle", NULL};
    int listen_fd, upstream_fd;
    PyObject *upstream, *receive, *core, *edge, *dispatch, *send_failed, *on_error, *clock, *settle = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iiOOOOOOOO|O:Pump", kw, &listen_fd, &upstream_fd, &upstream,
                                     &receive, &core, &edge, &dispatch, &send_failed, &on_error, &clock,
                                     &settle))
        return -1;
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(listen_fd, (struct sockaddr *)&ss, &len) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (ss.ss_family != AF_INET && ss.ss_family != AF_INET6) {
        PyErr_SetString(PyExc_ValueError, "the listen socket is neither IPv4 nor IPv6");
        return -1;
    }
    PyObject *host = NULL;
    long port = -1;
    if (upstream_fd >= 0) {
        if (!PyTuple_Check(upstream) || PyTuple_GET_SIZE(upstream) < 2 ||
            !PyUnicode_Check(PyTuple_GET_ITEM(upstream, 0)) || !PyLong_Check(PyTuple_GET_ITEM(upstream, 1))) {
            PyErr_SetString(PyExc_TypeError, "upstream must be (host, port)");
            return -1;
        }
        host = PyTuple_GET_ITEM(upstream, 0);
        port = PyLong_AsLong(PyTuple_GET_ITEM(upstream, 1));
        if (port == -1 && PyErr_Occurred())
            return -1;
    }
    /* the edge's epoch clock carries its offset (sipwatch.transport.epoch_clock): read it here */
    double offset = 0;
    int use_offset = 0;
    PyObject *off = PyObject_GetAttrString(clock, "offset");
    if (off == NULL) {
        PyErr_Clear();
    } else {
        if (PyFloat_CheckExact(off)) {
            offset = PyFloat_AS_DOUBLE(off);
            use_offset = 1;
        }
        Py_DECREF(off);
    }
    Pump_clear(p);
    p->family = ss.ss_family;
    p->listen_fd = listen_fd;
    p->upstream_fd = upstream_fd;
    p->upstream_host = Py_XNewRef(host);
    p->upstream_port = port;
    p->receive = Py_NewRef(receive);
    p->core = Py_NewRef(core);
    p->edge = Py_NewRef(edge);
    p->dispatch = Py_NewRef(dispatch);
    p->send_failed = Py_NewRef(send_failed);
    p->on_error = Py_NewRef(on_error);
    p->clock = Py_NewRef(clock);
    p->settle = settle == Py_None ? NULL : Py_NewRef(settle);
    p->offset = offset;
    p->use_offset = use_offset;
    return 0;
}

static PyMethodDef Pump_methods[] = {
    {"read_listen", (PyCFunction)Pump_read_listen, METH_NOARGS,
     "Read up to BATCH datagrams from the listen socket and handle each (never raises)."},
    {"read_upstream", (PyCFunction)Pump_read_upstream, METH_NOARGS,
     "Read up to BATCH datagrams from the connected upstream socket and handle each (never raises)."},
    {"close", (PyCFunction)Pump_close, METH_NOARGS,
     "Drop every reference and the buffers; later reads do nothing. The sockets stay open."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sipwatch._udppump.Pump",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Reads the edge's UDP sockets (loop.add_reader), calls the core, sends its common output.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Pump_init,
    .tp_dealloc = (destructor)Pump_dealloc,
    .tp_traverse = (traverseproc)Pump_traverse,
    .tp_clear = (inquiry)Pump_clear,
    .tp_methods = Pump_methods,
};

static struct PyModuleDef udppump_module = {
    PyModuleDef_HEAD_INIT, "_udppump",
    "The UDP edge's receive loop in C (recvmmsg, the core call, send); see sipwatch/_udppump.c.", -1, NULL,
};

PyMODINIT_FUNC PyInit__udppump(void)
{
    str_out_tcp = PyUnicode_InternFromString("out_tcp");
    str_wiretap = PyUnicode_InternFromString("wiretap");
    if (str_out_tcp == NULL || str_wiretap == NULL || PyType_Ready(&PumpType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&udppump_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "BATCH", BATCH) < 0 || PyModule_AddIntConstant(m, "SRC_CACHE", SRC_CACHE) < 0 ||
        PyModule_AddObjectRef(m, "Pump", (PyObject *)&PumpType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
