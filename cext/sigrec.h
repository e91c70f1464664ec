/*
 * Worker-side signal plumbing.
 *
 * SIGBUS: an SA_SIGINFO handler in C.  A doorbell from the supervisor (SI_USER
 * from the supervisor's pid) dequeues the kernel's siginfo record from this
 * task's shm mailbox; any other SIGBUS (a self-raised action-required one, or a
 * kill(1) from a shell) is recorded as the real kernel delivered it.  Records go
 * to a local ring and CPython runs the Python-level handler via
 * PyErr_SetInterruptEx().  Everything here is async-signal-safe.
 *
 * Group exit: a second real-time doorbell makes this thread die of the signal
 * that killed another thread of its emulated process, as exit_group would.
 */
#ifndef EMU_SIGREC_H
#define EMU_SIGREC_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <signal.h>
#include <errno.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <Python.h>
#include "layout.h"

#define EMU_LRING 64
static emu_siginfo emu_lring[EMU_LRING];
static volatile uint32_t emu_lhead = 0, emu_ltail = 0;
static emu_task *emu_self_task = NULL;
static volatile int emu_supervisor_pid = -1;

static void emu_lpush(const emu_siginfo *r) {
    uint32_t h = __atomic_load_n(&emu_lhead, __ATOMIC_RELAXED);
    if (h - __atomic_load_n(&emu_ltail, __ATOMIC_ACQUIRE) < EMU_LRING) {
        emu_lring[h % EMU_LRING] = *r;
        __atomic_store_n(&emu_lhead, h + 1, __ATOMIC_RELEASE);
    }
}

static int emu_lpop(emu_siginfo *out) {
    uint32_t t = emu_ltail;
    if (t == __atomic_load_n(&emu_lhead, __ATOMIC_ACQUIRE)) return 0;
    *out = emu_lring[t % EMU_LRING];
    __atomic_store_n(&emu_ltail, t + 1, __ATOMIC_RELEASE);
    return 1;
}

/* Dequeue every mailbox record the kernel queued for this task. */
static int emu_mb_drain(void) {
    emu_task *t = emu_self_task;
    int n = 0;
    if (!t) return 0;
    for (;;) {
        uint32_t tail = t->mb_tail, head = __atomic_load_n(&t->mb_head, __ATOMIC_ACQUIRE);
        if (tail == head) break;
        emu_lpush(&t->mb[tail % EMU_MB_RING]);
        __atomic_store_n(&t->mb_tail, tail + 1, __ATOMIC_RELEASE);
        n++;
    }
    return n;
}

static void emu_sigbus_action(int sig, siginfo_t *si, void *uctx) {
    int saved = errno;
    (void)uctx;
    if ((si->si_code == SI_TKILL || si->si_code == SI_USER) && si->si_pid == emu_supervisor_pid) {
        if (emu_mb_drain() == 0) { errno = saved; return; }   /* stale doorbell */
    } else {
        emu_siginfo r;
        memset(&r, 0, sizeof r);
        r.signo = si->si_signo; r.code = si->si_code; r.errno_ = si->si_errno;
        if (si->si_code <= 0) {            /* sent by a process: _kill/_rt layout */
            r.pid = si->si_pid;
        } else {                           /* kernel fault layout: _sigfault */
            r.addr = (uint64_t)(uintptr_t)si->si_addr;
            if (si->si_code == BUS_MCEERR_AR || si->si_code == BUS_MCEERR_AO)
                r.addr_lsb = si->si_addr_lsb;
        }
        emu_lpush(&r);
    }
    PyErr_SetInterruptEx(sig);
    errno = saved;
}

static int emu_install_sigbus(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = emu_sigbus_action;
    sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGBUS, &sa, NULL);
}

static void emu_group_exit_action(int sig, siginfo_t *si, void *uctx) {
    emu_task *t = emu_self_task;
    int s = (t && t->group_exit_sig > 0) ? t->group_exit_sig : SIGKILL;
    struct sigaction sa;
    sigset_t m;
    (void)sig; (void)si; (void)uctx;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    sigaction(s, &sa, NULL);
    sigemptyset(&m);
    sigaddset(&m, s);
    sigprocmask(SIG_UNBLOCK, &m, NULL);
    if (t) t->exit_sig = s;
    syscall(SYS_tgkill, getpid(), (pid_t)syscall(SYS_gettid), s);
    _exit(128 + s);
}

static int emu_install_group_exit(int sig) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = emu_group_exit_action;
    sa.sa_flags = SA_SIGINFO;
    sigfillset(&sa.sa_mask);
    return sigaction(sig, &sa, NULL);
}

/* A kernel-style SIGBUS on the calling thread, with the real siginfo. */
static int emu_raise_self(int signo, int code, uint64_t addr, int lsb) {
    siginfo_t si;
    memset(&si, 0, sizeof si);
    si.si_signo = signo; si.si_code = code;
    si.si_addr = (void *)(uintptr_t)addr;
    si.si_addr_lsb = (short)lsb;
    if (syscall(SYS_rt_tgsigqueueinfo, getpid(), (pid_t)syscall(SYS_gettid), signo, &si) < 0)
        return -errno;
    return 0;
}

static int emu_tgkill(int tgid, int tid, int sig) {
    if (syscall(SYS_tgkill, tgid, tid, sig) < 0) return -errno;
    return 0;
}
#endif
