"""The bpf(2) calls sockgate makes, over ctypes, and a tiny assembler: enough to load a
classifier of a few dozen instructions with a per-CPU counter map, attach it to an
interface's ingress (tcx, or a clsact qdisc's bpf filter on kernels before 6.6) and
read it back. What runs in the kernel: runtime/kernel/fragment_guard.py.

Why not libbpf/bcc: they compile C with clang at load time (bcc) or need an object
file built with it (libbpf); the node would need an LLVM toolchain or the project a
build step for one short program that fits on a screen as instructions.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import struct
from dataclasses import dataclass
from pathlib import Path

from runtime.kernel.netlink.core import Layout

# bpf(2) commands (include/uapi/linux/bpf.h, enum bpf_cmd)
MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
PROG_LOAD = 5
PROG_ATTACH = 8
PROG_DETACH = 9
PROG_GET_FD_BY_ID = 13
MAP_GET_FD_BY_ID = 14
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16

MAP_TYPE_PERCPU_ARRAY = 6
PROG_TYPE_SCHED_CLS = 3
ATTACH_TCX_INGRESS = 46
PSEUDO_MAP_FD = 1

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280}

# The parts of union bpf_attr each command reads; the kernel wants the rest zero.
_ATTR_SIZE = 128
MAP_CREATE_ATTR = Layout(("map_type", "I"), ("key_size", "I"), ("value_size", "I"), ("max_entries", "I"))
PROG_LOAD_ATTR = Layout(("prog_type", "I"), ("insn_cnt", "I"), ("insns", "Q"), ("license", "Q"),
                        ("log_level", "I"), ("log_size", "I"), ("log_buf", "Q"), ("kern_version", "I"),
                        ("prog_flags", "I"), ("prog_name", "16s"), ("prog_ifindex", "I"),
                        ("expected_attach_type", "I"))
PROG_ATTACH_ATTR = Layout(("target_ifindex", "I"), ("attach_bpf_fd", "I"), ("attach_type", "I"),
                          ("attach_flags", "I"))
PROG_QUERY_ATTR = Layout(("target_ifindex", "I"), ("attach_type", "I"), ("query_flags", "I"),
                         ("attach_flags", "I"), ("prog_ids", "Q"), ("prog_cnt", "I"))
GET_FD_BY_ID_ATTR = Layout(("id", "I"))
INFO_BY_FD_ATTR = Layout(("bpf_fd", "I"), ("info_len", "I"), ("info", "Q"))
MAP_ELEM_ATTR = Layout(("map_fd", "I"), ("_pad", "4x"), ("key", "Q"), ("value", "Q"), ("flags", "Q"))
# struct bpf_prog_info, up to its name
PROG_INFO = Layout(("type", "I"), ("id", "I"), ("tag", "8s"), ("jited_prog_len", "I"), ("xlated_prog_len", "I"),
                   ("jited_prog_insns", "Q"), ("xlated_prog_insns", "Q"), ("load_time", "Q"),
                   ("created_by_uid", "I"), ("nr_map_ids", "I"), ("map_ids", "Q"), ("name", "16s"))

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class BpfError(OSError):
    """A bpf(2) call the kernel refused; the message names the call."""


def _call(cmd: int, what: str, layout: Layout, **fields: int | bytes) -> int:
    buf = ctypes.create_string_buffer(_ATTR_SIZE)
    layout.pack_into(buf, 0, *(fields.get(name, b"" if isinstance(code, str) and code.endswith("s") else 0)
                               for name, code in layout.fields if not name.startswith("_")))
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(0, f"{what}: bpf(2) on {platform.machine()} is not supported by sockgate")
    ret = _libc.syscall(nr, cmd, buf, _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return int(ret)


# --- assembling -----------------------------------------------------------------

@dataclass(frozen=True)
class Insn:
    """One instruction; `off` may name a label (jumps), resolved by `assemble`."""
    code: int
    dst: int = 0
    src: int = 0
    off: int | str = 0
    imm: int = 0

    @property
    def slots(self) -> int:
        return 2 if self.code == LD_IMM64 else 1


_INSN = Layout(("code", "B"), ("regs", "B"), ("off", "h"), ("imm", "i"), byteorder="<")
LD_IMM64 = 0x18


def assemble(items: list[Insn | str]) -> bytes:
    """Instructions and labels (strings) to bytecode; a jump's offset counts the
    instructions after it."""
    labels, pc = {}, 0
    for it in items:
        if isinstance(it, str):
            labels[it] = pc
        else:
            pc += it.slots
    out, pc = bytearray(), 0
    for it in items:
        if isinstance(it, str):
            continue
        off = labels[it.off] - pc - 1 if isinstance(it.off, str) else it.off
        out += _INSN.pack(it.code, it.src << 4 | it.dst, off, it.imm)
        if it.slots == 2:
            out += _INSN.pack(0, 0, 0, 0)
        pc += it.slots
    return bytes(out)


def ldx(size: str, dst: int, src: int, off: int) -> Insn:
    """dst = *(size *)(src + off)"""
    return Insn({"w": 0x61, "h": 0x69, "b": 0x71, "dw": 0x79}[size], dst, src, off)


def stx(size: str, dst: int, src: int, off: int) -> Insn:
    """*(size *)(dst + off) = src"""
    return Insn({"w": 0x63, "dw": 0x7B}[size], dst, src, off)


def mov(dst: int, imm: int) -> Insn:
    return Insn(0xB7, dst, imm=imm)


def movr(dst: int, src: int) -> Insn:
    return Insn(0xBF, dst, src)


def add(dst: int, imm: int) -> Insn:
    return Insn(0x07, dst, imm=imm)


def jeq(dst: int, imm: int, label: str) -> Insn:
    return Insn(0x15, dst, off=label, imm=imm)


def jne(dst: int, imm: int, label: str) -> Insn:
    return Insn(0x55, dst, off=label, imm=imm)


def jgt_reg(dst: int, src: int, label: str) -> Insn:
    return Insn(0x2D, dst, src, off=label)


def ja(label: str) -> Insn:
    return Insn(0x05, off=label)


def call(helper: int) -> Insn:
    return Insn(0x85, imm=helper)


def ld_map(dst: int, map_fd: int) -> Insn:
    return Insn(LD_IMM64, dst, PSEUDO_MAP_FD, imm=map_fd)


EXIT = Insn(0x95)


# --- objects --------------------------------------------------------------------

def create_percpu_array(entries: int) -> int:
    """A map of `entries` u64 counters, one per CPU each; returns its fd."""
    return _call(MAP_CREATE, "create a BPF map", MAP_CREATE_ATTR, map_type=MAP_TYPE_PERCPU_ARRAY,
                 key_size=4, value_size=8, max_entries=entries)


def load_classifier(name: bytes, code: bytes) -> int:
    """Load a SCHED_CLS program (runs under tcx and cls_bpf alike); returns its fd.
    The verifier's log is only asked for when it refuses (a second load): writing it
    takes the load from ~0.2 to ~0.5 ms, on every ADD."""
    lic = ctypes.create_string_buffer(b"GPL")
    insns = ctypes.create_string_buffer(code, len(code))
    what = f"load BPF program {name.decode()}"
    fields: dict[str, int | bytes] = dict(prog_type=PROG_TYPE_SCHED_CLS, insn_cnt=len(code) // 8,
                                          insns=ctypes.addressof(insns),
                                          license=ctypes.addressof(lic), prog_name=name)
    try:
        return _call(PROG_LOAD, what, PROG_LOAD_ATTR, **fields)
    except BpfError as exc:
        if exc.errno != errno.EACCES and exc.errno != errno.EINVAL:
            raise
    log = ctypes.create_string_buffer(16384)
    try:
        return _call(PROG_LOAD, what, PROG_LOAD_ATTR, log_level=1, log_size=ctypes.sizeof(log),
                     log_buf=ctypes.addressof(log), **fields)
    except BpfError as exc:
        verifier = log.value.decode(errors="replace").strip().splitlines()[-3:]
        raise BpfError(exc.errno, f"{exc.strerror}; verifier: {' | '.join(verifier)}") from None


def tcx_attach(ifindex: int, prog_fd: int) -> None:
    """Attach to the ingress of `ifindex` (in the caller's netns). Without a link the
    attachment holds the program by itself: it goes when the interface goes."""
    _call(PROG_ATTACH, f"attach to the tcx ingress of interface {ifindex}", PROG_ATTACH_ATTR,
          target_ifindex=ifindex, attach_bpf_fd=prog_fd, attach_type=ATTACH_TCX_INGRESS)


def tcx_detach(ifindex: int, prog_fd: int) -> None:
    _call(PROG_DETACH, f"detach from the tcx ingress of interface {ifindex}", PROG_ATTACH_ATTR,
          target_ifindex=ifindex, attach_bpf_fd=prog_fd, attach_type=ATTACH_TCX_INGRESS)


def tcx_programs(ifindex: int) -> list[int]:
    """Ids of the programs on the tcx ingress of `ifindex`."""
    ids = (ctypes.c_uint32 * 16)()
    _call(PROG_QUERY, f"query the tcx ingress of interface {ifindex}", PROG_QUERY_ATTR,
          target_ifindex=ifindex, attach_type=ATTACH_TCX_INGRESS, prog_ids=ctypes.addressof(ids), prog_cnt=16)
    return [i for i in ids if i]


def prog_fd(prog_id: int) -> int:
    return _call(PROG_GET_FD_BY_ID, f"open BPF program {prog_id}", GET_FD_BY_ID_ATTR, id=prog_id)


def prog_info(fd: int) -> tuple[str, list[int]]:
    """(name, ids of its maps) of a program."""
    maps = (ctypes.c_uint32 * 4)()
    info = ctypes.create_string_buffer(PROG_INFO.size)
    struct.pack_into("=I", info, PROG_INFO.offset("nr_map_ids"), len(maps))
    struct.pack_into("=Q", info, PROG_INFO.offset("map_ids"), ctypes.addressof(maps))
    _call(OBJ_GET_INFO_BY_FD, "read a BPF program's info", INFO_BY_FD_ATTR, bpf_fd=fd, info_len=PROG_INFO.size,
          info=ctypes.addressof(info))
    got = PROG_INFO.unpack_from(info.raw)
    fields = dict(zip((name for name, _ in PROG_INFO.fields), got))
    name = bytes(fields["name"]).split(b"\0", 1)[0].decode(errors="replace")
    return name, [m for m in maps[:min(fields["nr_map_ids"], len(maps))] if m]


def map_fd(map_id: int) -> int:
    return _call(MAP_GET_FD_BY_ID, f"open BPF map {map_id}", GET_FD_BY_ID_ATTR, id=map_id)


def _possible_cpus() -> int:
    """Per-CPU maps hold a value for every possible CPU, not only the online ones."""
    count = 0
    for part in Path("/sys/devices/system/cpu/possible").read_text().strip().split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def percpu_sum(fd: int, key: int) -> int:
    """The sum over CPUs of a per-CPU array's u64 at `key`."""
    cpus = _possible_cpus()
    k = ctypes.c_uint32(key)
    values = (ctypes.c_uint64 * cpus)()
    _call(MAP_LOOKUP_ELEM, "read a BPF map", MAP_ELEM_ATTR, map_fd=fd, key=ctypes.addressof(k),
          value=ctypes.addressof(values))
    return sum(values)
