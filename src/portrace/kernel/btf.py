"""ctypes layouts built from a BPF object's own BTF (through libbpf).

The CO-RE engine decodes its records (``bpf/portrace.h``) with the layout the
compiler gave them, read back from the object, so the frontend keeps no second
copy of the header. Only what records use is supported: integers, arrays,
structs, unions, enums, typedefs and qualifiers; no bitfields.
Format: ``include/uapi/linux/btf.h`` (struct btf_type, btf_member, btf_array).
"""

from __future__ import annotations

import ctypes
from typing import Any

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_VAR, KIND_DATASEC = 14, 15
QUALIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT)


class _Type(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32),
                ("size_or_type", ctypes.c_uint32)]


class _Member(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32),
                ("offset", ctypes.c_uint32)]


class _Array(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("index_type", ctypes.c_uint32),
                ("nelems", ctypes.c_uint32)]


class _VarSecinfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("offset", ctypes.c_uint32),
                ("size", ctypes.c_uint32)]


_INTS = {(1, False): ctypes.c_uint8, (1, True): ctypes.c_int8,
         (2, False): ctypes.c_uint16, (2, True): ctypes.c_int16,
         (4, False): ctypes.c_uint32, (4, True): ctypes.c_int32,
         (8, False): ctypes.c_uint64, (8, True): ctypes.c_int64}


class BtfError(LookupError):
    """A type is missing from the object's BTF, or uses an unsupported kind."""


class Btf:
    """One ``struct btf *`` owned by libbpf (freed with its object)."""

    def __init__(self, lib: Any, handle: int) -> None:
        self.lib = lib
        self.handle = handle
        self._cache: dict[int, Any] = {}

    def _type(self, type_id: int) -> tuple[_Type, int]:
        addr = self.lib.btf__type_by_id(self.handle, type_id)
        if not addr:
            raise BtfError(f"no BTF type {type_id}")
        return _Type.from_address(addr), addr

    def _name(self, off: int) -> str:
        return (self.lib.btf__name_by_offset(self.handle, off) or b"").decode()

    def find(self, name: str, kind: int) -> int:
        type_id = self.lib.btf__find_by_name_kind(self.handle, name.encode(), kind)
        if type_id <= 0:
            raise BtfError(f"type {name} (kind {kind}) is not in the object's BTF")
        return int(type_id)

    def layout(self, name: str) -> Any:
        """The ctypes type of ``struct name`` or ``union name``."""
        for kind in (KIND_STRUCT, KIND_UNION):
            try:
                return self.ctype(self.find(name, kind))
            except BtfError:
                continue
        raise BtfError(f"struct/union {name} is not in the object's BTF")

    def ctype(self, type_id: int) -> Any:
        if type_id not in self._cache:
            self._cache[type_id] = self._build(type_id)
        return self._cache[type_id]

    def _build(self, type_id: int) -> Any:
        t, addr = self._type(type_id)
        kind, vlen = (t.info >> 24) & 0x1F, t.info & 0xFFFF
        extra = addr + ctypes.sizeof(_Type)
        if kind in QUALIFIERS:
            return self.ctype(t.size_or_type)
        if kind == KIND_INT:
            encoding = ctypes.c_uint32.from_address(extra).value
            signed = bool((encoding >> 24) & 1)
            # BTF_INT_CHAR, or plain `char` (clang marks it only as signed):
            # bytes, as the C string it holds.
            if t.size_or_type == 1 and ((encoding >> 24) & 2 or self._name(t.name_off) == "char"):
                return ctypes.c_char
            return _INTS[(t.size_or_type, signed)]
        if kind == KIND_ENUM:
            return _INTS[(t.size_or_type, False)]
        if kind == KIND_PTR:
            return ctypes.c_uint64
        if kind == KIND_ARRAY:
            arr = _Array.from_address(extra)
            return self.ctype(arr.type) * arr.nelems
        if kind in (KIND_STRUCT, KIND_UNION):
            return self._aggregate(t, kind, vlen, extra, type_id)
        raise BtfError(f"BTF kind {kind} (type {type_id}) is not supported in records")

    def _aggregate(self, t: _Type, kind: int, vlen: int, extra: int, type_id: int) -> Any:
        kind_flag = bool(t.info >> 31)
        members = [_Member.from_address(extra + i * ctypes.sizeof(_Member)) for i in range(vlen)]
        base: Any = ctypes.Union if kind == KIND_UNION else ctypes.Structure
        fields: list[tuple[str, Any]] = []
        pos = 0
        for i, m in enumerate(members):
            bits = m.offset & 0xFFFFFF if kind_flag else m.offset
            if (kind_flag and m.offset >> 24) or bits % 8:
                raise BtfError(f"bitfield in type {type_id}: records must not use them")
            name = self._name(m.name_off) or f"_anon{i}"
            ctype = self.ctype(m.type)
            off = bits // 8
            if kind == KIND_STRUCT and off > pos:
                fields.append((f"_gap{i}", ctypes.c_uint8 * (off - pos)))
            fields.append((name, ctype))
            pos = max(pos, off + ctypes.sizeof(ctype)) if kind == KIND_STRUCT else pos
        if kind == KIND_STRUCT and t.size_or_type > pos:
            fields.append(("_tail", ctypes.c_uint8 * (t.size_or_type - pos)))
        cls = type(self._name(t.name_off) or f"anon{type_id}", (base,),
                   {"_pack_": 1, "_fields_": fields})
        if ctypes.sizeof(cls) != t.size_or_type:
            raise BtfError(f"type {type_id}: built {ctypes.sizeof(cls)} bytes, BTF says "
                           f"{t.size_or_type}")
        return cls

    def datasec(self, name: str) -> dict[str, tuple[int, int]]:
        """variable name -> (offset, size) in a data section such as .rodata."""
        t, addr = self._type(self.find(name, KIND_DATASEC))
        vlen = t.info & 0xFFFF
        out = {}
        for i in range(vlen):
            v = _VarSecinfo.from_address(addr + ctypes.sizeof(_Type)
                                         + i * ctypes.sizeof(_VarSecinfo))
            var, _ = self._type(v.type)
            out[self._name(var.name_off)] = (int(v.offset), int(v.size))
        return out
