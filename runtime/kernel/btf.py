"""Where the running kernel keeps a struct's fields, read from its BTF
(/sys/kernel/btf/vmlinux): what a BPF program that reads kernel structs must know,
and what differs between kernel builds (a config option adds or drops fields).

Why not libbpf's CO-RE: it relocates an object file built by clang; sockgate's one
program is a few dozen instructions assembled in Python (runtime/kernel/bpf.py), so
the few offsets it needs are looked up here, by name, when it is loaded.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")

_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
_TYPE = struct.Struct("<III")         # name_off, info, size/type
_MAGIC = 0xEB9F

# BTF kinds (include/uapi/linux/btf.h) and the bytes that follow a type of each kind:
# a fixed part, and a part per member (vlen).
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM = 1, 2, 3, 4, 5, 6
_TYPEDEF, _VOLATILE, _CONST, _RESTRICT = 8, 9, 10, 11
_FUNC, _FUNC_PROTO, _VAR, _DATASEC, _DECL_TAG, _TYPE_TAG, _ENUM64 = 12, 13, 14, 15, 17, 18, 19
_TRAILER = {_INT: (4, 0), _ARRAY: (12, 0), _STRUCT: (0, 12), _UNION: (0, 12), _ENUM: (0, 8),
            _FUNC_PROTO: (0, 8), _VAR: (4, 0), _DATASEC: (0, 12), _DECL_TAG: (4, 0), _ENUM64: (0, 12)}
_QUALIFIERS = (_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG)


class BtfError(LookupError):
    """The kernel's BTF is missing, or lacks a struct or field sockgate needs."""


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    size_or_type: int
    kind_flag: bool
    members: tuple[tuple[str, int, int], ...] = ()  # (name, type id, bit offset)
    count: int = 0                                     # arrays: elements; type in members[0][1]


@dataclass(frozen=True)
class Field:
    """A field's place in its struct: byte offset (from the outermost struct) and size."""
    offset: int
    size: int


class Btf:
    """The types of one BTF blob, looked up by name."""

    def __init__(self, blob: bytes) -> None:
        magic, _, _, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(blob)
        if magic != _MAGIC:
            raise BtfError("not BTF (bad magic)")
        strings = blob[hdr_len + str_off:hdr_len + str_off + str_len]

        def name(off: int) -> str:
            return strings[off:strings.index(b"\0", off)].decode()

        self.types: list[_Type | None] = [None]  # type ids start at 1
        self.enums: dict[str, int] = {}
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, size_or_type = _TYPE.unpack_from(blob, pos)
            pos += _TYPE.size
            kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31)
            fixed, per_member = _TRAILER.get(kind, (0, 0))
            members: tuple[tuple[str, int, int], ...] = ()
            count = 0
            if kind in (_STRUCT, _UNION):
                members = tuple((name(n), t, o) for n, t, o in
                                (struct.unpack_from("<III", blob, pos + 12 * i) for i in range(vlen)))
            elif kind == _ARRAY:
                elem, _, count = struct.unpack_from("<III", blob, pos)
                members = (("", elem, 0),)
            elif kind == _ENUM:
                for i in range(vlen):
                    n, v = struct.unpack_from("<Ii", blob, pos + 8 * i)
                    self.enums[name(n)] = v
            elif kind == _ENUM64:
                for i in range(vlen):
                    n, lo, hi = struct.unpack_from("<III", blob, pos + 12 * i)
                    self.enums[name(n)] = hi << 32 | lo
            pos += fixed + per_member * vlen
            self.types.append(_Type(kind, name(name_off), size_or_type, kind_flag, members, count))
        self._structs = {t.name: i for i, t in enumerate(self.types) if t and t.kind == _STRUCT and t.name}
        self._funcs = {t.name: i for i, t in enumerate(self.types) if t and t.kind == _FUNC and t.name}

    def struct_id(self, name: str) -> int:
        """The type id of `struct name` (what a kfunc that casts to it is given)."""
        try:
            return self._structs[name]
        except KeyError:
            raise BtfError(f"the kernel's BTF has no struct {name}") from None

    def func_id(self, name: str) -> int:
        """The type id of a kernel function: how a BPF program calls a kfunc."""
        try:
            return self._funcs[name]
        except KeyError:
            raise BtfError(f"the kernel has no kfunc {name} (too old?)") from None

    def size(self, type_id: int) -> int:
        t = self.types[type_id]
        assert t is not None
        if t.kind in _QUALIFIERS:
            return self.size(t.size_or_type)
        if t.kind == _PTR:
            return 8
        if t.kind == _ARRAY:
            return t.count * self.size(t.members[0][1])
        return t.size_or_type

    def field(self, struct_name: str, field_name: str) -> Field:
        """`struct_name.field_name`, found also inside anonymous unions and structs (the
        kernel wraps many fields in them). Raises BtfError when either is missing or the
        field is a bitfield."""
        sid = self._structs.get(struct_name)
        if sid is None:
            raise BtfError(f"the kernel's BTF has no struct {struct_name}")
        found = self._find(sid, field_name, 0)
        if found is None:
            raise BtfError(f"the kernel's struct {struct_name} has no field {field_name}")
        return found

    def _find(self, type_id: int, field_name: str, base_bits: int) -> Field | None:
        t = self.types[type_id]
        assert t is not None
        for name, member_type, bits in t.members:
            if t.kind_flag:
                if bits >> 24:
                    if name == field_name:
                        raise BtfError(f"{t.name}.{name} is a bitfield")
                    continue
                bits &= 0xFFFFFF
            if name == field_name:
                return Field((base_bits + bits) // 8, self.size(member_type))
            inner = self._resolve(member_type)
            if not name and self.types[inner].kind in (_STRUCT, _UNION):  # type: ignore[union-attr]
                found = self._find(inner, field_name, base_bits + bits)
                if found is not None:
                    return found
        return None

    def _resolve(self, type_id: int) -> int:
        t = self.types[type_id]
        while t is not None and t.kind in _QUALIFIERS:
            type_id = t.size_or_type
            t = self.types[type_id]
        return type_id

    def enum(self, name: str) -> int:
        try:
            return self.enums[name]
        except KeyError:
            raise BtfError(f"the kernel's BTF has no enumerator {name}") from None


@lru_cache(maxsize=1)
def kernel() -> Btf:
    """The running kernel's BTF, parsed once per process (~0.3 s for 3 MB)."""
    try:
        return Btf(VMLINUX.read_bytes())
    except OSError as exc:
        raise BtfError(f"cannot read the kernel's BTF ({VMLINUX}): {exc.strerror} "
                       "(a kernel built without CONFIG_DEBUG_INFO_BTF)") from None
