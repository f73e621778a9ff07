"""The table rendering (pure)."""
import sys

import pytest

from netpolicy.ruleset import (
    EVENT_REASONS,
    EVENTS_NFLOG_GROUP,
    EgressPolicy,
    Endpoint,
    EventRate,
    FlowBounds,
    add_endpoint,
    add_pools,
    endpoint_elements,
    endpoint_keys,
    event_chain,
    meter_key,
    meter_record_script,
    render_table,
    renew_counted_script,
)


def test_render_is_deterministic_and_idempotent_in_form():
    text = render_table()
    assert text == render_table()
    # Every chain is flushed before it is filled: loading twice never duplicates rules.
    for chain in ("forward", "input", "output", "postrouting", "from_container", "egress_policy"):
        assert f"flush chain inet sockgate {chain}\n" in text
    assert "masquerade fully-random" in text
    assert "ct state invalid counter drop" in text


def test_the_meter_record_is_declared_by_the_rendering_and_written_by_the_load_alone():
    """A rendering never empties the record (a table rendered again keeps counting
    along the same meter); the load writes it in the same transaction as the elements.
    Renewing the counted elements touches those of the endpoints it restores alone."""
    text = render_table()
    assert "add set inet sockgate segment_meter { type mark; }" in text
    assert "flush set inet sockgate segment_meter" not in text
    assert meter_record_script(77) == ("flush set inet sockgate segment_meter\n"
                                       "add element inet sockgate segment_meter { 77 }\n")
    assert meter_key(77) == (77).to_bytes(4, sys.byteorder)
    ep = Endpoint("sgabc", 42, "10.77.0.5", "fd77::5")
    assert renew_counted_script([ep]).splitlines() == [
        f"{op} element inet sockgate {s} {{ {key} }}"
        for s, key in (("tx4", "42 . 10.77.0.5"), ("tx6", "42 . fd77::5"), ("rx", "42")) for op in ("add", "delete")]


def test_policy_plugs_into_egress_chain():
    text = render_table(EgressPolicy(sets=(("blocked4", "type ipv4_addr; flags interval"),),
                                     rules=("ip daddr @blocked4 drop",)))
    assert "add set inet sockgate blocked4 { type ipv4_addr; flags interval; }" in text
    assert "add rule inet sockgate egress_policy ip daddr @blocked4 drop" in text


def test_endpoint_elements_as_text_and_as_kernel_keys():
    ep = Endpoint("sgabc", 42, "10.77.0.5", "fd77::5")
    add = add_endpoint(ep)
    # Keyed by interface index; counted elements name their veth for billing.
    assert 'add element inet sockgate tx4 { 42 . 10.77.0.5 comment "sgabc" }' in add
    assert 'add element inet sockgate rx { 42 comment "sgabc" }' in add
    assert 'add element inet sockgate ifaces { "sgabc" }' in add
    # The binary keys (runtime.kernel.netlink.nftables) are the same elements, in the same order: a
    # host-order u32 index, then the address in network order; names NUL-padded.
    keys = dict(endpoint_keys(ep))
    assert [s for s, _ in endpoint_keys(ep)] == [s for s, _ in endpoint_elements(ep)]
    assert keys["tx4"] == (42).to_bytes(4, sys.byteorder) + bytes([10, 77, 0, 5])
    assert keys["tx6"] == (42).to_bytes(4, sys.byteorder) + bytes.fromhex("fd77" + "00" * 12 + "0005")
    assert keys["rx"] == (42).to_bytes(4, sys.byteorder)
    assert keys["ifaces"] == b"sgabc" + b"\0" * 11


def test_busy_path_is_one_lookup_before_any_jump():
    forward = [l for l in render_table().splitlines() if l.startswith("add rule inet sockgate forward")]
    # A reply into a container: one lookup; a container's own packet skips it by
    # direction and meets its own lookup next.
    assert ("forward ct direction reply meta iifgroup != 0x5347 ct state established,related "
            "meta oif @rx accept") in forward[0]
    # Then a test every packet but a TCP SYN fails on its first expressions (the
    # protocol, then the flags), before the container's own lookup.
    assert forward[1].startswith("add rule inet sockgate forward tcp flags & (syn | ack) == syn ")
    assert forward[2].endswith("forward ct state established meta iif . ip saddr @tx4 accept")
    assert "jump" not in " ".join(forward[:5])
    # What lets a packet into a container without its flow's first packet being
    # checked never takes one that came from a container (forged replies).
    for rule in forward[:5]:
        assert "@rx" not in rule or "meta iifgroup != 0x5347" in rule, rule


def test_a_containers_syn_on_an_established_entry_is_refused_before_the_busy_path():
    # A connection its peer reset, reopened on the same ports: conntrack would take
    # the SYN as part of the old entry and never count the new connection.
    rule = _chain("forward")[1]
    assert rule.startswith("tcp flags & (syn | ack) == syn ct direction original ct state established "
                           "meta iifgroup 0x5347 ")
    assert ends_in(rule, "jump refuse", "tcp-reopen")


def test_revision_stamp_changes_with_the_rules():
    plain, other = render_table(), render_table(EgressPolicy(rules=("meta l4proto icmp drop",)))
    assert "comment \"rev " in plain
    assert plain.split('comment "rev ')[1][:16] != other.split('comment "rev ')[1][:16]


def ends_in(rule: str, verdict: str, reason: str) -> bool:
    """Whether `rule` is counted as "drop:<reason>" and ends in `verdict`: itself, or
    through the reason's event chain (which reports the packet, then ends so)."""
    if not rule.endswith(f'comment "drop:{reason}"'):
        return False
    if f"counter goto {event_chain(reason)} " in rule:
        return _chain(event_chain(reason))[-1] == verdict
    return f"counter {verdict} comment" in rule


def _chain(name: str, text: str = "") -> list[str]:
    prefix = f"add rule inet sockgate {name} "
    return [line.removeprefix(prefix) for line in (text or render_table()).splitlines() if line.startswith(prefix)]


def test_icmp_errors_leave_only_about_the_containers_own_flow():
    rules = _chain("from_container")
    related = [r for r in rules if r.startswith("ct state related")]
    accepts = [r for r in related if r.endswith("accept")]
    # Every accepting rule ties the related flow's original tuple to the sending veth
    # (conntrack relates an error to whichever flow it quotes, whoever owns it), in
    # both directions, v4 and v6, and names the only error types the contract needs.
    assert len(accepts) == 4
    for r in accepts:
        assert "meta iif . ct original ip" in r and ("@tx4" in r or "@tx6" in r), r
        assert "echo" not in r and "redirect" not in r and "parameter-problem" not in r
    assert {("direction original" in r, "saddr" in r) for r in accepts} == {(True, True), (False, False)}
    assert any("packet-too-big" in r for r in accepts if "icmpv6" in r)
    # Whatever else is related ICMP is dropped and counted, before the policy could
    # take it for a new flow.
    drop = rules.index(next(r for r in related if not r.endswith("accept")))
    assert ends_in(rules[drop], "drop", "icmp-error")
    assert drop < rules.index("jump egress_policy")
    assert not any("icmp" in r and "return" in r for r in _chain("egress_policy"))


def test_flow_bounds_count_first_packets_rate_before_policy_count_after():
    rules = _chain("from_container")
    rate = next(i for i, r in enumerate(rules) if "@flow_rate" in r)
    count = next(i for i, r in enumerate(rules) if "@flow_count" in r)
    policy = rules.index("jump egress_policy")
    assert rate < policy < count
    for i, reason in ((rate, "flow-rate"), (count, "flow-limit")):
        # Only a flow's first packet (an unreplied UDP flow sends every packet as
        # "new"), refused at once, counted by reason, keyed by the veth.
        assert rules[i].startswith("ct status ! confirmed ") and "{ meta iif " in rules[i]
        assert ends_in(rules[i], "jump refuse", reason)
    accept = next(i for i, r in enumerate(rules) if r.endswith("@tx4 accept") and "ct original" not in r)
    assert count < accept


def test_fragments_from_containers_are_dropped_before_reassembly():
    text = render_table()
    assert ("add chain inet sockgate before_routing { type filter hook prerouting priority -450; policy accept; }"
            in text)
    # Raw loads (see ruleset): the version nibble picks the family's chain once.
    assert _chain("before_routing", text) == ["@nh,0,32 & 0xf0000000 == 0x40000000 goto before_routing4",
                                              "goto before_routing6"]
    # Then IPv4 flags+offset / IPv6 next header.
    assert _chain("before_routing4", text)[0] == ('@nh,48,16 != 0x4000 @nh,48,16 != 0 meta iifgroup 0x5347 '
                                                  'counter drop comment "drop:fragment"')
    assert _chain("before_routing6", text)[0] == ('@nh,48,8 != 6 @nh,48,8 != 17 @nh,48,8 != 58 meta iifgroup 0x5347 '
                                                  'counter drop comment "drop:fragment"')
    # The chain of earlier versions is deleted at every load, else it stays hooked.
    assert text.endswith("add chain inet sockgate fragments\ndelete chain inet sockgate fragments\n")


_SPOOFED = 'counter goto event_spoofed_source comment "drop:spoofed-source"'


def test_what_the_node_answers_before_forward_is_checked_before_routing():
    # ip_rcv_finish answers malformed IPv4 options, ip_forward a TTL/hop limit of 0 or
    # 1 and an IPv6 link-local source, before the forward hook; a link-local
    # destination is routed back out the veth. Each rule's first test is a raw load an
    # ordinary packet fails (no call on the busy path); only then the veth's group
    # and, for a forged source, the same lookup as anti-spoofing in `forward`.
    assert _chain("before_routing4")[1:] == [
        "@nh,64,32 & 0xfe000000 == 0 meta iifgroup 0x5347 goto last_hop4",
        "@nh,0,32 & 0x0f000000 != 0x05000000 meta iifgroup 0x5347 goto options4",
        'meta pkttype != host meta iifgroup 0x5347 counter drop comment "drop:link-broadcast"',
        f"meta iifgroup 0x5347 meta iif . ip saddr != @tx4 {_SPOOFED}"]
    assert _chain("before_routing6")[1:] == [
        "@nh,32,32 & 0x000000fe == 0 meta iifgroup 0x5347 goto last_hop6",
        "@nh,64,32 & 0xffc00000 == 0xfe800000 meta iifgroup 0x5347 jump link_local",
        "@nh,192,32 & 0xffc00000 == 0xfe800000 meta iifgroup 0x5347 jump link_local",
        'meta pkttype != host @nh,48,8 != 58 meta iifgroup 0x5347 counter drop comment "drop:link-broadcast"',
        '@nh,48,8 58 @th,0,8 133-137 meta iifgroup 0x5347 counter drop comment "drop:neighbour"',
        f"meta iifgroup 0x5347 meta iif . ip6 saddr != @tx6 {_SPOOFED}"]
    # From a forged source counted as such; from the container's own, dropped all the
    # same: conntrack would have refreshed its flow with a packet that never leaves.
    for chain, family, what in (("last_hop4", "ip", "last-hop"), ("options4", "ip", "ip-options"),
                                ("last_hop6", "ip6", "last-hop")):
        tx = "tx4" if family == "ip" else "tx6"
        assert _chain(chain) == [f"meta iif . {family} saddr != @{tx} {_SPOOFED}",
                                 f'counter drop comment "drop:{what}"'], chain
    # Link-local from a container: neighbour discovery counted as before; what goes to
    # the node (its end of the veth, link-scoped multicast such as MLD) on to
    # container_to_node; everything else dropped.
    link_local = _chain("link_local")
    assert link_local[0].startswith("icmpv6 type {") and ends_in(link_local[0], "drop", "neighbour")
    assert link_local[1:] == ["ip6 daddr { ff00::/8, fe80::1 } return", 'counter drop comment "drop:link-local"']
    # The first tests against ordinary headers: UDP, TTL/hop limit 64, public addresses.
    v4 = bytes.fromhex("45000054" "00004000" "40110000" "5db8d74d" "5db8d74e")
    v6 = bytes.fromhex("60000000" "00081140" "26062800" "021fcb07" + "00" * 8 + "26062800" + "00" * 16)
    word = lambda header, at: int.from_bytes(header[at:at + 4], "big")  # noqa: E731
    assert word(v4, 8) & 0xfe000000 != 0 and word(v4, 0) & 0x0f000000 == 0x05000000
    assert word(v6, 4) & 0xfe != 0 and word(v6, 8) & 0xffc00000 != 0xfe800000
    assert word(v6, 24) & 0xffc00000 != 0xfe800000


def test_no_neighbour_discovery_from_containers_and_no_refusal_to_a_forged_source():
    to_node = _chain("container_to_node")
    assert to_node[0].startswith("icmpv6 type {") and "nd-neighbor-solicit" in to_node[0]
    assert to_node[0].endswith('counter drop comment "drop:neighbour"')
    assert not any(r.endswith("accept") for r in to_node)
    # The refusal (a reset, an ICMP error) goes to the packet's source: only to the
    # container's own address, never to one it made up (a reflector, and the node
    # would resolve that address on its uplink first).
    refuse = next(i for i, r in enumerate(to_node) if ends_in(r, "jump refuse", "container-to-node"))
    spoof = [i for i, r in enumerate(to_node) if "spoofed-source" in r]
    assert len(spoof) == 2 and max(spoof) < refuse
    assert all(ends_in(to_node[i], "drop", "spoofed-source") for i in spoof)


def test_a_reload_starts_the_bounds_afresh():
    text = render_table()
    # Each element carries the limit it was created with: a reload (new limits) must
    # not leave the old ones in force.
    assert "flush set inet sockgate flow_count\n" in text and "flush set inet sockgate flow_rate\n" in text


def test_closing_flows_and_unreplied_udp_have_bounded_timeouts():
    text = render_table(EgressPolicy(idle_timeout=77))
    assert ("add ct timeout inet sockgate idle_tcp_77_b { protocol tcp; l3proto inet; policy = "
            "{ established: 77, time_wait: 10, close: 10 }; }") in text
    assert "policy = { unreplied: 30, replied: 77 }" in text
    assert 'ct timeout set "idle_tcp_77_b"' in text and 'ct timeout set "idle_udp_77_b"' in text
    assert FlowBounds().entries == 1024 + 200 + 100 * 10


def test_pools_are_one_collapsed_command_per_family():
    # Adjacent prefixes in separate commands make libnftables' auto-merge fail a
    # transaction that creates the set (a reload restoring many containers).
    out = add_pools(["10.77.0.1/32", "10.77.0.2/32", "10.77.0.3/32", "fd77::1/128", "fd77::2/128", "10.78.0.0/16"])
    assert out == ("add element inet sockgate pools4 { 10.77.0.1/32, 10.77.0.2/31, 10.78.0.0/16 }\n"
                   "add element inet sockgate pools6 { fd77::1/128, fd77::2/128 }\n")
    assert add_pools([]) == ""


def test_the_nodes_answers_to_hop_by_hop_options_are_dropped_on_their_way_out():
    # The kernel answers hop-by-hop options, and sends redirects, before any hook; the
    # answer takes the output hook before the node resolves where it goes. Byte 14 of an
    # ICMPv6 error is the quoted packet's next header (8-byte ICMPv6 header, then the
    # IPv6 header's byte 6). Redirects: only those from a container veth's address.
    assert _chain("output") == ['icmpv6 type parameter-problem @th,112,8 0 counter drop comment "drop:hop-by-hop"',
                                'ip6 saddr fe80::1 icmpv6 type nd-redirect counter drop comment "drop:redirect"',
                                "oifname @ifaces jump node_to_container"]
    quoted = bytes.fromhex("60000000" "0010" "00" "40")  # payload 16 bytes, next header 0 (hop-by-hop)
    error = bytes([4, 0, 0, 0, 0, 0, 0, 42]) + quoted
    assert error[112 // 8] == 0 and error[0] == 4



def test_the_nodes_own_link_local_multicast_is_not_counted_as_a_connection_into_a_container():
    assert _chain("node_to_container") == [
        "ct state established,related accept",
        'ip6 daddr ff02::/16 counter drop comment "drop:node-multicast"',
        'ip daddr 224.0.0.0/24 counter drop comment "drop:node-multicast"',
        'counter goto event_node_to_container comment "drop:node-to-container"']


# --- refused-flow events ---------------------------------------------------------------

def test_each_reported_reason_goes_through_its_event_chain_and_ends_as_before():
    from netpolicy.compile import compile_policy
    from netpolicy.policy import Policy
    text = render_table(compile_policy(Policy(), []).egress)
    counted = [line for line in text.splitlines() if line.startswith("add rule ") and 'comment "drop:' in line]
    reported = {line.rsplit('"drop:', 1)[1].rstrip('"') for line in counted if " goto event_" in line}
    assert reported == set(EVENT_REASONS)
    for line in counted:
        reason = line.rsplit('"drop:', 1)[1].rstrip('"')
        if reason in EVENT_REASONS:
            assert ends_in(line.split(" ", 5)[5], EVENT_REASONS[reason][1], reason), line
        else:  # not a flow's first packet, nor a flow the contract has: counted, not reported
            assert reason in ("invalid", "neighbour", "fragment", "link-local", "hop-by-hop", "redirect", "last-hop",
                              "ip-options", "link-broadcast", "node-multicast") and " goto " not in line, line
    for reason, (iface, verdict) in EVENT_REASONS.items():
        report, end = _chain(event_chain(reason), text)
        # Bounded per container (one bucket per veth, all reasons), the reason in the
        # prefix, headers only.
        assert report.startswith(f"update @event_rate {{ meta {iface} limit rate 5/second burst 10 packets }} "
                                 "log ")
        assert f'prefix "drop:{reason}" group {EVENTS_NFLOG_GROUP} snaplen 128 queue-threshold 16' in report
        assert end == verdict


def test_events_are_keyed_by_the_containers_side_of_the_packet():
    inward = {r for r, (iface, _) in EVENT_REASONS.items() if iface == "oif"}
    assert inward == {"inbound", "spoofed-node", "node-to-container"}
    assert "flush set inet sockgate event_rate\n" in render_table()  # a reload applies new rates


def test_the_busy_path_does_not_change_with_events():
    on, off = render_table(), render_table(EgressPolicy(events=EventRate(0, 1)))
    assert _chain("forward", on) == [r.replace(_rev(off), _rev(on)) for r in _chain("forward", off)]
    assert " log " not in off and all(_chain(event_chain(r), off) == [v] for r, (_, v) in EVENT_REASONS.items())


def _rev(text: str) -> str:
    return text.split('comment "rev ')[1][:16]


def test_a_reason_with_another_verdict_is_refused():
    from netpolicy.ruleset import dropped
    with pytest.raises(ValueError, match="inbound"):
        dropped("", "inbound", "jump refuse")
