"""The lab itself: topology, servers, DNS, probes, isolation from the host, teardown.

Needs root, iproute2 and nsenter. Every test asserts something the lab could get wrong.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from runtime.lab import LAB, Lab
from runtime.lab.builder import NETNS_DIR, PROJECT_ROOT, RUN_DIR

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nsenter") or not shutil.which("ip"),
                       reason="needs root, nsenter and iproute2"),
]

RANGES_DIR = Path(os.environ.get("SOCKGATE_GOOGLE_RANGES", PROJECT_ROOT.parent / "shared/data/google-ip-ranges"))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


# --- helpers ---------------------------------------------------------------------

def lab_namespaces(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix + "-")) if NETNS_DIR.is_dir() else []


def procs_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains text (each lab's run dir path is unique)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                if text in Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(d))
            except OSError:
                pass
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_events(lab: Lab, pred: Any, timeout: float = 3.0) -> list[dict[str, Any]]:
    """Server events matching pred; waits a little, the server logs asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in lab.server_events() if pred(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def assert_gone(prefix: str, run_dir: str, pids: list[int]) -> None:
    assert lab_namespaces(prefix) == []
    assert not Path(run_dir).exists()
    assert not (RUN_DIR / f"{prefix}.pid").exists()
    assert [p for p in pids if alive(p)] == []
    assert procs_mentioning(run_dir) == []


def host_snapshot() -> dict[str, Any]:
    """What the lab must never change in the root netns (read-only commands)."""
    def j(*argv: str) -> Any:
        return json.loads(subprocess.run(["ip", "-j", *argv], capture_output=True, text=True, check=True).stdout or "[]")
    links = sorted((l["ifname"], tuple(l.get("flags", [])), l.get("mtu")) for l in j("link", "show"))
    addrs = sorted((a["ifname"], ai["local"], ai["prefixlen"]) for a in j("addr", "show") for ai in a.get("addr_info", []))
    routes = [sorted(json.dumps(r, sort_keys=True) for r in j(fam, "route", "show", "table", "all")) for fam in ("-4", "-6")]
    rules = [sorted(json.dumps(r, sort_keys=True) for r in j(fam, "rule", "show")) for fam in ("-4", "-6")]
    sysctls = {k: Path(f"/proc/sys/{k}").read_text().strip()
               for k in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding", "net/ipv6/conf/default/accept_dad")}
    nft = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout if shutil.which("nft") else ""
    return {"links": links, "addrs": addrs, "routes": routes, "rules": rules, "sysctls": sysctls, "nft": nft}


def lock_holders() -> str:
    """The processes holding a lock on the labs' global lock file (/proc/locks)."""
    try:
        inode = (RUN_DIR / ".lock").stat().st_ino
    except FileNotFoundError:
        return "no lock file"
    out = []
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF" (a "->" marks a waiter)
        if f[1] == "->":
            f = f[:1] + f[2:]
        if f[5].rsplit(":", 1)[-1] == str(inode):
            cmd = Path(f"/proc/{f[4]}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") \
                if Path(f"/proc/{f[4]}").exists() else "?"
            out.append(f"{' '.join(f[:5])} {cmd[:200]}")
    return "lock holders/waiters: " + ("; ".join(out) or "none")


def spawn_lab_process(extra: str = "") -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """A separate python that builds a lab, reports it, then sleeps until signalled."""
    # SIGHUP at its default, whatever the suite inherited: under `nohup` (SIG_IGN, which
    # exec keeps) the lab deliberately leaves an ignored SIGHUP ignored, and the SIGHUP
    # test would wait for a teardown that never comes.
    code = (
        "import json, signal, sys, time\n"
        "signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"
        "from runtime.lab import Lab\n"
        "from runtime.lab.builder import _netns_pids\n"
        "with Lab() as lab:\n"
        "    extra = []\n"
        f"{extra}"
        "    print(json.dumps({'prefix': lab.prefix, 'run_dir': str(lab.run_dir),"
        " 'pids': _netns_pids(lab.namespaces), 'extra': extra}), flush=True)\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        proc.kill()
        raise AssertionError(f"lab process failed: {proc.communicate(timeout=10)[1]}")
    info = json.loads(line)
    assert info["pids"], "the lab's servers should run inside its namespaces"
    return proc, info


# --- constants -------------------------------------------------------------------

def _ranges() -> tuple[list[Any], list[Any]]:
    def load(name: str) -> list[Any]:
        data = json.loads((RANGES_DIR / name).read_text())
        return [ipaddress.ip_network(p.get("ipv4Prefix") or p.get("ipv6Prefix")) for p in data["prefixes"]]
    if not (RANGES_DIR / "goog.json").exists():
        pytest.skip(f"no Google ranges snapshot in {RANGES_DIR}")
    return load("goog.json"), load("cloud.json")


def test_constants_sit_in_the_ranges_they_stand_for() -> None:
    goog, cloud = _ranges()

    def in_any(a: str, nets: list[Any]) -> bool:
        ip = ipaddress.ip_address(a)
        return any(ip in n for n in nets)

    google = [*LAB.dns_v4, *LAB.dns_v6, LAB.google_v4, LAB.google_v6,
              *(a for addrs in LAB.gmail.values() for a in addrs)]
    for a in google:  # Google ranges = goog.json minus cloud.json
        assert in_any(a, goog) and not in_any(a, cloud), a
    for a in (LAB.cloud_v4, LAB.cloud_v6):
        assert in_any(a, cloud), a
    for a in (LAB.public_v4, LAB.public_v6):
        assert not in_any(a, goog) and not in_any(a, cloud), a
    for name, addrs in LAB.gmail.items():
        assert {ipaddress.ip_address(a).version for a in addrs} == {4, 6}, name
    assert len(set(LAB.public_addresses())) == len(LAB.public_addresses())
    assert LAB.iperf_port not in LAB.echo_ports


# --- topology --------------------------------------------------------------------

def test_names_carry_the_run_prefix(lab: Lab) -> None:
    assert lab.prefix.startswith("sgl-") and len(lab.prefix) == 10
    assert lab.node == f"{lab.prefix}-node" and lab.internet == f"{lab.prefix}-internet"
    assert lab.ns_path(lab.node) == f"/run/netns/{lab.node}" and os.path.exists(lab.ns_path(lab.node))
    assert lab.ns_path("internet") == f"/run/netns/{lab.internet}"
    record = json.loads((RUN_DIR / f"{lab.prefix}.pid").read_text())
    assert record["pid"] == os.getpid() and set(record["namespaces"]) >= {lab.node, lab.internet}


def test_node_topology(lab: Lab) -> None:
    links = json.loads(lab.run(lab.node, ["ip", "-j", "link", "show"]).stdout)
    assert sorted(l["ifname"] for l in links) == ["lo", LAB.uplink_if]
    addrs = json.loads(lab.run(lab.node, ["ip", "-j", "addr", "show", "dev", LAB.uplink_if]).stdout)[0]
    have = {(a["local"], a["prefixlen"]) for a in addrs["addr_info"]}
    assert {(LAB.node_uplink_v4, 24), (LAB.node_uplink_v6, 64)} <= have
    assert not any("tentative" in a or a.get("dadfailed") for a in addrs["addr_info"])
    r4 = json.loads(lab.run(lab.node, ["ip", "-j", "-4", "route", "show", "default"]).stdout)
    r6 = json.loads(lab.run(lab.node, ["ip", "-j", "-6", "route", "show", "default"]).stdout)
    assert [r["gateway"] for r in r4] == [LAB.internet_v4]
    assert [r["gateway"] for r in r6] == [LAB.internet_v6]
    fwd = lab.run(lab.node, ["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]).stdout.split()
    assert fwd == ["1", "1"]


def test_internet_topology(lab: Lab) -> None:
    links = json.loads(lab.run(lab.internet, ["ip", "-j", "link", "show"]).stdout)
    assert sorted(l["ifname"] for l in links) == sorted({"lo", LAB.downlink_if, LAB.public_if})
    addrs = json.loads(lab.run(lab.internet, ["ip", "-j", "addr", "show"]).stdout)
    have = {a["local"] for l in addrs for a in l["addr_info"]}
    assert set(LAB.public_addresses()) <= have
    routes = {r["dst"]: r.get("gateway") for fam in ("-4", "-6")
              for r in json.loads(lab.run(lab.internet, ["ip", "-j", fam, "route", "show"]).stdout)}
    assert routes["10.77.0.0/16"] == LAB.node_uplink_v4
    assert routes["fd77:5067:6174::/64"] == LAB.node_uplink_v6
    assert "default" not in routes  # the internet is a dead end: nothing can leave through it
    assert lab.run(lab.internet, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"
    for ns in (lab.node, lab.internet):  # set explicitly: a new netns copies the host's ipv4 conf
        assert lab.run(ns, ["sysctl", "-n", "net.ipv4.conf.all.rp_filter"]).stdout.strip() == "0"


# --- echo servers ----------------------------------------------------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("target,source", [(LAB.public_v4, LAB.node_uplink_v4), (LAB.public_v6, LAB.node_uplink_v6),
                                           (LAB.cloud_v6, LAB.node_uplink_v6), (LAB.google_v4, LAB.node_uplink_v4)])
def test_echo_from_node(lab: Lab, proto: str, target: str, source: str) -> None:
    payload = f"token-{proto}-{target}".encode()
    r = lab.probe(lab.node, proto, target, 443, payload=payload)
    assert r.ok and r.error is None and r.echo_ok, r
    assert r.peer_seen == source           # the server saw the node's uplink address
    assert r.server_local == target        # and the reply came from the address we asked
    port = r.raw["server"]["peer_port"]
    ev = wait_events(lab, lambda e: e["ev"] in ("udp", "tcp_close") and e.get("peer_port") == port
                     and e.get("local") == target)
    assert ev, "the server should log what it received"
    # far-side byte counts, what billing checks compare against
    assert ev[-1]["bytes_in" if proto == "tcp" else "bytes"] == len(payload)


def test_echo_binary_and_large_payloads(lab: Lab) -> None:
    blob = bytes(range(256)) * 4096  # 1 MiB: needs send/receive interleaving in the probe
    r = lab.probe(lab.node, "tcp", LAB.public_v6, 9000, payload=blob, timeout=10)
    assert r.ok and r.echo_ok, r
    r = lab.probe(lab.node, "udp", LAB.public_v4, 9000, payload=bytes(range(256)) * 8)
    assert r.ok and r.echo_ok, r


def test_closed_port_errors_surface(lab: Lab) -> None:
    # 5201 is left free for iperf3: TCP RST and ICMP port unreachable come back as errnos.
    assert lab.probe(lab.node, "tcp", LAB.public_v4, LAB.iperf_port).error == "ECONNREFUSED"
    assert lab.probe(lab.node, "udp", LAB.public_v6, LAB.iperf_port).error == "ECONNREFUSED"


def test_port_53_is_dns_on_resolvers_and_echo_elsewhere(lab: Lab) -> None:
    for proto in ("tcp", "udp"):
        r = lab.probe(lab.node, proto, LAB.public_v4, 53)
        assert r.ok and r.server_local == LAB.public_v4, r
        assert not lab.probe(lab.node, proto, LAB.dns_v4[0], 53, timeout=0.5).echo_ok
    for server in (*LAB.dns_v4, *LAB.dns_v6):
        for tcp in (False, True):
            d = lab.dns_query(lab.node, "pop.gmail.com", "A", server, tcp=tcp)
            assert d.ok and d.addresses == [LAB.gmail["pop.gmail.com"][0]], (server, tcp, d)


def test_servers_survive_many_concurrent_clients(lab: Lab) -> None:
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(lambda i: lab.probe(lab.node, "tcp" if i % 2 else "udp",
                                                  LAB.public_v4 if i % 3 else LAB.public_v6, 80,
                                                  payload=f"c{i}".encode()), range(48)))
    assert all(r.ok for r in results), [r for r in results if not r.ok]


# --- DNS -------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LAB.gmail))
def test_dns_answers_gmail_names(lab: Lab, name: str) -> None:
    a = lab.dns_query(lab.node, name, "A", LAB.dns_v4[0])
    aaaa = lab.dns_query(lab.node, name, "AAAA", LAB.dns_v6[1])
    assert a.rcode == aaaa.rcode == "NOERROR"
    assert a.addresses == [LAB.gmail[name][0]] and aaaa.addresses == [LAB.gmail[name][1]]
    assert {x.ttl for x in a.answers + aaaa.answers} == {LAB.gmail_ttl}


def test_dns_unknown_name_is_nxdomain_and_nothing_is_forwarded(lab: Lab) -> None:
    d = lab.dns_query(lab.node, "example.com", "A", LAB.dns_v4[1])
    assert d.ok and d.rcode == "NXDOMAIN" and d.answers == ()
    d = lab.dns_query(lab.node, "smtp.gmail.com", "MX", LAB.dns_v4[0])
    assert d.rcode == "NOERROR" and d.answers == ()  # known name, no such type: NODATA


def test_set_dns_takes_effect_for_the_next_query(lab: Lab) -> None:
    name = "smtp.gmail.com"
    try:
        lab.set_dns(name, ["142.250.10.200", "2607:f8b0:400e:c00::c8"], ttl=7)
        a = lab.dns_query(lab.node, name, "A")
        aaaa = lab.dns_query(lab.node, name, "AAAA", LAB.dns_v6[0], tcp=True)
        assert a.addresses == ["142.250.10.200"] and [x.ttl for x in a.answers] == [7]
        assert aaaa.addresses == ["2607:f8b0:400e:c00::c8"]
        lab.set_dns("new.example", [LAB.public_v4], ttl=1)
        assert lab.dns_query(lab.node, "new.example", "A").addresses == [LAB.public_v4]
    finally:
        lab.set_dns(name, list(LAB.gmail[name]), LAB.gmail_ttl)
    assert lab.dns_query(lab.node, name, "A").addresses == [LAB.gmail[name][0]]


# --- spoofing tool, isolation ------------------------------------------------------

@pytest.mark.parametrize("src,dst", [("10.77.9.9", LAB.public_v4), ("fd77:5067:6174::9:9", LAB.public_v6)])
def test_spoof_udp_really_forges_the_source(lab: Lab, src: str, dst: str) -> None:
    # Without a firewall the forged datagram arrives: proves the tool has teeth, so a
    # test seeing *no* arrival behind sockgate means the node dropped it.
    token = f"spoof-{os.urandom(4).hex()}"
    r = lab.spoof_udp(lab.node, src, dst, 9000, payload=token.encode())
    assert r.ok, r
    seen = wait_events(lab, lambda e: e.get("head") == token)
    assert seen and seen[0]["peer"] == src and seen[0]["local"] == dst


def test_bind_to_foreign_address_fails_without_freebind(lab: Lab) -> None:
    r = lab.probe(lab.node, "tcp", LAB.public_v4, 80, bind="10.77.1.1")
    assert not r.ok and r.error == "EADDRNOTAVAIL"
    r = lab.probe(lab.node, "tcp", LAB.public_v4, 80, bind=LAB.node_uplink_v4, bind_port=40999)
    assert r.ok and r.raw["server"]["peer_port"] == 40999


def test_no_path_from_lab_to_host(lab: Lab) -> None:
    routes = [r for fam in ("-4", "-6") for r in json.loads(subprocess.run(
        ["ip", "-j", fam, "route", "show"], capture_output=True, text=True).stdout or "[]")]
    host_addrs = {r["prefsrc"] for r in routes if "prefsrc" in r} | {r["gateway"] for r in routes if "gateway" in r}
    assert host_addrs, "expected the host to have some address to aim at"
    for ns in (lab.node, lab.internet):
        for a in sorted(host_addrs):
            r = lab.probe(ns, "udp", a, 53, timeout=0.5)
            assert not r.ok and r.peer_seen is None, (ns, a, r)


def test_app_namespaces(lab: Lab) -> None:
    name = lab.add_app("t1")
    try:
        assert name == f"{lab.prefix}-t1" and os.path.exists(lab.ns_path(name))
        links = json.loads(lab.run(name, ["ip", "-j", "link", "show"]).stdout)
        assert [(l["ifname"], "UP" in l["flags"]) for l in links] == [("lo", True)]
        r = lab.probe(name, "tcp", LAB.public_v4, 80, timeout=0.5)
        assert not r.ok and r.error == "ENETUNREACH"  # nothing wired yet: the core does that
        with pytest.raises(FileExistsError):
            lab.add_app("t1")
    finally:
        lab.remove_app("t1")
    assert not os.path.exists(f"/run/netns/{name}")
    with pytest.raises(KeyError):
        lab.run(name, ["true"])
    for bad in ("node", "internet", "../x", "Bad", ""):
        with pytest.raises(ValueError):
            lab.add_app(bad)


def test_run_refuses_namespaces_it_does_not_own(lab: Lab) -> None:
    for foreign in ("", "/", "sgl-000000-node", lab.prefix, "../" + lab.node):
        with pytest.raises(KeyError):
            lab.run(foreign, ["true"])
    cp = lab.run(lab.node, ["false"], check=False)
    assert cp.returncode == 1
    with pytest.raises(subprocess.CalledProcessError):
        lab.run(lab.node, ["false"])


# --- teardown ----------------------------------------------------------------------

def test_teardown_removes_namespaces_processes_and_records() -> None:
    with Lab() as lab:
        lab.add_app("x")
        sleeper = lab.popen("x", ["sleep", "300"])
        prefix, run_dir = lab.prefix, str(lab.run_dir)
        server_pids = procs_mentioning(run_dir)
        assert len(server_pids) >= 2 and len(lab_namespaces(prefix)) == 3
        assert lab.probe("x", "udp", "127.0.0.1", 9, timeout=0.3).error == "ECONNREFUSED"
    assert_gone(prefix, run_dir, server_pids + [sleeper.pid])
    assert sleeper.returncode is not None


def test_teardown_when_the_body_raises() -> None:
    with pytest.raises(ZeroDivisionError):
        with Lab() as lab:
            prefix, run_dir = lab.prefix, str(lab.run_dir)
            pids = procs_mentioning(run_dir)
            lab.add_app("boom")
            raise ZeroDivisionError("the body of a with-Lab block failed")
    assert pids
    assert_gone(prefix, run_dir, pids)


def test_prefix_clash_leaves_the_other_lab_alone(lab: Lab) -> None:
    with pytest.raises(FileExistsError):
        Lab(prefix=lab.prefix, clean_stale=False).start()
    assert len(lab_namespaces(lab.prefix)) >= 2 and (RUN_DIR / f"{lab.prefix}.pid").exists()
    assert lab.probe(lab.node, "udp", LAB.public_v4, 7).ok
    for bad in ("", "Sgl", "a/b", "x" * 30, "-x"):
        with pytest.raises(ValueError):
            Lab(prefix=bad)


def test_parallel_labs_do_not_collide() -> None:
    with Lab() as a, Lab() as b:
        assert a.prefix != b.prefix
        assert a.probe(a.node, "tcp", LAB.public_v4, 7).ok and b.probe(b.node, "udp", LAB.public_v6, 7).ok
        a_run = str(a.run_dir)
        a.close()
        assert lab_namespaces(a.prefix) == [] and len(lab_namespaces(b.prefix)) == 2
        assert b.probe(b.node, "tcp", LAB.public_v6, 7).ok  # b unharmed
    assert lab_namespaces(b.prefix) == [] and procs_mentioning(a_run) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_tears_the_lab_down(sig: signal.Signals) -> None:
    proc, info = spawn_lab_process()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        # Say who held the labs' global lock then, and what the process printed.
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"no teardown within 30 s of {sig!r}; {lock_holders()}; stderr: {err}") from None
    assert proc.returncode != 0, err   # it still dies of the signal (or KeyboardInterrupt)
    if sig != signal.SIGINT:
        assert proc.returncode == -sig, err
    assert_gone(info["prefix"], info["run_dir"], info["pids"])


def test_cleanup_stale_after_sigkill_spares_others(lab: Lab) -> None:
    foreign = f"sgltest-{os.urandom(3).hex()}-node"  # not our prefix pattern: must survive
    orphan = f"sgl-{os.urandom(3).hex()}-node"        # our pattern, no record: stale
    try:
        proc, info = spawn_lab_process("    extra.append(lab.popen(lab.node, ['sleep', '300']).pid)\n")
        sleeper = info["extra"][0]
        for n in (foreign, orphan):  # after the spawn: Lab.start() runs cleanup_stale() too
            subprocess.run(["ip", "netns", "add", n], check=True)
        proc.kill()
        proc.wait(10)
        time.sleep(0.3)  # PR_SET_PDEATHSIG kills the servers; the plain sleeper lives on
        assert len(lab_namespaces(info["prefix"])) == 2
        assert (RUN_DIR / f"{info['prefix']}.pid").exists()
        assert alive(sleeper), "a process without die_with_parent outlives its lab's creator"
        assert not any(alive(p) for p in info["pids"] if p != sleeper), "servers die with the creator"
        # Through the command an operator runs, which says what it removed.
        cleanup = subprocess.run([sys.executable, "-m", "runtime.cli.main", "lab-cleanup", "--json"],
                                 capture_output=True, text=True, timeout=60)
        assert cleanup.returncode == 0, cleanup.stderr
        cleaned = json.loads(cleanup.stdout)["removed"]
        assert info["prefix"] in cleaned and orphan[:10] in cleaned and lab.prefix not in cleaned
        assert not os.path.exists(f"/run/netns/{orphan}")
        assert_gone(info["prefix"], info["run_dir"], info["pids"] + [sleeper])
        assert os.path.exists(f"/run/netns/{foreign}")
        assert len(lab_namespaces(lab.prefix)) >= 2 and lab.probe(lab.node, "tcp", LAB.public_v4, 80).ok
    finally:
        for n in (foreign, orphan):
            subprocess.run(["ip", "netns", "del", n], check=False, capture_output=True)


def test_host_root_netns_is_unchanged() -> None:
    before = host_snapshot()
    with Lab() as lab:
        lab.add_app("h")
        assert lab.probe(lab.node, "tcp", LAB.public_v4, 80).ok
        during = host_snapshot()
    after = host_snapshot()
    assert during == before
    assert after == before
