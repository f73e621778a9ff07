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


def test_the_trim_deletes_what_an_attachment_holds_beyond_its_bounds_and_nothing_else(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from runtime.agent import closing_trim
    from runtime.kernel.netlink import conntrack
    from runtime.kernel.netlink.conntrack import DumpedEntry
    from runtime.state.store import READY, Attachment, AttachmentStore, network_root

    store = AttachmentStore(network_root(str(tmp_path), "net") / "attachments")
    for cid, n in (("closing", 1), ("live", 2), ("within", 3)):
        store.save(Attachment("net", cid, "eth0", "/run/netns/x", f"sg{cid}", ipv4=f"10.77.0.{n}",
                              ipv6=f"fd77::{n}", state=READY))
    bounds = FlowBounds(max_flows=16, new_flows_per_second=4, new_flows_burst=4)   # closing: 44

    def made(src: str, n: int, closing: bool, tag: bytes) -> list[DumpedEntry]:
        return [DumpedEntry(src, 10 if ":" in src else 2, tag, closing) for _ in range(n)]
    found = {
        # 30 + 20 closing over its two addresses (50 > 44), and 10 live: the closing go.
        "10.77.0.1": made("10.77.0.1", 30, True, b"c1") + made("10.77.0.1", 10, False, b"l1"),
        "fd77::1": made("fd77::1", 20, True, b"c1"),
        # 44 closing (at its bound) and 40 live: the live beyond 16 + SLACK go.
        "10.77.0.2": made("10.77.0.2", 44, True, b"c2") + made("10.77.0.2", 40, False, b"l2"),
        # At both bounds: nothing.
        "10.77.0.3": made("10.77.0.3", 44, True, b"c3") + made("10.77.0.3", 16 + closing_trim.SLACK, False, b"l3"),
        "192.0.2.9": made("192.0.2.9", 100, True, b"x"),   # no container's, and in no pool
        # A deleted container's, in the pools and routed nowhere: every one goes.
        "10.77.0.9": made("10.77.0.9", 5, False, b"g9"),
        "fd77::9": made("fd77::9", 3, True, b"g9"),
        # Routed into a veth, a container no record of this state dir names (another
        # state dir's, or one being added): stays.
        "10.77.0.8": made("10.77.0.8", 100, True, b"o8"),
    }
    deleted: list[bytes] = []

    class FakeConntrack:
        def entries_by_source(self):
            return found

        def delete(self, family, attrs):
            deleted.append(attrs)
            return True

        def close(self):
            pass
    monkeypatch.setattr(conntrack, "Conntrack", FakeConntrack)
    from runtime.kernel import netns, nft
    monkeypatch.setattr(nft, "prefixes", {"pools4": ["10.77.0.0/16"], "pools6": ["fd77::/64"]}.get)
    monkeypatch.setattr(netns, "routed_to_containers",
                        lambda: {"10.77.0.1", "fd77::1", "10.77.0.2", "10.77.0.3", "10.77.0.8"})
    policies = SimpleNamespace(get=lambda *_: SimpleNamespace(egress=SimpleNamespace(bounds=bounds)))
    trim = closing_trim.ClosingTrim("policy.json", str(tmp_path), policies=policies)
    over = 40 - 16 - closing_trim.SLACK
    assert trim.trim() == {"closing/eth0 (net)": 50, "live/eth0 (net)": over}
    assert sorted(deleted) == sorted([b"g9"] * 8 + [b"c1"] * 50 + [b"l2"] * over) and trim.deleted == 50 + over
    assert trim.forgotten == 8
