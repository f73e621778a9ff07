"""The sockgate nft table, rendered as text for `nft -f` (pure: data in, text out).

Static chains; everything per container is an element of a set. The rendering is
idempotent: loading it twice, or from two processes at once, gives the same table and
keeps every set element. Design notes: docs/dataplane.md.
"""
from __future__ import annotations

import functools
import hashlib
import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

FAMILY = "inet"
TABLE = "sockgate"

# Per-container state. `ifaces` holds host-side veth names (which packets are a
# container's at all). `tx4`/`tx6` pair a veth's index with the only source address
# allowed to arrive on it, and count what the container sent; `rx` counts what was
# delivered to it. One lookup in `tx4` is anti-spoofing, accounting and the accept
# of an established flow's packet at once: that lookup is the whole per-packet cost
# of sockgate on a flow's busy path. Keys are interface *indexes* (4 bytes, hashed
# with the address in one 8-byte key) rather than names (a 16-byte copy per packet
# and a key 2.5x longer): measured with `perf` under scripts/bench-dataplane, the
# nft share of the forwarding CPU fell by a third. An index can't be read back from
# a listing (nft prints it as whatever name the interface has then, or a number),
# so every counted element carries its veth's name as a comment: billing and
# metrics key on that. The comment also names the element's generation ("sgXXXX
# g=1a2b3c4d"), a token fresh each time the element is created, so billing can tell a
# counter that was re-created (a reloaded table) from one that only went on, whatever
# value it reached.
SETS = {
    "ifaces": "typeof iifname",
    "tx4": "typeof meta iif . ip saddr; counter",
    "tx6": "typeof meta iif . ip6 saddr; counter",
    "rx": "typeof meta oif; counter",
    # Per-container bounds (FlowBounds), filled by the kernel: one element per veth
    # index, holding that container's live flows (`ct count`) or its new-flow token
    # bucket (`limit`). The flow counts go when their flows do; buckets time out.
    "flow_count": "typeof meta iif; size 65535; flags dynamic",
    "flow_rate": "typeof meta iif; size 65535; flags dynamic,timeout; timeout 60s",
    # The container's bucket of refused-flow events (EventRate, see EVENT_REASONS).
    "event_rate": "typeof meta iif; size 65535; flags dynamic,timeout; timeout 60s",
    # The node's own addresses (every address of the netns the table lives in), filled
    # by the runtime when it loads the table and kept current by the agent
    # (node_addresses_script): what `"source": "node"` ingress rules match, and what no
    # forwarded packet may claim as its source.
    "node4": "type ipv4_addr",
    "node6": "type ipv6_addr",
}
NODE_SETS = ("node4", "node6")
COUNTED_SETS = ("tx4", "tx6", "rx")
BOUND_SETS = ("flow_count", "flow_rate", "event_rate")
# The interface group (IFLA_GROUP, `ip link set DEV group N`) of every container's
# node-side veth: what tells the rules "from a container" without a lookup. 0x5347 is
# "SG"; links are in group 0 unless an operator says otherwise.
CONTAINER_IFGROUP = 0x5347
# What sockgate 2026-11-25 keyed by veth name; a reload removes them.
LEGACY_SETS = {
    "saddr4": "typeof iifname . ip saddr",
    "saddr6": "typeof iifname . ip6 saddr",
    "acct_tx": "typeof iifname; counter",
    "acct_rx": "typeof oifname; counter",
}

# The node's end of every container veth holds this link-local address alone, the
# containers' IPv6 gateway (runtime.kernel.netns).
GATEWAY_V6 = "fe80::1"

# Base chains of earlier layouts, deleted at every load: before_routing took over from
# `fragments` (sockgate 2026-12-06), which would otherwise stay hooked.
LEGACY_CHAINS = ("fragments",)

# Neighbour discovery from a container is never needed: both ends of a container's veth
# carry one MAC and the NOARP flag (runtime.kernel.netns.create_veth), so neither side asks.
# What a container sends must not reach the node's neighbour tables, which all
# namespaces of a host share (gc_thresh3): a burst of forged solicitations would
# overflow address resolution host-wide. (ARP never gets that far: the kernel ignores
# ARP on a NOARP link.)
_ND = "icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect }"

# Refused-flow events (README "Refused-flow events"). The first packet of a flow that
# one of these reasons refuses or drops is also reported to NFLOG group
# EVENTS_NFLOG_GROUP, where the agent reads it (runtime.agent.events), at most
# EventRate per container: one token bucket per container veth in the set
# `event_rate`, shared by all its reasons, keyed by the interface that is the
# container's: `iif` for what it sent, `oif` for what was on its way into it. The
# report costs nothing on any other path: the refusing rule's verdict becomes a goto
# to the reason's chain `event_<reason>`, which logs (if the bucket allows) and then
# refuses or drops as before. Not reported: invalid packets, neighbour discovery and
# fragments (none of them a flow's first packet), IPv6 from or to a link-local address
# (no flow the contract has), the node's own answers to hop-by-hop options and its
# redirects (no container's packet), and what a chain accepts.
# reason: (the container's interface, the verdict)
EVENT_REASONS: dict[str, tuple[str, str]] = {
    "protocol": ("iif", "jump refuse"),
    "blocked-port": ("iif", "jump refuse"),
    "blocked-range": ("iif", "jump refuse"),
    "container-pool": ("iif", "jump refuse"),
    "spoofed-source": ("iif", "drop"),
    "tcp-without-flow": ("iif", "jump refuse"),
    "tcp-reopen": ("iif", "jump refuse"),
    "container-to-container": ("iif", "jump refuse"),
    "container-to-node": ("iif", "jump refuse"),
    "icmp-error": ("iif", "drop"),
    "flow-rate": ("iif", "jump refuse"),
    "flow-limit": ("iif", "jump refuse"),
    "inbound": ("oif", "drop"),
    "spoofed-node": ("oif", "drop"),
    "node-to-container": ("oif", "drop"),
}
# "SG", as CONTAINER_IFGROUP; one group per netns (nfnetlink_log binds one listener).
EVENTS_NFLOG_GROUP = 0x5347
# The agent reads the headers only: an IPv6 header (40 bytes) and the transport
# header's first bytes fit with room to spare.
EVENTS_SNAPLEN = 128
# Under a flood the kernel sends up to this many reports in one datagram (else at
# the agent's flush timeout): fewer wake-ups of the agent. A cap: the agent's own
# setting may only lower it.
EVENTS_QUEUE_THRESHOLD = 16
EVENT_PREFIX = "drop:"


def event_chain(reason: str) -> str:
    return "event_" + reason.replace("-", "_")


def dropped(match: str, reason: str, verdict: str = "jump refuse") -> str:
    """A rule that refuses or drops, counted by reason: the agent's metrics read the
    counters of every rule whose comment starts with "drop:". A reason in
    EVENT_REASONS goes through its event chain, which ends in the same verdict."""
    if reason in EVENT_REASONS:
        if EVENT_REASONS[reason][1] != verdict:
            raise ValueError(f"drop reason {reason!r} ends in {EVENT_REASONS[reason][1]!r} (EVENT_REASONS), "
                             f"not {verdict!r}")
        verdict = f"goto {event_chain(reason)}"
    return f'{match} counter {verdict} comment "drop:{reason}"'


def event_chains(rate: EventRate) -> dict[str, list[str]]:
    """The chain of each reported reason: the report (none when rate.per_second is 0),
    then the reason's verdict."""
    chains = {}
    for reason, (iface, verdict) in EVENT_REASONS.items():
        report = (f"update @event_rate {{ meta {iface} limit rate {rate.per_second}/second burst {rate.burst} "
                  f'packets }} log prefix "{EVENT_PREFIX}{reason}" group {EVENTS_NFLOG_GROUP} '
                  f"snaplen {EVENTS_SNAPLEN} queue-threshold {EVENTS_QUEUE_THRESHOLD}")
        chains[event_chain(reason)] = ([report] if rate.per_second else []) + [verdict]
    return chains


# Blocked attempts must fail at once (a reset or an ICMP error), not after a timeout.
_REJECT = ["meta l4proto tcp reject with tcp reset", "reject with icmpx admin-prohibited"]

# The `before_routing` chains' tests are raw loads of the network header
# (@nh,OFFSET,BITS) because every packet of the node runs them: nft evaluates a 1-, 2-
# or 4-byte load, a 32-bit mask and a compare inline, where `ip frag-off` brings a
# `meta nfproto` (a function call), a 16-bit mask another (nft_bitwise_eval) and
# `ip6 nexthdr != {..}` a set lookup (three). With retpolines and SRSO's safe RET every
# call on the packet path is dear: raw loads took the fragment tests from 1.9 to 1.25 %
# of a 64-byte UDP v4 packet's forwarding, 2.7 to 1.9 % for v6 (bench-dataplane
# --profile, docs/measurements.md). The version nibble picks the family once (ip_rcv and
# ipv6_rcv drop packets whose nibble doesn't match the hook's family, so it is exact);
# a jump is evaluated inline too. Each rule then opens with a test that an ordinary
# packet fails, and the veth's group (a call) comes after it.
_IS_V4 = "@nh,0,32 & 0xf0000000 == 0x40000000"
# IPv4: a fragment unless flags+offset are 0 or DF alone (0x4000); a packet with the
# reserved flag set is dropped too, which no sender needs.
_V4_FRAGMENT = "@nh,48,16 != 0x4000 @nh,48,16 != 0"
# IPv6: next header other than TCP (6), UDP (17), ICMPv6 (58), i.e. an extension
# header (see before_routing6).
_V6_EXTENSION = "@nh,48,8 != 6 @nh,48,8 != 17 @nh,48,8 != 58"
# Packets the node acts on between this hook and `forward`, where no rule of ours
# would see them. ip_rcv_finish sends "parameter problem" for malformed IPv4 options;
# ip_forward and ip6_forward send "time exceeded" for a TTL or hop limit of 0 or 1, and
# ip6_forward "beyond scope" for a link-local source; all to the packet's source
# address, resolving it on its link first. From a forged source that is an ICMP error
# to a victim of the container's choosing and a neighbour entry for a made-up address
# (host-wide limits, see _ND), at the node's ICMP rate limit (1,000 a second). A
# link-local destination other than the node's own is routed back out the
# container's veth, leaving a neighbour entry for it, whatever the source. (IPv6
# hop-by-hop options are parsed, and answered, before any netfilter hook: see
# _HOP_BY_HOP_ANSWER.) From the container's own address such a packet is dropped too:
# conntrack (-200) has seen it before ip_forward drops it, so it would refresh its
# flow, and make it assured, without reaching the peer or being billed: one packet
# now and then would keep any flow from idle reclaim. (A traceroute from a container
# gets no answer from its first hop, the node.)
# The same holds for a frame to a broadcast or multicast MAC carrying a packet to a
# unicast address (review 4): ip_forward and ip6_forward drop what isn't PACKET_HOST,
# after conntrack saw it. A container needs no such frame: what it sends to a
# broadcast or multicast address is refused anyway (a range the policy blocks, the
# node). (A frame to another unicast MAC never gets this far: ip_rcv drops it before
# any hook.) ICMPv6 is left to the chains after this one, which count neighbour
# discovery as such; no ICMPv6 packet refreshes a flow a container may have.
_NOT_FOR_NODE = "meta pkttype != host"
_V4_LAST_HOP = "@nh,64,32 & 0xfe000000 == 0"            # TTL 0 or 1
_V4_OPTIONS = "@nh,0,32 & 0x0f000000 != 0x05000000"     # header length other than 20 bytes
_V6_LAST_HOP = "@nh,32,32 & 0x000000fe == 0"            # hop limit 0 or 1
_V6_LINK_LOCAL_SOURCE = "@nh,64,32 & 0xffc00000 == 0xfe800000"       # fe80::/10
_V6_LINK_LOCAL_DESTINATION = "@nh,192,32 & 0xffc00000 == 0xfe800000"
_IN_CONTAINER = f"meta iifgroup {CONTAINER_IFGROUP:#x}"
# Neighbour discovery (ICMPv6 types 133-137) in raw loads: the fragment rule before it
# has dropped every packet whose next header is not its transport header.
_V6_ND = "@nh,48,8 58 @th,0,8 133-137"
# Anti-spoofing before conntrack (review 8). conntrack (-200) takes a packet for the
# flow whose addresses and ports it carries, whoever sent it: a packet from another
# container's address and port refreshed that container's entry, and made it assured
# (600 s, counted against its flow bound: one forged packet per port of its ephemeral
# range pinned its short exchanges until it could open no new flow), and a blind RST
# in its window cut its idle connection to the 10 s CLOSE timeout, all before
# `forward` dropped the packet as forged. From here, a container's packet reaches
# conntrack only from an address its veth owns. A lookup per packet a container
# sends (a negated lookup never counts: billing stays with `forward`); other packets
# fail the group test inline. Last in each family's chain, so that what the rules
# before it drop keeps its own reason.
_NOT_OWN_V4 = "meta iif . ip saddr != @tx4"
_NOT_OWN_V6 = "meta iif . ip6 saddr != @tx6"
_SPOOFED_V4 = f"{_IN_CONTAINER} {_NOT_OWN_V4}"
_SPOOFED_V6 = f"{_IN_CONTAINER} {_NOT_OWN_V6}"
# The kernel parses an IPv6 packet's hop-by-hop options on arrival (ip6_rcv_core),
# before any netfilter hook, and answers an unknown option whose type asks for it, or a
# malformed jumbo payload option, with "parameter problem" to the packet's source. No
# rule can see that packet, but the answer is the node's own packet, and the output
# hook runs before the node resolves where it goes: dropped there, it reaches no
# forged source and leaves no neighbour entry. An ICMPv6 error quotes the packet it is
# about after its own 8-byte header, so byte 14 is that packet's next header; 0 is a
# hop-by-hop header. The node answers no one's hop-by-hop options then; its other
# parameter problems go out as before. (The kernel has counted the answer against the
# node's ICMP rate limit by then: README "Threat model".)
_HOP_BY_HOP_ANSWER = "icmpv6 type parameter-problem @th,112,8 0"
# ip6_forward sends a Redirect, before the forward hook, when a packet would leave by
# the interface it came in on: from a container, a packet to its own address. The
# Redirect goes to the packet's source, forged or not, if that is on a link of the
# node's (the uplink's subnet), resolving it there first, and quotes the packet. Its
# source is the veth's link-local address, GATEWAY_V6 on every container veth, so
# only those are dropped (before the node resolves anything, as above); a redirect
# the node sends about other traffic comes from another address and goes out as before.
_REDIRECT_FROM_CONTAINER_VETH = f"ip6 saddr {GATEWAY_V6} icmpv6 type nd-redirect"

BASE_CHAINS: dict[str, tuple[str, list[str]]] = {
    # hook chains: (declaration, rules)
    "forward": ("type filter hook forward priority filter; policy accept;", [
        # The busy path first: every packet of an accepted flow is counted and
        # accepted in one lookup. (The policy decided the flow's first packet; a
        # policy change applies to new flows, those already open keep going.)
        # Everything else takes the full path below.
        # Replies to a container's own flows, and ICMP errors about them (C2); the
        # direction test keeps a container's own packets from paying this lookup.
        # Only from outside: conntrack tells a reply by its addresses and ports alone,
        # so another container forging the far end's address would otherwise be
        # un-NATed straight into this container's flow. Container veths carry
        # CONTAINER_IFGROUP, which costs a compare where `iifname @ifaces` would cost
        # a lookup on every reply.
        f"ct direction reply meta iifgroup != {CONTAINER_IFGROUP:#x} ct state established,related meta oif @rx accept",
        # A container's SYN on a flow conntrack holds as established: a connection its
        # peer reset (CLOSE, no FIN seen), reopened on the same ports. conntrack lets
        # that SYN through without a new entry and takes the peer's SYN-ACK as the old
        # flow coming back in sync, so the new connection would never pass the flow
        # bounds, which count a flow at its first, unconfirmed packet; and `ct count`
        # forgets closing entries. Refused, it fails at once (a reset); the entry
        # expires CLOSING_S later and the same ports open a counted flow. The
        # protocol test first: everything else a container sends fails it inline.
        dropped(f"tcp flags & (syn | ack) == syn ct direction original ct state established {_IN_CONTAINER}",
                "tcp-reopen"),
        # A container's packets, from the address its veth owns (anti-spoofing).
        "ct state established meta iif . ip saddr @tx4 accept",
        "ct state established meta iif . ip6 saddr @tx6 accept",
        # A UDP flow nobody answers (metrics, logs, a one-way stream, a flood) stays
        # "new" in conntrack for every packet, and would take the full path each time:
        # a dozen rules and the policy's lookups, several times the busy path's cost,
        # paid by the node for any container that sends without replies. Once a packet
        # of the flow passed every hook, conntrack confirmed the entry, and a later one
        # carries the same addresses and ports, so the policy's answer is the same; it
        # goes the established flow's way (TCP doesn't: a flow that was never answered
        # must still start with a SYN, see tcp-without-flow).
        "meta l4proto udp ct state new ct status confirmed meta iif . ip saddr @tx4 accept",
        "meta l4proto udp ct state new ct status confirmed meta iif . ip6 saddr @tx6 accept",
        # Into a container in the original direction: a flow a platform proxy opened
        # (ingress allowance, see to_container); from outside, as above.
        f"meta iifgroup != {CONTAINER_IFGROUP:#x} ct state established,related meta oif @rx accept",
        "iifname @ifaces jump from_container",
        "oifname @ifaces jump to_container",
    ]),
    # Before conntrack reassembles fragments (defrag runs at -400) and before the node
    # routes: a container's IP fragments never reach the node's reassembly memory,
    # which is one pool for the whole netns (4 MiB by default): unfinished fragments
    # from one container would otherwise starve every other container's reassembly,
    # and a datagram sent in tiny fragments would be billed once, as the reassembled
    # packet, while many more bytes leave the node. A container's kernel fragments
    # only UDP datagrams larger than the path MTU; those are lost (README: "Threat
    # model"). The family's chains also hold the anti-spoofing that can't wait for
    # `forward` (see _SPOOFED_V4, _V4_LAST_HOP). Every packet pays this hook
    # (docs/measurements.md).
    "before_routing": ("type filter hook prerouting priority -450; policy accept;", [
        f"{_IS_V4} goto before_routing4",
        "goto before_routing6",
    ]),
    "input": ("type filter hook input priority filter; policy accept;", [
        "iifname @ifaces jump container_to_node",
    ]),
    "output": ("type filter hook output priority filter; policy accept;", [
        dropped(_HOP_BY_HOP_ANSWER, "hop-by-hop", "drop"),
        dropped(_REDIRECT_FROM_CONTAINER_VETH, "redirect", "drop"),
        "oifname @ifaces jump node_to_container",
    ]),
    # Egress-only NAT. fully-random: source ports don't reveal anything about the
    # container's own port choice (C5).
    "postrouting": ("type nat hook postrouting priority srcnat; policy accept;", [
        "iifname @ifaces oifname != @ifaces masquerade fully-random",
    ]),
}


# Closing TCP flows (TIME_WAIT, CLOSE) are the entries `ct count` doesn't count, so how
# long they stay is part of a container's bound: N new flows per second leave at most
# N x CLOSING_S of them. 10 s (the kernel keeps TIME_WAIT 120 s) is long enough for a
# retransmitted FIN or ACK; the container's own TCP stack keeps its TIME_WAIT anyway.
CLOSING_S = 10
# A UDP flow that never got an answer: the kernel's default, pinned here so a node
# sysctl can't stretch it.
UNREPLIED_S = 30


def idle_timeouts(seconds: int) -> dict[str, str]:
    """ct timeout objects that let the kernel expire idle container flows (C10) and
    bound how long a closing one stays. The idle timeout is in the name: an object
    can't be changed in place, and a new name lets a changed timeout load in one
    transaction while old flows keep their object. ("_b": the second layout, with the
    closing and unreplied timeouts.)"""
    return {f"idle_tcp_{seconds}_b": f"protocol tcp; l3proto inet; policy = {{ established: {seconds}, "
                                     f"time_wait: {CLOSING_S}, close: {CLOSING_S} }};",
            f"idle_udp_{seconds}_b": f"protocol udp; l3proto inet; policy = {{ unreplied: {UNREPLIED_S}, "
                                     f"replied: {seconds} }};"}


@dataclass(frozen=True)
class FlowBounds:
    """Per-container bounds on conntrack: the policy file's `limits` (README "Threat
    model")."""

    # Live conntrack entries (TCP connections not yet closing, UDP flows).
    max_flows: int = 1024
    # New flows (their first packet) per second, and the burst above that rate.
    new_flows_per_second: int = 100
    new_flows_burst: int = 200

    @property
    def closing(self) -> int:
        """The most closing TCP entries (TIME_WAIT, CLOSE) its new-flow rate can leave
        behind while each stays CLOSING_S. More means the container keeps them alive by
        sending on them: the agent then deletes them (runtime.agent.closing_trim)."""
        return self.new_flows_burst + self.new_flows_per_second * CLOSING_S

    @property
    def entries(self) -> int:
        """The most conntrack entries one container can hold: its live flows, plus the
        closing TCP flows its new-flow rate can leave behind."""
        return self.max_flows + self.closing


@dataclass(frozen=True)
class EventRate:
    """Refused-flow events per container: the policy file's `limits.eventsPerSecond`
    and `limits.eventsBurst` (README "Refused-flow events"). 0 per second: none."""

    per_second: int = 5
    burst: int = 10


# ICMP errors a container may send, and only about a flow that is its own (C3): the
# contract's unreachable, Packet Too Big and time exceeded. conntrack relates an error
# to whatever flow its quoted header names, whoever owns that flow; the original tuple
# says whose it is: the container opened it (direction original: it is the original
# source) or accepted it under an ingress allowance (direction reply: it is the
# original destination). The veth index and that address must be one element of tx4 /
# tx6, which also counts the error for billing, like any packet it sends.
_ICMP_ERRORS_V4 = "icmp type { destination-unreachable, time-exceeded }"
_ICMP_ERRORS_V6 = "icmpv6 type { destination-unreachable, packet-too-big, time-exceeded }"
ICMP_FROM_CONTAINER = (
    f"ct state related {_ICMP_ERRORS_V4} ct direction original meta iif . ct original ip saddr @tx4 accept",
    f"ct state related {_ICMP_ERRORS_V4} ct direction reply meta iif . ct original ip daddr @tx4 accept",
    f"ct state related {_ICMP_ERRORS_V6} ct direction original meta iif . ct original ip6 saddr @tx6 accept",
    f"ct state related {_ICMP_ERRORS_V6} ct direction reply meta iif . ct original ip6 daddr @tx6 accept",
)


# A container sends only from its own addresses. (A negated lookup never counts.)
# Dropped, never refused: a refusal would go to the forged address, and the node
# would first resolve it on its uplink. before_routing4/6 drop a forged packet before
# conntrack sees it (_SPOOFED_V4); these are the second line, where a chain that falls
# through would accept.
ANTI_SPOOFING = [dropped(f"meta nfproto ipv4 {_NOT_OWN_V4}", "spoofed-source", "drop"),
                 dropped(f"meta nfproto ipv6 {_NOT_OWN_V6}", "spoofed-source", "drop")]


def _from_container(idle_timeout: int, bounds: FlowBounds) -> list[str]:
    tcp_obj, udp_obj = idle_timeouts(idle_timeout)
    return [
        *ANTI_SPOOFING,
        # Invalid packets are not NATed and would leak container addresses upstream.
        dropped("ct state invalid", "invalid", "drop"),
        # With nf_conntrack_tcp_loose=1 a mid-stream packet re-creates a reclaimed
        # flow's conntrack entry (and masquerade picks the same port again): a TCP
        # flow may only start with a SYN.
        dropped("meta l4proto tcp ct state new tcp flags & (fin | syn | rst | ack) != syn", "tcp-without-flow"),
        # No container reaches another (C1).
        dropped("oifname @ifaces", "container-to-container"),
        *ICMP_FROM_CONTAINER,
        # Every other error conntrack relates to some flow: forged, or about a flow
        # that isn't this container's (the node's, another container's).
        dropped("ct state related meta l4proto { icmp, ipv6-icmp }", "icmp-error", "drop"),
        # The bounds count a flow once, at its first packet (not yet confirmed by
        # conntrack; a UDP flow without an answer stays "new", but once confirmed its
        # packets are accepted in `forward` and never get here).
        # The rate comes before the policy so that refused attempts spend it too.
        dropped(f"ct status ! confirmed update @flow_rate {{ meta iif limit rate over "
                f"{bounds.new_flows_per_second}/second burst {bounds.new_flows_burst} packets }}", "flow-rate"),
        # egress_policy refuses (terminal) or returns.
        "jump egress_policy",
        # Only flows the policy allowed take an entry of the container's count.
        dropped(f"ct status ! confirmed add @flow_count {{ meta iif ct count over {bounds.max_flows} }}",
                "flow-limit"),
        f'meta l4proto tcp ct state new ct timeout set "{tcp_obj}"',
        f'meta l4proto udp ct state new ct timeout set "{udp_obj}"',
        # Accepted, and counted by the lookup that accepts it.
        "meta iif . ip saddr @tx4 accept",
        "meta iif . ip6 saddr @tx6 accept",
    ]


REGULAR_CHAINS: dict[str, list[str]] = {
    # What `forward` did not accept as a reply (C2): only a platform proxy's
    # ingress allowance, if configured, gets in. A forwarded packet claiming to come
    # from the node itself is forged (the node's own packets take the output hook):
    # it must not pass as the node under an ingress rule whose CIDR covers the node.
    "to_container": [dropped("ip saddr @node4", "spoofed-node", "drop"),
                     dropped("ip6 saddr @node6", "spoofed-node", "drop"),
                     dropped("", "inbound", "drop").lstrip()],
    # The node is not a service for containers, nor a neighbour to talk to (see _ND).
    "container_to_node": [dropped(_ND, "neighbour", "drop"), *ANTI_SPOOFING,
                          dropped("", "container-to-node").lstrip()],
    "refuse": _REJECT,
    "before_routing4": [
        dropped(f"{_V4_FRAGMENT} {_IN_CONTAINER}", "fragment", "drop"),
        # The packets the node would answer, or drop, before `forward` (see
        # _V4_LAST_HOP): a goto, so that an ordinary packet pays one failed test for
        # each; every other packet is checked where it goes (`forward`, container_to_node).
        f"{_V4_LAST_HOP} {_IN_CONTAINER} goto last_hop4",
        f"{_V4_OPTIONS} {_IN_CONTAINER} goto options4",
        dropped(f"{_NOT_FOR_NODE} {_IN_CONTAINER}", "link-broadcast", "drop"),
        dropped(_SPOOFED_V4, "spoofed-source", "drop"),
    ],
    # Counted as forged when they are (spoofed-source), else by what they are.
    "last_hop4": [dropped(_NOT_OWN_V4, "spoofed-source", "drop"),
                  dropped("", "last-hop", "drop").lstrip()],
    "options4": [dropped(_NOT_OWN_V4, "spoofed-source", "drop"),
                 dropped("", "ip-options", "drop").lstrip()],
    "last_hop6": [dropped(_NOT_OWN_V6, "spoofed-source", "drop"),
                  dropped("", "last-hop", "drop").lstrip()],
    "before_routing6": [
        # A fragment header may hide behind other extension headers, and walking them
        # (`exthdr frag exists`) costs more than this: a container's packet carries no
        # extension header at all (TCP, UDP, ICMPv6 only; C3).
        dropped(f"{_V6_EXTENSION} {_IN_CONTAINER}", "fragment", "drop"),
        f"{_V6_LAST_HOP} {_IN_CONTAINER} goto last_hop6",
        f"{_V6_LINK_LOCAL_SOURCE} {_IN_CONTAINER} jump link_local",
        f"{_V6_LINK_LOCAL_DESTINATION} {_IN_CONTAINER} jump link_local",
        dropped(f"{_NOT_FOR_NODE} @nh,48,8 != 58 {_IN_CONTAINER}", "link-broadcast", "drop"),
        # Neighbour discovery from no address (duplicate address detection, from ::)
        # or the container's own goes no further either (see _ND), as such, not as
        # forged; from a link-local address, link_local dropped it.
        dropped(f"{_V6_ND} {_IN_CONTAINER}", "neighbour", "drop"),
        dropped(_SPOOFED_V6, "spoofed-source", "drop"),
    ],
    # IPv6 from or to a link-local address, from a container (see _V4_LAST_HOP). No
    # contract flow uses one but the node's own end of the veth, GATEWAY_V6: the node
    # may open connections from it (probes, when the node has no other IPv6 address)
    # and a container's replies go there. A container's link-local address is never
    # in tx6, so container_to_node dropped what it sent the node from there before
    # this chain existed. What goes to the node (GATEWAY_V6, link-scoped multicast
    # such as MLD) goes on to that chain as before, but neighbour discovery.
    "link_local": [dropped(_ND, "neighbour", "drop"), f"ip6 daddr {{ ff00::/8, {GATEWAY_V6} }} return",
                   dropped("", "link-local", "drop").lstrip()],
    # The node's own link-local multicast (the MLD reports of each new veth, a few in
    # its first seconds) is no connection: counted apart, so that `node-to-container`
    # counts only what the node opened.
    "node_to_container": ["ct state established,related accept",
                          dropped("ip6 daddr ff02::/16", "node-multicast", "drop"),
                          dropped("ip daddr 224.0.0.0/24", "node-multicast", "drop"),
                          dropped("", "node-to-container", "drop").lstrip()],
}


@dataclass(frozen=True)
class EgressPolicy:
    """Where netpolicy's compiled contract plugs in.

    `rules` fill the `egress_policy` chain, evaluated for every packet a container
    sends that passed anti-spoofing (empty: allow all egress). `ingress_rules` run
    before the drop of connections into containers, `node_ingress_rules` only before
    that of the node's own connections, `node_reply_rules` before the drop of what a
    container sends to the node. `sets` are refilled from
    `elements` on every load; `dynamic_sets` are declared but keep their elements.
    """

    sets: tuple[tuple[str, str], ...] = ()
    dynamic_sets: tuple[tuple[str, str], ...] = ()
    rules: tuple[str, ...] = ()
    ingress_rules: tuple[str, ...] = ()
    # What the node itself may open (node_to_container, before its drop), and the
    # container's replies to those flows (container_to_node, before its drop).
    node_ingress_rules: tuple[str, ...] = ()
    node_reply_rules: tuple[str, ...] = ()
    elements: tuple[str, ...] = ()
    idle_timeout: int = 600
    bounds: FlowBounds = FlowBounds()
    events: EventRate = EventRate()


@functools.lru_cache(maxsize=8)
def revision(policy: EgressPolicy = EgressPolicy()) -> str:
    """A fingerprint of the rules, stamped on the table's first rule: a node whose
    loaded table was rendered by another sockgate version (or policy) reloads it."""
    return hashlib.sha256(_render(policy, "").encode()).hexdigest()[:16]


def render_table(policy: EgressPolicy = EgressPolicy(), *, pending: bool = False) -> str:
    """The table's script. pending: without its revision element, so that nothing
    takes the table for current (or adds to it) until revision_script() follows:
    for a load that has more to do before it counts as done (runtime.core.table)."""
    return _render(policy, revision(policy), pending)


def revision_script(policy: EgressPolicy) -> str:
    """The revision element of a table rendered with pending=True: now it is current."""
    return "\n".join(_revision_lines(revision(policy))) + "\n"


def _revision_lines(rev: str, pending: bool = False) -> list[str]:
    """The set `revision` emptied, and (unless pending) holding the table's mark."""
    t = f"{FAMILY} {TABLE}"
    mark = [] if pending else [f"add element {t} {REVISION_SET} {{ {_mark(rev)} }}"]
    return [f"flush set {t} {REVISION_SET}", *mark]


# The revision is also the one element of the set `revision`, so that a transaction
# can assert which rules it runs against at no extra cost: deleting and re-adding the
# element is a no-op if it is there, and fails the whole transaction if the table is
# missing or was rendered from other rules.
REVISION_SET = "revision"


def _mark(rev: str) -> str:
    return "0x" + rev[:8]


# The segment meter the table's tx counters go with (runtime/kernel/segment_meter.py):
# the one element of the set `segment_meter` is its map's id, 0 for "counted without one". The
# counters of a super-packet's sender are the nft counter plus the meter's count, so
# when the meter is gone (its pins removed, its bpffs unmounted) or replaced, the
# counters that went with it are no longer readable: readers refuse them, ADD's
# transaction asserts the element as it does the revision's, and the next load
# creates the counted elements again. The runtime writes it with every load.
METER_SET = "segment_meter"


def meter_key(map_id: int) -> bytes:
    return _u32(map_id)


def meter_record_script(map_id: int) -> str:
    t = f"{FAMILY} {TABLE}"
    return f"flush set {t} {METER_SET}\nadd element {t} {METER_SET} {{ {map_id} }}\n"


def renew_counted_script(endpoints: Sequence[Endpoint]) -> str:
    """The counted elements of `endpoints` gone, in the transaction that adds them again
    (add_endpoint): created anew, counters from zero, under the load's new generation
    (billing counts them from zero, runtime.billing.session). Only theirs: elements this
    load doesn't restore (another stateDir's containers) keep their counters, which go
    on. (Each is added first, a no-op if it is there: `delete` of a missing element
    would abort the transaction.)"""
    t = f"{FAMILY} {TABLE}"
    return "".join(f"add element {t} {s} {{ {e} }}\ndelete element {t} {s} {{ {e} }}\n"
                   for ep in endpoints for s, e in endpoint_elements(ep) if s in COUNTED_SETS)


def _render(policy: EgressPolicy, rev: str, pending: bool = False) -> str:
    t = f"{FAMILY} {TABLE}"
    lines = [f"add table {t}"]
    lines += [f"add ct timeout {t} {name} {{ {decl} }}" for name, decl in idle_timeouts(policy.idle_timeout).items()]
    for name, decl in (SETS | dict(policy.dynamic_sets) | dict(policy.sets)).items():
        lines.append(f"add set {t} {name} {{ {decl}; }}")
    lines += [f"flush set {t} {name}" for name, _ in policy.sets]
    # A bound lives in each element (the kernel copies the rule's `ct count` or `limit`
    # into the element it creates), so a reload that may carry new limits starts them
    # afresh: flows open at that moment are not counted against the new bound.
    lines += [f"flush set {t} {name}" for name in BOUND_SETS]
    lines += list(policy.elements)
    lines.append(f"add set {t} {REVISION_SET} {{ type mark; }}")
    lines.append(f"add set {t} {METER_SET} {{ type mark; }}")
    if rev:
        lines += _revision_lines(rev, pending)
    chains: dict[str, list[str]] = {name: rules for name, (_, rules) in BASE_CHAINS.items()}
    chains |= REGULAR_CHAINS
    chains |= event_chains(policy.events)
    chains["from_container"] = _from_container(policy.idle_timeout, policy.bounds)
    chains["egress_policy"] = list(policy.rules)
    for name, extra in (("to_container", policy.ingress_rules),
                        ("node_to_container", policy.ingress_rules + policy.node_ingress_rules),
                        ("container_to_node", policy.node_reply_rules)):
        chains[name] = [*chains[name][:-1], *extra, chains[name][-1]]
    # Declare every chain before filling any: rules jump to chains declared later.
    for name in chains:
        decl = BASE_CHAINS[name][0] if name in BASE_CHAINS else ""
        lines.append(f"add chain {t} {name} {{ {decl} }}" if decl else f"add chain {t} {name}")
    if rev:
        chains["forward"] = [f'{chains["forward"][0]} comment "rev {rev}"', *chains["forward"][1:]]
    for name, rules in chains.items():
        lines.append(f"flush chain {t} {name}")
        lines.extend(f"add rule {t} {name} {rule}" for rule in rules)
    # Sets of earlier layouts, unreferenced once the chains above are refilled. (No
    # `destroy` before nft 1.0.8: adding with the old definition first makes the
    # delete succeed whether or not the set was there.)
    for name, decl in LEGACY_SETS.items():
        lines += [f"add set {t} {name} {{ {decl}; }}", f"delete set {t} {name}"]
    for name in LEGACY_CHAINS:  # (a chain's rules go with it)
        lines += [f"add chain {t} {name}", f"delete chain {t} {name}"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Endpoint:
    """The per-container facts the data plane needs. `generation`: a token unique to
    this creation of the elements (see the counted sets above); the caller makes it."""

    host_ifname: str
    host_ifindex: int
    ipv4: str
    ipv6: str
    generation: str = ""


def element_comment(ep: Endpoint) -> str:
    return f"{ep.host_ifname} g={ep.generation}" if ep.generation else ep.host_ifname


def parse_comment(comment: str) -> tuple[str, str]:
    """(veth name, generation) of a counted element's comment; generation "" for the
    elements of versions that wrote the name alone."""
    name, _, rest = comment.partition(" ")
    return name, rest[2:] if rest.startswith("g=") else ""


def endpoint_elements(ep: Endpoint) -> list[tuple[str, str]]:
    """(set, element key) of every per-container element."""
    return [("ifaces", f'"{ep.host_ifname}"'),
            ("tx4", f"{ep.host_ifindex} . {ep.ipv4}"),
            ("tx6", f"{ep.host_ifindex} . {ep.ipv6}"),
            ("rx", f"{ep.host_ifindex}")]


# The same keys as the kernel stores them, for runtime.kernel.netlink.nftables (which talks nf_tables'
# netlink without libnftables). Each field of a concatenation takes a multiple of 4
# bytes; `meta iif`/`meta oif`/`meta mark` are host-order u32s, addresses network
# order, `iifname` a NUL-padded IFNAMSIZ (16) array.
_IFNAMSIZ = 16


def _u32(value: int) -> bytes:
    return struct.pack("=I", value)


def endpoint_keys(ep: Endpoint) -> list[tuple[str, bytes]]:
    """endpoint_elements() as binary keys, in the same order."""
    return [("ifaces", ep.host_ifname.encode().ljust(_IFNAMSIZ, b"\0")),
            ("tx4", _u32(ep.host_ifindex) + ipaddress.IPv4Address(ep.ipv4).packed),
            ("tx6", _u32(ep.host_ifindex) + ipaddress.IPv6Address(ep.ipv6).packed),
            ("rx", _u32(ep.host_ifindex))]


def revision_key(policy: EgressPolicy) -> bytes:
    return _u32(int(_mark(revision(policy)), 16))


def _element(set_name: str, key: str, ep: Endpoint) -> str:
    comment = f' comment "{element_comment(ep)}"' if set_name in COUNTED_SETS else ""
    return f"{key}{comment}"


def add_endpoint(ep: Endpoint) -> str:
    return "".join(f"add element {FAMILY} {TABLE} {s} {{ {_element(s, e, ep)} }}\n"
                   for s, e in endpoint_elements(ep))


def node_addresses_script(addresses: Sequence[str]) -> str:
    """Replace the contents of node4/node6 with `addresses` (the node's own), in one
    transaction with whatever it is appended to."""
    t = f"{FAMILY} {TABLE}"
    addrs = sorted({ipaddress.ip_address(a) for a in addresses}, key=lambda a: (a.version, a))
    lines = [f"flush set {t} {name}" for name in NODE_SETS]
    for version, name in ((4, "node4"), (6, "node6")):
        mine = [str(a) for a in addrs if a.version == version]
        if mine:
            lines.append(f"add element {t} {name} {{ {', '.join(mine)} }}")
    return "\n".join(lines) + "\n"


def add_pools(pools: tuple[str, ...] | list[str]) -> str:
    """Prefixes as destinations no container may reach (sets pools4/pools6, which
    auto-merge, so every ADD may add its network's pools again). One command per
    family, the prefixes collapsed: libnftables' auto-merge fails a transaction
    ("File exists") that adds adjacent prefixes to a new set in separate commands, as
    a reload restoring many containers' addresses would."""
    nets = [ipaddress.ip_network(p, strict=False) for p in pools]
    out = []
    for version, set_name in ((4, "pools4"), (6, "pools6")):
        # One version per call, which mypy can't see through the filter.
        mine = list(ipaddress.collapse_addresses(n for n in nets if n.version == version))  # type: ignore[type-var]
        if mine:
            out.append(f"add element {FAMILY} {TABLE} {set_name} {{ {', '.join(map(str, mine))} }}\n")
    return "".join(out)


def remove_elements(elements: list[tuple[str, str]]) -> str:
    """Delete (set, key) elements known to be present (just listed)."""
    return "".join(f"delete element {FAMILY} {TABLE} {s} {{ {e} }}\n" for s, e in elements)
