"""The segment meter's pure parts: the BTF reader on a blob built here, the
assembler, and the program's shape. Its behaviour in the kernel: tests/test_hostile.py
(test_segmented_sends_are_billed_as_what_left, test_oversized_segments_...)."""
from __future__ import annotations

import struct

import pytest

from runtime.kernel import bpf, btf, segment_meter


def _blob(types: list[bytes], strings: bytes) -> bytes:
    body = b"".join(types)
    return struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(body), len(body), len(strings)) + body + strings


def _type(name_off: int, kind: int, vlen: int, size_or_type: int, kind_flag: bool = False) -> bytes:
    return struct.pack("<III", name_off, (kind_flag << 31) | (kind << 24) | vlen, size_or_type)


# strings: 0 "", 1 "int", 5 "outer", 11 "a", 13 "b", 15 "inner_field", 27 "bits", 32 "E1"
STRINGS = b"\0int\0outer\0a\0b\0inner_field\0bits\0E1\0"


def _sample() -> btf.Btf:
    return btf.Btf(_blob([
        _type(1, 1, 0, 4) + struct.pack("<I", 32),                 # 1: int, 4 bytes
        _type(0, 2, 0, 1),                                          # 2: int *
        _type(0, 5, 1, 2) + struct.pack("<III", 15, 1, 0),         # 3: anonymous union { int inner_field; }
        _type(5, 4, 4, 24, kind_flag=True) + struct.pack(
            "<IIIIIIIIIIII",
            11, 1, 0,                  # int a at byte 0
            13, 2, 64,                 # int *b at byte 8
            0, 3, 128,                 # the union at byte 16
            27, 1, (3 << 24) | 160),   # int bits:3 at bit 160
        _type(0, 6, 1, 4) + struct.pack("<Ii", 32, 7),            # 5: enum { E1 = 7 }
    ], STRINGS))


def test_fields_are_found_by_name_also_inside_anonymous_unions():
    b = _sample()
    assert b.field("outer", "a") == btf.Field(0, 4)
    assert b.field("outer", "b") == btf.Field(8, 8)
    assert b.field("outer", "inner_field") == btf.Field(16, 4)
    assert b.enum("E1") == 7


def test_a_missing_struct_field_or_a_bitfield_is_an_error_that_names_it():
    b = _sample()
    with pytest.raises(btf.BtfError, match="no struct sk_buff"):
        b.field("sk_buff", "len")
    with pytest.raises(btf.BtfError, match="outer has no field nope"):
        b.field("outer", "nope")
    with pytest.raises(btf.BtfError, match="outer.bits is a bitfield"):
        b.field("outer", "bits")
    with pytest.raises(btf.BtfError, match="bad magic"):
        btf.Btf(b"\0" * 32)


def test_the_program_accepts_or_drops_and_every_jump_lands_inside_it():
    o = segment_meter.Offsets(skb_dev=16, skb_len=112, skb_head=192, skb_end=188, skb_network_header=180,
                              dev_mtu=56, dev_group=540, dev_ifindex=224, state_hook=0, shinfo_gso_size=4)
    code = segment_meter.program(map_fd=42, o=o)
    insns = [struct.unpack_from("<BBhi", code, i) for i in range(0, len(code), 8)]
    exits = [i for i, ins in enumerate(insns) if ins[0] == 0x95]
    # Each exit follows NF_ACCEPT (1) or the verdict register r6 (NF_ACCEPT or NF_DROP, 0).
    assert sorted(insns[i - 1] for i in exits) == [(0xB7, 0, 0, 1), (0xBF, 0x60, 0, 0)]
    assert {ins[3] for ins in insns if ins[0] == 0xB7 and ins[1] == 6} == {0, 1}
    assert (0x18, 0x11, 0, 42) in insns              # the count map
    assert (0x55, 0x02, 0, 0x5347) == next(i[:2] + (0, i[3]) for i in insns if i[0] == 0x55)  # containers only
    for pc, (code_, _, off, _) in enumerate(insns):
        if code_ & 0x07 == 0x05 and code_ not in (0x85, 0x95):
            assert 0 <= pc + 1 + off < len(insns), (pc, off)


def test_offsets_refuse_a_field_of_an_unexpected_size():
    class Fake:
        def field(self, struct_name: str, field_name: str) -> btf.Field:
            return btf.Field(0, 8 if field_name == "end" else {"dev": 8, "head": 8, "network_header": 2,
                                                                 "hook": 1, "gso_size": 2}.get(field_name, 4))
    with pytest.raises(btf.BtfError, match="sk_buff.end is 8 bytes, not 4"):
        segment_meter.Offsets.of(Fake())  # type: ignore[arg-type]


def test_an_unknown_label_is_an_error_and_ld_imm64_takes_two_slots():
    with pytest.raises(KeyError):
        bpf.assemble([bpf.ja("nowhere")])
    insns = bpf.assemble([bpf.jeq(1, 5, "end"), bpf.ld_map(2, 7), bpf.mov(0, 1), "end", bpf.EXIT])
    assert len(insns) == 5 * 8 and struct.unpack_from("<BBhi", insns, 0) == (0x15, 0x01, 3, 5)


def test_meters_are_pinned_in_the_hosts_bpffs_when_it_has_one(monkeypatch):
    """/sys/fs/bpf outlives any process, pod or mount namespace; a bpffs of sockgate's
    own lives as long as its mount."""
    for system_has_one, want in ((True, segment_meter.SYSTEM_BPFFS / "sockgate"), (False, segment_meter.OWN_BPFFS)):
        segment_meter.pin_root.cache_clear()
        monkeypatch.setattr(segment_meter, "_is_bpffs", lambda path, v=system_has_one: v)
        assert segment_meter.pin_root() == want
    segment_meter.pin_root.cache_clear()


def test_a_meter_that_cant_be_read_is_a_kernel_failure_that_says_what():
    """Its counts are a part of the tx counters: never mistaken for zero."""
    from runtime.errors import KERNEL_FAILURE, SockgateError
    from runtime.kernel import nft
    with pytest.raises(SockgateError) as got:
        with nft._meter("read the segment meter's counts"):
            raise bpf.BpfError(13, "open the BPF object pinned at /x: Permission denied")
    assert got.value.code == KERNEL_FAILURE
    assert "cannot read the segment meter's counts" in str(got.value) and "Permission denied" in str(got.value)
