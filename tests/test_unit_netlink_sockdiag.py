"""runtime.kernel.netlink.sockdiag: layouts match the kernel's structs; answers parse (pure)."""
import socket
import struct

from runtime.kernel.netlink import sockdiag
from runtime.kernel.netlink.conntrack import Flow
from runtime.kernel.netlink.core import attr


def test_layout_sizes_and_offsets_are_the_kernels():
    # sizeof(struct inet_diag_sockid) 48, inet_diag_req_v2 56, inet_diag_msg 72 (linux/inet_diag.h).
    assert (sockdiag.INET_DIAG_SOCKID.size, sockdiag.INET_DIAG_REQ_V2.size, sockdiag.INET_DIAG_MSG.size) == (48, 56, 72)
    assert sockdiag.INET_DIAG_SOCKID.offset("cookie") == 40
    assert sockdiag.INET_DIAG_MSG.offset("id") == 4
    # struct tcp_info: tcpi_last_data_sent at 44, then last_ack_sent, last_data_recv, last_ack_recv.
    assert sockdiag.TCP_INFO.offset("times") == 44
    assert sockdiag.TCP_INFO.size == 60


def _answer(family: int, state: int, sport: int, dport: int, src: str, dst: str, cookie: bytes,
            times: tuple[int, int, int, int] | None) -> bytes:
    raw = lambda a: socket.inet_pton(family, a).ljust(16, b"\0")   # noqa: E731
    sid = struct.pack("!HH16s16s", sport, dport, raw(src), raw(dst)) + b"\0" * 4 + cookie
    body = bytes([family, state, 0, 0]) + sid + b"\0" * 20
    if times is not None:
        info = bytes(8) + bytes(36) + struct.pack("=IIII", *times) + bytes(40)   # a longer, newer tcp_info
        body += attr(sockdiag.INET_DIAG_INFO, info)
    return body


def test_parse_reads_addresses_cookie_and_idle_time():
    s = sockdiag.parse_inet_diag(_answer(socket.AF_INET, 1, 40001, 443, "10.77.0.5", "93.184.215.14",
                                         b"C" * 8, (3000, 9, 2500, 2000)))
    assert (s.family, s.state, s.local, s.remote, s.cookie) == (
        socket.AF_INET, 1, ("10.77.0.5", 40001), ("93.184.215.14", 443), b"C" * 8)
    assert s.idle == 2.0                      # the least of sent, received, ack received
    assert s.matches(Flow(6, "10.77.0.5", 40001, "93.184.215.14", 443))
    assert not s.matches(Flow(6, "10.77.0.5", 40002, "93.184.215.14", 443))


def test_v4_mapped_socket_and_no_tcp_info():
    s = sockdiag.parse_inet_diag(_answer(socket.AF_INET6, 1, 5000, 53, "::ffff:10.77.0.5", "::ffff:1.1.1.1",
                                         b"\1" * 8, None))
    assert s.local == ("10.77.0.5", 5000) and s.remote == ("1.1.1.1", 53) and s.idle is None


def test_v6_addresses_are_written_as_canonical_writes_an_attachments():
    # The sweep compares a socket's addresses with the container's as text.
    s = sockdiag.parse_inet_diag(_answer(socket.AF_INET6, 1, 5000, 53, "fd77:5067:6174:0::5", "2606:2800:21f:cb07::77",
                                         b"\1" * 8, None))
    assert s.local == (sockdiag.canonical("FD77:5067:6174:0000:0000:0000:0000:0005"), 5000)
    assert s.local[0] == "fd77:5067:6174::5" and s.remote == ("2606:2800:21f:cb07::77", 53)
    assert sockdiag.canonical("10.77.0.5") == "10.77.0.5"


def test_request_is_laid_out_as_inet_diag_req_v2():
    sid = sockdiag.INET_DIAG_SOCKID.pack(1, 2, b"", b"", b"", sockdiag.NO_COOKIE)
    req = sockdiag.INET_DIAG_REQ_V2.pack(socket.AF_INET, socket.IPPROTO_TCP, 2, 1 << 1, sid)
    assert req[:8] == bytes([socket.AF_INET, socket.IPPROTO_TCP, 2, 0]) + struct.pack("=I", 2)
    assert req[8:12] == b"\0\1\0\2" and req[-8:] == b"\xff" * 8
