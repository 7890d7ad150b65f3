/* The Python object heap on transparent huge pages: pymalloc's arenas carved from one reserved,
 * 2-MiB-aligned region marked MADV_HUGEPAGE, instead of a fresh 4-KiB-paged mmap each.
 *
 * Why it exists: nearly every object the proxy makes (its calls, transactions, the records it
 * hands off) lives in pymalloc's arenas, 1 MiB each on 64-bit builds, mapped one by one with
 * plain pages. Live at 1000 calls/s with every feature on (SIPp through the compiled sidecar, a
 * 2-vCPU VM), the proxy and its span worker took ~1,200 page faults a second while their call
 * state grew, ~4 us each, and every object touched after a wake-up could cost a TLB miss, dear
 * under a hypervisor's nested paging. With the arenas on huge pages, installed before the
 * proxy's modules are imported: ~350 faults a second, and 2-8% less CPU per message (four
 * sittings of alternating runs, medians of 4 to 8 each: 26.5 -> 25.4, 29.4 -> 27.1,
 * 29.6 -> 28.1, 23.7 -> 23.2 us). Freed arenas are kept for reuse, the last KEEP_RESIDENT of
 * them with their memory (the next arena costs no mmap and no faults); the memory of the others
 * goes back to the system (MADV_DONTNEED) and their address range stays for later arenas.
 *
 * The region is reserved PROT_NONE (no commit charge, no memory) and made writable in HUGE-sized
 * steps as arenas are carved; when it is used up, or a step cannot be made writable (a strict
 * overcommit limit), arenas come from the allocator that was there before, as do arenas of
 * another size. Where transparent huge pages are off the region still works, on plain pages.
 *
 * pymalloc calls these with the GIL held, so the state below needs no lock. install() is meant
 * for a process's start (sipwatch.heap.early_choice): arenas already mapped keep their old
 * allocator's memory and are given back to it when freed (told apart by their address).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#define HUGE ((size_t)2 << 20)       /* a transparent huge page on x86-64 and arm64 (4-KiB base) */
#define KEEP_RESIDENT 16             /* freed arenas kept with their memory, for the next ones */
#define MIN_ARENA ((size_t)64 << 10) /* smaller requests are not arenas of CPython's: passed on */

static PyObjectArenaAllocator previous;
static char *base;                   /* the region: [base, base + size) */
static size_t size, carved, writable;
static void **spare;                 /* freed arenas of the region, the last freed on top */
static size_t spare_n, spare_cap;
#define RELEASED ((uintptr_t)1)        /* a spare's mark: its memory went back (arenas are aligned) */
static size_t arena_size;            /* the size pymalloc asks for (the first request's) */
static unsigned long long n_carved, n_reused, n_fallback, n_released;
static int installed;

static int in_region(const void *p)
{
    return base != NULL && (const char *)p >= base && (const char *)p < base + size;
}

static void *arena_alloc(void *ctx, size_t n)
{
    (void)ctx;
    if (arena_size == 0)
        arena_size = n;
    if (n == arena_size && n >= MIN_ARENA) {
        if (spare_n) {
            void *p = (void *)((uintptr_t)spare[--spare_n] & ~RELEASED);
            n_reused++;
            return p;
        }
        if (carved + n <= size) {
            if (carved + n > writable) {
                size_t grow = ((carved + n - writable) + HUGE - 1) / HUGE * HUGE;
                if (writable + grow > size)
                    grow = size - writable;
                if (mprotect(base + writable, grow, PROT_READ | PROT_WRITE) == 0)
                    writable += grow;
            }
            if (carved + n <= writable) {
                void *p = base + carved;
                carved += n;
                n_carved++;
                return p;
            }
        }
    }
    n_fallback++;
    return previous.alloc(previous.ctx, n);
}

static void arena_free(void *ctx, void *p, size_t n)
{
    (void)ctx;
    if (!in_region(p)) {
        previous.free(previous.ctx, p, n);
        return;
    }
    /* the last KEEP_RESIDENT freed keep their memory (the next arenas come from them); the one
     * that drops out of that group gives its memory back (the range stays writable: an arena
     * made of it later faults it in) and is marked so. spare_cap covers every arena the region
     * can hold (MIN_ARENA each at the least), so there is always room. */
    if (spare_n >= KEEP_RESIDENT) {
        void **old = &spare[spare_n - KEEP_RESIDENT];
        if (!((uintptr_t)*old & RELEASED)) {
            madvise(*old, n, MADV_DONTNEED);
            *old = (void *)((uintptr_t)*old | RELEASED);
            n_released++;
        }
    }
    spare[spare_n++] = p;
}

/* install(reserve) -> True when pymalloc's arenas now come from a huge-page region of reserve
 * bytes of address space (or did already), False when the region could not be reserved */
static PyObject *hugeheap_install(PyObject *mod, PyObject *arg)
{
    (void)mod;
    if (installed)
        Py_RETURN_TRUE;
    Py_ssize_t want = PyLong_AsSsize_t(arg);
    if (want == -1 && PyErr_Occurred())
        return NULL;
    if (want < (Py_ssize_t)HUGE) {
        PyErr_SetString(PyExc_ValueError, "reserve must be at least 2 MiB");
        return NULL;
    }
    size_t n = (size_t)want / HUGE * HUGE;
    void *p = mmap(NULL, n + HUGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        Py_RETURN_FALSE;
    char *aligned = (char *)(((uintptr_t)p + HUGE - 1) & ~(uintptr_t)(HUGE - 1));
    /* the unaligned head and the tail beyond the region go back */
    if (aligned > (char *)p)
        munmap(p, (size_t)(aligned - (char *)p));
    size_t tail = (size_t)((char *)p + n + HUGE - (aligned + n));
    if (tail)
        munmap(aligned + n, tail);
    size_t cap = n / MIN_ARENA;
    void **list = PyMem_RawMalloc(cap * sizeof(void *));
    if (list == NULL) {
        munmap(aligned, n);
        return PyErr_NoMemory();
    }
#ifdef MADV_HUGEPAGE
    madvise(aligned, n, MADV_HUGEPAGE); /* (EINVAL where THP is not built in: plain pages then) */
#endif
    base = aligned;
    size = n;
    spare = list;
    spare_cap = cap;
    PyObject_GetArenaAllocator(&previous);
    PyObjectArenaAllocator mine = {NULL, arena_alloc, arena_free};
    PyObject_SetArenaAllocator(&mine);
    installed = 1;
    Py_RETURN_TRUE;
}

/* stats() -> dict of the region's figures (bytes and counts) */
static PyObject *hugeheap_stats(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    return Py_BuildValue("{s:O,s:n,s:n,s:n,s:n,s:n,s:K,s:K,s:K,s:K}",
                         "installed", installed ? Py_True : Py_False,
                         "reserved", (Py_ssize_t)size, "carved", (Py_ssize_t)carved,
                         "writable", (Py_ssize_t)writable, "arena_size", (Py_ssize_t)arena_size,
                         "spare", (Py_ssize_t)spare_n,
                         "carved_arenas", n_carved, "reused", n_reused, "fallback", n_fallback,
                         "released", n_released);
}

/* region() -> (start address, size) of the reserved region, (0, 0) before install */
static PyObject *hugeheap_region(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    return Py_BuildValue("(Kn)", (unsigned long long)(uintptr_t)base, (Py_ssize_t)size);
}

static PyMethodDef hugeheap_methods[] = {
    {"install", hugeheap_install, METH_O, "install(reserve) -> bool: pymalloc's arenas from a huge-page region"},
    {"stats", hugeheap_stats, METH_NOARGS, "stats() -> dict: the region's figures"},
    {"region", hugeheap_region, METH_NOARGS, "region() -> (start, size) of the reserved region"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef hugeheap_module = {
    PyModuleDef_HEAD_INIT, "_hugeheap",
    "pymalloc's arenas on transparent huge pages; see sipwatch/_hugeheap.c.", -1, hugeheap_methods,
};

PyMODINIT_FUNC PyInit__hugeheap(void)
{
    PyObject *m = PyModule_Create(&hugeheap_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "KEEP_RESIDENT", KEEP_RESIDENT) < 0 ||
            PyModule_AddIntConstant(m, "HUGE", (long)HUGE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
