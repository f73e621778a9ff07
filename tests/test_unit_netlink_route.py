"""runtime.kernel.netlink.route's requests and answers (pure encoding, no kernel)."""
import socket
import struct

from runtime.kernel.netlink import route
from runtime.kernel.netlink.core import attr, attributes, u32


def test_get_netconf_encodes_family_and_ifindex():
    req = route.get_netconf(socket.AF_INET6, route.NETCONFA_IFINDEX_DEFAULT)
    assert req.kind == route.RTM_GETNETCONF
    assert req.body[:4] == bytes([socket.AF_INET6, 0, 0, 0])          # struct netconfmsg, aligned
    attrs = dict(attributes(req.body[4:]))
    assert struct.unpack("=i", attrs[route.NETCONFA_IFINDEX])[0] == -2


def test_parse_netconf_reads_forwarding_and_ifindex():
    body = (bytes([socket.AF_INET, 0, 0, 0])
            + attr(route.NETCONFA_IFINDEX, struct.pack("=i", -1))
            + attr(3, struct.pack("=i", 2))                      # rp_filter: ignored
            + attr(route.NETCONFA_FORWARDING, struct.pack("=i", 1)))
    assert route.parse_netconf(body) == route.Netconf(socket.AF_INET, -1, 1)
    assert route.parse_netconf(bytes([socket.AF_INET6, 0, 0, 0])).forwarding is None


def test_parse_link_reads_index_mac_flags_and_group():
    body = (route.IFINFOMSG.pack(0, 0, 42, route.IFF_UP | route.IFF_NOARP, 0)
            + attr(route.IFLA_ADDRESS, bytes.fromhex("0a0b0c0d0e0f"))
            + attr(route.IFLA_GROUP, u32(0x5347))
            + attr(route.IFLA_MTU, u32(1496)))
    assert route.parse_link(body) == route.Link(42, "0a:0b:0c:0d:0e:0f", route.IFF_UP | route.IFF_NOARP, 0x5347,
                                                mtu=1496)
    # No IFLA_GROUP (not in the answer): group 0, as the kernel defaults.
    assert route.parse_link(route.IFINFOMSG.pack(0, 0, 7, 0, 0)).group == 0


def test_header_sizes_are_the_kernels():
    # sizeof() of struct ifinfomsg, ifaddrmsg, ndmsg, rtmsg in <linux/rtnetlink.h>.
    assert (route.IFINFOMSG.size, route.IFADDRMSG.size, route.NDMSG.size, route.RTMSG.size) == (16, 8, 12, 12)
    assert route.IFINFOMSG.offset("index") == 4 and route.NDMSG.offset("state") == 8


def test_new_route_is_laid_out_as_before():
    # Byte for byte what the hand-built message was before the netlink package.
    req = route.new_route("0.0.0.0/0", 7, gateway="169.254.1.1", priority=7)
    assert req.body == (bytes([2, 0, 0, 0, 254, 3, 0, 1]) + b"\0\0\0\0"
                        + struct.pack("=HHI", 8, route.RTA_OIF, 7)
                        + struct.pack("=HH", 8, route.RTA_GATEWAY) + socket.inet_aton("169.254.1.1")
                        + struct.pack("=HHI", 8, route.RTA_PRIORITY, 7))
    assert req.flags == route.NLM_F_CREATE | route.NLM_F_EXCL


def test_a_replaced_route_overwrites_and_says_so():
    req = route.new_route("10.1.0.2/32", 7, mtu=1500, replace=True)
    assert req.flags == route.NLM_F_CREATE | route.NLM_F_REPLACE
    assert req.what == "replace route 10.1.0.2/32"
    assert req.body == route.new_route("10.1.0.2/32", 7, mtu=1500).body


def test_set_mtu_carries_the_mtu():
    req = route.set_mtu(9, 1496)
    assert req.kind == route.RTM_SETLINK
    assert dict(attributes(req.body[route.IFINFOMSG.size:])) == {route.IFLA_MTU: u32(1496)}
