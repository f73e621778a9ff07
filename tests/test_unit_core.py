"""The core (runtime.core.attach with runtime.core.table and runtime.core.restore) on fake backends
(tests/support/fakes.py): ADD, DEL, CHECK, GC and their rollbacks, without root."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.core import attach as core
from runtime.core import restore
from runtime.core.netconf import NetConf, parse_netconf
from runtime.core.policy import CompiledPolicies
from runtime.errors import (
    ALREADY_ATTACHED,
    CHECK_FAILED,
    INVALID_CONFIG,
    KERNEL_FAILURE,
    NOT_AVAILABLE,
    UNKNOWN_CONTAINER,
    SockgateError,
)
from runtime.state.ipam import Owner
from runtime.state.store import ADDING, READY, attachments, host_ifname
from tests.support.fakes import NODE_NETNS, FakeNode, fake_node

NETWORK = "unit"


@pytest.fixture(scope="module")
def policies() -> CompiledPolicies:
    # Compiling takes ~15 ms: once for the module (the cache is keyed by the files' stamps).
    return CompiledPolicies()


@dataclass
class Env:
    conf: NetConf
    fake: FakeNode
    tmp: Path

    def netns(self, name: str) -> str:
        path = self.tmp / "netns" / name
        path.parent.mkdir(exist_ok=True)
        path.touch()  # check_netns only stats it
        return str(path)

    def request(self, cid: str, ifname: str = "eth0") -> core.AttachRequest:
        return core.AttachRequest(conf=self.conf, container_id=cid, ifname=ifname, netns=self.netns(cid))

    def attach(self, cid: str, ifname: str = "eth0"):
        return core.attach(self.fake.node, self.request(cid, ifname))

    @property
    def net(self) -> core.Network:
        return core.Network(self.conf)

    def leftovers(self) -> dict:
        """Everything an attachment can leave: records, leases, links, routes, elements."""
        net = self.net
        listing = attachments(self.conf.state_dir, self.conf.name)
        return {"records": sorted(a.key for a in listing.records) + [str(p) for p in listing.unreadable],
                "leases": sorted({(o.container_id, o.ifname) for o in net.leases.leases().values()}),
                **self.fake.links.dump(),
                "elements": self.fake.table.dump()["elements"]}


NOTHING = {"records": [], "leases": [], "links": {}, "routes": {}, "elements": {}}


def make_env(tmp: Path, policies: CompiledPolicies) -> Env:
    state = tmp / "state"
    # The Google ranges as the cache `sockgate ranges update` writes (no fetch on ADD).
    (state / "ranges").mkdir(parents=True)
    (state / "ranges" / "google.json").write_text(json.dumps({"ipv4": ["8.8.8.0/24"],
                                                              "ipv6": ["2001:4860::/32"]}))
    conf = parse_netconf({"cniVersion": "1.1.0", "name": NETWORK, "type": "sockgate", "stateDir": str(state),
                          "runDir": str(tmp / "run"), "policyFile": str(tmp / "policy.json")})
    return Env(conf, fake_node(policies), tmp)


@pytest.fixture
def env(tmp_path, policies) -> Env:
    return make_env(tmp_path, policies)


def owned_by(env: Env, cid: str, ifname: str = "eth0") -> str:
    return host_ifname(NETWORK, cid, ifname)


# --- ADD and DEL ---------------------------------------------------------------------------

def test_attach_then_detach_leaves_nothing(env):
    att = env.attach("c1")
    host = owned_by(env, "c1")
    assert att.state == READY and att.host_ifname == host and att.host_ifindex and att.generation
    assert env.net.attachments.load("c1", "eth0") == att
    assert env.fake.links.node_links() == {host}
    assert env.fake.table.owners() == {s: {host} for s in ("ifaces", "tx4", "tx6", "rx")}
    core.check(env.fake.node, env.conf, "c1", "eth0", env.netns("c1"))
    env.fake.table.count(host, "tx4", 3, 1000)
    assert core.detach(env.fake.node, env.conf, "c1", "eth0") == att
    assert env.leftovers() == NOTHING
    # The final billing record, with the counters read through the node's table.
    records = [json.loads(line) for line in (Path(env.conf.billing_dir) / "billing.jsonl").read_text().splitlines()]
    assert [(r["final"], r["tx_bytes"]) for r in records] == [(True, 1000)]


def test_both_doors_leave_the_container_end_without_segmentation_offload(env):
    # CNI: configured inside the container; Docker: before the runtime moves it there.
    env.attach("c1")
    assert env.fake.links.netns[env.netns("c1")]["eth0"].segmentation is False
    core.attach_unplaced(env.fake.node, core.AttachRequest(conf=env.conf, container_id="d1", ifname="sgd1",
                                                           netns=""))
    assert env.fake.links.netns[NODE_NETNS]["sgd1"].segmentation is False


def test_second_add_refused_and_first_kept(env):
    env.attach("c1")
    with pytest.raises(SockgateError) as err:
        env.attach("c1")
    assert err.value.code == ALREADY_ATTACHED
    core.check(env.fake.node, env.conf, "c1", "eth0", env.netns("c1"))


def test_unwatched_add_loads_a_missing_table_and_restores_the_ready_ones(env):
    env.attach("c1")
    env.fake.table.flush()  # nft flush ruleset
    env.attach("c2")
    assert env.fake.table.owners()["rx"] == {owned_by(env, "c1"), owned_by(env, "c2")}
    assert env.fake.flows.purged == [{env.net.attachments.load("c1", "eth0").ipv4,
                                      env.net.attachments.load("c1", "eth0").ipv6}]


def test_a_reload_turns_off_segmentation_offload_once_for_an_earlier_versions_containers(env):
    att = env.attach("c1")
    # What an earlier sockgate left: the offloads on, nothing about them in the record.
    env.fake.links.netns[env.netns("c1")]["eth0"].segmentation = True
    env.net.attachments.save(dataclasses.replace(att, segmentation_off=False))
    env.fake.table.flush()
    env.attach("c2")  # finds the table missing: reloads it, restoring c1
    assert env.fake.links.netns[env.netns("c1")]["eth0"].segmentation is False
    assert env.net.attachments.load("c1", "eth0") == att
    env.fake.faults.calls.clear()
    env.fake.table.flush()
    env.attach("c3")
    assert "links.stop_container_segmentation" not in env.fake.faults.calls  # once


def test_a_reload_narrows_the_node_end_of_an_earlier_versions_veth_once(env):
    env.attach("c1")
    host = owned_by(env, "c1")
    assert env.fake.links.netns[NODE_NETNS][host].mtu == 1496  # what ADD makes now
    env.fake.links.netns[NODE_NETNS][host].mtu = 1500          # what an earlier sockgate made
    env.fake.table.flush()
    env.attach("c2")  # reload
    assert env.fake.links.netns[NODE_NETNS][host].mtu == 1496
    assert env.fake.links.narrowed == [host]
    env.fake.table.flush()
    env.attach("c3")
    assert env.fake.links.narrowed == [host]  # nothing to do the second time


def test_a_reload_killed_between_the_offloads_and_the_record_does_it_again(env, monkeypatch):
    # The worst moment: the container's offloads are off, its record doesn't say so yet.
    att = env.attach("c1")
    env.fake.links.netns[env.netns("c1")]["eth0"].segmentation = True
    env.net.attachments.save(dataclasses.replace(att, segmentation_off=False))
    env.fake.table.flush()

    def killed(state_dir, att):
        raise KeyboardInterrupt  # SIGKILL's stand-in: nothing after it runs
    monkeypatch.setattr(restore, "_record_segmentation_off", killed)
    with pytest.raises(KeyboardInterrupt):
        env.attach("c2")
    assert env.fake.links.netns[env.netns("c1")]["eth0"].segmentation is False
    assert env.net.attachments.load("c1", "eth0").segmentation_off is False
    monkeypatch.undo()
    env.fake.faults.calls.clear()
    env.fake.table.flush()
    env.attach("c3")  # the next reload does it again (idempotent) and records it
    assert "links.stop_container_segmentation" in env.fake.faults.calls
    assert env.net.attachments.load("c1", "eth0") == att
    assert env.fake.table.owners()["rx"] >= {owned_by(env, "c1"), owned_by(env, "c3")}


@pytest.mark.parametrize("step", ["end_escaped_flows", "stop_tcp_offload"])
def test_a_reload_killed_before_its_last_steps_leaves_a_table_the_next_caller_loads_again(env, monkeypatch, step):
    # Review 10 (F2, F5): killed after the load and before the flows opened without a
    # table were ended (or, without a meter, before the offloads went off), the table
    # was current already, so nothing ever did those steps.
    env.attach("c1")
    env.fake.table.flush()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # SIGKILL's stand-in: nothing after it runs
    monkeypatch.setattr(restore, step, killed)
    monkeypatch.setattr(env.fake.links, "tcp_offload_metered", lambda: False)
    with pytest.raises(KeyboardInterrupt):
        env.attach("c2")
    assert (env.fake.table.revision or "").startswith("pending ")  # loaded, not current
    monkeypatch.undo()
    monkeypatch.setattr(env.fake.links, "tcp_offload_metered", lambda: False)
    env.fake.faults.calls.clear()
    env.attach("c3")  # no flush: the table is there, but not current
    calls = env.fake.faults.calls
    assert calls.count("table.load_table") == 1 and "flows.purge_unmasqueraded" in calls
    assert "links.stop_container_segmentation" in calls
    assert calls.index("flows.purge_unmasqueraded") < calls.index("table.mark_loaded")
    assert not env.fake.table.revision.startswith("pending ")


def test_watched_add_skips_the_rules_check_but_reloads_a_table_it_finds_missing(env):
    env.fake.node.watched = True
    env.attach("c1")
    calls = env.fake.faults.calls
    # No table: the element transaction said so, the table was loaded, the add retried.
    assert calls.count("table.add_if_current") == 2 and env.fake.table.loads == 1
    env.fake.faults.calls.clear()
    env.attach("c2")
    assert "table.table_current" not in env.fake.faults.calls


def test_table_changing_under_every_attempt_fails_and_rolls_back(env):
    env.fake.table.refuse_adds = True
    with pytest.raises(SockgateError) as err:
        env.attach("c1")
    assert err.value.code == KERNEL_FAILURE and "changed under every attempt" in err.value.details
    assert env.fake.faults.calls.count("table.add_if_current") == 3
    assert env.leftovers() == NOTHING


def with_bystander(tmp: Path, policies: CompiledPolicies, watched: bool) -> Env:
    """An attachment ("other") that what follows must leave alone, and no table: the
    next ADD loads it (restoring other's elements) or finds it missing (watched)."""
    env = make_env(tmp, policies)
    env.fake.node.watched = watched
    env.attach("other")
    env.fake.table.flush()
    env.fake.faults.calls.clear()
    return env


def attach_calls(tmp: Path, policies: CompiledPolicies, watched: bool) -> list[str]:
    """The backend calls of one successful attach (see with_bystander)."""
    env = with_bystander(tmp, policies, watched)
    env.attach("c1")
    return list(env.fake.faults.calls)


def assert_only_bystander(env: Env, what: str) -> None:
    left = env.leftovers()
    assert left["records"] == left["leases"] == [("other", "eth0")], what
    assert env.fake.links.node_links() == {owned_by(env, "other")}, what
    assert not [ns for ns in left["links"] if "c1" in ns], what
    assert not [ns for ns in left["routes"] if "c1" in ns], what
    # other's elements, if the table was loaded again (restored) before the failure.
    assert env.fake.table.owners() in ({}, {s: {owned_by(env, "other")} for s in ("ifaces", "tx4", "tx6", "rx")}), \
        what


@pytest.mark.parametrize("watched", [False, True])
def test_rollback_after_a_failure_at_each_step(tmp_path, policies, watched):
    calls = attach_calls(tmp_path / "reference", policies, watched)
    assert {"links.create_veth", "table.load_table", "table.add_if_current", "links.configure_host"} <= set(calls)
    for step, op in enumerate(calls):
        env = with_bystander(tmp_path / f"step{step}", policies, watched)
        env.fake.faults.fail_at = step
        with pytest.raises(SockgateError) as err:
            env.attach("c1")
        what = f"failure at step {step} ({op})"
        assert err.value is env.fake.faults.raised, what  # the backend's error, as it raised it
        assert env.fake.faults.calls[step] == op, what
        assert_only_bystander(env, what)
        # And the same container can be added once the fault is gone.
        env.attach("c1")
        core.check(env.fake.node, env.conf, "c1", "eth0", env.netns("c1"))


def test_invalid_policy_fails_before_the_kernel_is_touched(env):
    Path(env.conf.policy_file).write_text("{not json")
    with pytest.raises(SockgateError) as err:
        env.attach("c1")
    assert err.value.code == INVALID_CONFIG
    assert "links.create_veth" not in env.fake.faults.calls
    assert env.leftovers() == NOTHING


# --- DEL is idempotent ------------------------------------------------------------------

def test_detach_twice_and_detach_of_the_unknown(env):
    env.attach("c1")
    node = env.fake.node
    assert core.detach(node, env.conf, "c1", "eth0") is not None
    assert core.detach(node, env.conf, "c1", "eth0") is None
    assert core.detach(node, env.conf, "never", "eth0") is None
    assert env.leftovers() == NOTHING


def test_detach_with_the_table_gone(env):
    env.attach("c1")
    env.fake.table.flush()
    core.detach(env.fake.node, env.conf, "c1", "eth0")
    assert env.leftovers() == NOTHING


@pytest.mark.parametrize("watched", [False, True])
def test_unwatched_detach_puts_a_missing_table_back_while_others_remain(env, watched):
    # No agent checks the table: else the containers left would go unfiltered until
    # the next ADD, however many DELs came first. Not after the last one.
    env.fake.node.watched = watched
    env.attach("c1")
    env.attach("c2")
    env.fake.table.flush()
    core.detach(env.fake.node, env.conf, "c2", "eth0")
    assert env.fake.table.owners() == ({} if watched else {s: {owned_by(env, "c1")}
                                                           for s in ("ifaces", "tx4", "tx6", "rx")})
    env.fake.table.flush()
    core.detach(env.fake.node, env.conf, "c1", "eth0")
    assert env.fake.table.dump()["present"] is False
    assert env.leftovers() == NOTHING


def test_unwatched_detach_succeeds_when_the_table_cannot_be_loaded(env, caplog):
    env.attach("c1")
    env.attach("c2")
    env.fake.table.flush()
    env.fake.faults.fail_op = "table.load_table"
    assert core.detach(env.fake.node, env.conf, "c2", "eth0") is not None
    assert env.fake.faults.raised is not None and env.fake.table.dump()["present"] is False
    assert "could not be loaded again" in caplog.text and "injected failure" in caplog.text
    assert env.net.attachments.load("c2", "eth0") is None and owned_by(env, "c2") not in env.fake.links.node_links()


@pytest.mark.parametrize("watched", [False, True])
def test_detach_after_an_attach_killed_at_each_step(tmp_path, policies, monkeypatch, watched):
    """A kill -9 mid-ADD leaves what was done so far, rollback included: DEL undoes it."""
    calls = attach_calls(tmp_path / "reference", policies, watched)

    class Killed(BaseException):
        pass

    for step in range(len(calls) + 1):
        env = with_bystander(tmp_path / f"step{step}", policies, watched)
        with monkeypatch.context() as m:
            m.setattr(core, "_teardown", lambda node, net, att: None)  # the process dies: no rollback
            m.setattr(env.fake.faults, "hit", _killer(env.fake.faults, step, Killed))
            if step < len(calls):
                with pytest.raises(Killed):
                    env.attach("c1")
            else:
                env.attach("c1")  # killed after the ADD's answer
        core.detach(env.fake.node, env.conf, "c1", "eth0")
        assert_only_bystander(env, f"killed at step {step}")


def _killer(faults, step: int, killed: type[BaseException]):
    real = faults.hit

    def hit(op: str) -> None:
        if len(faults.calls) == step:
            raise killed(op)
        real(op)
    return hit


def test_detach_rebuilds_from_leases_when_the_record_is_gone(env):
    env.attach("c1")
    host = owned_by(env, "c1")
    # An ADD killed between the lease and the record (or a record lost): the leases and
    # the veth's deterministic name are what DEL has. The elements, without the veth's
    # index, are found by their comment.
    env.net.attachments.delete("c1", "eth0")
    assert core.detach(env.fake.node, env.conf, "c1", "eth0") is None
    assert host not in env.fake.links.node_links()
    assert env.leftovers() == NOTHING


# --- GC ------------------------------------------------------------------------------------

def test_gc_keeps_the_valid_and_removes_the_rest(env):
    for cid in ("keep", "gone1", "gone2"):
        env.attach(cid)
    net = env.net
    # A lease without a record (an ADD killed between the two writes) and its veth.
    net.leases.allocate(env.conf.ipv4_pool, Owner("orphan", "eth0"))
    env.fake.links.create_veth(owned_by(env, "orphan"), env.netns("orphan"), "eth0", 1500)
    # A record torn by a crash of the node.
    (net.root / "attachments" / "torn.json").write_text("{")
    removed = core.gc(env.fake.node, env.conf, {("keep", "eth0")})
    assert removed == [("gone1", "eth0"), ("gone2", "eth0"), ("orphan", "eth0")]
    left = env.leftovers()
    assert left["records"] == left["leases"] == [("keep", "eth0")]
    assert env.fake.links.node_links() == {owned_by(env, "keep")}
    assert env.fake.table.owners() == {s: {owned_by(env, "keep")} for s in ("ifaces", "tx4", "tx6", "rx")}
    assert not (net.root / "attachments" / "torn.json").exists()
    core.check(env.fake.node, env.conf, "keep", "eth0", env.netns("keep"))
    assert core.gc(env.fake.node, env.conf, {("keep", "eth0")}) == []


# --- CHECK -------------------------------------------------------------------------------------

def check_error(env: Env, cid: str = "c1", netns: str | None = None) -> SockgateError:
    with pytest.raises(SockgateError) as err:
        core.check(env.fake.node, env.conf, cid, "eth0", netns if netns is not None else env.netns(cid))
    return err.value


def test_check_errors(env):
    assert check_error(env, "never").code == CHECK_FAILED
    att = env.attach("c1")
    assert check_error(env, netns=str(env.tmp / "no-such-netns")).code == UNKNOWN_CONTAINER
    links = env.fake.links
    container = links.netns[env.netns("c1")]["eth0"]
    container.addresses.discard(att.ipv4)
    links.routes[env.netns("c1")] = {r for r in links.routes[env.netns("c1")] if r[0] != "::/0"}
    links.routes[NODE_NETNS].discard((f"{att.ipv6}/128", att.host_ifname, ""))
    del env.fake.table.sets["tx6"]
    err = check_error(env)
    assert err.code == CHECK_FAILED
    assert err.details.split("; ") == [f"address {att.ipv4} missing on eth0", "IPv6 default route missing",
                                       f"node route to {att.ipv6}/128 missing", "nft element missing from set tx6"]
    links.delete_link(att.host_ifname)  # the container's end goes with it
    assert check_error(env).details.startswith("interface eth0 missing")
    assert f"host interface {att.host_ifname} missing" in check_error(env).details


def test_check_of_an_attachment_not_ready(env):
    att = env.attach("c1")
    att.state = ADDING
    env.net.attachments.save(att)
    assert check_error(env).code == CHECK_FAILED


# --- STATUS ------------------------------------------------------------------------------------

def test_status(env):
    core.status(env.fake.node, env.conf)
    assert env.fake.table.loads == 1
    env.fake.table.flush()
    env.fake.faults.fail_op = "table.load_table"
    with pytest.raises(SockgateError) as err:
        core.status(env.fake.node, env.conf)
    assert err.value.code == NOT_AVAILABLE
