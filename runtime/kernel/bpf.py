"""The bpf(2) calls sockgate makes, over ctypes, and a tiny assembler: enough to load
one netfilter program of a few dozen instructions with a hash map, attach it to
netfilter hooks through links, pin those in a bpffs and read the map back. What runs
in the kernel: runtime/kernel/segment_meter.py.

Why not libbpf/bcc: they compile C with clang at load time (bcc) or need an object
file built with it (libbpf; Debian 12's 1.1 can't attach a netfilter program
anyway); the node would need an LLVM toolchain or the project a build step for one
short program that fits on a screen as instructions.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
from dataclasses import dataclass

from runtime.kernel.netlink.core import Layout

# bpf(2) commands (include/uapi/linux/bpf.h, enum bpf_cmd)
MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
PROG_LOAD = 5
OBJ_PIN = 6
OBJ_GET = 7
PROG_GET_FD_BY_ID = 13
MAP_GET_FD_BY_ID = 14
OBJ_GET_INFO_BY_FD = 15
MAP_LOOKUP_AND_DELETE_ELEM = 21
LINK_CREATE = 28

MAP_TYPE_HASH = 1
PROG_TYPE_NETFILTER = 32
ATTACH_NETFILTER = 45
PSEUDO_MAP_FD = 1
NOEXIST = 1  # map update flag: only a new key

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280}

# The parts of union bpf_attr each command reads; the kernel wants the rest zero.
_ATTR_SIZE = 128
MAP_CREATE_ATTR = Layout(("map_type", "I"), ("key_size", "I"), ("value_size", "I"), ("max_entries", "I"),
                         ("map_flags", "I"), ("inner_map_fd", "I"), ("numa_node", "I"), ("map_name", "16s"))
PROG_LOAD_ATTR = Layout(("prog_type", "I"), ("insn_cnt", "I"), ("insns", "Q"), ("license", "Q"),
                        ("log_level", "I"), ("log_size", "I"), ("log_buf", "Q"), ("kern_version", "I"),
                        ("prog_flags", "I"), ("prog_name", "16s"), ("prog_ifindex", "I"),
                        ("expected_attach_type", "I"))
OBJ_ATTR = Layout(("pathname", "Q"), ("bpf_fd", "I"), ("file_flags", "I"))
BY_ID_ATTR = Layout(("id", "I"), ("next_id", "I"), ("open_flags", "I"))
INFO_ATTR = Layout(("bpf_fd", "I"), ("info_len", "I"), ("info", "Q"))
MAP_ELEM_ATTR = Layout(("map_fd", "I"), ("_pad", "4x"), ("key", "Q"), ("value", "Q"), ("flags", "Q"))
# link_create's netfilter member sits in the union after the four common fields
LINK_CREATE_ATTR = Layout(("prog_fd", "I"), ("target_fd", "I"), ("attach_type", "I"), ("flags", "I"),
                          ("pf", "I"), ("hooknum", "I"), ("priority", "i"), ("nf_flags", "I"))

# The process's own symbols: find_library would run ldconfig, on every in-process ADD.
_libc = ctypes.CDLL(None, use_errno=True)


class BpfError(OSError):
    """A bpf(2) call the kernel refused; the message names the call."""


def _call(cmd: int, what: str, layout: Layout, **fields: int | bytes) -> int:
    buf = ctypes.create_string_buffer(_ATTR_SIZE)
    layout.pack_into(buf, 0, *(fields.get(name, b"" if code.endswith("s") else 0)  # type: ignore[union-attr]
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


_SIZES = {1: "b", 2: "h", 4: "w", 8: "dw"}


def ldx(size: str | int, dst: int, src: int, off: int) -> Insn:
    """dst = *(size *)(src + off); size in bytes or as b/h/w/dw."""
    size = _SIZES[size] if isinstance(size, int) else size
    return Insn({"w": 0x61, "h": 0x69, "b": 0x71, "dw": 0x79}[size], dst, src, off)


def stx(size: str, dst: int, src: int, off: int) -> Insn:
    """*(size *)(dst + off) = src"""
    return Insn({"w": 0x63, "dw": 0x7B}[size], dst, src, off)


def atomic_add(dst: int, src: int, off: int) -> Insn:
    """*(u64 *)(dst + off) += src, atomically."""
    return Insn(0xDB, dst, src, off, 0)


def mov(dst: int, imm: int) -> Insn:
    return Insn(0xB7, dst, imm=imm)


def movr(dst: int, src: int) -> Insn:
    return Insn(0xBF, dst, src)


def add(dst: int, imm: int) -> Insn:
    return Insn(0x07, dst, imm=imm)


def addr(dst: int, src: int) -> Insn:
    return Insn(0x0F, dst, src)


def subr(dst: int, src: int) -> Insn:
    return Insn(0x1F, dst, src)


def mulr(dst: int, src: int) -> Insn:
    return Insn(0x2F, dst, src)


def divr(dst: int, src: int) -> Insn:
    """Unsigned; the kernel makes x / 0 = 0."""
    return Insn(0x3F, dst, src)


def and_(dst: int, imm: int) -> Insn:
    return Insn(0x57, dst, imm=imm)


def rsh(dst: int, imm: int) -> Insn:
    return Insn(0x77, dst, imm=imm)


def lsh(dst: int, imm: int) -> Insn:
    return Insn(0x67, dst, imm=imm)


def jeq(dst: int, imm: int, label: str) -> Insn:
    return Insn(0x15, dst, off=label, imm=imm)


def jne(dst: int, imm: int, label: str) -> Insn:
    return Insn(0x55, dst, off=label, imm=imm)


def jle(dst: int, imm: int, label: str) -> Insn:
    return Insn(0xB5, dst, off=label, imm=imm)


def jle_reg(dst: int, src: int, label: str) -> Insn:
    return Insn(0xBD, dst, src, off=label)


def jgt_reg(dst: int, src: int, label: str) -> Insn:
    return Insn(0x2D, dst, src, off=label)


def ja(label: str) -> Insn:
    return Insn(0x05, off=label)


def call(helper: int) -> Insn:
    return Insn(0x85, imm=helper)


PSEUDO_KFUNC_CALL = 2


def kfunc(btf_id: int) -> Insn:
    """Call the kernel function whose BTF type id is `btf_id` (in vmlinux)."""
    return Insn(0x85, 0, PSEUDO_KFUNC_CALL, 0, btf_id)


def ld_map(dst: int, map_fd: int) -> Insn:
    return Insn(LD_IMM64, dst, PSEUDO_MAP_FD, imm=map_fd)


EXIT = Insn(0x95)


# --- objects --------------------------------------------------------------------

def create_hash(name: bytes, key_size: int, value_size: int, entries: int) -> int:
    """A hash map; returns its fd."""
    return _call(MAP_CREATE, "create a BPF map", MAP_CREATE_ATTR, map_type=MAP_TYPE_HASH, key_size=key_size,
                 value_size=value_size, max_entries=entries, map_name=name)


def load_netfilter(name: bytes, code: bytes) -> int:
    """Load a netfilter program; returns its fd. The verifier's log is asked for only
    when it refuses (a second load), to say why."""
    lic = ctypes.create_string_buffer(b"GPL")
    insns = ctypes.create_string_buffer(code, len(code))
    what = f"load BPF program {name.decode()}"
    fields: dict[str, int | bytes] = dict(prog_type=PROG_TYPE_NETFILTER, insn_cnt=len(code) // 8,
                                          insns=ctypes.addressof(insns), license=ctypes.addressof(lic),
                                          prog_name=name, expected_attach_type=ATTACH_NETFILTER)
    try:
        return _call(PROG_LOAD, what, PROG_LOAD_ATTR, **fields)
    except BpfError as exc:
        if exc.errno not in (errno.EACCES, errno.EINVAL):
            raise
    log = ctypes.create_string_buffer(65536)
    try:
        return _call(PROG_LOAD, what, PROG_LOAD_ATTR, log_level=1, log_size=ctypes.sizeof(log),
                     log_buf=ctypes.addressof(log), **fields)
    except BpfError as exc:
        verifier = log.value.decode(errors="replace").strip().splitlines()[-4:]
        raise BpfError(exc.errno, f"{exc.strerror}; verifier: {' | '.join(verifier)}") from None


def link_netfilter(prog_fd: int, pf: int, hooknum: int, priority: int) -> int:
    """Attach a netfilter program to a hook of the calling thread's netns; returns the
    link's fd. The link holds the hook, and a reference to the netns, until its last
    fd closes or its pin is removed."""
    return _call(LINK_CREATE, f"attach a netfilter program (family {pf}, hook {hooknum})", LINK_CREATE_ATTR,
                 prog_fd=prog_fd, attach_type=ATTACH_NETFILTER, pf=pf, hooknum=hooknum, priority=priority)


def pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(path.encode())
    _call(OBJ_PIN, f"pin a BPF object at {path}", OBJ_ATTR, pathname=ctypes.addressof(p), bpf_fd=fd)


def pinned(path: str) -> int:
    """An fd of the object pinned at `path`."""
    p = ctypes.create_string_buffer(path.encode())
    return _call(OBJ_GET, f"open the BPF object pinned at {path}", OBJ_ATTR, pathname=ctypes.addressof(p))


def object_id(fd: int) -> int:
    """A map's, program's or link's id: unique among the kernel's live objects, and not
    given again until the ids wrap (2^31 objects later). The id is the second u32 of
    every bpf_*_info, so only that much is asked for (the kernel copies what fits)."""
    info = ctypes.create_string_buffer(8)
    _call(OBJ_GET_INFO_BY_FD, "read a BPF object's id", INFO_ATTR, bpf_fd=fd, info_len=8,
          info=ctypes.addressof(info))
    return int.from_bytes(info.raw[4:8], sys.byteorder)


def link_prog_id(fd: int) -> int:
    """The id of the program a link attaches (bpf_link_info: type, id, prog_id)."""
    info = ctypes.create_string_buffer(12)
    _call(OBJ_GET_INFO_BY_FD, "read a BPF link's program", INFO_ATTR, bpf_fd=fd, info_len=12,
          info=ctypes.addressof(info))
    return int.from_bytes(info.raw[8:12], sys.byteorder)


# bpf_prog_info's nr_map_ids (u32) and map_ids (a pointer to u32s), after type, id,
# tag[8], two lengths, two pointers, load_time and created_by_uid.
_PROG_INFO_MAPS = Layout(("nr_map_ids", "I"), ("map_ids", "Q"))
_PROG_INFO_MAPS_AT = 52


def prog_map_ids(prog_id: int, most: int = 8) -> list[int]:
    """The ids of the maps a live program uses (at most `most` of them)."""
    fd = _call(PROG_GET_FD_BY_ID, f"open BPF program {prog_id}", BY_ID_ATTR, id=prog_id)
    try:
        ids = (ctypes.c_uint32 * most)()
        info = ctypes.create_string_buffer(_PROG_INFO_MAPS_AT + _PROG_INFO_MAPS.size)
        _PROG_INFO_MAPS.pack_into(info, _PROG_INFO_MAPS_AT, most, ctypes.addressof(ids))
        _call(OBJ_GET_INFO_BY_FD, f"read BPF program {prog_id}'s maps", INFO_ATTR, bpf_fd=fd,
              info_len=len(info), info=ctypes.addressof(info))
        (count, _) = _PROG_INFO_MAPS.unpack_from(info, _PROG_INFO_MAPS_AT)
        return list(ids[:min(count, most)])
    finally:
        os.close(fd)


def map_alive(map_id: int) -> bool:
    """Whether a map of that id lives (something holds it: a pin, a program, an fd)."""
    try:
        os.close(_call(MAP_GET_FD_BY_ID, f"open BPF map {map_id}", BY_ID_ATTR, id=map_id))
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """A map's value at `key`; None when there is none."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _call(MAP_LOOKUP_ELEM, "read a BPF map", MAP_ELEM_ATTR, map_fd=fd, key=ctypes.addressof(k),
              value=ctypes.addressof(v))
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def delete(fd: int, key: bytes) -> bool:
    """Delete `key`; False when it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _call(MAP_DELETE_ELEM, "delete from a BPF map", MAP_ELEM_ATTR, map_fd=fd, key=ctypes.addressof(k))
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def keys(fd: int, key_size: int) -> list[bytes]:
    """Every key of a hash map (a snapshot: keys added meanwhile may be missed)."""
    out: list[bytes] = []
    nxt = ctypes.create_string_buffer(key_size)
    cur: ctypes.Array | None = None
    while True:
        try:
            _call(MAP_GET_NEXT_KEY, "list a BPF map", MAP_ELEM_ATTR, map_fd=fd,
                  key=ctypes.addressof(cur) if cur is not None else 0, value=ctypes.addressof(nxt))
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return out
            raise
        out.append(nxt.raw)
        cur = ctypes.create_string_buffer(nxt.raw, key_size)
