"""The conntrack budget the agent reports (pure arithmetic on the policy's limits)."""
from netpolicy.ruleset import CLOSING_S, FlowBounds
from runtime.agent.conntrack_budget import CONTAINER_SHARE, Budget


def test_a_container_at_its_bound_includes_its_closing_flows():
    b = FlowBounds(max_flows=1000, new_flows_per_second=50, new_flows_burst=100)
    assert b.entries == 1000 + 100 + 50 * CLOSING_S


def test_room_fits_and_the_value_to_set():
    bounds = FlowBounds()                      # 2224 entries per container
    table = 262144
    room = int(table * CONTAINER_SHARE) // bounds.entries
    assert Budget(table, bounds, room).fits and not Budget(table, bounds, room + 1).fits
    short = Budget(table, bounds, room + 12)
    # The advised maximum holds every attached container within the share, exactly.
    assert Budget(short.needed_max, bounds, short.attachments).fits
    assert not Budget(short.needed_max - bounds.entries, bounds, short.attachments).fits
    assert "nf_conntrack_max is 262144" in short.describe() and f"holds {room} containers" in short.describe()


def test_the_trim_deletes_every_closing_entry_of_a_container_over_its_bound_and_no_other(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from runtime.agent import closing_trim
    from runtime.kernel.netlink import conntrack
    from runtime.state.store import READY, Attachment, AttachmentStore, network_root

    store = AttachmentStore(network_root(str(tmp_path), "net") / "attachments")
    for cid, n in (("over", 1), ("under", 2)):
        store.save(Attachment("net", cid, "eth0", "/run/netns/x", f"sg{cid}", ipv4=f"10.77.0.{n}",
                              ipv6=f"fd77::{n}", state=READY))
    bounds = FlowBounds(max_flows=16, new_flows_per_second=4, new_flows_burst=4)   # closing: 44
    # "over": 30 + 20 closing entries over its two addresses (50 > 44); "under": 44;
    # a source that is no container's: 100.
    found = {"10.77.0.1": [(2, b"a")] * 30, "fd77::1": [(10, b"b")] * 20, "10.77.0.2": [(2, b"c")] * 44,
             "192.0.2.9": [(2, b"d")] * 100}
    deleted: list[bytes] = []

    class FakeConntrack:
        def closing_entries(self):
            return found

        def delete(self, family, attrs):
            deleted.append(attrs)
            return True

        def close(self):
            pass
    monkeypatch.setattr(conntrack, "Conntrack", FakeConntrack)
    policies = SimpleNamespace(get=lambda *_: SimpleNamespace(egress=SimpleNamespace(bounds=bounds)))
    trim = closing_trim.ClosingTrim("policy.json", str(tmp_path), policies=policies)
    assert trim.trim() == {"over/eth0 (net)": 50}
    assert sorted(set(deleted)) == [b"a", b"b"] and len(deleted) == 50 and trim.deleted == 50
