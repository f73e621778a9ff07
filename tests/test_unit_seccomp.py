"""The seccomp profile generator (pure): structure, the allowed pairs, a complete
partition of setsockopt/getsockopt arguments, strict mode, determinism, the CLI."""
from __future__ import annotations

import json
import random
from typing import Any

import pytest

from netpolicy import seccomp
from netpolicy.seccomp import ENOPROTOOPT, ENOSYS, EPERM, U64
from runtime.cli.main import build_parser

ACTIONS = {"SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO"}
OPS = {"SCMP_CMP_EQ", "SCMP_CMP_MASKED_EQ", "SCMP_CMP_GT"}
CONTRACT = {(1, 9), (1, 1), (6, 1), (1, 13), (1, 10), (1, 7), (1, 8), (1, 2)}  # C12, by (level, optname)


def _matches(arg: dict[str, Any], args: tuple[int, ...]) -> bool:
    v = args[arg["index"]] & U64
    if arg["op"] == "SCMP_CMP_EQ":
        return v == arg["value"]
    if arg["op"] == "SCMP_CMP_MASKED_EQ":  # value = mask, valueTwo = datum (libseccomp's order)
        return v & arg["value"] == arg["valueTwo"]
    if arg["op"] == "SCMP_CMP_GT":
        return v > arg["value"]
    raise AssertionError(arg)


def decide(profile: dict[str, Any], name: str, *args: int) -> tuple[str, int | None]:
    """What libseccomp makes of ``profile`` for one call: the action of the matching
    rule, else the default. Asserts that matching rules never disagree (libseccomp
    gives each argument combination one action)."""
    args = args + (0,) * (6 - len(args))
    hits = {(r["action"], r.get("errnoRet")) for r in profile["syscalls"]
            if name in r["names"] and all(_matches(a, args) for a in r.get("args", []))}
    assert len(hits) <= 1, f"{name}{args}: overlapping rules {hits}"
    return hits.pop() if hits else (profile["defaultAction"], profile["defaultErrnoRet"])


ALLOW = ("SCMP_ACT_ALLOW", None)
NOPROTOOPT = ("SCMP_ACT_ERRNO", ENOPROTOOPT)
DENIED = ("SCMP_ACT_ERRNO", EPERM)


@pytest.mark.parametrize("fmt", seccomp.FORMATS)
@pytest.mark.parametrize("strict", [False, True])
def test_structure_is_valid(fmt: str, strict: bool) -> None:
    p = seccomp.generate(fmt, strict=strict)
    assert p["defaultAction"] == "SCMP_ACT_ERRNO" and p["defaultErrnoRet"] == EPERM
    if fmt == "docker":
        assert "architectures" not in p  # Docker refuses a profile with both
        assert p["archMap"] == [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": []},
                                {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": []}]
    else:
        assert "archMap" not in p and p["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"]
    assert set(p) == {"defaultAction", "defaultErrnoRet", "syscalls", "archMap" if fmt == "docker" else "architectures"}
    for r in p["syscalls"]:
        assert set(r) <= {"names", "action", "args", "errnoRet", "comment"}
        assert r["names"] and all(isinstance(n, str) and n for n in r["names"])
        assert r["action"] in ACTIONS
        assert ("errnoRet" in r) == (r["action"] == "SCMP_ACT_ERRNO")
        indexes = [a["index"] for a in r.get("args", [])]
        assert len(indexes) == len(set(indexes)), "one comparison per argument and rule"
        for a in r.get("args", []):
            assert set(a) == {"index", "value", "valueTwo", "op"}
            assert 0 <= a["index"] <= 5 and a["op"] in OPS
            assert 0 <= a["value"] <= U64 and 0 <= a["valueTwo"] <= U64
            if a["op"] == "SCMP_CMP_MASKED_EQ":
                assert a["valueTwo"] & a["value"] == a["valueTwo"], "datum inside the mask"
    # Round-trips through JSON unchanged (ints stay ints, nothing unserializable).
    assert json.loads(seccomp.render(p)) == p


@pytest.mark.parametrize("strict", [False, True])
def test_unconditional_and_conditional_rules_never_share_a_syscall(strict: bool) -> None:
    # In libseccomp an unconditional rule for a syscall replaces its argument rules.
    p = seccomp.generate(strict=strict)
    unconditional = [n for r in p["syscalls"] if "args" not in r for n in r["names"]]
    conditional = {n for r in p["syscalls"] if "args" in r for n in r["names"]}
    assert len(unconditional) == len(set(unconditional))
    assert not set(unconditional) & conditional
    assert {"socket", "socketpair", "setsockopt", "getsockopt", "clone", "personality"} <= conditional


def test_allowed_pairs_are_present() -> None:
    p = seccomp.generate()
    for call in ("setsockopt", "getsockopt"):
        allowed = {(r["args"][0]["value"], r["args"][1]["value"]) for r in p["syscalls"]
                   if r["names"] == [call] and r["action"] == "SCMP_ACT_ALLOW"}
        assert CONTRACT <= allowed
        assert (0, 11) in allowed and (41, 25) in allowed  # IP_RECVERR, IPV6_RECVERR: glibc's resolver
    getsockopt_only = {(1, 3), (1, 4), (1, 30), (1, 38), (1, 39)}  # SO_TYPE, SO_ERROR, ... read-only
    assert all(decide(p, "getsockopt", 3, lvl, opt) == ALLOW for lvl, opt in getsockopt_only)
    assert all(decide(p, "setsockopt", 3, lvl, opt) == NOPROTOOPT for lvl, opt in getsockopt_only)


@pytest.mark.parametrize("contract_only", [False, True])
def test_options_partition_is_complete(contract_only: bool) -> None:
    """Every (level, optname) is decided by exactly one rule: ALLOW for the allowed pairs,
    ENOPROTOOPT for all others, including values with garbage in the upper 32 bits."""
    p = seccomp.generate(contract_only=contract_only)
    for call, options in (("setsockopt", seccomp.setsockopt_options(contract_only)),
                          ("getsockopt", seccomp.getsockopt_options(contract_only))):
        allowed = {(o.level, o.name) for o in options}
        if contract_only:
            assert allowed == CONTRACT
        edges = [0, 1, 2, 255, 256, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 32) | 1, (1 << 32) | 9, 1 << 63, U64,
                 U64 - 1]
        levels = list(range(0, 300)) + edges
        names = list(range(0, 80)) + edges
        for level in levels:
            for name in names:
                want = ALLOW if (level, name) in allowed else NOPROTOOPT
                assert decide(p, call, 3, level, name) == want, (call, level, name)


def test_the_issue_examples() -> None:
    p = seccomp.generate()
    assert decide(p, "setsockopt", 3, 1, 9) == ALLOW       # SO_KEEPALIVE
    assert decide(p, "setsockopt", 3, 6, 1) == ALLOW       # TCP_NODELAY
    assert decide(p, "setsockopt", 3, 1, 6) == NOPROTOOPT  # SO_BROADCAST
    assert decide(p, "setsockopt", 3, 0, 19) == NOPROTOOPT  # IP_TRANSPARENT
    assert decide(p, "socket", 2, 3, 1) == DENIED          # AF_INET SOCK_RAW IPPROTO_ICMP
    assert decide(p, "socket", 17, 3, 768) == DENIED       # AF_PACKET
    assert decide(p, "listen", 3, 128) == ALLOW
    assert decide(seccomp.generate(strict=True), "listen", 3, 128) == DENIED


def test_socket_rules() -> None:
    p = seccomp.generate()
    nonblock_cloexec = 0o4000 | 0o2000000
    for domain in (2, 10):  # AF_INET, AF_INET6
        for stype, proto in ((1, 6), (2, 17)):
            for flags in (0, nonblock_cloexec):
                assert decide(p, "socket", domain, stype | flags, 0) == ALLOW
                assert decide(p, "socket", domain, stype | flags, proto) == ALLOW
        assert decide(p, "socket", domain, 1, 17) == DENIED   # stream with UDP
        assert decide(p, "socket", domain, 1, 132) == DENIED  # SCTP
        assert decide(p, "socket", domain, 1, 262) == DENIED  # MPTCP
        assert decide(p, "socket", domain, 2, 1) == DENIED    # ICMP "ping" socket
        assert decide(p, "socket", domain, 2, 58) == DENIED   # ICMPv6 "ping" socket
        assert decide(p, "socket", domain, 2, 136) == DENIED  # UDP-Lite
        for stype in (3, 4, 5, 6, 10):  # raw, rdm, seqpacket, dccp, packet
            assert decide(p, "socket", domain, stype, 0) == DENIED
        assert decide(p, "socket", domain | (1 << 32), 1, 0) == DENIED
    for stype in (1, 2, 5):
        assert decide(p, "socket", 1, stype, 0) == ALLOW  # AF_UNIX
    for domain in (0, 3, 4, 5, 9, 16, 17, 29, 38, 40, 44):  # incl. netlink, packet, can, alg, vsock, xdp
        assert decide(p, "socket", domain, 2, 0) == DENIED
        assert decide(p, "socketpair", domain, 1, 0) == DENIED
    assert decide(p, "socketpair", 1, 1, 0) == ALLOW


def test_process_rules() -> None:
    p = seccomp.generate()
    assert decide(p, "clone", 0x01000000 | 0x00200000 | 17) == ALLOW  # fork-like
    assert decide(p, "clone", 0x003D0F00) == ALLOW                    # glibc's pthread_create flags
    for ns_flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000):
        assert decide(p, "clone", 17 | ns_flag) == DENIED
    assert decide(p, "clone3") == ("SCMP_ACT_ERRNO", ENOSYS)
    assert decide(p, "personality", 0xFFFFFFFF) == ALLOW
    assert decide(p, "personality", 0x0040000) == DENIED  # ADDR_NO_RANDOMIZE


def test_allow_list() -> None:
    names = set(seccomp.allowed_syscalls())
    ordinary = {"read", "write", "openat", "close", "mmap", "execve", "exit_group", "futex", "epoll_wait",
                "connect", "bind", "sendto", "recvfrom", "getrandom", "rt_sigaction", "wait4", "clock_nanosleep"}
    assert ordinary <= names
    refused = {"io_uring_setup", "io_uring_enter", "io_uring_register", "socketcall", "unshare", "setns", "mount",
               "umount2", "pivot_root", "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "ptrace",
               "process_vm_readv", "init_module", "finit_module", "kexec_load", "reboot", "userfaultfd",
               "modify_ldt", "iopl", "chroot", "open_by_handle_at", "clock_settime", "swapon", "setsockopt",
               "getsockopt", "socket", "clone", "clone3", "listen"}
    assert not names & (refused - {"listen"})
    assert "listen" not in seccomp.allowed_syscalls(strict=True)
    p = seccomp.generate()
    for n in sorted(refused - {"setsockopt", "getsockopt", "socket", "clone", "clone3", "listen"}):
        assert decide(p, n) == DENIED, n


def test_strict_adds_the_listen_deny() -> None:
    normal, strict = seccomp.generate(), seccomp.generate(strict=True)
    assert [r for r in strict["syscalls"] if "listen" in r["names"]] == [
        {"names": ["listen"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM, "comment": "strict: no listening sockets"}]
    assert not any(r["action"] == "SCMP_ACT_ERRNO" and "listen" in r["names"] for r in normal["syscalls"])
    # nothing else differs
    strip = lambda p: [dict(r, names=[n for n in r["names"] if n != "listen"]) for r in p["syscalls"]  # noqa: E731
                       if r["names"] != ["listen"]]
    assert strip(normal) == strip(strict)


def test_output_is_deterministic() -> None:
    for fmt in seccomp.FORMATS:
        for strict in (False, True):
            a = seccomp.render(seccomp.generate(fmt, strict=strict))
            b = seccomp.render(seccomp.generate(fmt, strict=strict))
            assert a == b and a.endswith("}\n")
    first = seccomp.generate()["syscalls"][0]["names"]
    assert first == sorted(first)
    # the two formats differ only in how they name the architectures
    d, k = seccomp.generate("docker"), seccomp.generate("kubernetes")
    assert d["syscalls"] == k["syscalls"]


def test_complement_conditions() -> None:
    rng = random.Random(7)
    for _ in range(50):
        allowed = set(rng.sample(range(0, 70), rng.randint(1, 12)))
        conds = seccomp.complement_conditions(2, allowed)
        assert all(c["index"] == 2 for c in conds)
        for v in list(range(0, 140)) + [1 << 32, U64, (1 << 32) + min(allowed)]:
            hits = sum(_matches(c, (0, 0, v)) for c in conds)
            assert hits == (0 if v in allowed else 1), (sorted(allowed), v)
    assert seccomp.complement_conditions(1, [0]) == [{"index": 1, "value": 0, "valueTwo": 0, "op": "SCMP_CMP_GT"}]
    with pytest.raises(ValueError):
        seccomp.complement_conditions(1, [])
    with pytest.raises(ValueError):
        seccomp.generate("podman")


def test_pod_seccomp_profile() -> None:
    assert seccomp.pod_seccomp_profile() == {"type": "Localhost", "localhostProfile": "profiles/sockgate.json"}
    assert f"{seccomp.KUBELET_SECCOMP_ROOT}/{seccomp.KUBERNETES_PROFILE_PATH}" == \
        "/var/lib/kubelet/seccomp/profiles/sockgate.json"


def test_cli_generate(tmp_path, capsys) -> None:
    parser = build_parser()
    out = tmp_path / "p.json"
    args = parser.parse_args(["seccomp", "generate", "--format", "kubernetes", "--strict", "-o", str(out)])
    assert args.func(args) == 0
    assert out.read_text() == seccomp.render(seccomp.generate("kubernetes", strict=True))
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    args = parser.parse_args(["seccomp", "generate"])
    assert args.format == "docker" and not args.strict and not args.contract_only
    assert args.func(args) == 0
    assert capsys.readouterr().out == seccomp.render(seccomp.generate("docker"))
    args = parser.parse_args(["seccomp", "generate", "--contract-only"])
    args.func(args)
    assert json.loads(capsys.readouterr().out) == seccomp.generate(contract_only=True)
    with pytest.raises(SystemExit):
        parser.parse_args(["seccomp", "generate", "--format", "oci"])
