"""nanosets: an Arrow-like columnar dataset library with a zero-copy file format, from scratch.

Stands in for pyarrow + HF `datasets` in this project. It keeps the ideas that make them fast: data
stored column by column in flat typed buffers, nulls in validity bitmaps, variable-length values
(strings, lists) as an offsets buffer into one values buffer, memory-mapped files whose columns are
read in place (no parsing, no copy), and row selection (select/shuffle/filter) as an index
indirection over untouched data. It drops the rest: no compute kernels, no dictionary/date/decimal
types, no IPC streaming, no Parquet writer, no cloud filesystems.

How it works, in five lines:
  1. A column is an `Array`: a type plus a few `memoryview` buffers (validity bits, offsets, values).
  2. Python rows become Arrays through `array_from_pylist` (types inferred or given as a schema).
  3. A `Table` is a list of RecordBatches (chunks) of equal-length named Arrays.
  4. `write_nano` lays buffers out 64-byte aligned in one file + JSON metadata; `read_nano` mmaps it
     and only parses the metadata, so opening is O(1) in data size and columns are views into the map.
  5. `Dataset` wraps a Table with an optional row-index indirection and the HF-datasets-like API.

Commands:
  python nanosets.py            # CPU self-test, a few seconds
  python nanosets.py --bench    # 1 GB benchmark against pyarrow (and HF datasets when installed)

Usage:
  from nanosets import Dataset, load_dataset
  ds = Dataset.from_list([{"q": "1+1", "ids": [1, 2, 3]}], schema={"ids": "list<int32>"})
  ds.save_to_disk("data/train.nano"); ds = load_dataset("data/train.nano")
  ds.shuffle(seed=0).with_format("torch")[0]["ids"]   # a tensor viewing the mmap'd file

THE .nano FILE FORMAT (version 1; all integers little-endian)
  offset  bytes  field
  0       8      magic b"NANOSET\\0"
  8       4      format version, uint32 (= 1)
  12      4      header size, uint32 (= 64)
  16      8      total file size, uint64 (a shorter file on disk means it was truncated)
  24      8      metadata offset, uint64
  32      8      metadata length, uint64
  40      4      crc32 of the metadata bytes, uint32
  44      20     reserved, zero
  64      ...    data buffers, each starting at a multiple of 64 bytes, zero padding between them
  M       L      metadata: UTF-8 JSON (M = metadata offset, L = metadata length), see below
  M+L     8      tail magic b"NANOEND\\0" (also the last 8 bytes of the file)

  Metadata JSON: {"version": 1, "num_rows": R, "schema": [[name, type], ...],
                  "batches": [{"length": n, "columns": [node, ...]}, ...], "metadata": {...}}
  A type is JSON: "int32" (any primitive name), "string", "null", {"list": T},
                  {"struct": [[name, T], ...]}, {"tensor": "float32", "shape": [2, 3]}.
  A node describes one Array of a batch: {"length": n, "null_count": k,
      "buffers": {"validity": [offset, nbytes] or null, "offsets"/"values"/"data": [offset, nbytes]},
      "children": [node, ...]}   (list: one child with the values; struct: one child per field)
  Buffers per type: primitive -> values (n * itemsize); bool -> values (one byte per value, unlike
  Arrow's bits, so torch.frombuffer(dtype=torch.bool) is zero-copy); string -> offsets ((n+1) int64)
  + data (UTF-8 bytes); list -> offsets ((n+1) int64) + child; struct -> children; tensor -> values
  (n * prod(shape) * itemsize); null -> nothing. Validity is bit-packed, LSB first, 1 = valid, and is
  omitted when the column has no nulls.

Sections:
  types . bitmaps . arrays . building arrays from Python . tables . the .nano file .
  Dataset . loading (jsonl/json/parquet/nano) . pyarrow interop . training helpers (packing,
  sharded sampler) . benchmark . self-test
"""
from __future__ import annotations

import array as pyarray
import bisect
import gc
import glob
import json
import math
import mmap
import os
import random
import struct
import sys
import tempfile
import time
import warnings
import zlib
from typing import Any, Callable, Iterable, Iterator

import torch

# ---- types ----------------------------------------------------------------------------------------
# A DataType says how to interpret an Array's buffers. Primitive types are fixed-width scalars; the
# others are built from them. `str(t)` is a compact readable form ("list<int32>") that `parse_type`
# reads back, so users can write schemas as strings.


class DataType:
    """Base class of all types. Equality and hashing go through the canonical string form."""

    def __eq__(self, other):
        return isinstance(other, DataType) and str(self) == str(other)

    def __hash__(self):
        return hash(str(self))

    def __repr__(self):
        return f"DataType({str(self)!r})"


class PrimitiveType(DataType):
    """Fixed-width scalar. `fmt` is the memoryview/struct format char (None where Python has none)."""

    def __init__(self, name: str, fmt: str | None, itemsize: int, torch_dtype: torch.dtype):
        self.name, self.fmt, self.itemsize, self.torch_dtype = name, fmt, itemsize, torch_dtype

    def __str__(self):
        return self.name


class NullType(DataType):
    """A column where every value is None (what inference gives for an all-None column)."""

    def __str__(self):
        return "null"


class StringType(DataType):
    """UTF-8 text: int64 offsets into one bytes buffer (Arrow's large_utf8)."""

    def __str__(self):
        return "string"


class ListType(DataType):
    """Variable-length list of `value` (any type, so lists nest to any depth): Arrow's large_list."""

    def __init__(self, value: DataType):
        self.value = value

    def __str__(self):
        return f"list<{self.value}>"


class StructType(DataType):
    """A record of named fields, each a child Array of the same length."""

    def __init__(self, fields: dict[str, DataType]):
        for name in fields:
            if any(c in name for c in "<>,:"):
                raise ValueError(f"struct field name {name!r} may not contain any of '<>,:'")
        self.fields = dict(fields)

    def __str__(self):
        return "struct<" + ", ".join(f"{k}: {v}" for k, v in self.fields.items()) + ">"


class TensorType(DataType):
    """Fixed-shape tensor per row (Arrow's fixed_shape_tensor): n rows = one [n, *shape] buffer."""

    def __init__(self, value: PrimitiveType, shape: tuple[int, ...]):
        if not isinstance(value, PrimitiveType) or value.name == "bool":
            raise ValueError(f"tensor values must be a numeric primitive type, got {value}")
        if not shape or any(int(s) <= 0 for s in shape):
            raise ValueError(f"tensor shape must be non-empty positive ints, got {shape}")
        self.value, self.shape = value, tuple(int(s) for s in shape)
        self.numel = math.prod(self.shape)

    def __str__(self):
        return f"tensor<{self.value}>[{','.join(map(str, self.shape))}]"


PRIMITIVES: dict[str, PrimitiveType] = {
    t.name: t
    for t in [
        PrimitiveType("bool", "?", 1, torch.bool),
        PrimitiveType("int8", "b", 1, torch.int8),
        PrimitiveType("uint8", "B", 1, torch.uint8),
        PrimitiveType("int16", "h", 2, torch.int16),
        PrimitiveType("uint16", "H", 2, torch.uint16),
        PrimitiveType("int32", "i", 4, torch.int32),
        PrimitiveType("uint32", "I", 4, torch.uint32),
        PrimitiveType("int64", "q", 8, torch.int64),
        PrimitiveType("uint64", "Q", 8, torch.uint64),
        # memoryview cannot cast to half floats, so these two decode through torch instead.
        PrimitiveType("float16", None, 2, torch.float16),
        PrimitiveType("bfloat16", None, 2, torch.bfloat16),
        PrimitiveType("float32", "f", 4, torch.float32),
        PrimitiveType("float64", "d", 8, torch.float64),
    ]
}
STRING, NULL = StringType(), NullType()
_TORCH_TO_PRIMITIVE = {t.torch_dtype: t for t in PRIMITIVES.values()}


def parse_type(spec: str | DataType) -> DataType:
    """'list<struct<a: int32, b: string>>' -> DataType. A small recursive-descent parser."""
    if isinstance(spec, DataType):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a type must be a DataType or a string like 'list<int32>', got {spec!r}")
    s = spec.replace(" ", "")
    t, end = _parse_type_at(s, 0, spec)
    if end != len(s):
        raise ValueError(f"cannot parse type {spec!r}: unexpected text at {s[end:]!r}")
    return t


def _parse_type_at(s: str, i: int, spec: str) -> tuple[DataType, int]:
    j = i
    while j < len(s) and (s[j].isalnum() or s[j] == "_"):
        j += 1
    name = s[i:j]
    if name in PRIMITIVES:
        return PRIMITIVES[name], j
    if name == "string":
        return STRING, j
    if name == "null":
        return NULL, j
    if name in ("list", "struct", "tensor") and s[j : j + 1] == "<":
        if name == "list":
            inner, k = _parse_type_at(s, j + 1, spec)
            _expect(s, k, ">", spec)
            return ListType(inner), k + 1
        if name == "tensor":
            inner, k = _parse_type_at(s, j + 1, spec)
            _expect(s, k, ">", spec)
            _expect(s, k + 1, "[", spec)
            close = s.find("]", k + 2)
            if close < 0:
                raise ValueError(f"cannot parse type {spec!r}: tensor shape has no closing ']'")
            shape = tuple(int(x) for x in s[k + 2 : close].split(","))
            return TensorType(inner, shape), close + 1
        fields, k = {}, j + 1
        while s[k : k + 1] != ">":
            colon = s.find(":", k)
            if colon < 0:
                raise ValueError(f"cannot parse type {spec!r}: struct field without ':'")
            fname = s[k:colon]
            fields[fname], k = _parse_type_at(s, colon + 1, spec)
            if s[k : k + 1] == ",":
                k += 1
        return StructType(fields), k + 1
    raise ValueError(
        f"cannot parse type {spec!r} at {s[i:]!r}: expected one of {sorted(PRIMITIVES)}, "
        "string, null, list<T>, struct<name: T, ...>, tensor<T>[d0,d1,...]"
    )


def _expect(s: str, i: int, ch: str, spec: str):
    if s[i : i + 1] != ch:
        raise ValueError(f"cannot parse type {spec!r}: expected {ch!r} at {s[i:]!r}")


def type_to_json(t: DataType):
    if isinstance(t, ListType):
        return {"list": type_to_json(t.value)}
    if isinstance(t, StructType):
        return {"struct": [[k, type_to_json(v)] for k, v in t.fields.items()]}
    if isinstance(t, TensorType):
        return {"tensor": t.value.name, "shape": list(t.shape)}
    return str(t)


def type_from_json(j) -> DataType:
    if isinstance(j, str):
        return parse_type(j)
    if isinstance(j, dict) and "list" in j:
        return ListType(type_from_json(j["list"]))
    if isinstance(j, dict) and "struct" in j:
        return StructType({k: type_from_json(v) for k, v in j["struct"]})
    if isinstance(j, dict) and "tensor" in j:
        return TensorType(PRIMITIVES[j["tensor"]], tuple(j["shape"]))
    raise ValueError(f"unknown type description {j!r}")


# ---- buffers and bitmaps ----------------------------------------------------------------------------
# Every buffer is a 1-D memoryview of bytes: over a bytearray (built in memory), an mmap (read from a
# .nano file) or a pyarrow Buffer. Views are how zero-copy works: slicing a memoryview copies nothing.


class NanosetsError(ValueError):
    """Bad input: a corrupt file, a row that disagrees with the schema, a bad argument."""


def _empty_tensor(dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype)


def frombuffer(buf, dtype: torch.dtype, count: int, offset: int = 0) -> torch.Tensor:
    """torch.frombuffer that accepts empty ranges and read-only buffers (pyarrow's, bytes).

    ZERO-COPY: the tensor views `buf`; writing to it writes into the buffer. Read-only sources
    (e.g. an mmap opened for reading) make torch warn; we silence that one warning, as our files are
    mapped copy-on-write (a write changes this process's copy, never the file)."""
    if count == 0:
        return _empty_tensor(dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)


def tensor_to_buffer(t: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes as a memoryview. Zero-copy through numpy when it is installed."""
    t = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    try:
        return memoryview(t.numpy())  # shares memory; the ndarray keeps the tensor alive
    except (ImportError, RuntimeError):  # torch built without numpy: one copy via bytes()
        return memoryview(bytes(t.untyped_storage())[: t.numel()])


def pack_bits(valid: torch.Tensor) -> memoryview:
    """bool[n] -> validity bitmap, LSB first (bit i of byte i//8 is row i), as Arrow lays it out."""
    n = valid.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8)
    padded[:n] = valid.to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return tensor_to_buffer((padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8))  # [ceil(n/8)]


def unpack_bits(bitmap, offset: int, length: int) -> torch.Tensor:
    """Validity bitmap -> bool[length] for rows offset..offset+length (vectorised, no Python loop)."""
    first, last = offset // 8, (offset + length + 7) // 8
    by = frombuffer(bitmap, torch.uint8, last - first, first)  # [bytes]
    bits = (by.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1  # [bytes, 8]
    start = offset - first * 8
    return bits.reshape(-1)[start : start + length].bool()


def _bit(bitmap, i: int) -> bool:
    return bool((bitmap[i >> 3] >> (i & 7)) & 1)


def _check_range(offs: list[int], limit: int, what: str):
    """Offsets must be non-decreasing and inside their values buffer, or we'd silently return garbage."""
    if offs and (offs[0] < 0 or offs[-1] > limit or any(b < a for a, b in zip(offs, offs[1:]))):
        raise NanosetsError(f"corrupt {what}: offsets {offs[:4]}...{offs[-2:]} leave the values (size {limit})")


# ---- arrays ---------------------------------------------------------------------------------------
# An Array = type + length + buffers + `offset` (the first row it shows inside its buffers). slice()
# only moves offset/length, which is why slicing is O(1) and shares memory with its parent.
# Each class implements: get(i) (one Python value), to_pylist(), take_pylist(idx), compact() (an
# equal array whose offset is 0, copying only what must be shifted) and buffers for the writer.


class Array:
    type: DataType

    def __init__(self, length: int, validity=None, offset: int = 0):
        self.length, self.validity, self.offset = int(length), validity, int(offset)
        self._null_count = None if validity is not None else 0

    def __len__(self):
        return self.length

    def __repr__(self):
        return f"{type(self).__name__}<{self.type}>[{self.length}]"

    @property
    def null_count(self) -> int:
        if self._null_count is None:  # counting needs a scan, so do it once and only when asked
            self._null_count = int((~unpack_bits(self.validity, self.offset, self.length)).sum())
        return self._null_count

    def is_valid(self, i: int) -> bool:
        return self.validity is None or _bit(self.validity, self.offset + i)

    def valid_list(self) -> list[bool] | None:
        if self.validity is None or self.null_count == 0:
            return None
        return unpack_bits(self.validity, self.offset, self.length).tolist()

    def _take_nulls(self, values: list, idx: torch.Tensor) -> list:
        """values gathered at rows idx, with None where those rows are null."""
        if self.validity is None or self.null_count == 0:
            return values
        valid = unpack_bits(self.validity, self.offset, self.length)[idx].tolist()
        return [v if ok else None for v, ok in zip(values, valid)]

    def _apply_nulls(self, values: list) -> list:
        valid = self.valid_list()
        return values if valid is None else [v if ok else None for v, ok in zip(values, valid)]

    def _check_index(self, i: int) -> int:
        if not -self.length <= i < self.length:
            raise IndexError(f"row {i} out of range for an array of {self.length} rows")
        return i + self.length if i < 0 else i

    def slice(self, start: int, stop: int) -> "Array":
        """Rows [start, stop) as a new Array sharing every buffer (O(1), no copy)."""
        start, stop = max(0, min(start, self.length)), max(0, min(stop, self.length))
        new = self._with_window(self.offset + start, max(0, stop - start))
        if self._null_count == 0:
            new._null_count = 0
        return new

    def _with_window(self, offset: int, length: int) -> "Array":
        raise NotImplementedError

    def _compact_validity(self):
        """The validity bitmap re-based to offset 0 (a byte slice when aligned, else repacked)."""
        if self.validity is None or self.null_count == 0:
            return None
        if self.offset % 8 == 0:
            return self.validity[self.offset // 8 : (self.offset + self.length + 7) // 8]
        return pack_bits(unpack_bits(self.validity, self.offset, self.length))

    def take_pylist(self, idx: torch.Tensor) -> list:
        """Python values at rows idx (int64 tensor). Subclasses vectorise; this is the plain loop."""
        return [self.get(i) for i in idx.tolist()]


class NullArray(Array):
    type = NULL

    def get(self, i):
        self._check_index(i)
        return None

    def to_pylist(self):
        return [None] * self.length

    def take_pylist(self, idx):
        return [None] * len(idx)

    def _with_window(self, offset, length):
        return NullArray(length)

    def compact(self):
        return self

    @property
    def null_count(self):
        return self.length


class PrimitiveArray(Array):
    """Fixed-width values: row i lives at bytes [(offset+i)*itemsize, (offset+i+1)*itemsize)."""

    def __init__(self, type: PrimitiveType, length, values, validity=None, offset=0):
        super().__init__(length, validity, offset)
        self.type, self.values = type, values
        self._typed = values.cast(type.fmt) if type.fmt and len(values) % type.itemsize == 0 else None

    def _with_window(self, offset, length):
        return PrimitiveArray(self.type, length, self.values, self.validity, offset)

    def to_torch(self) -> torch.Tensor:
        """ZERO-COPY tensor [length] over the values buffer (null rows hold whatever bytes are there)."""
        return frombuffer(self.values, self.type.torch_dtype, self.length, self.offset * self.type.itemsize)

    def get(self, i):
        i = self._check_index(i)
        if not self.is_valid(i):
            return None
        if self._typed is not None:
            return self._typed[self.offset + i]
        return frombuffer(self.values, self.type.torch_dtype, 1, (self.offset + i) * self.type.itemsize).item()

    def to_pylist(self):
        if self._typed is not None:  # memoryview.tolist() builds Python numbers in C: fast
            values = self._typed[self.offset : self.offset + self.length].tolist()
        else:
            values = self.to_torch().tolist()
        return self._apply_nulls(values)

    def take_pylist(self, idx):
        return self._take_nulls(self.to_torch()[idx].tolist(), idx)  # one gather, one conversion

    def compact(self):
        isz = self.type.itemsize
        return PrimitiveArray(self.type, self.length,
                              self.values[self.offset * isz : (self.offset + self.length) * isz],
                              self._compact_validity())


class _OffsetsMixin:
    """Shared by string and list arrays: row i spans values [offsets[offset+i], offsets[offset+i+1])."""

    offsets: memoryview

    def _offs(self) -> memoryview:
        if self._offs_view is None:
            self._offs_view = self.offsets.cast("q")  # int64 view, no copy; cached (hot in ds[i])
        return self._offs_view

    _offs_view = None

    def _bounds(self, i: int) -> tuple[int, int]:
        o = self._offs()
        return o[self.offset + i], o[self.offset + i + 1]

    def _offsets_tensor(self) -> torch.Tensor:
        return frombuffer(self.offsets, torch.int64, self.length + 1, self.offset * 8)  # [length+1]

    def _compact_offsets(self) -> tuple[memoryview, int, int]:
        """Offsets re-based to start at 0, plus the [first, last) range of values they cover."""
        t = self._offsets_tensor()
        first, last = int(t[0]), int(t[-1])
        if first == 0:
            return self.offsets[self.offset * 8 : (self.offset + self.length + 1) * 8], 0, last
        return tensor_to_buffer(t - first), first, last


def _utf8(b, row) -> str:
    try:
        return str(b, "utf-8")
    except UnicodeDecodeError as e:
        raise NanosetsError(f"corrupt string column: row {row} is not valid UTF-8 ({e.reason})") from None


class StringArray(_OffsetsMixin, Array):
    """UTF-8 strings: int64 offsets[length+1] into one `data` bytes buffer."""

    type = STRING

    def __init__(self, length, offsets, data, validity=None, offset=0):
        super().__init__(length, validity, offset)
        self.offsets, self.data = offsets, data

    def _with_window(self, offset, length):
        return StringArray(length, self.offsets, self.data, self.validity, offset)

    def get(self, i):
        i = self._check_index(i)
        if not self.is_valid(i):
            return None
        a, b = self._bounds(i)
        if not 0 <= a <= b <= len(self.data):
            raise NanosetsError(f"corrupt string column: row {i} spans bytes [{a}, {b}) of {len(self.data)}")
        return _utf8(self.data[a:b], i)

    def _decode(self, spans: list[tuple[int, int]], base: int, blob: bytes) -> list[str]:
        # TRICK: when the bytes are pure ASCII (common for math text), byte offsets equal character
        # offsets, so we decode the whole blob once and slice str objects instead of decoding each.
        if blob.isascii():
            text = blob.decode("ascii")
            return [text[a - base : b - base] for a, b in spans]
        return [_utf8(blob[a - base : b - base], i) for i, (a, b) in enumerate(spans)]

    def to_pylist(self):
        if self.length == 0:
            return []
        offs = self._offs()[self.offset : self.offset + self.length + 1].tolist()
        _check_range(offs, len(self.data), "string column")
        blob = bytes(self.data[offs[0] : offs[-1]])  # one copy of this slice's bytes
        return self._apply_nulls(self._decode(list(zip(offs, offs[1:])), offs[0], blob))

    def take_pylist(self, idx):
        t = self._offsets_tensor()
        starts, ends = t[idx].tolist(), t[idx + 1].tolist()
        data, n = self.data, len(self.data)
        out = []
        for a, b in zip(starts, ends):
            if not 0 <= a <= b <= n:
                raise NanosetsError(f"corrupt string column: a row spans bytes [{a}, {b}) of {n}")
            out.append(_utf8(data[a:b], len(out)))
        return self._take_nulls(out, idx)

    def compact(self):
        offsets, first, last = self._compact_offsets()
        return StringArray(self.length, offsets, self.data[first:last], self._compact_validity())


class ListArray(_OffsetsMixin, Array):
    """list<T>: int64 offsets[length+1] into a child Array that holds all rows' values back to back."""

    def __init__(self, type: ListType, length, offsets, child: Array, validity=None, offset=0):
        super().__init__(length, validity, offset)
        self.type, self.offsets, self.child = type, offsets, child

    def _with_window(self, offset, length):
        return ListArray(self.type, length, self.offsets, self.child, self.validity, offset)

    def _check_span(self, a, b, i):
        if not 0 <= a <= b <= self.child.length:
            raise NanosetsError(f"corrupt list column: row {i} spans values [{a}, {b}) of {self.child.length}")

    def get(self, i):
        i = self._check_index(i)
        if not self.is_valid(i):
            return None
        a, b = self._bounds(i)
        self._check_span(a, b, i)
        child = self.child
        if isinstance(child, PrimitiveArray) and child._typed is not None and child.validity is None:
            return child._typed[child.offset + a : child.offset + b].tolist()  # no Array object per row
        return child.slice(a, b).to_pylist()

    def value_tensor(self, i: int) -> torch.Tensor:
        """ZERO-COPY tensor of row i's values (primitive children only)."""
        a, b = self._bounds(self._check_index(i))
        self._check_span(a, b, i)
        return self.child.slice(a, b).to_torch()

    def to_pylist(self):
        if self.length == 0:
            return []
        offs = self._offs()[self.offset : self.offset + self.length + 1].tolist()
        _check_range(offs, self.child.length, "list column")
        child = self.child
        if isinstance(child, PrimitiveArray) and child._typed is not None and child.null_count == 0:
            mv, o = child._typed, child.offset  # list<number>: convert each row straight from the buffer
            return self._apply_nulls([mv[o + a : o + b].tolist() for a, b in zip(offs, offs[1:])])
        flat, base = child.slice(offs[0], offs[-1]).to_pylist(), offs[0]
        return self._apply_nulls([flat[a - base : b - base] for a, b in zip(offs, offs[1:])])

    def take_pylist(self, idx):
        t = self._offsets_tensor()
        starts, ends = t[idx].tolist(), t[idx + 1].tolist()
        child = self.child
        for a, b in zip(starts, ends):
            self._check_span(a, b, "?")
        if isinstance(child, PrimitiveArray) and child._typed is not None and child.validity is None:
            mv, o = child._typed, child.offset  # fast path: list<number> without nulls
            out = [mv[o + a : o + b].tolist() for a, b in zip(starts, ends)]
        else:
            out = [child.slice(a, b).to_pylist() for a, b in zip(starts, ends)]
        return self._take_nulls(out, idx)

    def compact(self):
        offsets, first, last = self._compact_offsets()
        return ListArray(self.type, self.length, offsets, self.child.slice(first, last).compact(),
                         self._compact_validity())


class StructArray(Array):
    """struct<...>: one child Array per field, all of this array's length (children are pre-sliced)."""

    def __init__(self, type: StructType, length, children: dict[str, Array], validity=None, offset=0):
        super().__init__(length, validity, offset)
        self.type, self.children = type, children

    def _with_window(self, offset, length):
        start = offset - self.offset
        kids = {k: c.slice(start, start + length) for k, c in self.children.items()}
        return StructArray(self.type, length, kids, self.validity, offset)

    def get(self, i):
        i = self._check_index(i)
        if not self.is_valid(i):
            return None
        return {k: c.get(i) for k, c in self.children.items()}

    def _zip(self, columns: dict[str, list], n: int) -> list:
        names = list(columns)
        rows = [dict(zip(names, vals)) for vals in zip(*columns.values())] if names else [{} for _ in range(n)]
        return rows

    def to_pylist(self):
        return self._apply_nulls(self._zip({k: c.to_pylist() for k, c in self.children.items()}, self.length))

    def take_pylist(self, idx):
        rows = self._zip({k: c.take_pylist(idx) for k, c in self.children.items()}, len(idx))
        return self._take_nulls(rows, idx)

    def compact(self):
        kids = {k: c.compact() for k, c in self.children.items()}
        return StructArray(self.type, self.length, kids, self._compact_validity())


class TensorArray(Array):
    """Fixed-shape tensor per row: values hold length * prod(shape) elements, row-major."""

    def __init__(self, type: TensorType, length, values, validity=None, offset=0):
        super().__init__(length, validity, offset)
        self.type, self.values = type, values

    def _with_window(self, offset, length):
        return TensorArray(self.type, length, self.values, self.validity, offset)

    def to_torch(self) -> torch.Tensor:
        """ZERO-COPY tensor [length, *shape] over the values buffer."""
        t, isz = self.type, self.type.value.itemsize
        flat = frombuffer(self.values, t.value.torch_dtype, self.length * t.numel, self.offset * t.numel * isz)
        return flat.view(self.length, *t.shape)

    def get(self, i):
        i = self._check_index(i)
        return self.to_torch()[i].tolist() if self.is_valid(i) else None

    def to_pylist(self):
        return self._apply_nulls(self.to_torch().tolist())

    def take_pylist(self, idx):
        out = self.to_torch()[idx].tolist()
        return self._take_nulls(out, idx)

    def compact(self):
        row = self.type.numel * self.type.value.itemsize
        return TensorArray(self.type, self.length,
                           self.values[self.offset * row : (self.offset + self.length) * row],
                           self._compact_validity())


# ---- building arrays from Python -------------------------------------------------------------------
# Python rows -> columns. Two steps: infer a type for each column (unless a schema says it), then
# pack the values into buffers with the stdlib `array` module (which converts and range-checks a
# whole list in C). When packing fails we go back and find the exact row to name in the error.


class _Mismatch(Exception):
    """Internal: value at `row` (within the list being built) does not fit `expected`."""

    def __init__(self, row: int, path: str, expected, value):
        self.row, self.path, self.expected, self.value = row, path, expected, value


def _describe(v) -> str:
    r = repr(v)
    return f"{type(v).__name__} {r[:40] + '...' if len(r) > 40 else r}"


def _infer_one(v, name: str) -> DataType:
    if v is None:
        return NULL
    if isinstance(v, bool):
        return PRIMITIVES["bool"]
    if isinstance(v, int):
        return PRIMITIVES["int64"]
    if isinstance(v, float):
        return PRIMITIVES["float64"]
    if isinstance(v, str):
        return STRING
    if isinstance(v, torch.Tensor):
        if v.dim() == 0:
            return _TORCH_TO_PRIMITIVE[v.dtype]
        return TensorType(_TORCH_TO_PRIMITIVE[v.dtype], tuple(v.shape))
    if isinstance(v, (list, tuple)):
        return ListType(infer_type(list(v), name + "[]"))
    if isinstance(v, dict):
        return StructType({k: infer_type([v[k]], f"{name}.{k}") for k in v})
    raise TypeError(f"cannot store a {type(v).__name__} ({v!r:.40}); use bool/int/float/str/list/dict/tensor")


def unify_types(a: DataType, b: DataType) -> DataType | None:
    """The narrowest type holding values of both a and b (None when there is none)."""
    if a == b:
        return a
    if a == NULL:
        return b
    if b == NULL:
        return a
    nums = ("int64", "float64")
    if str(a) in nums and str(b) in nums:
        return PRIMITIVES["float64"]  # int + float -> float, as pyarrow and pandas do
    if isinstance(a, ListType) and isinstance(b, ListType):
        v = unify_types(a.value, b.value)
        return None if v is None else ListType(v)
    if isinstance(a, StructType) and isinstance(b, StructType):
        fields = dict(a.fields)
        for k, t in b.fields.items():
            fields[k] = unify_types(fields[k], t) if k in fields else t
            if fields[k] is None:
                return None
        return StructType(fields)
    return None


def infer_type(values: list, name: str = "column") -> DataType:
    """One type for every value of a column; raises naming the first row that disagrees."""
    kinds = set(map(type, values))
    fast = {int: "int64", float: "float64", str: "string", bool: "bool"}
    simple = kinds - {type(None)}
    if len(simple) == 1 and next(iter(simple)) in fast:  # the common case, no per-row work
        return parse_type(fast[next(iter(simple))])
    if simple <= {int, float} and simple:
        return PRIMITIVES["float64"]
    if simple and simple <= {list, tuple}:  # infer lists from their flattened values in one call
        flat = [x for v in values if v is not None for x in v]
        try:
            return ListType(infer_type(flat, name + "[]"))
        except NanosetsError:
            pass  # fall through to the row-by-row scan, which names the row
    result = NULL
    for row, v in enumerate(values):
        try:
            t = _infer_one(v, name)
        except (TypeError, KeyError, NanosetsError) as e:
            raise NanosetsError(f"column {name!r}, row {row}: {e}") from None
        u = unify_types(result, t)
        if u is None:
            raise NanosetsError(f"column {name!r}, row {row} holds {_describe(v)} ({t}) but earlier rows are {result}")
        result = u
    return result


def _as_list(v, row, path, t):
    if isinstance(v, (list, tuple)):
        return v
    if isinstance(v, torch.Tensor) and v.dim() == 1:
        return v.tolist()
    raise _Mismatch(row, path, t, v)


def _build(values: list, t: DataType, path: str) -> Array:
    """Pack Python values into an Array of type t (raises _Mismatch with the row inside `values`)."""
    n = len(values)
    valid = [v is not None for v in values]
    has_nulls = not all(valid)
    validity = pack_bits(torch.tensor(valid, dtype=torch.bool)) if has_nulls else None
    if isinstance(t, NullType):
        for row, v in enumerate(values):
            if v is not None:
                raise _Mismatch(row, path, t, v)
        return NullArray(n)
    if isinstance(t, PrimitiveType):
        return _build_primitive(values, t, path, validity, has_nulls)
    if isinstance(t, StringType):
        enc = []
        for row, v in enumerate(values):
            if v is None:
                enc.append(b"")
            elif isinstance(v, str):
                enc.append(v.encode("utf-8"))
            else:
                raise _Mismatch(row, path, t, v)
        offsets = pyarray.array("q", [0])
        total = 0
        for e in enc:
            total += len(e)
            offsets.append(total)
        return StringArray(n, memoryview(offsets).cast("B"), memoryview(b"".join(enc)), validity)
    if isinstance(t, ListType):
        offsets, flat, total = pyarray.array("q", [0]), [], 0
        for row, v in enumerate(values):
            if v is not None:
                v = _as_list(v, row, path, t)
                flat.extend(v)
                total += len(v)
            offsets.append(total)
        try:
            child = _build(flat, t.value, path + "[]")
        except _Mismatch as m:  # map the flat position back to the row that holds it
            row = bisect.bisect_right(offsets, m.row) - 1
            raise _Mismatch(row, f"{path}[{m.row - offsets[row]}]" + m.path[len(path) + 2 :], m.expected, m.value)
        return ListArray(t, n, memoryview(offsets).cast("B"), child, validity)
    if isinstance(t, StructType):
        for row, v in enumerate(values):
            if v is not None and not isinstance(v, dict):
                raise _Mismatch(row, path, t, v)
            if v is not None and not v.keys() <= t.fields.keys():
                extra = sorted(set(v) - set(t.fields))
                raise _Mismatch(row, f"{path}.{extra[0]}", "no such field in " + str(t), v[extra[0]])
        kids = {k: _build([None if v is None else v.get(k) for v in values], ft, f"{path}.{k}")
                for k, ft in t.fields.items()}
        return StructArray(t, n, kids, validity)
    if isinstance(t, TensorType):
        rows = []
        for row, v in enumerate(values):
            try:
                x = torch.zeros(t.shape) if v is None else torch.as_tensor(v, dtype=t.value.torch_dtype)
            except (TypeError, ValueError, RuntimeError):
                raise _Mismatch(row, path, t, v) from None
            if tuple(x.shape) != t.shape:
                raise _Mismatch(row, path, t, v)
            rows.append(x.to(t.value.torch_dtype))
        stacked = torch.stack(rows) if rows else torch.zeros(0, *t.shape, dtype=t.value.torch_dtype)
        return TensorArray(t, n, tensor_to_buffer(stacked), validity)
    raise TypeError(f"unknown type {t}")


def _build_primitive(values, t: PrimitiveType, path, validity, has_nulls) -> PrimitiveArray:
    filled = [0 if v is None else v for v in values] if has_nulls else values
    if t.name == "bool":
        for row, v in enumerate(values):
            if v is not None and not isinstance(v, bool):
                raise _Mismatch(row, path, t, v)
        return PrimitiveArray(t, len(values), memoryview(pyarray.array("b", filled)).cast("B"), validity)
    is_int = t.torch_dtype.is_floating_point is False
    code = t.fmt if t.fmt else "d"  # halves are checked as doubles, then rounded by torch
    try:
        if is_int and any(type(v) in (float, bool) for v in filled):
            raise TypeError  # array('q') rejects floats and would take True as 1: name the row instead
        packed = pyarray.array(code, filled)  # converts + range-checks the whole list in C
    except (TypeError, OverflowError, ValueError):
        for row, v in enumerate(filled):
            try:
                if is_int and type(v) in (float, bool):
                    raise TypeError
                pyarray.array(code, [v])
            except (TypeError, OverflowError, ValueError):
                raise _Mismatch(row, path, t, v) from None
        raise
    buf = memoryview(packed).cast("B")
    if t.fmt is None:  # float16 / bfloat16: round the doubles once, in torch
        buf = tensor_to_buffer(frombuffer(buf, torch.float64, len(filled)).to(t.torch_dtype))
    return PrimitiveArray(t, len(values), buf, validity)


def array_from_pylist(values: list, type: DataType | str | None = None, name: str = "column") -> Array:
    """Python values -> Array. Errors name the column, the row and what was expected."""
    t = infer_type(values, name) if type is None else parse_type(type)
    try:
        return _build(list(values), t, name)
    except _Mismatch as m:
        raise NanosetsError(f"column {name!r}, row {m.row} (at {m.path}): expected {m.expected}, "
                            f"got {_describe(m.value)}") from None


def array_from_tensor(t: torch.Tensor) -> Array:
    """A CPU tensor -> PrimitiveArray ([n]) or TensorArray ([n, ...]), ZERO-COPY over its memory."""
    if t.dtype not in _TORCH_TO_PRIMITIVE:
        raise NanosetsError(f"unsupported tensor dtype {t.dtype}")
    p = _TORCH_TO_PRIMITIVE[t.dtype]
    if t.dim() == 1:
        return PrimitiveArray(p, t.shape[0], tensor_to_buffer(t))
    return TensorArray(TensorType(p, tuple(t.shape[1:])), t.shape[0], tensor_to_buffer(t))


def list_array_from_tensors(offsets: torch.Tensor, values: Array | torch.Tensor) -> ListArray:
    """Build list<T> straight from int64 offsets[n+1] and the flat values (no Python per row)."""
    child = array_from_tensor(values) if isinstance(values, torch.Tensor) else values
    offsets = offsets.to(torch.int64)
    if offsets.numel() == 0 or int(offsets[0]) != 0 or int(offsets[-1]) != child.length:
        raise NanosetsError("list offsets must start at 0 and end at the number of values")
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise NanosetsError("list offsets must be non-decreasing")
    return ListArray(ListType(child.type), offsets.numel() - 1, tensor_to_buffer(offsets), child)


# ---- take and concat (the two operations that do copy data) -----------------------------------------


def _gather_validity(a: Array, idx: torch.Tensor):
    if a.validity is None or a.null_count == 0:
        return None
    return pack_bits(unpack_bits(a.validity, a.offset, a.length)[idx])


def _ranges_index(starts: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated aranges [s0..e0) ++ [s1..e1) ++ ... without a Python loop; plus new offsets."""
    lens = ends - starts  # [k]
    new_offsets = torch.zeros(len(lens) + 1, dtype=torch.int64)
    torch.cumsum(lens, 0, out=new_offsets[1:])
    total = int(new_offsets[-1])
    # position p of the output comes from starts[row(p)] + (p - new_offsets[row(p)])
    within = torch.arange(total, dtype=torch.int64) - new_offsets[:-1].repeat_interleave(lens)
    return starts.repeat_interleave(lens) + within, new_offsets


def take_array(a: Array, idx: torch.Tensor) -> Array:
    """A new Array with rows a[idx] copied into fresh buffers (used to materialise an indirection)."""
    n, valid = len(idx), _gather_validity(a, idx)
    if isinstance(a, NullArray):
        return NullArray(n)
    if isinstance(a, PrimitiveArray):
        return PrimitiveArray(a.type, n, tensor_to_buffer(a.to_torch()[idx]), valid)
    if isinstance(a, TensorArray):
        return TensorArray(a.type, n, tensor_to_buffer(a.to_torch()[idx]), valid)
    if isinstance(a, StructArray):
        return StructArray(a.type, n, {k: take_array(c, idx) for k, c in a.children.items()}, valid)
    pos, new_offsets = _ranges_index(*_checked_spans(a, idx))
    if isinstance(a, StringArray):
        data = frombuffer(a.data, torch.uint8, len(a.data))[pos]  # gather the bytes
        return StringArray(n, tensor_to_buffer(new_offsets), tensor_to_buffer(data), valid)
    return ListArray(a.type, n, tensor_to_buffer(new_offsets), take_array(a.child, pos), valid)


def concat_arrays(arrays: list[Array]) -> Array:
    """One Array holding the rows of all `arrays` (same type) back to back."""
    t = arrays[0].type
    if any(a.type != t for a in arrays):
        raise NanosetsError(f"cannot concat arrays of types {sorted({str(a.type) for a in arrays})}")
    if len(arrays) == 1:
        return arrays[0]
    n = sum(a.length for a in arrays)
    valid = None
    if any(a.validity is not None and a.null_count for a in arrays):
        valid = pack_bits(torch.cat([torch.ones(a.length, dtype=torch.bool) if a.validity is None
                                     else unpack_bits(a.validity, a.offset, a.length) for a in arrays]))
    if isinstance(t, NullType):
        return NullArray(n)
    if isinstance(a := arrays[0], (PrimitiveArray, TensorArray)):
        data = tensor_to_buffer(torch.cat([x.to_torch() for x in arrays]))
        return type(a)(t, n, data, valid)
    if isinstance(t, StructType):
        kids = {k: concat_arrays([x.children[k] for x in arrays]) for k in t.fields}
        return StructArray(t, n, kids, valid)
    parts = [x.compact() for x in arrays]
    offs, base = [torch.zeros(1, dtype=torch.int64)], 0
    for p in parts:
        o = p._offsets_tensor()
        offs.append(o[1:] + base)
        base += int(o[-1])
    offsets = tensor_to_buffer(torch.cat(offs))
    if isinstance(t, StringType):
        return StringArray(n, offsets, memoryview(b"".join(p.data for p in parts)), valid)
    return ListArray(t, n, offsets, concat_arrays([p.child for p in parts]), valid)


# ---- tables -----------------------------------------------------------------------------------------
# A RecordBatch is a set of equal-length named Arrays; a Table is a list of RecordBatches with one
# schema ("chunked", like pyarrow.Table). Chunks let us append and concat without copying.

Schema = dict  # column name -> DataType, in column order


def _schema_str(schema: Schema) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in schema.items()) + "}"


class RecordBatch:
    def __init__(self, columns: dict[str, Array]):
        lengths = {k: a.length for k, a in columns.items()}
        if len(set(lengths.values())) > 1:
            raise NanosetsError(f"columns of one batch must have equal lengths, got {lengths}")
        self.columns = dict(columns)
        self.num_rows = next(iter(lengths.values()), 0)

    @property
    def schema(self) -> Schema:
        return {k: a.type for k, a in self.columns.items()}

    @classmethod
    def from_pydict(cls, data: dict[str, list], schema: dict | None = None) -> "RecordBatch":
        schema = {k: parse_type(v) for k, v in (schema or {}).items()}
        unknown = set(schema) - set(data)
        if unknown:
            raise NanosetsError(f"schema names columns {sorted(unknown)} that the data does not have")
        cols = {}
        for k, v in data.items():
            if isinstance(v, Array):
                cols[k] = v
            elif isinstance(v, torch.Tensor) and k not in schema:
                cols[k] = array_from_tensor(v)
            else:
                cols[k] = array_from_pylist(v.tolist() if isinstance(v, torch.Tensor) else list(v), schema.get(k), k)
        return cls(cols)

    def slice(self, start: int, stop: int) -> "RecordBatch":
        return RecordBatch({k: a.slice(start, stop) for k, a in self.columns.items()})


def _no_gc(fn):
    """Pause Python's cyclic garbage collector while fn builds Python objects.

    Decoding a batch allocates hundreds of thousands of lists; every 700 allocations CPython runs a
    collection that walks the young objects looking for reference cycles, and these objects (lists
    of ints and strs) can never form one. Pausing the collector for the duration of the decode makes
    iteration ~1.3x faster; reference counting still frees everything as usual."""

    def wrapper(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


class Table:
    """Chunked columnar table: `batches` share one schema; rows are numbered across chunks."""

    def __init__(self, batches: list[RecordBatch], schema: Schema | None = None):
        self.schema = dict(schema if schema is not None else (batches[0].schema if batches else {}))
        for i, b in enumerate(batches):
            if list(b.schema.items()) != list(self.schema.items()):
                raise NanosetsError(f"batch {i} has schema {_schema_str(b.schema)}, "
                                    f"expected {_schema_str(self.schema)}")
        self.batches = [b for b in batches if b.num_rows] or batches[:1]
        self._starts = [0]  # _starts[c] = global row of chunk c's first row
        for b in self.batches:
            self._starts.append(self._starts[-1] + b.num_rows)
        self.num_rows = self._starts[-1]

    @property
    def column_names(self) -> list[str]:
        return list(self.schema)

    @classmethod
    def from_pydict(cls, data: dict[str, list], schema: dict | None = None) -> "Table":
        return cls([RecordBatch.from_pydict(data, schema)])

    @classmethod
    def from_pylist(cls, rows: list[dict], schema: dict | None = None) -> "Table":
        names: dict[str, None] = {}  # column order = first appearance in the rows
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise NanosetsError(f"row {i} is a {type(r).__name__}, expected a dict of column -> value")
            names.update(dict.fromkeys(r))
        names.update(dict.fromkeys(schema or {}))  # schema columns no row has: all null
        return cls.from_pydict({k: [r.get(k) for r in rows] for k in names}, schema)

    def _locate(self, i: int) -> tuple[int, int]:
        if not -self.num_rows <= i < self.num_rows:
            raise IndexError(f"row {i} out of range for a table of {self.num_rows} rows")
        i = i + self.num_rows if i < 0 else i
        c = bisect.bisect_right(self._starts, i) - 1
        return c, i - self._starts[c]

    def row(self, i: int) -> dict:
        c, j = self._locate(i)
        return {k: a.get(j) for k, a in self.batches[c].columns.items()}

    @_no_gc
    def slice_pydict(self, start: int, stop: int, columns: list[str] | None = None) -> dict[str, list]:
        """Rows [start, stop) as {column: list}, walking only the chunks that overlap."""
        columns = columns or self.column_names
        out: dict[str, list] = {k: [] for k in columns}
        c = max(0, bisect.bisect_right(self._starts, start) - 1)
        while c < len(self.batches) and self._starts[c] < stop:
            b, s0 = self.batches[c], self._starts[c]
            for k in columns:
                out[k].extend(b.columns[k].slice(max(start - s0, 0), min(stop - s0, b.num_rows)).to_pylist())
            c += 1
        return out

    @_no_gc
    def take_pydict(self, idx: torch.Tensor, columns: list[str] | None = None) -> dict[str, list]:
        """Rows at global indices idx (int64 tensor, any order) as {column: list}."""
        columns = columns or self.column_names
        if len(self.batches) == 1:
            b = self.batches[0]
            return {k: b.columns[k].take_pylist(idx) for k in columns}
        starts = torch.tensor(self._starts, dtype=torch.int64)
        chunk = torch.bucketize(idx, starts, right=True) - 1  # [k] chunk of each row
        out: dict[str, list] = {k: [None] * len(idx) for k in columns}
        for c in chunk.unique().tolist():
            where = (chunk == c).nonzero().squeeze(1)  # positions in the output
            local = idx[where] - self._starts[c]
            pos = where.tolist()
            for k in columns:
                dst = out[k]
                for p, v in zip(pos, self.batches[c].columns[k].take_pylist(local)):
                    dst[p] = v
        return out

    def split_rows(self, rows) -> list[tuple[int, Any, torch.Tensor | None]]:
        """Global rows -> [(chunk, local rows, output positions)]. A (start, stop) range gives local
        ranges in order (positions None); an index tensor gives per-chunk local indices plus where
        their values go in the output."""
        if isinstance(rows, tuple):
            start, stop = rows
            parts, c = [], max(0, bisect.bisect_right(self._starts, start) - 1)
            while c < len(self.batches) and self._starts[c] < stop:
                s0 = self._starts[c]
                parts.append((c, (max(start - s0, 0), min(stop - s0, self.batches[c].num_rows)), None))
                c += 1
            return parts or [(0, (0, 0), None)]
        if len(self.batches) == 1:
            return [(0, rows, None)]
        chunk = torch.bucketize(rows, torch.tensor(self._starts, dtype=torch.int64), right=True) - 1
        parts = []
        for c in chunk.unique().tolist():
            where = (chunk == c).nonzero().squeeze(1)  # output positions of this chunk's rows
            parts.append((c, rows[where] - self._starts[c], where))
        return parts or [(0, rows, None)]

    def column(self, name: str) -> Array:
        """The whole column as one Array: zero-copy when the table has one chunk, else concatenated."""
        if name not in self.schema:
            raise KeyError(f"no column {name!r}; columns are {self.column_names}")
        return concat_arrays([b.columns[name] for b in self.batches]) if self.batches else NullArray(0)

    def select(self, names: list[str]) -> "Table":
        missing = [n for n in names if n not in self.schema]
        if missing:
            raise KeyError(f"no columns {missing}; columns are {self.column_names}")
        return Table([RecordBatch({n: b.columns[n] for n in names}) for b in self.batches],
                     {n: self.schema[n] for n in names})

    def rename(self, mapping: dict[str, str]) -> "Table":
        new = [mapping.get(n, n) for n in self.schema]
        if len(set(new)) != len(new):
            raise NanosetsError(f"renaming {mapping} would give duplicate column names {new}")
        batches = [RecordBatch({mapping.get(k, k): a for k, a in b.columns.items()}) for b in self.batches]
        return Table(batches, {mapping.get(k, k): t for k, t in self.schema.items()})

    def take(self, idx: torch.Tensor) -> "Table":
        """Rows idx copied into one new chunk (materialises a select/shuffle/filter indirection)."""
        if len(self.batches) > 1:
            return self.combine_chunks().take(idx)
        b = self.batches[0]
        return Table([RecordBatch({k: take_array(a, idx) for k, a in b.columns.items()})], self.schema)

    def combine_chunks(self) -> "Table":
        if len(self.batches) <= 1:
            return self
        return Table([RecordBatch({k: self.column(k) for k in self.schema})], self.schema)

    @staticmethod
    def concat(tables: list["Table"]) -> "Table":
        """Tables with equal schemas -> one table whose chunks are all of theirs (no copy)."""
        for i, t in enumerate(tables[1:], 1):
            if list(t.schema.items()) != list(tables[0].schema.items()):
                raise NanosetsError(f"cannot concat: table {i} has schema {_schema_str(t.schema)}, "
                                    f"table 0 has {_schema_str(tables[0].schema)}")
        return Table([b for t in tables for b in t.batches], tables[0].schema)


# ---- the .nano file ---------------------------------------------------------------------------------
# Layout in the module docstring. Writing streams each buffer straight from its memoryview into a
# temp file (no serialisation step), then renames; reading maps the file and validates every number
# in the metadata against the file size and the type before trusting it.

MAGIC, TAIL, VERSION, HEADER, ALIGN = b"NANOSET\0", b"NANOEND\0", 1, 64, 64
_HEADER_FMT = "<8sIIQQQI20x"  # magic, version, header size, file size, meta offset, meta length, crc


def _pad(f):
    f.write(bytes(-f.tell() % ALIGN))


def _write_buffer(f, buf) -> list[int] | None:
    if buf is None:
        return None
    _pad(f)
    off = f.tell()
    mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf
    f.write(mv)
    return [off, mv.nbytes]


def _write_node(f, a: Array) -> dict:
    a = a.compact()  # offset 0: the file stores exactly this array's rows
    bufs: dict[str, list[int] | None] = {"validity": _write_buffer(f, a._compact_validity())}
    children = []
    if isinstance(a, (PrimitiveArray, TensorArray)):
        bufs["values"] = _write_buffer(f, a.values)
    elif isinstance(a, StringArray):
        bufs["offsets"], bufs["data"] = _write_buffer(f, a.offsets), _write_buffer(f, a.data)
    elif isinstance(a, ListArray):
        bufs["offsets"] = _write_buffer(f, a.offsets)
        children = [_write_node(f, a.child)]
    elif isinstance(a, StructArray):
        children = [_write_node(f, c) for c in a.children.values()]
    return {"length": a.length, "null_count": a.null_count, "buffers": bufs, "children": children}


def write_nano(path: str | os.PathLike, table: Table | Iterable[RecordBatch], metadata: dict | None = None,
               schema: Schema | None = None) -> None:
    """Write a Table (or a stream of RecordBatches with `schema`) to `path` atomically: a crash
    leaves either the old file or none, never half of one. Batches are written as they come, so a
    large dataset never has to be in memory at once."""
    if isinstance(table, Table):
        schema, table = table.schema, table.batches
    elif schema is None:
        raise NanosetsError("write_nano needs schema= when given batches instead of a Table")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".nano", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(HEADER))  # placeholder, patched at the end when we know the offsets
            batches, num_rows = [], 0
            for i, b in enumerate(table):
                if list(b.schema.items()) != list(schema.items()):
                    raise NanosetsError(f"batch {i} has schema {_schema_str(b.schema)}, expected {_schema_str(schema)}")
                batches.append({"length": b.num_rows, "columns": [_write_node(f, b.columns[k]) for k in schema]})
                num_rows += b.num_rows
            meta = json.dumps({"version": VERSION, "num_rows": num_rows,
                               "schema": [[k, type_to_json(t)] for k, t in schema.items()],
                               "batches": batches, "metadata": metadata or {}}).encode()
            _pad(f)
            meta_off = f.tell()
            f.write(meta)
            f.write(TAIL)
            size = f.tell()
            f.seek(0)
            f.write(struct.pack(_HEADER_FMT, MAGIC, VERSION, HEADER, size, meta_off, len(meta), zlib.crc32(meta)))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # atomic on POSIX
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _Reader:
    """Turns metadata nodes back into Arrays over the mapped file, checking every range first."""

    def __init__(self, path: str, mv: memoryview, data_end: int):
        self.path, self.mv, self.data_end = path, mv, data_end

    def fail(self, where: str, msg: str):
        raise NanosetsError(f"{self.path}: corrupt .nano file at {where}: {msg}")

    def buffer(self, node: dict, name: str, where: str, size: int | None = None):
        bufs = node.get("buffers", {})
        if not isinstance(bufs, dict):
            self.fail(where, f"'buffers' should be an object, got {type(bufs).__name__}")
        spec = bufs.get(name)
        if spec is None:
            return None
        if not (isinstance(spec, list) and len(spec) == 2 and all(isinstance(x, int) for x in spec)):
            self.fail(where, f"buffer {name} should be [offset, nbytes], got {spec!r}")
        off, n = spec
        if off < HEADER or n < 0 or off + n > self.data_end or off % ALIGN:
            self.fail(where, f"buffer {name} [{off}, {off + n}) is outside the data region "
                             f"[{HEADER}, {self.data_end}) or not {ALIGN}-byte aligned")
        if size is not None and n != size:
            self.fail(where, f"buffer {name} has {n} bytes, expected {size}")
        return self.mv[off : off + n]

    def offsets(self, node, where, length) -> tuple[memoryview, int]:
        buf = self.buffer(node, "offsets", where, (length + 1) * 8)
        if buf is None:
            self.fail(where, "missing offsets buffer")
        first, last = struct.unpack_from("<q", buf, 0)[0], struct.unpack_from("<q", buf, length * 8)[0]
        if first != 0 or last < 0:
            self.fail(where, f"offsets run from {first} to {last}; expected 0 to a non-negative end")
        return buf, last

    def node(self, node, t: DataType, where: str) -> Array:
        if not isinstance(node, dict) or not isinstance(node.get("length"), int) or node["length"] < 0:
            self.fail(where, f"expected a node with a non-negative length, got {str(node)[:80]}")
        n = node["length"]
        validity = self.buffer(node, "validity", where, (n + 7) // 8)
        kids = node.get("children", [])
        if isinstance(t, NullType):
            return NullArray(n)
        if isinstance(t, PrimitiveType):
            return PrimitiveArray(t, n, self.buffer(node, "values", where, n * t.itemsize), validity)
        if isinstance(t, TensorType):
            size = n * t.numel * t.value.itemsize
            return TensorArray(t, n, self.buffer(node, "values", where, size), validity)
        if isinstance(t, StringType):
            offsets, last = self.offsets(node, where, n)
            data = self.buffer(node, "data", where, last)
            return StringArray(n, offsets, data if data is not None else memoryview(b""), validity)
        if isinstance(t, ListType):
            offsets, last = self.offsets(node, where, n)
            if len(kids) != 1:
                self.fail(where, f"a list node needs 1 child, has {len(kids)}")
            child = self.node(kids[0], t.value, where + "[]")
            if child.length != last:
                self.fail(where, f"offsets end at {last} but the values child has {child.length} rows")
            return ListArray(t, n, offsets, child, validity)
        if isinstance(t, StructType):
            if len(kids) != len(t.fields):
                self.fail(where, f"struct has {len(t.fields)} fields but {len(kids)} children")
            children = {k: self.node(c, ft, f"{where}.{k}") for (k, ft), c in zip(t.fields.items(), kids)}
            if any(c.length != n for c in children.values()):
                self.fail(where, "struct children differ in length from the struct")
            return StructArray(t, n, children, validity)
        self.fail(where, f"unknown type {t}")


def read_nano(path: str | os.PathLike) -> tuple[Table, dict]:
    """Map a .nano file and return (Table, user metadata). Reads only the header and metadata."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER + len(TAIL):
            raise NanosetsError(f"{path}: {size} bytes is too small for a .nano file (at least {HEADER + 8})")
        # ACCESS_COPY = MAP_PRIVATE: pages come from the page cache on first touch (nothing is read
        # now), and a write through a tensor view changes only this process's copy, never the file.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    magic, version, hsize, fsize, moff, mlen, crc = struct.unpack_from(_HEADER_FMT, mm, 0)
    if magic != MAGIC:
        raise NanosetsError(f"{path}: not a .nano file (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise NanosetsError(f"{path}: .nano format version {version}; this nanosets reads version {VERSION}")
    if fsize != size:
        raise NanosetsError(f"{path}: truncated or padded: the header says {fsize} bytes, the file has {size}")
    if hsize != HEADER or moff < HEADER or moff + mlen + len(TAIL) != size or mm[size - 8 :] != TAIL:
        raise NanosetsError(f"{path}: corrupt .nano header (metadata at {moff}+{mlen} in a {size}-byte file)")
    meta_bytes = mm[moff : moff + mlen]
    if zlib.crc32(meta_bytes) != crc:
        raise NanosetsError(f"{path}: metadata checksum mismatch: the file is corrupt")
    try:
        meta = json.loads(meta_bytes)
        schema = {name: type_from_json(t) for name, t in meta["schema"]}
        reader = _Reader(path, memoryview(mm), moff)
        batches = []
        for bi, b in enumerate(meta["batches"]):
            if len(b["columns"]) != len(schema):
                reader.fail(f"batch {bi}", f"{len(b['columns'])} columns, schema has {len(schema)}")
            cols = {k: reader.node(node, t, f"batch {bi}, column {k!r}") for (k, t), node in zip(schema.items(), b["columns"])}
            if any(a.length != b["length"] for a in cols.values()):
                reader.fail(f"batch {bi}", "columns differ in length from the batch")
            batches.append(RecordBatch(cols))
    except (KeyError, TypeError, ValueError) as e:  # NanosetsError is a ValueError and passes through
        if isinstance(e, NanosetsError):
            raise
        raise NanosetsError(f"{path}: corrupt .nano metadata: {type(e).__name__}: {e}") from None
    table = Table(batches, schema)
    if table.num_rows != meta.get("num_rows"):
        raise NanosetsError(f"{path}: metadata says {meta.get('num_rows')} rows, batches hold {table.num_rows}")
    return table, meta.get("metadata", {})


def verify_nano(path: str | os.PathLike) -> int:
    """Full O(size) check: decode every row of every column (opening only checks O(1) things)."""
    table, _ = read_nano(path)
    for bi, b in enumerate(table.batches):
        for k, a in b.columns.items():
            for s in range(0, a.length, 65536):
                try:
                    a.slice(s, s + 65536).to_pylist()
                except NanosetsError as e:
                    raise NanosetsError(f"{os.fspath(path)}: batch {bi}, column {k!r}, rows {s}+: {e}") from None
    return table.num_rows


def _checked_spans(a: "ListArray | StringArray", local) -> tuple[torch.Tensor, torch.Tensor]:
    """Start/end offsets of the selected rows, refusing corrupt ones (a clamped slice would silently
    return the wrong values, and pyarrow would read out of bounds)."""
    offs = a._offsets_tensor()  # [length+1]
    sel = torch.arange(*local) if isinstance(local, tuple) else local
    starts, ends = offs[sel], offs[sel + 1]
    limit = a.child.length if isinstance(a, ListArray) else len(a.data)
    if len(sel) and (bool((ends < starts).any()) or int(starts.min()) < 0 or int(ends.max()) > limit):
        raise NanosetsError(f"corrupt {'list' if isinstance(a, ListArray) else 'string'} column: offsets "
                            f"leave the values (size {limit}) or run backwards")
    return starts, ends


def _gather_rows_torch(a: Array, local, lists: bool):
    """Rows `local` ((start, stop) or an index tensor) of one chunk as a tensor, or a list of row tensors."""
    if not lists:
        return a.slice(*local).to_torch() if isinstance(local, tuple) else a.to_torch()[local]
    starts, ends = _checked_spans(a, local)
    vals = a.child.to_torch()
    return [vals[s:e] for s, e in zip(starts.tolist(), ends.tolist())]  # views into the file


# ---- Dataset: the HF-datasets-like API -----------------------------------------------------------
# A Dataset = Table + optional `indices` (int64 tensor: logical row i is physical row indices[i]).
# select/shuffle/filter/sort/train_test_split only build a new indices tensor, so they copy no data
# and are O(rows) at worst; save_to_disk / flatten_indices materialise the rows in their new order.


def _progress(total: int, desc: str, enabled: bool | None):
    """tqdm when installed and the job is big enough to watch; a no-op otherwise."""
    if enabled is False or (enabled is None and total < 50_000):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="rows")


def _index_tensor(indices, n: int) -> torch.Tensor:
    """list/range/tensor of row numbers -> int64 tensor, checked against the dataset size n."""
    if isinstance(indices, range):
        idx = torch.arange(indices.start, indices.stop, indices.step, dtype=torch.int64)
    else:
        idx = torch.as_tensor(indices if isinstance(indices, torch.Tensor) else list(indices), dtype=torch.int64)
    idx = idx.reshape(-1)
    if len(idx) and (int(idx.min()) < -n or int(idx.max()) >= n):
        bad = idx[(idx < -n) | (idx >= n)][0]
        raise IndexError(f"index {int(bad)} out of range for a dataset of {n} rows")
    return torch.where(idx < 0, idx + n, idx)


class DatasetDict(dict):
    """{split name: Dataset}, as returned by train_test_split and load_dataset(data_files={...})."""

    def __repr__(self):
        return "DatasetDict({" + ", ".join(f"{k!r}: {v!r}" for k, v in self.items()) + "})"


class Dataset:
    def __init__(self, table: Table, indices: torch.Tensor | None = None, format: dict | None = None,
                 metadata: dict | None = None):
        self._table, self._indices = table, indices
        self._format = format or {"type": "python", "columns": None}
        self.metadata = metadata or {}

    # -- construction --
    @classmethod
    def from_list(cls, rows: list[dict], schema: dict | None = None) -> "Dataset":
        """Rows (dicts) -> Dataset. Missing keys become nulls; schema fixes types by column name."""
        return cls(Table.from_pylist(rows, schema))

    @classmethod
    def from_dict(cls, columns: dict[str, list], schema: dict | None = None) -> "Dataset":
        """{column: list | tensor | Array} -> Dataset (1-D tensors are wrapped without a copy)."""
        return cls(Table.from_pydict(columns, schema))

    def _derive(self, table=None, indices=..., format=None) -> "Dataset":
        return Dataset(self._table if table is None else table, self._indices if indices is ... else indices,
                       dict(format or self._format), self.metadata)

    # -- shape --
    def __len__(self):
        return self._table.num_rows if self._indices is None else len(self._indices)

    @property
    def num_rows(self) -> int:
        return len(self)

    @property
    def column_names(self) -> list[str]:
        return self._table.column_names

    @property
    def schema(self) -> Schema:
        return dict(self._table.schema)

    features = schema  # HF's name for it

    def __repr__(self):
        return f"Dataset(num_rows={len(self)}, schema={_schema_str(self.schema)})"

    # -- row addressing --
    def _physical(self, key) -> tuple[int, int] | torch.Tensor:
        """Logical rows -> physical rows: a (start, stop) range when contiguous, else an index tensor."""
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                if self._indices is None:
                    return start, max(start, stop)
                idx = self._indices[start:stop]
            else:
                idx = torch.arange(start, stop, step, dtype=torch.int64)
                idx = idx if self._indices is None else self._indices[idx]
        else:
            idx = _index_tensor(key, n)
            idx = idx if self._indices is None else self._indices[idx]
        if len(idx) > 1 and int(idx[-1]) - int(idx[0]) == len(idx) - 1 and bool((idx[1:] > idx[:-1]).all()):
            return int(idx[0]), int(idx[-1]) + 1  # a run like 7,8,9: read it as a zero-copy range
        return idx

    def _columns_for_output(self) -> list[str]:
        return self._format["columns"] or self.column_names

    def _fetch(self, rows, columns: list[str]) -> dict[str, list]:
        if isinstance(rows, tuple):
            return self._table.slice_pydict(rows[0], rows[1], columns)
        return self._table.take_pydict(rows, columns)

    def _fetch_torch(self, rows, columns: list[str]) -> dict[str, Any]:
        """Like _fetch, but numbers come back as tensors: zero-copy views of the file when the rows are
        contiguous inside one chunk, a gather otherwise; list<number> rows become one tensor each
        (views). Columns with nulls, strings and nested types stay Python values (no tensor holds None)."""
        out, python_cols = {}, []
        parts = self._table.split_rows(rows)  # [(chunk, local rows, output positions or None)]
        for k in columns:
            t, chunks = self.schema[k], [b.columns[k] for b in self._table.batches]
            numeric = isinstance(t, (PrimitiveType, TensorType))
            lists = isinstance(t, ListType) and isinstance(t.value, PrimitiveType)
            if not (numeric or lists) or any(a.null_count or (lists and a.child.null_count) for a in chunks):
                python_cols.append(k)
                continue
            pieces = [(_gather_rows_torch(chunks[c], local, lists), pos) for c, local, pos in parts]
            if len(pieces) == 1 and pieces[0][1] is None:
                out[k] = pieces[0][0]  # the common case: one chunk, no reordering, views untouched
            elif lists:
                n = sum(len(p) for p, _ in pieces)
                merged: list = [] if pieces[0][1] is None else [None] * n
                for p, pos in pieces:
                    if pos is None:
                        merged.extend(p)
                    else:
                        for i, v in zip(pos.tolist(), p):
                            merged[i] = v
                out[k] = merged
            elif pieces[0][1] is None:
                out[k] = torch.cat([p for p, _ in pieces])
            else:
                first = pieces[0][0]
                merged_t = torch.empty((sum(len(p) for p, _ in pieces),) + tuple(first.shape[1:]), dtype=first.dtype)
                for p, pos in pieces:
                    merged_t[pos] = p
                out[k] = merged_t
        out.update(self._fetch(rows, python_cols) if python_cols else {})
        return {k: out[k] for k in columns}

    def __getitem__(self, key):
        """ds[i] -> row dict; ds[a:b] / ds[[i, j]] -> {column: values}; ds["col"] -> the column."""
        torch_fmt = self._format["type"] == "torch"
        if isinstance(key, str):
            if key not in self.schema:
                raise KeyError(f"no column {key!r}; columns are {self.column_names}")
            rows = self._physical(slice(None))
            if torch_fmt:
                return self._fetch_torch(rows, [key])[key]
            return self._fetch(rows, [key])[key]
        if isinstance(key, int) or (isinstance(key, torch.Tensor) and key.dim() == 0):
            i = int(key)
            if not -len(self) <= i < len(self):
                raise IndexError(f"row {i} out of range for a dataset of {len(self)} rows")
            i = i + len(self) if i < 0 else i
            p = i if self._indices is None else int(self._indices[i])
            if torch_fmt:
                batch = self._fetch_torch((p, p + 1), self._columns_for_output())
                return {k: (v[0] if isinstance(v, (list, torch.Tensor)) else v) for k, v in batch.items()}
            c, j = self._table._locate(p)  # hot path for random access: no tensors, no slicing
            cols = self._table.batches[c].columns
            return {k: cols[k].get(j) for k in self._columns_for_output()}
        rows = self._physical(key)
        cols = self._columns_for_output()
        return self._fetch_torch(rows, cols) if torch_fmt else self._fetch(rows, cols)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.iter(batch_size=1024):
            names = list(batch)
            for values in zip(*batch.values()):
                yield dict(zip(names, values))

    def iter(self, batch_size: int = 1000, drop_last_batch: bool = False) -> Iterator[dict[str, list]]:
        """Yield {column: values} batches in order (tensors under with_format('torch'))."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = len(self)
        for start in range(0, n, batch_size):
            if drop_last_batch and start + batch_size > n:
                break
            yield self[start : start + batch_size]

    # -- formats --
    def with_format(self, type: str | None = None, columns: list[str] | None = None) -> "Dataset":
        """'torch': numbers as tensors (zero-copy views when possible); None/'python': Python objects."""
        if type not in (None, "python", "torch"):
            raise ValueError(f"format {type!r} is not supported; use None, 'python' or 'torch'")
        if columns is not None:
            missing = [c for c in columns if c not in self.schema]
            if missing:
                raise KeyError(f"no columns {missing}; columns are {self.column_names}")
        return self._derive(format={"type": type or "python", "columns": columns})

    def reset_format(self) -> "Dataset":
        return self.with_format(None)

    # -- row selection: all of these only build `indices` --
    def select(self, indices) -> "Dataset":
        idx = _index_tensor(indices, len(self))
        return self._derive(indices=idx if self._indices is None else self._indices[idx])

    def shuffle(self, seed: int | None = None) -> "Dataset":
        seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.select(perm)

    def sort(self, column: str, reverse: bool = False) -> "Dataset":
        """Rows ordered by `column` (stable); nulls last."""
        values = self.reset_format()[column]
        order = sorted(range(len(values)), key=lambda i: (values[i] is None, values[i] if values[i] is not None else 0),
                       reverse=False)
        if reverse:
            nonnull = [i for i in order if values[i] is not None][::-1]
            order = nonnull + [i for i in order if values[i] is None]
        return self.select(order)

    def filter(self, function: Callable, batched: bool = False, batch_size: int = 1000,
               with_indices: bool = False, fn_kwargs: dict | None = None, progress: bool | None = None) -> "Dataset":
        """Keep rows where function(row) is true (function(batch) -> list of bools when batched)."""
        keep: list[int] = []
        src, bar, kw = self.reset_format(), _progress(len(self), "filter", progress), fn_kwargs or {}
        for start in range(0, len(self), batch_size):
            batch = src[start : start + batch_size]
            n = len(next(iter(batch.values()), []))
            if batched:
                args = (batch, list(range(start, start + n))) if with_indices else (batch,)
                mask = list(function(*args, **kw))
                if len(mask) != n:
                    raise NanosetsError(f"filter function returned {len(mask)} values for a batch of {n} rows")
            else:
                names = list(batch)
                mask = [function(*((dict(zip(names, vals)), start + j) if with_indices else (dict(zip(names, vals)),)), **kw)
                        for j, vals in enumerate(zip(*batch.values()))]
            keep.extend(start + j for j, m in enumerate(mask) if m)
            if bar is not None:
                bar.update(n)
        if bar is not None:
            bar.close()
        return self.select(keep)

    def shard(self, num_shards: int, index: int, contiguous: bool = True) -> "Dataset":
        """The index-th of num_shards pieces (contiguous blocks, or every num_shards-th row)."""
        if not 0 <= index < num_shards:
            raise ValueError(f"shard index {index} is not in [0, {num_shards})")
        n = len(self)
        if contiguous:
            div, mod = divmod(n, num_shards)
            start = index * div + min(index, mod)
            return self.select(range(start, start + div + (index < mod)))
        return self.select(range(index, n, num_shards))

    def train_test_split(self, test_size: float | int | None = None, train_size: float | int | None = None,
                         shuffle: bool = True, seed: int | None = None) -> DatasetDict:
        n = len(self)

        def count(x, rounding):
            return None if x is None else (rounding(x * n) if isinstance(x, float) else int(x))

        n_test, n_train = count(test_size, math.ceil), count(train_size, math.floor)  # as HF rounds
        if n_test is None:
            n_test = n - n_train if n_train is not None else math.ceil(0.25 * n)
        if n_train is None:
            n_train = n - n_test
        if n_test < 1 or n_train < 1 or n_test + n_train > n:
            raise ValueError(f"cannot split {n} rows into train={n_train} and test={n_test}")
        order = self.shuffle(seed) if shuffle else self
        return DatasetDict(train=order.select(range(n_train)), test=order.select(range(n_train, n_train + n_test)))

    # -- column operations: metadata only, no copy --
    def select_columns(self, columns: str | list[str]) -> "Dataset":
        return self._derive(table=self._table.select([columns] if isinstance(columns, str) else list(columns)))

    def remove_columns(self, columns: str | list[str]) -> "Dataset":
        drop = [columns] if isinstance(columns, str) else list(columns)
        missing = [c for c in drop if c not in self.schema]
        if missing:
            raise KeyError(f"cannot remove missing columns {missing}; columns are {self.column_names}")
        return self.select_columns([c for c in self.column_names if c not in drop])

    def rename_column(self, original: str, new: str) -> "Dataset":
        return self.rename_columns({original: new})

    def rename_columns(self, mapping: dict[str, str]) -> "Dataset":
        missing = [c for c in mapping if c not in self.schema]
        if missing:
            raise KeyError(f"cannot rename missing columns {missing}; columns are {self.column_names}")
        return self._derive(table=self._table.rename(mapping))

    # -- map: the one operation that builds new columns --
    def map(self, function: Callable, batched: bool = False, batch_size: int = 1000, with_indices: bool = False,
            remove_columns: str | list[str] | None = None, fn_kwargs: dict | None = None,
            schema: dict | None = None, progress: bool | None = None, desc: str = "map") -> "Dataset":
        """Apply function to rows (or batches) and return a Dataset with its outputs as columns.

        function(row) -> dict, or function(batch: {col: list}) -> {col: list} when batched (a batched
        function may change the row count if every input column is removed or returned). Returned
        columns replace or add columns; columns neither returned nor removed are carried over as
        they are, without re-encoding. `schema` pins output types (e.g. {"ids": "list<int32>"})."""
        remove = [remove_columns] if isinstance(remove_columns, str) else list(remove_columns or [])
        missing = [c for c in remove if c not in self.schema]
        if missing:
            raise KeyError(f"remove_columns names missing columns {missing}; columns are {self.column_names}")
        src, bar, kw = self.reset_format(), _progress(len(self), desc, progress), fn_kwargs or {}
        outputs: dict[str, list] = {}
        n_out = 0
        for start in range(0, len(self), batch_size):
            batch = src[start : start + batch_size]
            n = len(next(iter(batch.values()), []))
            if batched:
                out = function(*((batch, list(range(start, start + n))) if with_indices else (batch,)), **kw)
                out = {} if out is None else out
                if not isinstance(out, dict):
                    raise NanosetsError(f"map function must return a dict of lists, got {type(out).__name__}")
                lens = {k: len(v) for k, v in out.items()}
                if len(set(lens.values())) > 1:
                    raise NanosetsError(f"map function returned columns of different lengths: {lens}")
                m = next(iter(lens.values()), n)
            else:
                names, rows = list(batch), []
                for j, vals in enumerate(zip(*batch.values())):
                    row = dict(zip(names, vals))
                    r = function(*((row, start + j) if with_indices else (row,)), **kw)
                    if r is not None and not isinstance(r, dict):
                        raise NanosetsError(f"map function must return a dict, got {type(r).__name__} at row {start + j}")
                    rows.append(r or {})
                keys = dict.fromkeys(k for r in rows for k in r)
                out, m = {k: [r.get(k) for r in rows] for k in keys}, n
            for k in out:  # a column first seen in this batch is null in the earlier rows
                outputs.setdefault(k, [None] * n_out)
            for k in outputs:
                outputs[k].extend(out[k] if k in out else [None] * m)
            n_out += m
            if bar is not None:
                bar.update(n)
        if bar is not None:
            bar.close()
        keep = [c for c in self.column_names if c not in remove and c not in outputs]
        if keep and n_out != len(self):
            raise NanosetsError(f"map changed the row count ({len(self)} -> {n_out}) but keeps columns {keep}: "
                                "remove them with remove_columns= or return them")
        base = self.select_columns(keep).flatten_indices()._table.combine_chunks() if keep else None
        new = RecordBatch.from_pydict(outputs, schema) if outputs else RecordBatch({})
        cols = {} if base is None or not base.batches else dict(base.batches[0].columns)
        cols.update(new.columns)
        order = [c for c in self.column_names if c in cols] + [c for c in new.columns if c not in self.schema]
        return Dataset(Table([RecordBatch({c: cols[c] for c in order})]), None, dict(self._format), self.metadata)

    # -- materialising and saving --
    def flatten_indices(self, chunk_rows: int = 1 << 16) -> "Dataset":
        """Copy rows into their selected order so `indices` goes away (what save_to_disk writes)."""
        if self._indices is None:
            return self
        return self._derive(table=Table(list(self._batches(chunk_rows)), self.schema), indices=None)

    def _batches(self, chunk_rows: int = 1 << 16) -> Iterator[RecordBatch]:
        """The rows in logical order as RecordBatches; zero-copy slices when there are no indices."""
        if self._indices is None:
            yield from self._table.batches
            return
        table = self._table.combine_chunks()  # once, not per block: take() gathers within one chunk
        for s in range(0, len(self._indices), chunk_rows):
            yield table.take(self._indices[s : s + chunk_rows]).batches[0]

    def save_to_disk(self, path: str | os.PathLike) -> str:
        """Write a .nano file (`path` ending in .nano) or a folder holding data.nano; atomic."""
        path = os.fspath(path)
        target = path if path.endswith(".nano") else os.path.join(path, "data.nano")
        write_nano(target, self._batches(), metadata=self.metadata, schema=self.schema)
        return target

    def to_dict(self) -> dict[str, list]:
        return self.reset_format()[:]

    def to_list(self) -> list[dict]:
        return list(self.reset_format())

    def to_jsonl(self, path: str | os.PathLike) -> None:
        """One JSON object per line (UTF-8, tensors as lists), written atomically."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for row in self.reset_format():
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def to_arrow(self):
        return to_arrow(Table(list(self._batches()), self.schema))

    @classmethod
    def from_arrow(cls, table) -> "Dataset":
        return cls(from_arrow(table))


def concatenate_datasets(datasets: list[Dataset]) -> Dataset:
    """Rows of all datasets in order. Zero-copy: chunks are appended and indices offset."""
    if not datasets:
        raise ValueError("concatenate_datasets needs at least one dataset")
    table = Table.concat([d._table for d in datasets])
    if all(d._indices is None for d in datasets):
        return Dataset(table, None, dict(datasets[0]._format))
    parts, base = [], 0
    for d in datasets:
        parts.append((d._indices if d._indices is not None else torch.arange(d._table.num_rows)) + base)
        base += d._table.num_rows
    return Dataset(table, torch.cat(parts), dict(datasets[0]._format))


# ---- loading files --------------------------------------------------------------------------------


def _read_json_rows(path: str) -> list[dict]:
    """JSON lines, a JSON list of rows, a dict of columns, or {"data": [rows]} -> list of row dicts."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if path.endswith(".json") and stripped[:1] in "[{":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None  # not one JSON document: maybe JSON lines saved as .json
        if isinstance(obj, list):
            bad = next((i for i, r in enumerate(obj) if not isinstance(r, dict)), None)
            if bad is not None:
                raise NanosetsError(f"{path}: item {bad} of the JSON list is a {type(obj[bad]).__name__}, expected an object")
            return obj
        if isinstance(obj, dict):
            if isinstance(obj.get("data"), list):
                return obj["data"]
            if obj and all(isinstance(v, list) for v in obj.values()):
                lens = {k: len(v) for k, v in obj.items()}
                if len(set(lens.values())) != 1:
                    raise NanosetsError(f"{path}: a dict of columns needs equal lengths, got {lens}")
                return [dict(zip(obj, vals)) for vals in zip(*obj.values())]
            if len(stripped.splitlines()) == 1:
                return [obj]
    rows = []
    # split on "\n" only: str.splitlines() also breaks on U+2028/U+0085, which JSON strings may hold raw
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NanosetsError(f"{path}, line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise NanosetsError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _expand(paths) -> list[str]:
    out = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else list(paths):
        p = os.fspath(p)
        if any(c in p for c in "*?["):
            found = sorted(glob.glob(p))
            if not found:
                raise FileNotFoundError(f"no files match {p!r}")
            out.extend(found)
        elif os.path.isdir(p):
            if os.path.exists(os.path.join(p, "data.nano")):
                out.append(os.path.join(p, "data.nano"))
            else:
                found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(SUPPORTED))
                if not found:
                    raise FileNotFoundError(f"folder {p!r} holds no {'/'.join(SUPPORTED)} files")
                out.extend(found)
        elif not os.path.exists(p):
            raise FileNotFoundError(f"no such file: {p!r}")
        else:
            out.append(p)
    return out


SUPPORTED = (".jsonl", ".json", ".nano", ".parquet")


def load_from_disk(path: str | os.PathLike) -> Dataset:
    """Open a .nano file (or a folder with data.nano) written by save_to_disk. O(1), zero-copy."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "data.nano")
    table, meta = read_nano(path)
    return Dataset(table, metadata=meta)


def _load_files(files: list[str], schema: dict | None) -> Dataset:
    kinds = {os.path.splitext(f)[1] for f in files}
    unknown = kinds - set(SUPPORTED)
    if unknown:
        raise NanosetsError(f"cannot load {[f for f in files if os.path.splitext(f)[1] in unknown][0]!r}: "
                            f"supported endings are {SUPPORTED}")
    if kinds <= {".jsonl", ".json"}:  # all rows first, so types are inferred over every file at once
        rows = [r for f in files for r in _read_json_rows(f)]
        try:
            return Dataset.from_list(rows, schema)
        except NanosetsError as e:
            raise NanosetsError(f"{files[0] if len(files) == 1 else files}: {e}") from None
    parts = []
    for f in files:
        if f.endswith(".nano"):
            parts.append(load_from_disk(f))
        elif f.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise NanosetsError(f"reading {f} needs pyarrow (pip install pyarrow)") from None
            parts.append(Dataset(from_arrow(pq.read_table(f))))
        else:
            parts.append(_load_files([f], schema))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def load_dataset(path=None, data_files=None, split: str | None = None, schema: dict | None = None):
    """Load jsonl / json / .nano / parquet files (globs and folders too) into a Dataset.

    load_dataset("train.jsonl") or load_dataset(["a.jsonl", "b.jsonl"]) -> Dataset
    load_dataset("json", data_files={"train": ..., "test": ...}) -> DatasetDict (or one split)
    Unlike HF, a single file or list gives a Dataset, not {"train": Dataset}. Hub names are not
    fetched here (prepare_data.py downloads hub files, then loads them with this)."""
    if path in ("json", "jsonl", "nano", "parquet", None):
        if data_files is None:
            raise ValueError("pass a path, or a format name with data_files=")
        path = data_files
    if isinstance(path, dict):
        dd = DatasetDict({k: _load_files(_expand(v), schema) for k, v in path.items()})
        if split is not None:
            if split not in dd:
                raise KeyError(f"no split {split!r}; splits are {list(dd)}")
            return dd[split]
        return dd
    return _load_files(_expand(path), schema)


# ---- pyarrow interop (optional: pyarrow is imported only here) -----------------------------------


def _pa_type(t: DataType):
    import pyarrow as pa

    if isinstance(t, PrimitiveType):
        return pa.float32() if t.name == "bfloat16" else getattr(pa, {"bool": "bool_"}.get(t.name, t.name))()
    if isinstance(t, StringType):
        return pa.large_string()
    if isinstance(t, NullType):
        return pa.null()
    if isinstance(t, ListType):
        return pa.large_list(_pa_type(t.value))
    if isinstance(t, StructType):
        return pa.struct([(k, _pa_type(v)) for k, v in t.fields.items()])
    return pa.fixed_shape_tensor(_pa_type(t.value), list(t.shape))


def _to_pa(a: Array):
    """Array -> pyarrow Array over the same memory (bool and bfloat16 are converted)."""
    import pyarrow as pa

    a, t, n = a.compact(), a.type, a.length
    val = a._compact_validity()
    val = pa.py_buffer(val) if val is not None else None
    if isinstance(a, NullArray):
        return pa.nulls(n)
    if isinstance(a, PrimitiveArray):
        if t.name == "bool":  # Arrow packs bools into bits
            return pa.Array.from_buffers(pa.bool_(), n, [val, pa.py_buffer(pack_bits(a.to_torch()))])
        values = tensor_to_buffer(a.to_torch().float()) if t.name == "bfloat16" else a.values
        return pa.Array.from_buffers(_pa_type(t), n, [val, pa.py_buffer(values)])
    if isinstance(a, (StringArray, ListArray)):
        _checked_spans(a, (0, n))  # pyarrow trusts offsets blindly: a bad one would read out of bounds
    if isinstance(a, StringArray):
        return pa.Array.from_buffers(pa.large_string(), n, [val, pa.py_buffer(a.offsets), pa.py_buffer(a.data)])
    if isinstance(a, ListArray):
        child = _to_pa(a.child)
        return pa.Array.from_buffers(pa.large_list(child.type), n, [val, pa.py_buffer(a.offsets)], children=[child])
    if isinstance(a, StructArray):
        kids = [_to_pa(c) for c in a.children.values()]
        return pa.Array.from_buffers(_pa_type(t), n, [val], children=kids)
    flat = PrimitiveArray(t.value, n * t.numel, a.values)
    storage = pa.Array.from_buffers(pa.list_(_pa_type(t.value), t.numel), n, [val], children=[_to_pa(flat)])
    return pa.ExtensionArray.from_storage(_pa_type(t), storage)


def to_arrow(table: Table):
    """nanosets Table -> pyarrow.Table, zero-copy for numbers, strings and lists."""
    import pyarrow as pa

    schema = pa.schema([(k, _pa_type(t)) for k, t in table.schema.items()])
    batches = [pa.RecordBatch.from_arrays([_to_pa(b.columns[k]) for k in table.schema], schema=schema)
               for b in table.batches]
    return pa.Table.from_batches(batches, schema=schema)


def _from_pa(arr, name: str) -> Array:
    import pyarrow as pa

    t, n, off = arr.type, len(arr), arr.offset
    if isinstance(arr, pa.ExtensionArray):
        if not hasattr(t, "shape"):
            raise NanosetsError(f"column {name!r}: arrow extension type {t} is not supported")
        storage = _from_pa(arr.storage, name)  # a tensor<T>[numel]; give it the real shape
        return TensorArray(TensorType(storage.type.value, tuple(t.shape)), n, storage.values, storage.validity)
    if pa.types.is_string(t) or pa.types.is_list(t):
        large = pa.large_string() if pa.types.is_string(t) else pa.large_list(t.value_type)
        return _from_pa(arr.cast(large), name)  # 32-bit offsets -> 64-bit (copies the offsets only)
    bufs = arr.buffers()
    validity = None
    if arr.null_count and bufs[0] is not None:
        validity = pack_bits(unpack_bits(memoryview(bufs[0]), off, n)) if off % 8 else memoryview(bufs[0])[off // 8 :]
    if pa.types.is_null(t):
        return NullArray(n)
    if pa.types.is_boolean(t):
        return PrimitiveArray(PRIMITIVES["bool"], n, tensor_to_buffer(unpack_bits(memoryview(bufs[1]), off, n)), validity)
    if pa.types.is_large_string(t) or pa.types.is_large_list(t):
        offs = frombuffer(memoryview(bufs[1]), torch.int64, n + 1, off * 8)
        first, last = int(offs[0]), int(offs[-1])
        offsets = tensor_to_buffer(offs - first)
        if pa.types.is_large_string(t):
            data = memoryview(bufs[2])[first:last] if bufs[2] is not None else memoryview(b"")
            return StringArray(n, offsets, data, validity)
        child = _from_pa(arr.values.slice(first, last - first), name + "[]")
        return ListArray(ListType(child.type), n, offsets, child, validity)
    if pa.types.is_struct(t):
        kids = {t.field(i).name: _from_pa(c, f"{name}.{t.field(i).name}") for i, c in enumerate(arr.flatten())}
        return StructArray(StructType({k: c.type for k, c in kids.items()}), n, kids, validity)
    if pa.types.is_fixed_size_list(t):
        k = t.list_size
        flat = _from_pa(arr.values.slice(off * k, n * k), name + "[]")
        if not isinstance(flat, PrimitiveArray):
            raise NanosetsError(f"column {name!r}: fixed-size lists must hold numbers, got {t}")
        return TensorArray(TensorType(flat.type, (k,)), n, flat.compact().values, validity)
    pname = {"bool": "bool", "halffloat": "float16", "float": "float32", "double": "float64"}.get(str(t), str(t))
    if pname not in PRIMITIVES:
        raise NanosetsError(f"column {name!r} has arrow type {t}, which nanosets does not support")
    p = PRIMITIVES[pname]
    return PrimitiveArray(p, n, memoryview(bufs[1])[off * p.itemsize : (off + n) * p.itemsize], validity)


def from_arrow(table) -> Table:
    """pyarrow.Table -> nanosets Table, sharing pyarrow's buffers wherever the layouts agree."""
    batches = [RecordBatch({name: _from_pa(b.column(i), name) for i, name in enumerate(b.schema.names)})
               for b in table.to_batches()]
    if not batches:  # an empty table still has a schema
        empty = {f.name: _from_pa(table.column(f.name).combine_chunks() if table.column(f.name).num_chunks
                                  else __import__("pyarrow").array([], f.type), f.name) for f in table.schema}
        batches = [RecordBatch(empty)]
    return Table(batches)


# ---- training helpers: packing and a resumable sharded sampler -----------------------------------


def plan_packs(lengths: list[int], token_budget: int, strategy: str = "first_fit") -> list[list[int]]:
    """Assign sequences to packs of at most `token_budget` tokens; returns packs of sequence indices.

    first_fit: each sequence, in order, goes into the first pack with room (keeps data order roughly).
    sorted: the same, longest sequences first (first-fit decreasing: fewer, fuller packs).
    A max segment tree over the packs' free space finds "the first pack with room >= L" in O(log P)
    instead of scanning every open pack, so 1M sequences pack in seconds."""
    if strategy not in ("first_fit", "sorted"):
        raise ValueError(f"strategy must be 'first_fit' or 'sorted', got {strategy!r}")
    for i, L in enumerate(lengths):
        if not 0 < L <= token_budget:
            raise NanosetsError(f"sequence {i} has {L} tokens; each must be in [1, token_budget={token_budget}]")
    n = len(lengths)
    order = sorted(range(n), key=lambda i: -lengths[i]) if strategy == "sorted" else range(n)
    size = 1
    while size < max(n, 1):
        size *= 2
    tree = [token_budget] * (2 * size)  # tree[1] = root; leaves tree[size + p] = free space of pack p
    packs: list[list[int]] = []
    for i in order:
        L, node = lengths[i], 1
        while node < size:  # walk down, preferring the left child: the first pack that fits
            node = 2 * node if tree[2 * node] >= L else 2 * node + 1
        p = node - size
        if p == len(packs):
            packs.append([])
        packs[p].append(i)
        tree[node] -= L
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return packs


def pack_sequences(sequences: list, token_budget: int, loss_masks: list | None = None,
                   strategy: str = "first_fit") -> list[dict[str, torch.Tensor]]:
    """Token sequences -> packed varlen batches with no padding.

    Each pack is a dict of tensors:
      input_ids [N] int64   the sequences back to back (N <= token_budget)
      positions [N] int64   0..len-1 within each sequence (RoPE positions restart per sequence)
      cu_seqlens [B+1] int32  sequence b is input_ids[cu_seqlens[b]:cu_seqlens[b+1]]
      loss_mask [N] bool    per input token: 1 = this token is a training target (e.g. response)
      labels [N] int64      labels[t] = input_ids[t+1] when t+1 is in the same sequence and is a
                            target, else -100 (already shifted: logits[t] predict labels[t])
      seq_index [B] int64   which input sequence each packed one is
    """
    seqs = [torch.as_tensor(s, dtype=torch.int64).reshape(-1) for s in sequences]
    masks = [torch.ones(len(s), dtype=torch.bool) if loss_masks is None else
             torch.as_tensor(m).reshape(-1).bool() for s, m in zip(seqs, loss_masks or seqs)]
    for i, (s, m) in enumerate(zip(seqs, masks)):
        if len(s) != len(m):
            raise NanosetsError(f"sequence {i}: {len(s)} tokens but a loss mask of {len(m)}")
    out = []
    for pack in plan_packs([len(s) for s in seqs], token_budget, strategy):
        ids = torch.cat([seqs[i] for i in pack])  # [N]
        mask = torch.cat([masks[i] for i in pack])  # [N]
        lens = torch.tensor([len(seqs[i]) for i in pack], dtype=torch.int64)  # [B]
        cu = torch.zeros(len(pack) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0)
        positions = torch.cat([torch.arange(int(L)) for L in lens])  # [N]
        labels = torch.full_like(ids, -100)
        labels[:-1] = torch.where(mask[1:], ids[1:], -100)  # next token, if it is a target...
        labels[cu[1:].long() - 1] = -100  # ...and never across a sequence boundary
        out.append({"input_ids": ids, "positions": positions, "cu_seqlens": cu, "loss_mask": mask,
                    "labels": labels, "seq_index": torch.tensor(pack, dtype=torch.int64)})
    return out


class ShardedSampler:
    """Row indices for one data-parallel rank, epoch after epoch, resumable mid-epoch.

    Every epoch draws one permutation of all rows (seeded by seed + epoch, so every rank draws the
    same one without talking), cuts it to a multiple of dp_size (drop_last) or wraps it around to
    one, and rank r takes every dp_size-th index starting at r. state_dict() records (epoch,
    position); a sampler loaded from it continues with exactly the indices the original would have
    produced next. Iterating never ends: the training loop decides how many steps to run."""

    def __init__(self, num_rows: int, dp_rank: int = 0, dp_size: int = 1, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if num_rows < (dp_size if drop_last else 1):
            raise ValueError(f"{num_rows} rows cannot feed {dp_size} data-parallel ranks")
        self.num_rows, self.dp_rank, self.dp_size = num_rows, dp_rank, dp_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        """Indices this rank gets per epoch."""
        n = self.num_rows // self.dp_size if self.drop_last else -(-self.num_rows // self.dp_size)
        return n

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.num_rows)
        total = len(self) * self.dp_size
        if total > self.num_rows:  # pad by wrapping around so every rank gets the same count
            order = torch.cat([order, order[: total - self.num_rows]])
        return order[self.dp_rank : total : self.dp_size]

    def __iter__(self) -> Iterator[int]:
        while True:
            idx = self.epoch_indices(self.epoch).tolist()
            while self.position < len(idx):
                self.position += 1
                yield idx[self.position - 1]
            self.epoch, self.position = self.epoch + 1, 0

    def take(self, k: int) -> list[int]:
        """The next k indices (crossing epoch boundaries as needed)."""
        it = iter(self)
        return [next(it) for _ in range(k)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_rows": self.num_rows,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        for k in ("num_rows", "dp_size", "seed"):
            if state[k] != getattr(self, k):
                raise ValueError(f"sampler state has {k}={state[k]}, this sampler has {getattr(self, k)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ---- benchmark: python nanosets.py --bench ------------------------------------------------------
# A generated dataset of >= 1 GB (int64, float32, string and list<int32> token columns), written as
# .nano and as an Arrow IPC stream (what HF datasets caches), then read by nanosets, pyarrow and HF
# datasets (when installed) in the same run. Opening and RSS are measured in fresh subprocesses.


def _bench_table(gb: float, seed: int = 0) -> Table:
    g = torch.Generator().manual_seed(seed)
    n = int(gb * 1e9 / (8 + 4 + 200 + 8 + 512 * 4 + 8))  # bytes per row, offsets included
    text_len = torch.randint(20, 381, (n,), generator=g)  # ~200 ASCII chars per row
    text = torch.randint(97, 123, (int(text_len.sum()),), generator=g, dtype=torch.uint8)
    text[torch.rand(len(text), generator=g) < 0.15] = 32  # spaces, so it looks like words
    ids_len = torch.randint(64, 961, (n,), generator=g)  # ~512 token ids per row
    ids = torch.randint(0, 151_936, (int(ids_len.sum()),), generator=g, dtype=torch.int32)

    def offsets(lens):
        return torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])

    cols = {"id": array_from_tensor(torch.arange(n, dtype=torch.int64)),
            "score": array_from_tensor(torch.rand(n, generator=g)),
            "text": StringArray(n, tensor_to_buffer(offsets(text_len)), tensor_to_buffer(text)),
            "input_ids": list_array_from_tensors(offsets(ids_len), ids)}
    return Table([RecordBatch(cols)])


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _bench_open(kind: str, path: str) -> dict:
    """Run in a fresh process: import everything first, then time the open and the RSS it adds."""
    import gc

    if kind == "pyarrow":
        import pyarrow as pa
    if kind == "hf":
        import datasets
    gc.collect()
    rss0, t0 = _rss_mb(), time.perf_counter()
    if kind == "nanosets":
        ds = load_dataset(path)
        n = len(ds)
    elif kind == "pyarrow":
        ds = pa.ipc.open_stream(pa.memory_map(path)).read_all()
        n = ds.num_rows
    else:
        ds = datasets.Dataset.from_file(path)
        n = len(ds)
    return {"open_ms": (time.perf_counter() - t0) * 1e3, "rss_mb": _rss_mb() - rss0, "rows": n}


def _timeit(fn, repeat: int = 3) -> float:
    fn()  # untimed warm-up: page cache, lazy imports
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(gb: float = 1.0, folder: str | None = None, rows_iter: int = 100_000, rows_random: int = 2000) -> list:
    import subprocess

    try:
        import pyarrow as pa
    except ImportError:
        raise SystemExit("the benchmark compares against pyarrow: pip install pyarrow") from None
    try:
        import datasets as hf
    except ImportError:
        hf = None
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    folder = folder or tempfile.mkdtemp(prefix="nanosets-bench-")
    nano_path, arrow_path = os.path.join(folder, "bench.nano"), os.path.join(folder, "bench.arrow")
    if not (os.path.exists(nano_path) and os.path.exists(arrow_path)):
        t0 = time.perf_counter()
        table = _bench_table(gb)
        write_nano(nano_path, table)
        pat = to_arrow(table)  # zero-copy view; cast to the 32-bit-offset types HF uses by default
        pat = pat.cast(pa.schema([("id", pa.int64()), ("score", pa.float32()), ("text", pa.string()),
                                  ("input_ids", pa.list_(pa.int32()))]))
        with pa.ipc.new_stream(arrow_path, pat.schema) as w:
            w.write_table(pat)
        del table, pat
        print(f"generated {os.path.getsize(nano_path) / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s at {folder}")
    size = os.path.getsize(nano_path)
    kinds = ["nanosets", "pyarrow"] + (["hf"] if hf else [])
    opened = {}
    for k in kinds:
        for _ in range(2):  # the first run warms the page cache for the metadata; keep the second
            out = subprocess.run([sys.executable, __file__, "--bench-open", k,
                                  nano_path if k == "nanosets" else arrow_path],
                                 capture_output=True, text=True, check=True)
        opened[k] = json.loads(out.stdout.strip().splitlines()[-1])

    ds = load_dataset(nano_path)
    pt = pa.ipc.open_stream(pa.memory_map(arrow_path)).read_all()
    hds = hf.Dataset.from_file(arrow_path) if hf else None
    n = len(ds)
    row_bytes = size / n
    res: dict[str, dict[str, float]] = {k: {} for k in kinds}
    for k in kinds:
        res[k]["open (ms)"], res[k]["RSS added by open (MB)"] = opened[k]["open_ms"], opened[k]["rss_mb"]

    # 1. full scan of a numeric column as a tensor (sum forces every byte to be read)
    res["nanosets"]["scan float32 column (GB/s)"] = n * 4 / _timeit(lambda: ds.with_format("torch")["score"].sum()) / 1e9
    res["pyarrow"]["scan float32 column (GB/s)"] = n * 4 / _timeit(
        lambda: torch.from_numpy(pt.column("score").combine_chunks().to_numpy(zero_copy_only=True)).sum()) / 1e9
    if hds is not None:
        res["hf"]["scan float32 column (GB/s)"] = n * 4 / _timeit(lambda: hds.with_format("torch", columns=["score"])[:]["score"].sum(), 1) / 1e9

    # 2. batched iteration to Python objects (all four columns), first rows_iter rows
    def it_nano():
        for b in ds.iter(batch_size=1000):
            if b["id"][-1] >= rows_iter - 1:
                break

    def it_pa():
        for b in pt.slice(0, rows_iter).to_batches(max_chunksize=1000):
            b.to_pydict()

    def it_hf():
        for b in hds.iter(batch_size=1000):
            if b["id"][-1] >= rows_iter - 1:
                break

    mb = rows_iter * row_bytes / 1e6
    res["nanosets"]["iterate to Python (MB/s)"] = mb / _timeit(it_nano, 1)
    res["pyarrow"]["iterate to Python (MB/s)"] = mb / _timeit(it_pa, 1)
    if hds is not None:
        res["hf"]["iterate to Python (MB/s)"] = mb / _timeit(it_hf, 1)

    # 3. random row access (one full row: all four columns)
    rows = random.Random(0).sample(range(n), rows_random)
    res["nanosets"]["random row (us)"] = _timeit(lambda: [ds[i] for i in rows], 1) / rows_random * 1e6
    res["pyarrow"]["random row (us)"] = _timeit(lambda: [pt.slice(i, 1).to_pylist() for i in rows], 1) / rows_random * 1e6
    if hds is not None:
        res["hf"]["random row (us)"] = _timeit(lambda: [hds[i] for i in rows], 1) / rows_random * 1e6

    # 4. shuffled batch iteration (a permutation of all rows, first rows_iter rows read)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))

    def sh_nano():
        for j, _ in enumerate(ds.shuffle(seed=0).iter(batch_size=1000)):
            if (j + 1) * 1000 >= rows_iter:
                break

    def sh_pa():
        for s in range(0, rows_iter, 1000):
            pt.take(pa.array(perm[s : s + 1000].numpy())).to_pydict()

    def sh_hf():
        for j, _ in enumerate(hds.shuffle(seed=0).iter(batch_size=1000)):
            if (j + 1) * 1000 >= rows_iter:
                break

    res["nanosets"]["shuffled iterate (MB/s)"] = mb / _timeit(sh_nano, 1)
    res["pyarrow"]["shuffled iterate (MB/s)"] = mb / _timeit(sh_pa, 1)
    if hds is not None:
        res["hf"]["shuffled iterate (MB/s)"] = mb / _timeit(sh_hf, 1)

    targets = {"open (ms)": ("<=", 50), "RSS added by open (MB)": ("<", 50), "random row (us)": ("<=", 20),
               "scan float32 column (GB/s)": ("x pyarrow >=", 0.8), "iterate to Python (MB/s)": ("x HF >=", 1.0)}
    lower_better = {"open (ms)", "RSS added by open (MB)", "random row (us)"}
    print(f"\nnanosets bench: {n:,} rows, {size / 1e9:.2f} GB file; torch {torch.__version__}, pyarrow {pa.__version__}"
          f"{', datasets ' + hf.__version__ if hf else ', HF datasets not installed'}; warm page cache")
    head = f"{'metric':28s} {'nanosets':>10s} {'pyarrow':>10s} {'HF':>10s} {'ratio':>7s}  target"
    print(head + "\n" + "-" * len(head))
    table_rows = []
    for metric in res["nanosets"]:
        ours, pa_v, hf_v = res["nanosets"][metric], res["pyarrow"].get(metric), res.get("hf", {}).get(metric)
        peers = [v for v in (pa_v, hf_v) if v is not None]
        best = (min if metric in lower_better else max)(peers)
        ratio = best / ours if metric in lower_better else ours / best  # > 1 means we beat the best peer
        op, goal = targets.get(metric, ("", None))
        if op.startswith("x pyarrow"):
            ok = ours / pa_v >= goal
        elif op.startswith("x HF"):
            ok = hf_v is None or ours / hf_v >= goal
        elif op:
            ok = ours <= goal if op == "<=" else ours < goal
        else:
            ok = None
        tgt = f"{op} {goal}" + ("" if ok is None else (" ok" if ok else " MISSED")) if op else ""
        fmt = lambda v: "-" if v is None else f"{v:10.2f}"  # noqa: E731
        print(f"{metric:28s} {fmt(ours):>10s} {fmt(pa_v):>10s} {fmt(hf_v):>10s} {ratio:7.2f}  {tgt}")
        table_rows.append((metric, ours, pa_v, hf_v, ratio, tgt))
    print("ratio = nanosets vs the best peer (>1: nanosets is better)")
    return table_rows


# ---- self-test: python nanosets.py ----------------------------------------------------------------


def selftest():
    rows = [{"q": "1+1", "ids": [1, 2, 3], "meta": {"level": 1, "tags": ["a"]}, "x": 0.5},
            {"q": "héllo", "ids": [], "meta": None, "x": None},
            {"q": None, "ids": [7], "meta": {"level": 3, "tags": []}, "x": 2.0}]
    ds = Dataset.from_list(rows, schema={"ids": "list<int32>"})
    assert ds.to_list() == rows, ds.to_list()
    with tempfile.TemporaryDirectory() as d:
        back = load_dataset(ds.save_to_disk(os.path.join(d, "t.nano")))
        assert back.to_list() == rows and back.schema == ds.schema
        assert back.shuffle(seed=0).sort("ids")[0]["ids"] == []  # list comparison sorts [] first
        ids = back.with_format("torch")[0]["ids"]
        assert ids.dtype == torch.int32 and ids.tolist() == [1, 2, 3]
        m = back.map(lambda r: {"n": len(r["ids"])}, remove_columns=["meta"])
        assert m.column_names == ["q", "ids", "x", "n"] and m["n"] == [3, 0, 1]
        assert back.filter(lambda r: r["x"] is not None)["x"] == [0.5, 2.0]
        with open(os.path.join(d, "t.nano"), "r+b") as f:
            f.truncate(200)
        try:
            load_dataset(os.path.join(d, "t.nano"))
            raise AssertionError("a truncated file must not open")
        except NanosetsError as e:
            assert "truncated" in str(e)
    packs = pack_sequences([[1, 2, 3], [4, 5], [6, 7, 8, 9]], token_budget=5)
    assert [p["cu_seqlens"].tolist() for p in packs] == [[0, 3, 5], [0, 4]]
    s = ShardedSampler(10, dp_rank=1, dp_size=2, seed=0)
    first = s.take(3)
    resumed = ShardedSampler(10, dp_rank=1, dp_size=2, seed=0)
    resumed.load_state_dict(s.state_dict())
    assert first + resumed.take(4) == ShardedSampler(10, 1, 2, seed=0).take(7)
    print("nanosets selftest: OK")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--bench-open":
        print(json.dumps(_bench_open(sys.argv[2], sys.argv[3])))
    elif "--bench" in sys.argv:
        import argparse

        ap = argparse.ArgumentParser(description="nanosets benchmark")
        ap.add_argument("--bench", action="store_true")
        ap.add_argument("--gb", type=float, default=1.0, help="dataset size to generate")
        ap.add_argument("--dir", default=None, help="where to put the generated files (reused if present)")
        a = ap.parse_args()
        bench(a.gb, a.dir)
    else:
        selftest()
