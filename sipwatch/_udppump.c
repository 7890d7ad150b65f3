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
 * epoch clock: CLOCK_MONOTONIC, which is time.monotonic() on Linux, plus its offset; a response
 * is given its kernel arrival stamp instead, see time_of) and makes one vectorcall of
 * core.receive_datagram(data, src, now). The common output, a list of
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
 * Past capacity, the plainest new INVITEs are refused (503 + Retry-After) and the ACKs of those
 * refusals absorbed here, on the receive buffer, without the core's call (see "refusals" below):
 * there are more of them than calls at twice the capacity, and what each costs decides how many
 * calls the rest of a limited CPU carries. The 503s of one batch leave together at its end, with
 * one sendmmsg (send_replies); the core's output is sent as each datagram's comes.
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
#include <math.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 32            /* datagrams per wake-up at most: the loop stays responsive */
#define BUF_SIZE 65536      /* larger than any UDP payload (IPv4 65507, IPv6 65527) */
#define SRC_CACHE 256       /* source tuples kept (a power of two) */
#define MAX_OUT 16          /* outputs per datagram handled here; more go to Python */
#define REPLY_ARENA (2 * BUF_SIZE) /* the 503s of one batch, sent together at its end */

/* sipwatch._sipscan's refuse_raw (the capsule "sipwatch._sipscan._refuse_raw"): its signature,
 * REFUSE_RAW_ARGS there, kept in step with this one */
typedef int (*refuse_raw_fn)(PyObject *table, const unsigned char *s, Py_ssize_t n, const Py_ssize_t limits[3],
                             const unsigned char *mac_state, Py_ssize_t state_len, const char *status,
                             Py_ssize_t status_len, const char *extra, Py_ssize_t extra_len,
                             const unsigned char src_ip[4], int src_port, char *out, Py_ssize_t cap,
                             Py_ssize_t result[6]);

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
    int stamped;               /* the kernel stamps each datagram's arrival (SO_TIMESTAMPNS); only with use_offset */
    double last_wall_offset;   /* see batch_offset; NAN before the first */
    char *bufs;                /* BATCH * BUF_SIZE, allocated at the first read */
    SrcEntry cache[SRC_CACHE];
    /* refusals here (see refuse_here): NULL unless the core gave their parameters */
    refuse_raw_fn refuse;
    PyObject *names, *status, *extra;  /* the name table, the 503's status line and its extra line */
    Py_ssize_t limits[3];              /* max header lines, Content-Length digits, message size */
    Py_ssize_t invite_at, ack_at;      /* their counters in stats.requests, plus the direction */
    long from_signaling, from_gateway; /* the directions */
    unsigned char upstream_ip[4];      /* the connected upstream's address, when IPv4 */
    int upstream_ipv4;
    char *reply;                       /* REPLY_ARENA: this batch's 503s, one after another */
    size_t reply_used;
    int n_replies;                     /* queued in replies[], sent by send_replies */
    struct {
        size_t at, len;
        struct sockaddr_in to;
    } replies[BATCH];
    unsigned long long refused_here;   /* datagrams handled by refuse_here (for tests) */
} Pump;

static PyObject *str_out_tcp, *str_wiretap, *str_fast_refusals, *str_overloaded, *str_draining,
    *str_acks_until, *str_key, *str_mac_state_key, *str_mac_state, *str_tracker, *str_calls, *str_stats,
    *str_requests, *str_refused, *str_upstream;

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

/* The 503s refuse_here queued, with one sendmmsg (on loopback ~0.6 us a datagram less than a
 * sendto each, measured; past the knee there is one for every refused call). A datagram the
 * kernel refuses is reported as send_one's are, and the rest still go. */
static void send_replies(Pump *p)
{
    const int n = p->n_replies;
    p->n_replies = 0;
    p->reply_used = 0;
    if (n == 0 || p->reply == NULL || p->listen_fd < 0)
        return;
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < n; i++) {
        iov[i].iov_base = p->reply + p->replies[i].at;
        iov[i].iov_len = p->replies[i].len;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &p->replies[i].to;
        msgs[i].msg_hdr.msg_namelen = sizeof p->replies[i].to;
    }
    for (int i = 0; i < n;) {
        const int r = sendmmsg(p->listen_fd, msgs + i, (unsigned int)(n - i), 0);
        if (r > 0)
            i += r;
        else if (r < 0 && errno == EINTR)
            continue;
        else {
            socket_error(p, r < 0 ? errno : EIO);  /* (that one is lost, as with send_one) */
            i++;
        }
    }
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

/* The read time as an object (a new reference): ``now`` itself unless it is a response's arrival
 * (``sent``, the read time, is then a number; see time_of). */
static PyObject *read_time(PyObject *now, double sent)
{
    return isnan(sent) ? Py_NewRef(now) : PyFloat_FromDouble(sent);
}

/* Send ``out`` here when all of it is common (then the wiretap's copies, when one is set), else
 * hand it to the Python dispatch. */
static void route(Pump *p, PyObject *data, PyObject *src, PyObject *now, double sent, PyObject *out)
{
    if (p->core == NULL)
        return;  /* closed by the core's call */
    PyObject *tap = NULL;  /* the wiretap (the HEP sender's tap), when one is set (before any
                            * goto failed, which releases it) */
    PyObject *flag = PyObject_GetAttr(p->core, str_out_tcp);
    if (flag == NULL)
        goto failed;
    int tcp = PyObject_IsTrue(flag);
    Py_DECREF(flag);
    if (tcp < 0)
        goto failed;
    int python = tcp;
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
        Py_CLEAR(tap);  /* (cleared: a failing dispatch below goes to failed, which releases it) */
        /* at the read time, as without stamps: its taps and its TCP bookkeeping run now */
        PyObject *when = read_time(now, sent);
        if (when == NULL)
            goto failed;
        PyObject *args[4] = {data, src, when, out};
        PyObject *r = PyObject_Vectorcall(p->dispatch, args, 4, NULL);
        Py_DECREF(when);
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
        /* the copies left now, not when a response arrived (see time_of) */
        PyObject *left = ok && n > 0 ? read_time(now, sent) : NULL;
        if (ok && n > 0 && left == NULL)
            ok = 0;
        for (Py_ssize_t i = 0; i < n && ok; i++) {
            PyObject *item = PyList_GET_ITEM(out, i);
            ok = call_tap(tap, PyTuple_GET_ITEM(item, 0), Py_None, PyTuple_GET_ITEM(item, 1), left);
        }
        Py_XDECREF(left);
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

/* the edge's epoch clock, when it carries its offset (use_offset) */
static double epoch_now(Pump *p)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    /* as time.monotonic() rounds: nanoseconds as a double, divided once */
    double d = (double)((int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec);
    return d / 1e9 + p->offset;
}

/* -- refusals ------------------------------------------------------------------------------- *
 * Past capacity every refused call costs its INVITE (answered 503 + Retry-After) and the ACK of
 * that 503 (absorbed); at twice the capacity there are more of these than calls carried, so
 * what each costs decides how many calls the rest of the CPU carries. ProxyCore._fast_refusal
 * reads them in one C call, but each still took a bytes object, the source tuple, the clock
 * object, the core's call, its Via object and the output list. Here the plainest of them (see
 * _sipscan.c: refuse_raw's shape with a plain Via, over IPv4, no wiretap, the core's key
 * current, a Call-ID the tracker does not hold, a 503 not bound for the upstream) are handled
 * on the pump's buffer: the same checks the core makes, in the same order, the same counters
 * and the same bytes sent; anything else, and any doubt, goes to the core's call, before
 * anything changed. */

/* 1/0: the attribute's truth, -1 with an exception set */
static int truth_of(PyObject *o, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL)
        return -1;
    const int t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

/* list[i] += 1 */
static int bump_item(PyObject *list, Py_ssize_t i)
{
    PyObject *one = PyLong_FromLong(1);
    PyObject *w = one != NULL ? PyNumber_Add(PyList_GET_ITEM(list, i), one) : NULL;
    Py_XDECREF(one);
    return w == NULL ? -1 : PyList_SetItem(list, i, w);
}

/* 1: handled here (the core's counters bumped, its 503 sent or its ACK absorbed); 0: the
 * core's call decides, nothing changed; -1: an exception, nothing changed. */
static int refuse_here(Pump *p, const char *buf, size_t len, const struct sockaddr_storage *from)
{
    const int invite = buf[0] == 'I';
    PyObject *core = p->core, *tap = NULL, *key = NULL, *state = NULL, *src = NULL, *upstream = NULL,
             *stats = NULL, *requests = NULL, *call_id = NULL, *tracker = NULL, *calls = NULL;
    int rc = 0;
    if (from->ss_family != AF_INET || !p->use_offset)  /* (one() checked the length) */
        return 0;
    int on = truth_of(core, str_fast_refusals);
    if (on <= 0)
        return on;
    int draining = 0;
    if (invite) {  /* receive_datagram's test: overloaded or draining */
        const int over = truth_of(core, str_overloaded);
        if (over < 0 || (draining = truth_of(core, str_draining)) < 0)
            return -1;
        if (!over && !draining)
            return 0;
    }
    const double now = epoch_now(p);  /* (an INVITE needs it only when it is refused) */
    if (!invite) {  /* an ACK: within the window after a refusal, with an "sw" tag somewhere */
        PyObject *until = PyObject_GetAttr(core, str_acks_until);
        if (until == NULL)
            return -1;
        const double u = PyFloat_AsDouble(until);
        Py_DECREF(until);
        if (u == -1.0 && PyErr_Occurred())
            return -1;
        if (!(now < u))
            return 0;
        const char *tag = memmem(buf, len, ";tag=sw", 7);
        if (tag == NULL || tag == buf)
            return 0;
    }
    if ((tap = PyObject_GetAttr(p->edge, str_wiretap)) == NULL)
        return -1;
    if (tap != Py_None)
        goto out;  /* (the tap sees every datagram: the core's call and route() do that) */
    /* _fast_refusal rekeys first when the key changed: then the core's call */
    if ((key = PyObject_GetAttr(core, str_key)) == NULL || (state = PyObject_GetAttr(core, str_mac_state_key)) == NULL)
        goto failed;
    const int current = key == state;
    Py_CLEAR(state);
    if (!current)
        goto out;
    if ((state = PyObject_GetAttr(core, str_mac_state)) == NULL)
        goto failed;
    if (!PyBytes_CheckExact(state))
        goto out;
    const struct sockaddr_in *sin = (const struct sockaddr_in *)from;
    if (p->n_replies == BATCH || REPLY_ARENA - p->reply_used < BUF_SIZE)
        send_replies(p);  /* (not within one batch: a 503 is a few hundred bytes) */
    char *reply = p->reply + p->reply_used;
    Py_ssize_t res[6];
    rc = p->refuse(p->names, (const unsigned char *)buf, (Py_ssize_t)len, p->limits,
                   (const unsigned char *)PyBytes_AS_STRING(state), PyBytes_GET_SIZE(state),
                   PyBytes_AS_STRING(p->status), PyBytes_GET_SIZE(p->status), PyBytes_AS_STRING(p->extra),
                   PyBytes_GET_SIZE(p->extra), (const unsigned char *)&sin->sin_addr, ntohs(sin->sin_port),
                   reply, BUF_SIZE, res);
    if (rc <= 0)
        goto done;
    rc = 0;  /* (res[0], is_ack, follows from the first byte: "INVITE " or "ACK ") */
    /* the direction: from the upstream's address or not, as the core tells it */
    if ((src = src_tuple(p, from)) == NULL || (upstream = PyObject_GetAttr(core, str_upstream)) == NULL)
        goto failed;
    const int from_upstream = PyObject_RichCompareBool(src, upstream, Py_EQ);
    if (from_upstream < 0)
        goto failed;
    const Py_ssize_t at = (invite ? p->invite_at : p->ack_at) + (from_upstream ? p->from_signaling : p->from_gateway);
    if ((stats = PyObject_GetAttr(core, str_stats)) == NULL || (requests = PyObject_GetAttr(stats, str_requests)) == NULL)
        goto failed;
    if (!PyList_CheckExact(requests) || at < 0 || at >= PyList_GET_SIZE(requests))
        goto out;
    struct sockaddr_in to = *sin;
    if (invite) {
        /* a retransmission of an admitted call's INVITE is forwarded: lookup_call finds nothing
         * for a Call-ID its table does not hold, so only those are refused here; sip-signaling's
         * own INVITEs are never refused (ProxyCore._request) */
        if ((call_id = PyBytes_FromStringAndSize(buf + res[1], res[2] - res[1])) == NULL ||
                (tracker = PyObject_GetAttr(core, str_tracker)) == NULL ||
                (calls = PyObject_GetAttr(tracker, str_calls)) == NULL)
            goto failed;
        if (!PyDict_Check(calls))  /* (an OrderedDict: its items are the dict's) */
            goto out;
        const int known = PyDict_Contains(calls, call_id);
        if (known < 0)
            goto failed;
        to.sin_port = htons((uint16_t)res[4]);
        /* (a 503 for the upstream leaves by the connected socket: route() does that) */
        if (known || from_upstream || (p->upstream_host != NULL && (!p->upstream_ipv4 || (to.sin_port == htons((uint16_t)p->upstream_port)
                      && memcmp(&to.sin_addr, p->upstream_ip, 4) == 0))))
            goto out;
    }
    /* from here on it is ours: the counters as _fast_refusal and _refused bump them, then the send */
    rc = 1;
    int ok = bump_item(requests, at) == 0;
    if (ok && invite) {  /* ProxyCore._refused: the counter, the ACK window, the INVITE remembered */
        PyObject *when = PyFloat_FromDouble(now);
        PyObject *cseq = when != NULL ? PyLong_FromSsize_t(res[5]) : NULL;
        PyObject *done = cseq != NULL ? PyObject_CallMethodObjArgs(core, str_refused, when, call_id, cseq, NULL) : NULL;
        ok = done != NULL;
        Py_XDECREF(done);
        Py_XDECREF(cseq);
        Py_XDECREF(when);
    }
    if (!ok)
        hand_over(p->on_error);
    if (invite) {  /* sent with the batch's other 503s at its end (send_replies) */
        p->replies[p->n_replies].at = p->reply_used;
        p->replies[p->n_replies].len = (size_t)res[3];
        p->replies[p->n_replies++].to = to;
        p->reply_used += (size_t)res[3];
    }
    p->refused_here++;
    goto out;
failed:
    rc = -1;
    goto done;
out:
    if (rc < 0)
        rc = 0;
done:
    Py_XDECREF(tap);
    Py_XDECREF(key);
    Py_XDECREF(state);
    Py_XDECREF(src);
    Py_XDECREF(upstream);
    Py_XDECREF(stats);
    Py_XDECREF(requests);
    Py_XDECREF(call_id);
    Py_XDECREF(tracker);
    Py_XDECREF(calls);
    return rc;
}

/* The time the core is given for a datagram: when it is read, except that a response stamped by
 * the kernel is given its arrival (``arrived``, on the epoch clock; NAN for a request or when
 * not stamped). A request's time is when it is forwarded (a moment later), a response's when it
 * reached this host: the round trip between them is the next hop's and the wire's alone, without
 * the time a response queued here behind other work (a busy or stalled sidecar would have
 * charged its own delay to sip-signaling). An arrival is never later than the read, nor earlier
 * than ARRIVAL_SPAN seconds before it (after a longer stall, the 1xx and the final that waited
 * keep their order). *sent is set to the read time when the time given is the arrival. */
#define ARRIVAL_SPAN 10.0
static PyObject *time_of(Pump *p, double arrived, double *sent)
{
    *sent = NAN;
    if (!p->use_offset)
        return PyObject_CallNoArgs(p->clock);
    const double now = epoch_now(p);
    if (!(arrived <= now))  /* (NAN too) */
        return PyFloat_FromDouble(now);
    *sent = now;
    return PyFloat_FromDouble(arrived >= now - ARRIVAL_SPAN ? arrived : now - ARRIVAL_SPAN);
}

static void one(Pump *p, const char *buf, size_t len, const struct sockaddr_storage *from, double arrived)
{
    /* (``arrived``: see time_of) */
    PyObject *data = NULL, *src = NULL, *now = NULL, *out = NULL;
    double sent = NAN;
    if (p->refuse != NULL && len > 12 && (buf[0] == 'I' || buf[0] == 'A')) {
        const int here = refuse_here(p, buf, len, from);
        if (here > 0)
            return;
        if (here < 0)
            PyErr_Clear();  /* (nothing changed: the core's call decides, and meets the same trouble) */
    }
    data = PyBytes_FromStringAndSize(buf, (Py_ssize_t)len);
    if (data == NULL)
        goto failed;
    src = src_tuple(p, from);
    if (src == NULL)
        goto failed;
    now = time_of(p, arrived, &sent);
    if (now == NULL)
        goto failed;
    PyObject *args[3] = {data, src, now};
    out = PyObject_Vectorcall(p->receive, args, 3, NULL);
    if (out == NULL)
        goto failed;
    route(p, data, src, now, sent, out);
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

/* epoch clock minus wall clock, read between two epoch readings; of a few tries the narrowest
 * bracket (a preemption between the reads would shift every arrival of the batch by its length;
 * sipwatch.transport.epoch_clock reads its offset the same way) */
static double wall_offset(Pump *p)
{
    double best = NAN, width = INFINITY;
    for (int i = 0; i < 3 && width > 20e-6; i++) {
        struct timespec wall;
        const double before = epoch_now(p);
        clock_gettime(CLOCK_REALTIME, &wall);
        const double after = epoch_now(p);
        if (after - before < width) {
            width = after - before;
            best = (before + after) / 2 - ((double)wall.tv_sec + (double)wall.tv_nsec / 1e9);
        }
    }
    return best;
}

/* The offset for this batch's stamps (wall clock, the kernel's) to the epoch clock, read once a
 * batch that holds a response; NAN when it moved since the last reading by more than WALL_STEP:
 * the wall clock was stepped (NTP slews both clocks alike, only a step parts them), and a stamp
 * taken before the step would be off by it. */
#define WALL_STEP 1e-3
static double batch_offset(Pump *p)
{
    const double w = wall_offset(p);
    const double last = p->last_wall_offset;
    p->last_wall_offset = w;
    return isnan(last) || fabs(w - last) <= WALL_STEP ? w : NAN;
}

/* A datagram's arrival on the epoch clock, from its SCM_TIMESTAMPNS stamp; NAN when it has none. */
static double arrival(struct msghdr *h, double wall_to_epoch)
{
    if (isnan(wall_to_epoch) || (h->msg_flags & MSG_CTRUNC))
        return NAN;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c != NULL; c = CMSG_NXTHDR(h, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS &&
            c->cmsg_len >= CMSG_LEN(sizeof(struct timespec))) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(c), sizeof ts);
            return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9 + wall_to_epoch;
        }
    }
    return NAN;
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
    union {
        char buf[CMSG_SPACE(sizeof(struct timespec))];
        struct cmsghdr align;
    } ctl[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = p->bufs + (size_t)i * BUF_SIZE;
        iov[i].iov_len = BUF_SIZE;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &from[i];
        msgs[i].msg_hdr.msg_namelen = sizeof from[i];
        if (p->stamped) {
            msgs[i].msg_hdr.msg_control = ctl[i].buf;
            msgs[i].msg_hdr.msg_controllen = sizeof ctl[i].buf;
        }
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
    /* the kernel's arrival stamps are wall-clock time: the batch's one offset to the epoch clock */
    double wall_to_epoch = NAN;  /* read at the batch's first response */
    int offset_read = 0;
    /* the core may close the pump (a stop from a callback): hold it until the batch is done */
    Py_INCREF(p);
    for (int i = 0; i < n && p->receive != NULL; i++) {
        double arrived = NAN;
        if (p->stamped && msgs[i].msg_len > 8 && memcmp(iov[i].iov_base, "SIP/2.0 ", 8) == 0) {
            if (!offset_read) {
                wall_to_epoch = batch_offset(p);
                offset_read = 1;
            }
            arrived = arrival(&msgs[i].msg_hdr, wall_to_epoch);
        }
        one(p, iov[i].iov_base, msgs[i].msg_len, &from[i], arrived);
    }
    send_replies(p);
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
    Py_CLEAR(p->names);
    Py_CLEAR(p->status);
    Py_CLEAR(p->extra);
    p->refuse = NULL;
    for (int i = 0; i < SRC_CACHE; i++) {
        Py_CLEAR(p->cache[i].tuple);
        p->cache[i].family = 0;
    }
    return 0;
}

static PyObject *Pump_close(Pump *p, PyObject *Py_UNUSED(ignored))
{
    send_replies(p);  /* (closed from a callback within a batch: the 503s queued before it still go) */
    Pump_clear(p);
    p->listen_fd = p->upstream_fd = -1;
    PyMem_RawFree(p->bufs);
    p->bufs = NULL;
    PyMem_RawFree(p->reply);
    p->reply = NULL;
    p->n_replies = 0;
    p->reply_used = 0;
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
    Py_VISIT(p->names);
    Py_VISIT(p->status);
    Py_VISIT(p->extra);
    for (int i = 0; i < SRC_CACHE; i++)
        Py_VISIT(p->cache[i].tuple);
    return 0;
}

static void Pump_dealloc(Pump *p)
{
    PyObject_GC_UnTrack(p);
    Pump_clear(p);
    PyMem_RawFree(p->bufs);
    PyMem_RawFree(p->reply);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static int Pump_init(Pump *p, PyObject *args, PyObject *kwargs)
{
    static char *kw[] = {"listen_fd", "upstream_fd", "upstream", "receive", "core", "edge", "dispatch",
                         "send_failed", "on_error", "clock", "settle", "refusals", NULL};
    int listen_fd, upstream_fd;
    PyObject *upstream, *receive, *core, *edge, *dispatch, *send_failed, *on_error, *clock, *settle = Py_None,
             *refusals = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iiOOOOOOOO|OO:Pump", kw, &listen_fd, &upstream_fd, &upstream,
                                     &receive, &core, &edge, &dispatch, &send_failed, &on_error, &clock,
                                     &settle, &refusals))
        return -1;
    /* refusals: ProxyCore.refusal_params(), or None (then every datagram goes to the core) */
    PyObject *names = NULL, *status = NULL, *extra = NULL;
    Py_ssize_t limits[3], at[2];
    long dirs[2];
    refuse_raw_fn refuse = NULL;
    if (refusals != Py_None) {
        if (!PyArg_ParseTuple(refusals, "O!nnnO!O!nnll:refusals", &PyDict_Type, &names, &limits[0], &limits[1],
                              &limits[2], &PyBytes_Type, &status, &PyBytes_Type, &extra, &at[0],
                              &at[1], &dirs[0], &dirs[1]))
            return -1;
        refuse = (refuse_raw_fn)PyCapsule_Import("sipwatch._sipscan._refuse_raw", 0);
        if (refuse == NULL)
            PyErr_Clear();  /* (built without it: the core's call refuses them all) */
    }
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
    p->n_replies = 0;
    p->reply_used = 0;
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
    /* arrival stamps for the responses' times (see time_of); without them, the read time */
    int on = 1;
    p->last_wall_offset = NAN;
    p->stamped = use_offset && setsockopt(listen_fd, SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof on) == 0 &&
                 (upstream_fd < 0 || setsockopt(upstream_fd, SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof on) == 0);
    p->refuse = refuse;
    if (refuse != NULL) {
        p->names = Py_NewRef(names);
        p->status = Py_NewRef(status);
        p->extra = Py_NewRef(extra);
        memcpy(p->limits, limits, sizeof limits);
        p->invite_at = at[0];
        p->ack_at = at[1];
        p->from_signaling = dirs[0];
        p->from_gateway = dirs[1];
        const char *up = host != NULL ? PyUnicode_AsUTF8(host) : NULL;
        if (host != NULL && up == NULL)
            return -1;
        p->upstream_ipv4 = up != NULL && inet_pton(AF_INET, up, p->upstream_ip) == 1;
        if (p->reply == NULL && (p->reply = PyMem_RawMalloc(REPLY_ARENA)) == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

static PyObject *Pump_refused_here(Pump *p, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(p->refused_here);
}

static PyObject *Pump_stamped(Pump *p, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(p->stamped);
}

static PyGetSetDef Pump_getset[] = {
    {"stamped", (getter)Pump_stamped, NULL,
     "True when responses are timed at their arrival (the kernel's SO_TIMESTAMPNS stamps).", NULL},
    {"refused_here", (getter)Pump_refused_here, NULL,
     "Datagrams refused (INVITEs) or absorbed (their ACKs) by the pump itself, not the core's call.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

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
    .tp_getset = Pump_getset,
};

static struct PyModuleDef udppump_module = {
    PyModuleDef_HEAD_INIT, "_udppump",
    "The UDP edge's receive loop in C (recvmmsg, the core call, send); see sipwatch/_udppump.c.", -1, NULL,
};

PyMODINIT_FUNC PyInit__udppump(void)
{
    static const struct { PyObject **at; const char *name; } names[] = {
        {&str_out_tcp, "out_tcp"}, {&str_wiretap, "wiretap"}, {&str_fast_refusals, "fast_refusals"},
        {&str_overloaded, "overloaded"}, {&str_draining, "draining"}, {&str_acks_until, "_refusal_acks_until"},
        {&str_key, "key"}, {&str_mac_state_key, "_mac_state_key"}, {&str_mac_state, "_mac_state"},
        {&str_tracker, "tracker"}, {&str_calls, "calls"}, {&str_stats, "stats"}, {&str_requests, "requests"},
        {&str_refused, "_refused"},
        {&str_upstream, "upstream"}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((*names[i].at = PyUnicode_InternFromString(names[i].name)) == NULL)
            return NULL;
    if (PyType_Ready(&PumpType) < 0)
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
