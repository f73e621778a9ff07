"""The operator's commands without root: the sweep of vanished attachments on the
core's fake backends, doctor's checks on a /proc of the test's own and a fake
iptables, status's readers (pools, events) and its rendering. The same commands on a
real kernel: tests/test_ops.py."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from runtime.agent.sweep import AttachmentSweep, sweep_all
from runtime.cli import doctor, gc, status
from runtime.cli.main import main
from runtime.core import attach as core
from runtime.core.policy import CompiledPolicies
from runtime.errors import SockgateError
from runtime.state.ipam import Owner
from runtime.state.store import ADDING, READY, attachments
from tests.test_unit_core import NOTHING, Env, make_env


@pytest.fixture(scope="module")
def policies() -> CompiledPolicies:
    return CompiledPolicies()


@pytest.fixture
def env(tmp_path, policies) -> Env:
    return make_env(tmp_path, policies)


def vanish(env: Env, cid: str) -> None:
    """The container's netns went, and the kernel took both ends of its veth."""
    assert env.fake.links._delete(core.Network(env.conf).attachments.load(cid, "eth0").host_ifname)


# --- the sweep (runtime.core.attach.sweep) ---------------------------------------------

def test_sweep_removes_only_the_attachments_whose_veth_is_gone(env):
    gone = env.attach("gone")
    kept = env.attach("kept")
    env.fake.table.count(gone.host_ifname, "tx4", 3, 1000)
    vanish(env, "gone")
    swept = core.sweep(env.fake.node, env.conf)
    assert [(v.att.container_id, v.att.ifname) for v in swept.removed] == [("gone", "eth0")]
    assert "veth" in swept.removed[0].why and "still opens" in swept.removed[0].why
    left = env.leftovers()
    assert left["records"] == [("kept", "eth0")] and left["leases"] == [("kept", "eth0")]
    assert env.fake.table.owners()["tx4"] == {kept.host_ifname}
    # The gone one was billed a final record, as at DEL.
    records = [json.loads(line) for line in (Path(env.conf.billing_dir) / "billing.jsonl").read_text().splitlines()]
    assert [(r["container_id"], r["final"], r["tx_bytes"]) for r in records] == [("gone", True, 1000)]
    assert core.sweep(env.fake.node, env.conf).removed == []  # nothing more to do


def test_sweep_never_touches_an_attachment_being_added(env, monkeypatch):
    """Mid-ADD the record says `adding` and the veth may not exist yet: a sweep then
    (here: from inside create_veth, before the veth is made) must leave it alone."""
    real = env.fake.links.create_veth
    seen = []

    def create_veth(*args, **kw):
        record = core.Network(env.conf).attachments.load("new", "eth0")
        seen.append(record.state)
        seen.append(core.sweep(env.fake.node, env.conf).removed)
        return real(*args, **kw)

    monkeypatch.setattr(env.fake.links, "create_veth", create_veth)
    att = env.attach("new")
    assert seen == [ADDING, []]
    assert att.state == READY and env.leftovers()["records"] == [("new", "eth0")]
    assert env.leftovers()["leases"] == [("new", "eth0")]


def test_a_record_replaced_after_the_listing_is_not_removed(env, monkeypatch):
    """vanished() lists the old record; DEL and a new ADD of the same key happen
    before the removal takes the locks: the new attachment stays."""
    env.attach("c")
    vanish(env, "c")
    [old] = core.vanished(env.fake.node, attachments(env.conf.state_dir, env.conf.name).records)
    core.detach(env.fake.node, env.conf, "c", "eth0")
    new = env.attach("c")
    assert core.remove_vanished(env.fake.node, env.conf, old) is None
    assert env.leftovers()["records"] == [("c", "eth0")] and env.fake.links.node_links() == {new.host_ifname}


def test_sweep_frees_leases_without_a_record_and_keeps_the_skipped(env):
    env.attach("docker-one")
    net = core.Network(env.conf)
    att = net.attachments.load("docker-one", "eth0")
    att.labels["docker_endpoint_id"] = "docker-one"
    net.attachments.save(att)
    vanish(env, "docker-one")
    # An ADD killed between its lease and its record.
    net.leases.allocate(env.conf.ipv4_pool, Owner("crashed", "eth0"))
    done = sweep_all(env.fake.node, env.conf.state_dir, env.conf.run_dir, env.conf.policy_file)
    assert done[env.conf.name].removed == []  # the Docker door's own sweep owns it
    assert done[env.conf.name].leftovers.leases == [("crashed", "eth0")]
    assert env.leftovers()["leases"] == [("docker-one", "eth0")]
    # `sockgate gc` takes the Docker door's too.
    report = gc.run_gc(env.conf.state_dir, env.conf.run_dir, env.conf.policy_file, node=env.fake.node)
    assert [(r.container_id, r.network) for r in report.removed] == [("docker-one", env.conf.name)]
    assert env.leftovers() == NOTHING


def test_agent_component_sweeps_at_start_and_counts(env):
    import threading
    env.attach("a")
    vanish(env, "a")
    sweeper = AttachmentSweep(env.fake.node, env.conf.state_dir, env.conf.run_dir, env.conf.policy_file,
                              interval=3600)
    stop = threading.Event()
    stop.set()  # one sweep (the one at start), then return
    sweeper.run(stop)
    assert sweeper.removed == 1 and env.leftovers() == NOTHING
    with pytest.raises(ValueError):
        AttachmentSweep(env.fake.node, env.conf.state_dir, env.conf.run_dir, env.conf.policy_file, interval=0)


def test_gc_refuses_where_no_veth_and_no_table_exist_unless_forced(env):
    env.attach("a")
    env.attach("b")
    vanish(env, "a")
    vanish(env, "b")
    env.fake.table.flush()  # as seen from a netns that isn't the node's: no table either
    env.fake.table.revision = None
    with pytest.raises(SockgateError) as err:
        gc.run_gc(env.conf.state_dir, env.conf.run_dir, env.conf.policy_file, node=env.fake.node)
    assert "node's network namespace" in str(err.value)
    assert len(env.leftovers()["records"]) == 2
    report = gc.run_gc(env.conf.state_dir, env.conf.run_dir, env.conf.policy_file, node=env.fake.node, force=True)
    assert sorted(r.container_id for r in report.removed) == ["a", "b"]
    assert "removed 2 attachment(s)" in gc.render(report)
    with pytest.raises(SockgateError, match="no network 'nope'"):
        gc.run_gc(env.conf.state_dir, env.conf.run_dir, env.conf.policy_file, network="nope", node=env.fake.node)


# --- doctor's checks ------------------------------------------------------------------

def fake_proc(tmp: Path, **values: str) -> str:
    """A /proc with the given sysctls (net.ipv4.ip_forward="1") and /proc/net files
    (net/ip_tables_names="filter")."""
    root = tmp / "proc"
    for key, value in values.items():
        path = root / key if key.startswith("net/") else root / "sys" / key.replace(".", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    return str(root)


HEALTHY = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1",
           "net.netfilter.nf_conntrack_events": "2", "net.netfilter.nf_conntrack_acct": "0",
           "net.netfilter.nf_conntrack_max": "262144"}


class FakeIptables:
    """`<tool> -w 5 -S CHAIN` answers, per tool name."""

    def __init__(self, chains: dict[str, dict[str, str]]) -> None:
        self.chains = chains
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess:
        self.calls.append(argv)
        assert argv[1:4] == ["-w", "5", "-S"], argv  # reads only
        # A table that doesn't exist lists as the built-in chain with policy ACCEPT.
        text = self.chains.get(Path(argv[0]).name, {}).get(argv[4], "-P FORWARD ACCEPT\n" if argv[4] == "FORWARD"
                                                                     else None)
        if text is None:
            return subprocess.CompletedProcess(argv, 1, "", f"chain `{argv[4]}' does not exist")
        return subprocess.CompletedProcess(argv, 0, text, "")


def cfg_of(tmp_path: Path, iptables: FakeIptables | None = None, **sysctls: str) -> doctor.DoctorConfig:
    return doctor.DoctorConfig(state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"),
                               policy_file=str(tmp_path / "policy.json"),
                               proc=fake_proc(tmp_path, **{**HEALTHY, **sysctls}),
                               run=iptables or FakeIptables({}), which=lambda name: f"/usr/sbin/{name}")


def test_forwarding(tmp_path):
    assert doctor.check_forwarding(cfg_of(tmp_path)).ok
    off = doctor.check_forwarding(cfg_of(tmp_path / "off", **{"net.ipv6.conf.all.forwarding": "0"}))
    assert not off.ok and "net.ipv6.conf.all.forwarding=0" in off.detail
    assert off.fix.startswith("sysctl -w net.ipv6.conf.all.forwarding=1")


def test_conntrack_events_and_accounting(tmp_path):
    ok = doctor.check_conntrack(cfg_of(tmp_path))
    assert ok.ok and "nf_conntrack_acct=0" in ok.detail
    off = doctor.check_conntrack(cfg_of(tmp_path / "off", **{"net.netfilter.nf_conntrack_events": "0"}))
    assert not off.ok and "nf_conntrack_events=1" in off.fix


def test_conntrack_max_against_the_expected_containers(tmp_path):
    cfg = cfg_of(tmp_path)
    assert doctor.check_conntrack_max(cfg).ok  # nothing attached
    # 88 containers at the default bound (2224 entries) fit in 75 % of 262144; 110 don't.
    cfg.expected_containers = 110
    planned = doctor.check_conntrack_max(cfg)
    assert not planned.ok and "nf_conntrack_max=326187" in planned.fix
    cfg.expected_containers = 88
    assert doctor.check_conntrack_max(cfg).ok


class FakeIp:
    """`ip -j link show` and `ip -j -4|-6 route show default` answers (reads only)."""

    def __init__(self, links: list[dict], v4: list[dict], v6: list[dict] | None = None) -> None:
        self.answers = {("link", "show"): [{}] + links, ("-4", "route", "show", "default"): v4,
                        ("-6", "route", "show", "default"): v6 or []}

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess:
        assert argv[:2] == ["/usr/sbin/ip", "-j"], argv
        return subprocess.CompletedProcess(argv, 0, json.dumps(self.answers[tuple(argv[2:])]), "")


def _link(name: str, mtu: int, group: str = "default") -> dict:
    return {"ifname": name, "mtu": mtu, "group": group}


@pytest.mark.parametrize("links, v4, ok, words", [
    # The node's end of a veth is 4 bytes below the network's mtu, and takes 4 more.
    ([_link("eth0", 1460), _link("sg01", 1456, "21319")], [{"dst": "default", "dev": "eth0"}], True,
     "1 container veths at most the default route's MTU 1460 (via eth0 (IPv4))"),
    # GCE's 1460 with the network's default mtu: the one that fails.
    ([_link("eth0", 1460), _link("sg01", 1496, "21319"), _link("sg02", 1456, "21319"), _link("docker0", 1500)],
     [{"dst": "default", "dev": "eth0"}], False, "1 of 2 container veths (sg01) take packets above 1460 bytes"),
    # A veth an earlier sockgate made, both ends at the network's mtu.
    ([_link("eth0", 1500), _link("sg01", 1500, "21319")], [{"dst": "default", "dev": "eth0"}], False,
     "(sg01) take packets above 1500 bytes"),
    # ip_forward honours a route's MTU metric over its device's.
    ([_link("eth0", 1500), _link("sg01", 1496, "21319")],
     [{"dst": "default", "dev": "eth0", "metrics": [{"mtu": 1400}]}], False, "above 1400"),
    ([_link("eth0", 1500), _link("eth1", 1400), _link("sg01", 1496, "21319")],
     [{"dst": "default", "nexthops": [{"dev": "eth0"}, {"dev": "eth1"}]}], False, "via eth1 (IPv4)"),
    ([_link("eth0", 1460)], [{"dst": "default", "dev": "eth0"}], True, "no container veth here"),
    ([_link("sg01", 9000, "21319")], [], True, "no default route"),
])
def test_mtu(tmp_path, links, v4, ok, words):
    cfg = cfg_of(tmp_path)
    cfg.run = FakeIp(links, v4)
    result = doctor.check_mtu(cfg)
    assert result.ok is ok and words in result.detail, result
    if not ok:
        assert result.fix.startswith(f"set the network's mtu to {'1500' if 'above 1500' in words else '14'}")


@pytest.mark.parametrize("extra, ok, words", [
    ([], True, "every container veth here (1) is recorded in"),
    ([_link("sgforeign", 1456, "21319")], False, "1 of 2 container veths are not recorded in"),
    ([_link("docker0", 1500)], True, "every container veth here (1)"),  # not sockgate's group: not counted
])
def test_state_dir(tmp_path, policies, extra, ok, words):
    env = make_env(tmp_path, policies)
    att = env.attach("c1")
    cfg = dataclasses.replace(cfg_of(tmp_path), state_dir=env.conf.state_dir)
    cfg.run = FakeIp([_link("eth0", 1500), _link(att.host_ifname, 1456, "21319"), *extra], [])
    result = doctor.check_state_dir(cfg)
    assert result.ok is ok and words in result.detail, result
    assert ok or ("sgforeign" in result.detail and result.fix.startswith("use one stateDir per node"))


DOCKER_FORWARD = "-P FORWARD DROP\n-A FORWARD -j DOCKER-USER\n-A FORWARD -j DOCKER-FORWARD\n"
OUR_RULES = ('-A DOCKER-USER -o sg+ -m comment --comment "sockgate: veths policed by table inet sockgate" -j ACCEPT\n'
             '-A DOCKER-USER -i sg+ -m comment --comment "sockgate: veths policed by table inet sockgate" -j ACCEPT\n')


@pytest.mark.parametrize("chains, ok, words", [
    ({}, True, "ip6tables-nft: FORWARD policy ACCEPT"),
    ({"iptables-nft": {"FORWARD": "-P FORWARD ACCEPT\n"}}, True, "FORWARD policy ACCEPT"),
    ({"iptables-nft": {"FORWARD": DOCKER_FORWARD, "DOCKER-USER": "-N DOCKER-USER\n"}}, False,
     "no ACCEPT for -i sg+ and -o sg+ in DOCKER-USER"),
    ({"iptables-nft": {"FORWARD": DOCKER_FORWARD, "DOCKER-USER": "-N DOCKER-USER\n" + OUR_RULES}}, True,
     "accepted in DOCKER-USER"),
    # dockerd 20.10 makes no DOCKER-USER for IPv6: the rules go on top of FORWARD.
    ({"ip6tables-nft": {"FORWARD": "-P FORWARD DROP\n-A FORWARD -i sg+ -j ACCEPT\n"}}, False,
     "no ACCEPT for -o sg+ in FORWARD (no DOCKER-USER chain)"),
])
def test_docker_forward(tmp_path, chains, ok, words):
    fake = FakeIptables(chains)
    result = doctor.check_docker_forward(cfg_of(tmp_path, fake))
    assert result.ok is ok and words in result.detail, result
    if not ok:
        assert "-I DOCKER-USER -i sg+ -j ACCEPT" in result.fix
    # The legacy tools are asked only where a legacy filter table exists.
    assert not any("legacy" in argv[0] for argv in fake.calls)


def test_legacy_tables(tmp_path):
    assert doctor.check_iptables_legacy(cfg_of(tmp_path)).ok
    fake = FakeIptables({"iptables-legacy": {"FORWARD": DOCKER_FORWARD}})
    cfg = cfg_of(tmp_path / "legacy", fake, **{"net/ip_tables_names": "nat\nfilter"})
    found = doctor.check_iptables_legacy(cfg)
    assert not found.ok and "IPv4: nat, filter" in found.detail
    forward = doctor.check_docker_forward(cfg)
    assert not forward.ok and "iptables-legacy: FORWARD policy DROP" in forward.detail


def write_cache(state: Path, age_s: float) -> Path:
    path = state / "ranges" / "google.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    updated = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - age_s))
    path.write_text(json.dumps({"updated": updated, "ipv4": ["8.8.8.0/24"], "ipv6": []}))
    return path


def test_ranges_cache(tmp_path):
    cfg = cfg_of(tmp_path)  # no policy file: the default, which names Google's URLs
    missing = doctor.check_ranges(cfg)
    assert not missing.ok and "CNI code 50" in missing.detail and missing.fix.startswith("sockgate ranges update")
    write_cache(tmp_path / "state", 8 * 86400)
    stale = doctor.check_ranges(cfg)
    assert not stale.ok and "fetched 8 d ago" in stale.detail
    write_cache(tmp_path / "state", 3600)
    assert doctor.check_ranges(cfg).ok
    # Files instead of URLs: stale when a file changed after the cache was made.
    goog, cloud = tmp_path / "goog.json", tmp_path / "cloud.json"
    goog.write_text("{}")
    cloud.write_text("{}")
    Path(cfg.policy_file).write_text(json.dumps({"googleRanges": {"goog": str(goog), "cloud": str(cloud)}}))
    assert not doctor.check_ranges(cfg).ok
    write_cache(tmp_path / "state", 0)
    os.utime(goog, (time.time() - 60, time.time() - 60))
    os.utime(cloud, (time.time() - 60, time.time() - 60))
    assert doctor.check_ranges(cfg).ok


def test_a_check_that_raises_fails_alone(tmp_path, monkeypatch):
    def broken(cfg):
        raise RuntimeError("boom")

    monkeypatch.setattr(doctor, "CHECKS", (broken, doctor.check_forwarding))
    results = doctor.run_checks(cfg_of(tmp_path))
    assert [(c.name, c.ok) for c in results] == [("broken", False), ("forwarding", True)]
    assert "RuntimeError: boom" in results[0].detail
    text = doctor.render(results)
    assert "What to do:" in text and "1 of 2 checks failed" in text
    assert doctor.to_json(results)["ok"] is False


# --- status ---------------------------------------------------------------------------

def test_pools_from_the_cni_config_and_leases(tmp_path):
    state = tmp_path / "state"
    confdir = tmp_path / "net.d"
    confdir.mkdir()
    (confdir / "00-sockgate.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "sg", "plugins": [
            {"type": "sockgate", "ipv4Pool": "10.9.0.0/29", "ipv6Pool": "fd00:9::/125", "stateDir": str(state)}]}))
    (confdir / "10-other.conf").write_text(json.dumps({"cniVersion": "1.0.0", "name": "other", "type": "sockgate"}))
    leases = state / "networks" / "sg" / "leases"
    leases.mkdir(parents=True)
    for name in ("10.9.0.1", "10.9.0.2", "10.8.0.1", "fd00:9::1", ".last-v4"):
        (leases / name).write_text("c\neth0\n")
    rows = status.pool_usage(str(state), str(tmp_path / "run"), "", str(confdir), ["sg"])
    assert [(r.network, r.family, r.pool, r.size, r.leased, r.outside) for r in rows] == [
        ("sg", "ipv4", "10.9.0.0/29", 6, 3, 1), ("sg", "ipv6", "fd00:9::/125", 7, 1, 0)]
    # A network with leases and no config found (the other config keeps its state elsewhere).
    (state / "networks" / "lost" / "leases").mkdir(parents=True)
    rows = status.pool_usage(str(state), str(tmp_path / "run"), "", str(confdir), ["lost"])
    lost = [r for r in rows if r.network == "lost"]
    assert [(r.pool, r.size) for r in lost] == [(None, None)] * 2 and "no config found" in lost[0].source
    assert {r.network for r in rows} == {"lost", "sg"}  # a configured network is shown without attachments too


def test_recent_refusals_are_the_last_events_oldest_first(tmp_path):
    events = tmp_path / "events"
    events.mkdir()
    for name, n in (("events.jsonl.2", 1), ("events.jsonl.1", 2), ("events.jsonl", 3)):
        (events / name).write_text(json.dumps({"n": n, "pod": "ns/p"}) + "\n"
                                   + ('{"n": 99' if name == "events.jsonl" else ""))  # a line being written
    assert [e["n"] for e in status.recent_refusals(str(tmp_path), 2)[0]] == [2, 3]
    assert status.recent_refusals(str(tmp_path), 0) == ([], "")
    assert status.recent_refusals(str(tmp_path / "none"), 5) == ([], "")


def test_age_text():
    assert [status.age_text(s) for s in (None, 3, 300, 7200, 3 * 86400)] == ["?", "3 s", "5 min", "2 h", "3 d"]


def test_status_renders_a_down_agent_and_json(tmp_path, capsys):
    state, run = tmp_path / "state", tmp_path / "run"
    # A record left by a killed agent: status says down, and what the record names.
    run.mkdir()
    (run / "agent.json").write_text(json.dumps({"pid": 4242, "version": "9.9", "started": "2026-12-06T08:00:00+00:00"}))
    st = status.Status(agent=status.agent_state(str(run)), table=status.TableState(False, detail="no table"),
                       policy=status.file_state(tmp_path / "none.json"), ranges=status.ranges_state(str(state)),
                       pools=[], attachments=[], refusals=[{"time": "t", "pod": "ns/p", "destination": "10.0.0.1",
                                                            "port": 25, "protocol": "tcp", "reason": "blocked-port",
                                                            "rule": "blocked port 25"}])
    text = status.render(st)
    assert "agent:    DOWN: no socket at" in text and "pid 4242" in text
    assert "ranges:   " in text and "MISSING" in text and "blocked port 25" in text
    doc = json.loads(json.dumps(st.to_json()))
    assert doc["agent"]["up"] is False and doc["agent"]["pid"] == 4242 and doc["refusals"][0]["port"] == 25


def test_commands_are_declared_with_json(capsys):
    for cmd in ("status", "doctor", "gc"):
        with pytest.raises(SystemExit) as done:
            main([cmd, "--help"])
        assert done.value.code == 0
        assert "--json" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        main(["doctor", "--expected-containers", "-1"])
    assert bad.value.code == 2


def test_stale_lab_namespaces_are_listed_without_deleting(tmp_path, monkeypatch):
    from runtime.lab import builder
    run, netns = tmp_path / "lab-run", tmp_path / "netns"
    run.mkdir()
    netns.mkdir()
    monkeypatch.setattr(builder, "RUN_DIR", run)
    monkeypatch.setattr(builder, "NETNS_DIR", netns)
    me = builder._proc_start(os.getpid())
    names = ["sgl-aaaaaa-node", "sgl-bbbbbb-node", "sgl-cccccc-node", "sgl-cccccc-app1", "other-ns"]
    for name in names:
        (netns / name).touch()
    # A live lab (this process), a dead one (a pid that can't be running), an orphan.
    builder._Record("sgl-aaaaaa", os.getpid(), me, ["sgl-aaaaaa-node"], 0.0).save()
    builder._Record("sgl-bbbbbb", os.getpid(), me + 1, ["sgl-bbbbbb-node"], 0.0).save()
    assert builder.Lab.stale_namespaces() == ["sgl-bbbbbb-node", "sgl-cccccc-app1", "sgl-cccccc-node"]
    assert sorted(os.listdir(netns)) == sorted(names)  # nothing deleted
    check = doctor.check_lab_namespaces(doctor.DoctorConfig())
    assert not check.ok and "3 lab namespace(s)" in check.detail and check.fix == "sockgate lab-cleanup"
