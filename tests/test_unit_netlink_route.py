"""runtime.rtnl's netconf request and answer (pure encoding, no kernel)."""
import socket
import struct

from runtime import rtnl


def test_get_netconf_encodes_family_and_ifindex():
    req = rtnl.get_netconf(socket.AF_INET6, rtnl.NETCONFA_IFINDEX_DEFAULT)
    assert req.kind == rtnl.RTM_GETNETCONF
    assert req.body[:4] == bytes([socket.AF_INET6, 0, 0, 0])          # struct netconfmsg, aligned
    attrs = dict(rtnl.attributes(req.body[4:]))
    assert struct.unpack("=i", attrs[rtnl.NETCONFA_IFINDEX])[0] == -2


def test_parse_netconf_reads_forwarding_and_ifindex():
    body = (bytes([socket.AF_INET, 0, 0, 0])
            + rtnl._attr(rtnl.NETCONFA_IFINDEX, struct.pack("=i", -1))
            + rtnl._attr(3, struct.pack("=i", 2))                      # rp_filter: ignored
            + rtnl._attr(rtnl.NETCONFA_FORWARDING, struct.pack("=i", 1)))
    assert rtnl.parse_netconf(body) == rtnl.Netconf(socket.AF_INET, -1, 1)
    assert rtnl.parse_netconf(bytes([socket.AF_INET6, 0, 0, 0])).forwarding is None



def test_parse_link_reads_index_mac_flags_and_group():
    body = (rtnl._IFINFO.pack(0, 0, 42, rtnl.IFF_UP | rtnl.IFF_NOARP, 0)
            + rtnl._attr(rtnl.IFLA_ADDRESS, bytes.fromhex("0a0b0c0d0e0f"))
            + rtnl._attr(rtnl.IFLA_GROUP, rtnl._u32(0x5347)))
    assert rtnl._parse_link(body) == rtnl.Link(42, "0a:0b:0c:0d:0e:0f", rtnl.IFF_UP | rtnl.IFF_NOARP, 0x5347)
    # No IFLA_GROUP (not in the answer): group 0, as the kernel defaults.
    assert rtnl._parse_link(rtnl._IFINFO.pack(0, 0, 7, 0, 0)).group == 0
