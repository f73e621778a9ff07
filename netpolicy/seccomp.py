"""The seccomp profile for contract row C12, socket options (pure: data in, JSON out).

An allow-list (default EPERM; options outside the contract fail with ENOPROTOOPT), for
x86_64 and aarch64, in Docker's or Kubernetes' format. What a container gets: README,
"Socket options (seccomp)"; how the rules are built: docs/seccomp.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

FORMATS = ("docker", "kubernetes")

# errno values (the same on x86_64 and aarch64)
EPERM = 1
ENOSYS = 38
ENOPROTOOPT = 92

U64 = (1 << 64) - 1

# socket(2) constants
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
SOCK_STREAM, SOCK_DGRAM = 1, 2
SOCK_TYPE_MASK = 0xF  # the kernel's mask; the rest of `type` is SOCK_NONBLOCK/SOCK_CLOEXEC
IPPROTO_TCP, IPPROTO_UDP = 6, 17

# clone(2) flags that create namespaces (Docker allows them only with CAP_SYS_ADMIN)
CLONE_NAMESPACE_FLAGS = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000
                         | 0x20000000 | 0x40000000)  # NEWNS CGROUP UTS IPC USER PID NET


@dataclass(frozen=True)
class SockOpt:
    level: int
    name: int
    level_name: str
    opt_name: str

    def __str__(self) -> str:
        return f"{self.level_name}/{self.opt_name}"


SOL_IP, SOL_SOCKET, SOL_TCP, SOL_IPV6 = 0, 1, 6, 41


def _so(name: int, opt_name: str) -> SockOpt:
    return SockOpt(SOL_SOCKET, name, "SOL_SOCKET", opt_name)


# Contract row C12: accepted by setsockopt and getsockopt.
CONTRACT_OPTIONS: tuple[SockOpt, ...] = (
    _so(1, "SO_DEBUG"),
    _so(2, "SO_REUSEADDR"),
    _so(7, "SO_SNDBUF"),
    _so(8, "SO_RCVBUF"),
    _so(9, "SO_KEEPALIVE"),
    _so(10, "SO_OOBINLINE"),
    _so(13, "SO_LINGER"),
    SockOpt(SOL_TCP, 1, "IPPROTO_TCP", "TCP_NODELAY"),
)

# glibc's stub resolver (res_send) enables extended ICMP error reporting on its UDP
# socket and gives up on the name server when that fails: without these two, no
# hostname resolves over DNS. They only let the socket's owner read ICMP errors about
# its own packets.
RESOLVER_OPTIONS: tuple[SockOpt, ...] = (
    SockOpt(SOL_IP, 11, "SOL_IP", "IP_RECVERR"),
    SockOpt(SOL_IPV6, 25, "SOL_IPV6", "IPV6_RECVERR"),
)

# Read-only (getsockopt only): they report and change nothing. SO_ERROR is how a
# non-blocking connect() learns its result (asyncio, libcurl, Go, libuv all read it).
READONLY_OPTIONS: tuple[SockOpt, ...] = (
    _so(3, "SO_TYPE"),
    _so(4, "SO_ERROR"),
    _so(30, "SO_ACCEPTCONN"),
    _so(38, "SO_PROTOCOL"),
    _so(39, "SO_DOMAIN"),
)

ARCH_MAP: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("SCMP_ARCH_X86_64", ()),
    ("SCMP_ARCH_AARCH64", ()),
)

# Allowed without conditions: what an ordinary program (and runc's last steps before
# exec) needs. Names the local libseccomp doesn't know are skipped by the runtime, so
# newer calls can be listed. Deliberately absent: io_uring_* (it can create sockets and
# set options without going through socket/setsockopt), socketcall, unshare/setns/mount
# and the other namespace and filesystem-admin calls, bpf, perf_event_open, keyrings
# (add_key/keyctl/request_key: not namespaced), ptrace and process_vm_*, modules, kexec,
# reboot, swap, clock setting, userfaultfd, modify_ldt, iopl/ioperm.
SYSCALL_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("file descriptors and I/O", (
        "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
        "preadv2", "pwritev2", "lseek", "close", "close_range", "dup", "dup2", "dup3",
        "pipe", "pipe2", "fcntl", "flock", "ioctl", "sendfile", "splice", "tee", "vmsplice",
        "copy_file_range", "fsync", "fdatasync", "sync", "syncfs", "sync_file_range",
        "fadvise64", "readahead", "fallocate", "ftruncate", "truncate",
    )),
    ("paths and metadata", (
        "open", "openat", "openat2", "creat", "stat", "fstat", "lstat", "newfstatat", "statx",
        "statfs", "fstatfs", "access", "faccessat", "faccessat2", "getcwd", "chdir", "fchdir",
        "getdents", "getdents64", "mkdir", "mkdirat", "rmdir", "rename", "renameat", "renameat2",
        "link", "linkat", "unlink", "unlinkat", "symlink", "symlinkat", "readlink", "readlinkat",
        "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "fchownat", "lchown",
        "umask", "utime", "utimes", "utimensat", "futimesat", "mknod", "mknodat",
        "name_to_handle_at",
        "getxattr", "lgetxattr", "fgetxattr", "getxattrat", "listxattr", "llistxattr",
        "flistxattr", "listxattrat", "setxattr", "lsetxattr", "fsetxattr", "setxattrat",
        "removexattr", "lremovexattr", "fremovexattr", "removexattrat",
        "inotify_init", "inotify_init1", "inotify_add_watch", "inotify_rm_watch",
    )),
    ("waiting and events", (
        "select", "pselect6", "poll", "ppoll", "epoll_create", "epoll_create1", "epoll_ctl",
        "epoll_wait", "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2",
        "io_setup", "io_destroy", "io_submit", "io_cancel", "io_getevents",
    )),
    ("memory", (
        "brk", "mmap", "munmap", "mremap", "mprotect", "msync", "madvise", "mincore",
        "mlock", "mlock2", "munlock", "mlockall", "munlockall", "membarrier", "memfd_create",
        "mbind", "get_mempolicy", "set_mempolicy", "set_mempolicy_home_node", "remap_file_pages",
        "pkey_alloc", "pkey_free", "pkey_mprotect", "map_shadow_stack", "mseal", "cachestat",
    )),
    ("processes and threads", (
        "execve", "execveat", "fork", "vfork", "exit", "exit_group", "wait4", "waitid",
        "getpid", "getppid", "gettid", "getpgid", "getpgrp", "setpgid", "getsid", "setsid",
        "set_tid_address", "set_robust_list", "get_robust_list", "rseq", "arch_prctl", "prctl",
        "get_thread_area", "set_thread_area", "futex", "futex_waitv", "futex_wake", "futex_wait",
        "futex_requeue", "sched_yield", "sched_getaffinity", "sched_setaffinity", "sched_getattr",
        "sched_setattr", "sched_getparam", "sched_setparam", "sched_getscheduler",
        "sched_setscheduler", "sched_get_priority_max", "sched_get_priority_min",
        "sched_rr_get_interval", "getpriority", "setpriority", "ioprio_get", "ioprio_set",
        "getrlimit", "setrlimit", "prlimit64", "getrusage", "times", "getcpu", "uname",
        "sysinfo", "getrandom", "seccomp", "landlock_create_ruleset", "landlock_add_rule",
        "landlock_restrict_self", "pidfd_open", "pidfd_send_signal", "pidfd_getfd",
        "uretprobe",
    )),
    ("credentials", (
        "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups",
        "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups",
        "setfsuid", "setfsgid", "capget", "capset",
    )),
    ("signals", (
        "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigsuspend",
        "rt_sigtimedwait", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "sigaltstack", "signalfd",
        "signalfd4", "kill", "tkill", "tgkill", "pause", "alarm", "restart_syscall",
    )),
    ("time", (
        "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time",
        "adjtimex", "clock_adjtime", "getitimer", "setitimer", "timer_create", "timer_delete",
        "timer_gettime", "timer_settime", "timer_getoverrun", "timerfd_create",
        "timerfd_gettime", "timerfd_settime",
    )),
    ("System V and POSIX IPC", (
        "shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop", "semctl",
        "msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend",
        "mq_timedreceive", "mq_notify", "mq_getsetattr",
    )),
    ("sockets, besides the rules below", (
        "connect", "bind", "accept", "accept4", "getsockname", "getpeername", "sendto",
        "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg", "shutdown",
    )),
)

# personality(2) values Docker's default profile allows: PER_LINUX, PER_LINUX32,
# UNAME26, UNAME26|PER_LINUX32, and 0xffffffff (query).
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)


# ---- building blocks ---------------------------------------------------------------

def _arg(index: int, op: str, value: int, value_two: int = 0) -> dict[str, Any]:
    return {"index": index, "value": value, "valueTwo": value_two, "op": op}


def _eq(index: int, value: int) -> dict[str, Any]:
    return _arg(index, "SCMP_CMP_EQ", value)


def _masked_eq(index: int, mask: int, value: int) -> dict[str, Any]:
    # libseccomp's (arg & mask) == datum; in this format "value" is the mask and
    # "valueTwo" the datum (as in Docker's clone rule).
    return _arg(index, "SCMP_CMP_MASKED_EQ", mask, value)


def _rule(names: Iterable[str], action: str, args: list[dict[str, Any]] | None = None,
          errno: int | None = None, comment: str = "") -> dict[str, Any]:
    r: dict[str, Any] = {"names": list(names), "action": action}
    if args:
        r["args"] = args
    if errno is not None:
        r["errnoRet"] = errno
    if comment:
        r["comment"] = comment
    return r


def complement_conditions(index: int, allowed: Iterable[int]) -> list[dict[str, Any]]:
    """Single comparisons on argument ``index`` that together match exactly the 64-bit
    values not in ``allowed``, each value by exactly one comparison: aligned blocks
    (EQ for one value, MASKED_EQ for 2^k values) for the gaps, GT past the largest."""
    values = sorted(set(allowed))
    if not values:
        raise ValueError("allowed must not be empty")
    if values[0] < 0 or values[-1] >= U64:
        raise ValueError("allowed values must be in 0 .. 2^64-2")
    out: list[dict[str, Any]] = []
    lo = 0
    for v in values:
        hi = v - 1
        while lo <= hi:
            size = lo & -lo if lo else 1 << 63
            while size > hi - lo + 1:
                size >>= 1
            out.append(_eq(index, lo) if size == 1 else _masked_eq(index, U64 ^ (size - 1), lo))
            lo += size
        lo = v + 1
    out.append(_arg(index, "SCMP_CMP_GT", values[-1]))
    return out


def _option_rules(syscall: str, options: tuple[SockOpt, ...]) -> list[dict[str, Any]]:
    """ALLOW for each (level, optname) in ``options``; ERRNO(ENOPROTOOPT) for every other
    pair: args 1 (level) and 2 (optname) of setsockopt/getsockopt(fd, level, optname, ...)."""
    by_level: dict[int, list[SockOpt]] = {}
    for o in sorted(options, key=lambda o: (o.level, o.name)):
        by_level.setdefault(o.level, []).append(o)
    rules = [_rule([syscall], "SCMP_ACT_ALLOW", [_eq(1, o.level), _eq(2, o.name)], comment=str(o))
             for level in sorted(by_level) for o in by_level[level]]
    for level in sorted(by_level):
        opts = by_level[level]
        name = opts[0].level_name
        for cond in complement_conditions(2, [o.name for o in opts]):
            rules.append(_rule([syscall], "SCMP_ACT_ERRNO", [_eq(1, level), cond], ENOPROTOOPT,
                               f"other {name} options"))
    for cond in complement_conditions(1, by_level):
        rules.append(_rule([syscall], "SCMP_ACT_ERRNO", [cond], ENOPROTOOPT, "other levels"))
    return rules


def _socket_rules() -> list[dict[str, Any]]:
    rules = [_rule(["socket"], "SCMP_ACT_ALLOW", [_eq(0, AF_UNIX)], comment="AF_UNIX, any type"),
             _rule(["socketpair"], "SCMP_ACT_ALLOW", [_eq(0, AF_UNIX)], comment="AF_UNIX only")]
    for domain, dname in ((AF_INET, "AF_INET"), (AF_INET6, "AF_INET6")):
        for stype, tname, proto, pname in ((SOCK_STREAM, "SOCK_STREAM", IPPROTO_TCP, "IPPROTO_TCP"),
                                           (SOCK_DGRAM, "SOCK_DGRAM", IPPROTO_UDP, "IPPROTO_UDP")):
            for p in (0, proto):
                rules.append(_rule(["socket"], "SCMP_ACT_ALLOW",
                                   [_eq(0, domain), _masked_eq(1, SOCK_TYPE_MASK, stype), _eq(2, p)],
                                   comment=f"{dname} {tname} protocol {p or 0}" + (f" ({pname})" if p else "")))
    return rules


def allowed_syscalls(strict: bool = False) -> list[str]:
    """The syscalls allowed without conditions, sorted."""
    names = {n for _, group in SYSCALL_GROUPS for n in group}
    if not strict:
        names.add("listen")
    return sorted(names)


def setsockopt_options(contract_only: bool = False) -> tuple[SockOpt, ...]:
    return CONTRACT_OPTIONS + (() if contract_only else RESOLVER_OPTIONS)


def getsockopt_options(contract_only: bool = False) -> tuple[SockOpt, ...]:
    return setsockopt_options(contract_only) + (() if contract_only else READONLY_OPTIONS)


def generate(fmt: str = "docker", *, strict: bool = False, contract_only: bool = False) -> dict[str, Any]:
    """The profile as a dict (see the module docstring). ``fmt``: ``docker`` (archMap)
    or ``kubernetes`` (architectures); ``strict``: listen() fails with EPERM;
    ``contract_only``: exactly C12's eight options, nothing for the resolver or the
    read-only getsockopt options (glibc DNS over UDP and non-blocking connects fail)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    profile: dict[str, Any] = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": EPERM}
    if fmt == "docker":
        profile["archMap"] = [{"architecture": a, "subArchitectures": list(sub)} for a, sub in ARCH_MAP]
    else:
        profile["architectures"] = [a for a, _ in ARCH_MAP]
    syscalls = [_rule(allowed_syscalls(strict), "SCMP_ACT_ALLOW",
                      comment="what an ordinary program needs")]
    syscalls += [_rule(["personality"], "SCMP_ACT_ALLOW", [_eq(0, p)]) for p in PERSONALITIES]
    syscalls.append(_rule(["clone"], "SCMP_ACT_ALLOW", [_masked_eq(0, CLONE_NAMESPACE_FLAGS, 0)],
                          comment="no new namespaces"))
    syscalls.append(_rule(["clone3"], "SCMP_ACT_ERRNO", errno=ENOSYS,
                          comment="flags are in memory, unfilterable: ENOSYS makes libc fall back to clone"))
    syscalls += _socket_rules()
    syscalls += _option_rules("setsockopt", setsockopt_options(contract_only))
    syscalls += _option_rules("getsockopt", getsockopt_options(contract_only))
    if strict:
        syscalls.append(_rule(["listen"], "SCMP_ACT_ERRNO", errno=EPERM, comment="strict: no listening sockets"))
    return profile | {"syscalls": syscalls}


def render(profile: dict[str, Any]) -> str:
    """Stable JSON text (two-space indent, trailing newline)."""
    return json.dumps(profile, indent=2) + "\n"


# Where the kubelet looks for Localhost profiles, and the pod field that names one.
KUBELET_SECCOMP_ROOT = "/var/lib/kubelet/seccomp"
KUBERNETES_PROFILE_PATH = "profiles/sockgate.json"


def pod_seccomp_profile(localhost_profile: str = KUBERNETES_PROFILE_PATH) -> dict[str, Any]:
    """The ``securityContext.seccompProfile`` of a pod or container using the profile
    installed at KUBELET_SECCOMP_ROOT/``localhost_profile``."""
    return {"type": "Localhost", "localhostProfile": localhost_profile}
