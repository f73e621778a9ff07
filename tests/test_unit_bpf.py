"""The BPF assembler and the fragment guard's program (pure: no kernel). The guard's
behaviour in the kernel: tests/test_hostile.py (fragments) and test_fragment_guard.py."""
from __future__ import annotations

import struct

import pytest

from runtime.kernel import bpf, fragment_guard


def _insns(code: bytes) -> list[tuple[int, int, int, int]]:
    return [struct.unpack_from("<BBhi", code, i) for i in range(0, len(code), 8)]


def test_jumps_count_the_instructions_after_them_and_ld_imm64_takes_two_slots():
    code = bpf.assemble([bpf.jeq(1, 5, "end"), bpf.ld_map(2, 7), bpf.mov(0, 1), "end", bpf.EXIT])
    insns = _insns(code)
    assert len(insns) == 5
    assert insns[0] == (0x15, 0x01, 3, 5)            # over ld_imm64 (2) and mov (1)
    assert insns[1] == (0x18, 0x12, 0, 7)            # dst r2, src PSEUDO_MAP_FD
    assert insns[2] == (0, 0, 0, 0)                  # its second half
    assert insns[4] == (0x95, 0, 0, 0)


def test_backward_jumps_are_negative():
    insns = _insns(bpf.assemble(["top", bpf.mov(0, 0), bpf.ja("top")]))
    assert insns[1] == (0x05, 0, -2, 0)


def test_an_unknown_label_is_an_error():
    with pytest.raises(KeyError):
        bpf.assemble([bpf.ja("nowhere")])


def test_the_guard_returns_pass_or_drop_and_counts_into_its_map():
    insns = _insns(fragment_guard.program(map_fd=42))
    exits = [i for i, ins in enumerate(insns) if ins[0] == 0x95]
    # Every exit follows `r0 = verdict`: pass (-1, tcx NEXT / TC_ACT_UNSPEC) or drop (2).
    assert sorted(insns[i - 1] for i in exits) == [(0xB7, 0, 0, -1), (0xB7, 0, 0, 2)]
    assert (0x18, 0x11, 0, 42) in insns              # the counter map
    # Every jump lands inside the program.
    for pc, (code, _, off, _) in enumerate(insns):
        if code & 0x07 == 0x05 and code not in (0x85, 0x95):
            assert 0 <= pc + 1 + off < len(insns), (pc, off)
