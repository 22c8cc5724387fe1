"""nanosets: an Arrow-like columnar dataset library with a zero-copy, checksummed file format, from scratch.

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

Sections, in file order; * marks the ~600-line first read (after the format table below), the
others stand alone:
  types (the type grammar) . buffers and bitmaps . *arrays (Array, _FixedWidth, _OffsetsMixin,
  ListArray) . building arrays from Python (inference, errors that name the row) . take and concat .
  tables (chunking) . *the .nano file (write_nano, _Reader.node, read_nano, _Reader.verify) .
  *Dataset (its docstring, _physical, __getitem__, select, shuffle) . *loading files (load_dataset) .
  pyarrow interop . training helpers (packing, the sharded sampler) . benchmark . self-test and CLI

Commands:
  python nanosets.py                      # CPU self-test, a few seconds
  python nanosets.py --verify F.nano ...  # check every buffer's checksum (~0.5 s per GB, see verify_nano)
  python nanosets.py --bench              # 1 GB benchmark against pyarrow (and HF datasets when installed)
  python nanosets.py --help

Usage:
  from nanosets import Dataset, load_dataset
  ds = Dataset.from_list([{"q": "1+1", "ids": [1, 2, 3]}], schema={"ids": "list<int32>"})
  ds.save_to_disk("data/train.nano"); ds = load_dataset("data/train.nano")
  ds.shuffle(seed=0).with_format("torch")[0]["ids"]   # a tensor viewing the mmap'd file
  load_dataset("data/gsm8k_sft")                      # a folder: {"train": ..., "test": ...} by file name
  load_dataset("data/gsm8k_sft", split="test", verify=True)   # one split, every checksum checked

THE .nano FILE FORMAT (version 2; all integers little-endian)
  offset  bytes  field
  0       8      magic b"NANOSET\\0"
  8       4      format version, uint32 (= 2)
  12      4      header size, uint32 (= 64)
  16      8      total file size, uint64 (a shorter file on disk means it was truncated)
  24      8      metadata offset, uint64
  32      8      metadata length, uint64
  40      4      crc32 of the metadata bytes, uint32
  44      20     reserved, zero
  64      ...    data buffers, each starting at a multiple of 64 bytes, zero padding between them
  M       L      metadata: UTF-8 JSON (M = metadata offset, L = metadata length), see below
  M+L     8      tail magic b"NANOEND\\0" (also the last 8 bytes of the file)

  Metadata JSON: {"version": 2, "num_rows": R, "schema": [[name, type], ...],
                  "batches": [{"length": n, "columns": [node, ...]}, ...], "metadata": {...}}
  A type is JSON: "int32" (any primitive name), "string", "null", {"list": T},
                  {"struct": [[name, T], ...]}, {"tensor": "float32", "shape": [2, 3]}.
  A node describes one Array of a batch: {"length": n, "null_count": k,
      "buffers": {"validity": [offset, nbytes, crc32] or null, "offsets"/"values"/"data": [offset, nbytes, crc32]},
      "children": [node, ...]}   (list: one child with the values; struct: one child per field)
  Buffers per type: primitive -> values (n * itemsize); bool -> values (one byte per value, unlike
  Arrow's bits, so torch.frombuffer(dtype=torch.bool) is zero-copy); string -> offsets ((n+1) int64)
  + data (UTF-8 bytes); list -> offsets ((n+1) int64) + child; struct -> children; tensor -> values
  (n * prod(shape) * itemsize); null -> nothing. Validity is bit-packed, LSB first, 1 = valid, and is
  omitted when the column has no nulls. crc32 is zlib's, of the buffer's nbytes (padding excluded).

  What is checked, and when:
    open (O(1) in the data size): magic, version, sizes, tail, the metadata crc32, every buffer's
        range, size and alignment against its type, the first and last offset of every string/list;
    every read: the offsets of the rows it touches, and UTF-8 of the strings it decodes;
    verify (verify_nano, load_dataset(verify=True), --verify; O(size)): every data buffer's crc32 and
        that every offsets buffer is non-decreasing. A flipped byte in a token id, a length or a mask
        is invisible to the checks above and caught only here: run it once before a long job.
        Cost: ~0.5 s per GB when the pages are cached (BENCHMARKS.md has the measured numbers).
  Version 1 files (buffers as [offset, nbytes], no checksums) still open and read. verify can only
  decode every row of them (offsets, UTF-8), which misses a changed number, and warns so: rebuild
  such a file from its source (for prepare_data.py output: rerun it with --overwrite).
"""
from __future__ import annotations

import array as pyarray
import bisect
import copy
import gc
import glob
import itertools
import json
import math
import mmap
import os
import re
import struct
import sys
import tempfile
import time
import warnings
import zlib
from contextlib import nullcontext
from typing import Any, Callable, Iterable, Iterator

import torch


class NanosetsError(ValueError):
    """Bad input: a corrupt file, a row that disagrees with the schema, a bad argument. A ValueError,
    so callers (and CLIs) can treat it as an expected error with a message for the user."""


def _expect(ok, msg: str, exc: type[Exception] = NanosetsError) -> None:
    """Raise exc(msg) unless ok: one line per input check, the expectation stated positively. The
    message is built even when ok, so hot paths and per-row loops keep a plain `if ...: raise`."""
    if not ok:
        raise exc(msg)


# ---- types ----------------------------------------------------------------------------------------
# A DataType says how to interpret an Array's buffers. Primitive types are fixed-width scalars; the
# others are built from them. Schemas may be written as strings: parse_type reads str(t) back.

class DataType:
    """Base class of all types. `name` is the canonical string form ("list<int32>") that parse_type
    reads back; equality and hashing go through it, so two separately built list<int32> are equal."""
    name: str

    def __str__(self):
        return self.name

    def __eq__(self, other):  # structural: the canonical names are equal
        return isinstance(other, DataType) and str(self) == str(other)

    def __hash__(self):
        return hash(str(self))

    def __repr__(self):
        return f"DataType({str(self)!r})"


class PrimitiveType(DataType):
    """Fixed-width scalar. `fmt` is the memoryview/struct format char (None where Python has none)."""
    def __init__(self, name: str, fmt: str | None, torch_dtype: torch.dtype):
        self.name, self.fmt, self.torch_dtype, self.itemsize = name, fmt, torch_dtype, torch_dtype.itemsize


class NullType(DataType):
    """A column where every value is None (what inference gives for an all-None column)."""
    name = "null"


class StringType(DataType):
    """UTF-8 text: int64 offsets into one bytes buffer (Arrow's large_utf8: a column may hold > 2 GB of text)."""
    name = "string"


class ListType(DataType):
    """Variable-length list of `value` (any type, so lists nest to any depth): Arrow's large_list."""
    def __init__(self, value: DataType):
        self.value, self.name = value, f"list<{value}>"


class StructType(DataType):
    """A record of named fields, each a child Array of the same length. Field names may not contain
    the type grammar's punctuation, or str(t) could not be parsed back."""
    def __init__(self, fields: dict[str, DataType]):
        for name in fields:  # these characters are the grammar's: "struct<a: int32, b: list<string>>"
            if any(c in name for c in "<>,:"):
                raise ValueError(f"struct field name {name!r} may not contain any of '<>,:'")
        self.fields = dict(fields)
        self.name = "struct<" + ", ".join(f"{k}: {v}" for k, v in self.fields.items()) + ">"


class TensorType(DataType):
    """Fixed-shape tensor per row (Arrow's fixed_shape_tensor): n rows = one [n, *shape] buffer, no offsets."""
    def __init__(self, value: PrimitiveType, shape: tuple[int, ...]):
        if not isinstance(value, PrimitiveType) or value.name == "bool":
            raise ValueError(f"tensor values must be a numeric primitive type, got {value}")
        if not shape or any(int(s) <= 0 for s in shape):
            raise ValueError(f"tensor shape must be non-empty positive ints, got {shape}")
        self.value, self.shape = value, tuple(int(s) for s in shape)
        self.numel = math.prod(self.shape)  # elements per row
        self.name = f"tensor<{value}>[{','.join(map(str, self.shape))}]"


# name -> memoryview format char ("" where Python has none: the halves decode through torch instead)
PRIMITIVES: dict[str, PrimitiveType] = {n: PrimitiveType(n, fmt or None, getattr(torch, n)) for n, fmt in [
    ("bool", "?"), ("int8", "b"), ("uint8", "B"), ("int16", "h"), ("uint16", "H"), ("int32", "i"), ("uint32", "I"),
    ("int64", "q"), ("uint64", "Q"), ("float16", ""), ("bfloat16", ""), ("float32", "f"), ("float64", "d")]}
STRING, NULL = StringType(), NullType()  # types without parameters: one instance each
_TORCH_TO_PRIMITIVE = {t.torch_dtype: t for t in PRIMITIVES.values()}  # for columns built from tensors
# Python scalar -> column type; bool first, because bool is a subclass of int in Python
_PY_TYPES = {bool: PRIMITIVES["bool"], int: PRIMITIVES["int64"], float: PRIMITIVES["float64"], str: STRING}


def parse_type(spec: str | DataType) -> DataType:
    """'list<struct<a: int32, b: string>>' -> DataType, so schemas can be written as strings.
    A small recursive-descent parser: _parse_type_at reads one type starting at position i and
    returns where it stopped; composite types call it again for their inner types."""
    if isinstance(spec, DataType):
        return spec
    _expect(isinstance(spec, str), f"a type must be a DataType or a string like 'list<int32>', got {spec!r}", TypeError)
    s = spec.replace(" ", "")  # spaces are decoration: "list< int32 >" is "list<int32>"
    t, end = _parse_type_at(s, 0, spec)
    _expect(end == len(s), f"cannot parse type {spec!r}: unexpected text at {s[end:]!r}", ValueError)
    return t


def _parse_type_at(s: str, i: int, spec: str) -> tuple[DataType, int]:
    m = re.compile(r"\w*").match(s, i)  # the type's name: letters, digits, '_'
    name, j = m.group(), m.end()
    simple = {**PRIMITIVES, "string": STRING, "null": NULL}  # the types that are just a name
    if name in simple:
        return simple[name], j
    if name in ("list", "struct", "tensor") and s[j : j + 1] == "<":
        if name != "struct":  # list<T> and tensor<T>[d0,d1,...] both start with one inner type
            inner, k = _parse_type_at(s, j + 1, spec)
            want = ">[" if name == "tensor" else ">"  # tensor: the shape follows the '>' as [d0,d1,...]
            _expect(s.startswith(want, k), f"cannot parse type {spec!r}: expected {want!r} at {s[k:]!r}", ValueError)
            if name == "list":
                return ListType(inner), k + 1
            close = s.find("]", k + 2)
            _expect(close >= 0, f"cannot parse type {spec!r}: tensor shape has no closing ']'", ValueError)
            return TensorType(inner, tuple(int(x) for x in s[k + 2 : close].split(","))), close + 1
        fields, k = {}, j + 1  # struct<name: T, ...>: fields until the closing '>'
        while s[k : k + 1] != ">":
            colon = s.find(":", k)
            _expect(colon >= 0, f"cannot parse type {spec!r}: struct field without ':'", ValueError)
            fields[s[k:colon]], k = _parse_type_at(s, colon + 1, spec)
            if s[k : k + 1] == ",":
                k += 1
        return StructType(fields), k + 1
    raise ValueError(f"cannot parse type {spec!r} at {s[i:]!r}: expected one of {sorted(PRIMITIVES)}, "
                     "string, null, list<T>, struct<name: T, ...>, tensor<T>[d0,d1,...]")


def type_to_json(t: DataType):
    """DataType -> the JSON the file's metadata stores (structured, so no string parsing on open)."""
    if isinstance(t, ListType):
        return {"list": type_to_json(t.value)}
    if isinstance(t, StructType):
        return {"struct": [[k, type_to_json(v)] for k, v in t.fields.items()]}
    if isinstance(t, TensorType):
        return {"tensor": t.value.name, "shape": list(t.shape)}
    return str(t)


def type_from_json(j) -> DataType:
    """The inverse of type_to_json; raises ValueError on anything else (a corrupt file's metadata)."""
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

def frombuffer(buf, dtype: torch.dtype, count: int, offset: int = 0) -> torch.Tensor:
    """torch.frombuffer that accepts empty ranges and read-only buffers (pyarrow's, bytes). ZERO-COPY:
    the tensor views `buf`. torch's warning about read-only buffers is silenced: our files are mapped
    copy-on-write (a write through the tensor changes this process's copy, never the file)."""
    if count == 0:
        return torch.empty(0, dtype=dtype)  # torch.frombuffer refuses a zero-length range
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
    flat = valid.reshape(-1).to(torch.uint8)  # [n]
    padded = torch.nn.functional.pad(flat, (0, -len(flat) % 8))  # [8 * ceil(n/8)], zero bits past the end
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)  # bit j of a byte = row 8k+j
    return tensor_to_buffer((padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8))  # [ceil(n/8)]


def unpack_bits(bitmap, offset: int, length: int) -> torch.Tensor:
    """Validity bitmap -> bool[length] for rows offset..offset+length (vectorised, no Python loop)."""
    first, last = offset // 8, (offset + length + 7) // 8  # the bytes that hold those rows
    by = frombuffer(bitmap, torch.uint8, last - first, first)  # [bytes]
    bits = (by.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1  # [bytes, 8]
    start = offset - first * 8  # rows before `offset` that share its first byte
    return bits.reshape(-1)[start : start + length].bool()


# ---- arrays ---------------------------------------------------------------------------------------
# An Array = type + length + buffers + `offset` (the first row it shows inside its buffers).

def _row_index(i: int, n: int, what: str) -> int:
    """Python's indexing rules for row i of n: -n <= i < n, negative i counts from the end."""
    if not -n <= i < n:
        raise IndexError(f"row {i} out of range for {what} of {n} rows")
    return i + n if i < 0 else i


def _rows_of(columns: dict[str, list], n: int = 0) -> list[dict]:
    """{column: values} -> one dict per row (n rows: only used when there are no columns)."""
    names = list(columns)
    return [dict(zip(names, vals)) for vals in zip(*columns.values())] if names else [{} for _ in range(n)]


class Array:
    """One column (or one chunk of a column): `length` rows starting at row `offset` of its buffers.

    Why an offset: slice() returns a shallow copy over the SAME buffers with a moved window, so a
    slice is O(1) and copies nothing (as in Arrow). compact() does the opposite when a writer needs
    offset 0: it re-bases the buffers and copies only what must move. Nulls live in `validity` (a
    bitmap, or None when there are none); the values under a null row are zeros and are never shown:
    get() and take_pylist() here put the Nones in, and each subclass only decodes values, in _get(i)
    (one row) and _pylist(idx) (rows idx, or every row when idx is None, vectorised where it can)."""
    type: DataType

    def __init__(self, length: int, validity=None, offset: int = 0):
        self.length, self.validity, self.offset = int(length), validity, int(offset)
        self._null_count = None if validity is not None else 0  # None: unknown until someone asks

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
        """Row i is not null: bit (offset + i) of the bitmap, read straight from its byte."""
        j = self.offset + i  # the bitmap, like every buffer, is indexed from the buffer's start
        return self.validity is None or bool((self.validity[j >> 3] >> (j & 7)) & 1)

    def get(self, i: int):
        """Row i as a Python value (None when the row is null)."""
        i = _row_index(i, self.length, "an array")
        return self._get(i) if self.is_valid(i) else None

    def to_pylist(self) -> list:
        return self.take_pylist(None)

    def take_pylist(self, idx: torch.Tensor | None) -> list:
        """Rows idx (an int64 tensor: any order, repeats allowed; None: every row) as Python values."""
        values = self._pylist(idx)
        if self.validity is None or self.null_count == 0:
            return values  # the common case: no bitmap to read
        valid = unpack_bits(self.validity, self.offset, self.length)  # [length] bool
        return [v if ok else None for v, ok in zip(values, (valid if idx is None else valid[idx]).tolist())]

    def slice(self, start: int, stop: int) -> "Array":
        """Rows [start, stop) as a new Array sharing every buffer (O(1), no copy)."""
        start, stop = max(0, min(start, self.length)), max(0, min(stop, self.length))
        new = copy.copy(self)  # shallow: buffers and cached views are shared, not copied
        new.offset, new.length = self.offset + start, max(0, stop - start)
        new._null_count = 0 if self._null_count == 0 else None  # no nulls stays no nulls; else recount
        return new

    def _compact_validity(self):
        """The validity bitmap re-based to offset 0 (a byte slice when aligned, else repacked)."""
        if self.validity is None or self.null_count == 0:
            return None
        if self.offset % 8 == 0:  # byte-aligned: the bits are already in place, just slice the bytes
            return self.validity[self.offset // 8 : (self.offset + self.length + 7) // 8]
        return pack_bits(unpack_bits(self.validity, self.offset, self.length))


class NullArray(Array):
    """The `null` type: every row is None, so there are no buffers at all."""
    type = NULL

    @property
    def null_count(self):
        return self.length

    def _get(self, i):
        return None

    def _pylist(self, idx):
        return [None] * (self.length if idx is None else len(idx))

    def compact(self):
        return NullArray(self.length)


class _FixedWidth(Array):
    """Numbers (PrimitiveArray) and fixed-shape tensors (TensorArray): every row is `row_bytes` bytes
    of `values`, so row i sits at bytes [(offset+i) * row_bytes, (offset+i+1) * row_bytes) and needs
    no offsets buffer; the whole column is one zero-copy tensor."""
    def __init__(self, type, length, values, validity=None, offset=0):
        super().__init__(length, validity, offset)
        self.type, self.values = type, values
        self.elem, self.shape = (type.value, type.shape) if isinstance(type, TensorType) else (type, ())
        self.numel = math.prod(self.shape)  # elements per row: 1 for a number (an empty shape)
        self.row_bytes = self.numel * self.elem.itemsize
        # Numbers get a typed memoryview (e.g. 'i' for int32) that indexes and converts in C; halves have
        # no format char, and tensors (no `fmt`) are read through torch.
        fmt = getattr(type, "fmt", None)
        self._typed = values.cast(fmt) if fmt and len(values) % self.row_bytes == 0 else None

    def to_torch(self) -> torch.Tensor:
        """ZERO-COPY tensor [length, *shape] over the values buffer (null rows hold zeros)."""
        n, at = self.length * self.numel, self.offset * self.row_bytes  # elements, byte offset
        flat = frombuffer(self.values, self.elem.torch_dtype, n, at)
        return flat.view(self.length, *self.shape)  # [length * numel] -> [length, *shape]

    def _get(self, i):
        if self._typed is not None:  # the hot path of ds[i]: one C-level index, no tensor
            return self._typed[self.offset + i]
        return self.to_torch()[i].tolist()  # a number, or nested lists of shape [*shape]

    def _pylist(self, idx):
        if idx is None and self._typed is not None:  # memoryview.tolist() builds Python numbers in C: fast
            return self._typed[self.offset : self.offset + self.length].tolist()
        return (self.to_torch() if idx is None else self.to_torch()[idx]).tolist()  # one gather, one conversion

    def compact(self):
        rb = self.row_bytes
        window = self.values[self.offset * rb : (self.offset + self.length) * rb]  # a view, no copy
        return type(self)(self.type, self.length, window, self._compact_validity())


class PrimitiveArray(_FixedWidth):
    """Fixed-width scalars (ints, floats, bool as one byte each): to_torch() is [length]; to_pylist() runs in C."""


class TensorArray(_FixedWidth):
    """Fixed-shape tensor per row: values hold length * prod(shape) elements, row-major."""


class _OffsetsMixin:
    """Shared by string and list arrays: row i spans values [offsets[offset+i], offsets[offset+i+1]).
    The offsets of a file are not trusted blindly: every read checks the spans it uses (a span that
    runs backwards or past the values would otherwise return the wrong rows without a word)."""
    offsets: memoryview
    _offs_view = None

    def _bounds(self, i: int) -> tuple[int, int]:
        """Row i's [start, end) in the values, checked: the one span that ds[i] uses."""
        if self._offs_view is None:
            self._offs_view = self.offsets.cast("q")  # int64 view, no copy; cached (hot in ds[i])
        a, b, limit = self._offs_view[self.offset + i], self._offs_view[self.offset + i + 1], self._num_values()
        if not 0 <= a <= b <= limit:
            raise NanosetsError(f"corrupt {self.type} column: row {i} spans values [{a}, {b}) of {limit}")
        return a, b

    def _offsets_tensor(self) -> torch.Tensor:
        return frombuffer(self.offsets, torch.int64, self.length + 1, self.offset * 8)  # [length+1]

    def _spans(self, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Start/end value positions of rows (None: this whole window; a (start, stop) range; or an
        index tensor), vectorised and checked (a clamped slice would silently return the wrong
        values; pyarrow would read out of bounds)."""
        offs = self._offsets_tensor()  # [length+1]
        if isinstance(rows, torch.Tensor):
            starts, ends = offs[rows], offs[rows + 1]  # [k], [k] gathers
        else:  # a window of rows: two views of the offsets, no gather
            start, stop = rows or (0, self.length)
            starts, ends = offs[start:stop], offs[start + 1 : stop + 1]  # [k], [k]
        limit = self._num_values()
        if len(starts) and (bool((ends < starts).any()) or int(starts.min()) < 0 or int(ends.max()) > limit):
            raise NanosetsError(f"corrupt {self.type} column: offsets leave the values (size {limit}) or run backwards")
        return starts, ends

    def _compact_offsets(self) -> tuple[memoryview, int, int]:
        """Offsets re-based to start at 0, plus the [first, last) range of values they cover."""
        t = self._offsets_tensor()  # [length+1]
        first, last = int(t[0]), int(t[-1])
        if first == 0:  # already based at 0: a view of the window's offsets
            return self.offsets[self.offset * 8 : (self.offset + self.length + 1) * 8], 0, last
        return tensor_to_buffer(t - first), first, last


def _utf8(b, row) -> str:
    """bytes -> str, or an error naming the row (a raw UnicodeDecodeError names no row or column)."""
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

    def _num_values(self) -> int:
        return len(self.data)

    def _get(self, i):
        a, b = self._bounds(i)
        return _utf8(self.data[a:b], i)

    def _pylist(self, idx):
        starts, ends = (x.tolist() for x in self._spans(idx))
        if idx is not None:  # scattered rows: one decode each
            return [_utf8(self.data[a:b], r) for r, a, b in zip(idx.tolist(), starts, ends)]
        base, blob = (starts[0], bytes(self.data[starts[0] : ends[-1]])) if starts else (0, b"")  # one copy
        # TRICK: when the bytes are pure ASCII (common for math text), byte offsets equal character
        # offsets, so we decode the whole blob once and slice str objects instead of decoding each.
        if blob.isascii():  # a C-speed scan of the bytes
            text = blob.decode("ascii")
            return [text[a - base : b - base] for a, b in zip(starts, ends)]
        return [_utf8(blob[a - base : b - base], i) for i, (a, b) in enumerate(zip(starts, ends))]

    def compact(self):
        offsets, first, last = self._compact_offsets()
        return StringArray(self.length, offsets, self.data[first:last], self._compact_validity())


class ListArray(_OffsetsMixin, Array):
    """list<T>: int64 offsets[length+1] into a child Array that holds all rows' values back to back.
    The child is itself any Array, so list<list<int32>> is a ListArray over a ListArray over a
    PrimitiveArray. For list<number> without nulls the row values come straight from the child's typed
    memoryview (no Array object per row): the hot path of a token-id column."""
    def __init__(self, type: ListType, length, offsets, child: Array, validity=None, offset=0):
        super().__init__(length, validity, offset)
        self.type, self.offsets, self.child = type, offsets, child

    def _num_values(self) -> int:
        return self.child.length

    def _typed_child(self) -> memoryview | None:
        """The child's typed memoryview when rows can be read from it directly (numbers, no nulls)."""
        c = self.child
        return c._typed if isinstance(c, PrimitiveArray) and c._typed is not None and c.null_count == 0 else None

    def _get(self, i):
        a, b = self._bounds(i)
        mv = self._typed_child()
        if mv is not None:
            return mv[self.child.offset + a : self.child.offset + b].tolist()
        return self.child.slice(a, b).to_pylist()

    def _pylist(self, idx):
        """A window of rows (idx None) decodes its child range once and cuts it; scattered rows, one by one."""
        starts, ends = (x.tolist() for x in self._spans(idx))
        mv, o = self._typed_child(), self.child.offset
        if mv is not None:  # list<number>: each row converted straight from the buffer
            return [mv[o + a : o + b].tolist() for a, b in zip(starts, ends)]
        if idx is not None or not starts:
            return [self.child.slice(a, b).to_pylist() for a, b in zip(starts, ends)]
        lo, flat = starts[0], self.child.slice(starts[0], ends[-1]).to_pylist()  # the window's values
        return [flat[a - lo : b - lo] for a, b in zip(starts, ends)]  # cut into rows (list slices)

    def compact(self):
        offsets, first, last = self._compact_offsets()  # the child keeps only the values we cover
        return ListArray(self.type, self.length, offsets, self.child.slice(first, last).compact(),
                         self._compact_validity())


class StructArray(Array):
    """struct<...>: one child Array per field, all of this array's length. The children are kept
    pre-sliced to this window; `offset` only locates rows in this array's own validity bitmap."""
    def __init__(self, type: StructType, length, children: dict[str, Array], validity=None, offset=0):
        super().__init__(length, validity, offset)
        self.type, self.children = type, children

    def slice(self, start, stop):
        new = super().slice(start, stop)  # moves the window of our validity bitmap
        s = new.offset - self.offset  # the clamped start, relative to this struct
        new.children = {k: c.slice(s, s + new.length) for k, c in self.children.items()}
        return new

    def _get(self, i):
        return {k: c.get(i) for k, c in self.children.items()}

    def _pylist(self, idx):
        n = self.length if idx is None else len(idx)
        return _rows_of({k: c.take_pylist(idx) for k, c in self.children.items()}, n)

    def compact(self):
        kids = {k: c.compact() for k, c in self.children.items()}
        return StructArray(self.type, self.length, kids, self._compact_validity())


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
    return f"{type(v).__name__} {r[:40] + '...' if len(r) > 40 else r}"  # short: it goes into one error line


def _check_all(values: list, ok: Callable, path: str, t) -> None:
    """Raise _Mismatch at the first non-null value that ok(value) refuses."""
    bad = next((row for row, v in enumerate(values) if v is not None and not ok(v)), None)
    if bad is not None:
        raise _Mismatch(bad, path, t, values[bad])


def _infer_one(v, name: str) -> DataType:
    """The type of one Python value (lists and dicts recurse into their items)."""
    if v is None:
        return NULL
    for py, t in _PY_TYPES.items():
        if isinstance(v, py):
            return t
    if isinstance(v, torch.Tensor):  # a 0-d tensor is a scalar; a [d0, ...] one is a tensor<T>[d0, ...]
        p = _TORCH_TO_PRIMITIVE[v.dtype]
        return p if v.dim() == 0 else TensorType(p, tuple(v.shape))
    if isinstance(v, (list, tuple)):
        return ListType(infer_type(list(v), name + "[]"))
    if isinstance(v, dict):
        return StructType({k: infer_type([v[k]], f"{name}.{k}") for k in v})
    raise TypeError(f"cannot store a {type(v).__name__} ({v!r:.40}); use bool/int/float/str/list/dict/tensor")


def unify_types(a: DataType, b: DataType) -> DataType | None:
    """The narrowest type holding values of both a and b (None when there is none).
    This is how a column's type grows over its rows: null joins anything, int64 + float64 -> float64,
    lists unify their items, structs take the union of their fields (a missing field is a null)."""
    if a == b or b == NULL:
        return a
    if a == NULL:
        return b
    if {str(a), str(b)} <= {"int64", "float64"}:
        return PRIMITIVES["float64"]  # int + float -> float, as pyarrow and pandas do
    if isinstance(a, ListType) and isinstance(b, ListType):
        v = unify_types(a.value, b.value)
        return None if v is None else ListType(v)
    if isinstance(a, StructType) and isinstance(b, StructType):
        fields = dict(a.fields)  # a's fields first, then the ones only b has: column order is first seen
        for k, t in b.fields.items():
            fields[k] = unify_types(fields[k], t) if k in fields else t
            if fields[k] is None:  # the same field holds two types that do not unify
                return None
        return StructType(fields)
    return None  # e.g. string vs int64, list vs struct: no type holds both


def infer_type(values: list, name: str = "column") -> DataType:
    """One type for every value of a column; raises naming the first row that disagrees."""
    simple = set(map(type, values)) - {type(None)}  # the Python types present, nulls aside
    if len(simple) == 1 and next(iter(simple)) in _PY_TYPES:  # the common case, no per-row work
        return _PY_TYPES[next(iter(simple))]
    if simple <= {int, float} and simple:  # ints mixed with floats: float64, as pyarrow does
        return PRIMITIVES["float64"]
    if simple and simple <= {list, tuple}:  # infer lists from their flattened values in one call
        try:
            return ListType(infer_type([x for v in values if v is not None for x in v], name + "[]"))
        except NanosetsError:
            pass  # fall through to the row-by-row scan, which names the row
    result = NULL  # the slow path: grow the type row by row, so a conflict names its row
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


def _offsets_of(lengths: Iterable[int]) -> memoryview:
    """Lengths -> int64 offsets [0, l0, l0+l1, ...] as bytes: row i spans [offsets[i], offsets[i+1])."""
    return memoryview(pyarray.array("q", itertools.accumulate(lengths, initial=0))).cast("B")


def _build(values: list, t: DataType, path: str) -> Array:
    """Pack Python values into an Array of type t (raises _Mismatch with the row inside `values`).
    Nested types recurse: a list column builds its child from all rows' items flattened, a struct
    builds one child per field. `path` names the position for errors (e.g. "col[].field")."""
    n, has_nulls = len(values), any(v is None for v in values)
    validity = pack_bits(torch.tensor([v is not None for v in values])) if has_nulls else None  # None: no nulls
    if isinstance(t, NullType):
        _check_all(values, lambda v: False, path, t)  # only None fits
        return NullArray(n)
    if isinstance(t, PrimitiveType):
        return _build_primitive(values, t, path, validity, has_nulls)
    if isinstance(t, StringType):
        _check_all(values, lambda v: isinstance(v, str), path, t)
        try:
            enc = [b"" if v is None else v.encode("utf-8") for v in values]  # a null row is an empty span
        except UnicodeEncodeError:  # a lone surrogate ("\ud83d": JSON may escape one) has no UTF-8 form
            _check_all(values, lambda v: not re.search("[\ud800-\udfff]", v), path, "text without lone surrogates")
        return StringArray(n, _offsets_of(map(len, enc)), memoryview(b"".join(enc)), validity)
    if isinstance(t, ListType):
        # each row as a sequence (a 1-D tensor as a list, a null row empty), then all items flattened
        rows = [v.tolist() if isinstance(v, torch.Tensor) and v.dim() == 1 else v for v in values]
        _check_all(rows, lambda v: isinstance(v, (list, tuple)), path, t)
        rows = [v or () for v in rows]
        offsets = _offsets_of(map(len, rows))
        try:
            child = _build([x for r in rows for x in r], t.value, path + "[]")
        except _Mismatch as m:  # map the flat position back to the row that holds it
            starts = offsets.cast("q")  # starts[r] = flat position of row r's first item
            row = bisect.bisect_right(starts, m.row) - 1
            raise _Mismatch(row, f"{path}[{m.row - starts[row]}]" + m.path[len(path) + 2 :], m.expected, m.value)
        return ListArray(t, n, offsets, child, validity)
    if isinstance(t, StructType):
        _check_all(values, lambda v: isinstance(v, dict), path, t)
        for row, v in enumerate(values):  # a key the type does not have would be lost silently: refuse it
            if v is not None and not v.keys() <= t.fields.keys():
                extra = sorted(set(v) - set(t.fields))
                raise _Mismatch(row, f"{path}.{extra[0]}", "no such field in " + str(t), v[extra[0]])
        kids = {k: _build([None if v is None else v.get(k) for v in values], ft, f"{path}.{k}")  # missing: null
                for k, ft in t.fields.items()}
        return StructArray(t, n, kids, validity)
    if isinstance(t, TensorType):
        rows = []  # one [*shape] tensor per row (zeros under a null), stacked into one buffer
        for row, v in enumerate(values):
            try:
                x = torch.zeros(t.shape) if v is None else torch.as_tensor(v, dtype=t.value.torch_dtype)
            except (TypeError, ValueError, RuntimeError):
                raise _Mismatch(row, path, t, v) from None
            if tuple(x.shape) != t.shape:
                raise _Mismatch(row, path, t, v)
            rows.append(x.to(t.value.torch_dtype))
        stacked = torch.stack(rows) if rows else torch.zeros(0, *t.shape, dtype=t.value.torch_dtype)  # [n, *shape]
        return TensorArray(t, n, tensor_to_buffer(stacked), validity)
    raise TypeError(f"unknown type {t}")


def _build_primitive(values, t: PrimitiveType, path, validity, has_nulls) -> PrimitiveArray:
    """Numbers -> one packed buffer. array.array converts and range-checks the whole list in C; only
    when it refuses do we walk the rows in Python to find which one to name."""
    filled = [0 if v is None else v for v in values] if has_nulls else values  # nulls hold 0
    if t.name == "bool":  # only real bools: 1 or "yes" in a bool column is a mistake to report
        _check_all(values, lambda v: isinstance(v, bool), path, t)
        return PrimitiveArray(t, len(values), memoryview(pyarray.array("b", filled)).cast("B"), validity)
    is_int = not t.torch_dtype.is_floating_point

    def pack(vals):
        if is_int and any(type(v) in (float, bool) for v in vals):
            raise TypeError  # array('q') rejects floats and would take True as 1: name the row instead
        return pyarray.array(t.fmt or "d", vals)  # halves are checked as doubles, then rounded by torch

    try:
        packed = pack(filled)  # the fast path: one C call for the whole column
    except (TypeError, OverflowError, ValueError):
        for row, v in enumerate(filled):  # the slow path, only to name the first bad row
            try:
                pack([v])
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
    except _Mismatch as m:  # the internal signal becomes the user's error, with the full position
        raise NanosetsError(f"column {name!r}, row {m.row} (at {m.path}): expected {m.expected}, "
                            f"got {_describe(m.value)}") from None


def array_from_tensor(t: torch.Tensor) -> Array:
    """A CPU tensor -> PrimitiveArray ([n]) or TensorArray ([n, ...]), ZERO-COPY over its memory."""
    _expect(t.dtype in _TORCH_TO_PRIMITIVE, f"unsupported tensor dtype {t.dtype}")
    p = _TORCH_TO_PRIMITIVE[t.dtype]
    if t.dim() == 1:
        return PrimitiveArray(p, t.shape[0], tensor_to_buffer(t))
    return TensorArray(TensorType(p, tuple(t.shape[1:])), t.shape[0], tensor_to_buffer(t))


def list_array_from_tensors(offsets: torch.Tensor, values: Array | torch.Tensor) -> ListArray:
    """Build list<T> straight from int64 offsets[n+1] and the flat values (no Python per row): how
    a tokenizer's output becomes a column without a Python int per token."""
    child = array_from_tensor(values) if isinstance(values, torch.Tensor) else values  # zero-copy
    offsets = offsets.to(torch.int64)  # [n+1]
    if offsets.numel() == 0 or int(offsets[0]) != 0 or int(offsets[-1]) != child.length:
        raise NanosetsError("list offsets must start at 0 and end at the number of values")
    _expect(bool((offsets[1:] >= offsets[:-1]).all()), "list offsets must be non-decreasing")
    return ListArray(ListType(child.type), offsets.numel() - 1, tensor_to_buffer(offsets), child)


# ---- take and concat (the two operations that do copy data) -----------------------------------------
# Everything above views memory. These two build new buffers: take_array gathers rows into a fresh
# Array (what save_to_disk does to a shuffled dataset), concat_arrays joins chunks into one.

def _ranges_index(starts: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated aranges [s0..e0) ++ [s1..e1) ++ ... without a Python loop; plus new offsets.
    Example: starts [5, 0], ends [7, 3] -> positions [5, 6, 0, 1, 2], new offsets [0, 2, 5]."""
    lens = ends - starts  # [k]
    new_offsets = torch.cat([lens.new_zeros(1), lens.cumsum(0)])  # [k+1]
    total = int(new_offsets[-1])
    # position p of the output comes from starts[row(p)] + (p - new_offsets[row(p)])
    within = torch.arange(total, dtype=torch.int64) - new_offsets[:-1].repeat_interleave(lens)  # [total]
    return starts.repeat_interleave(lens) + within, new_offsets


def take_array(a: Array, idx: torch.Tensor) -> Array:
    """A new Array with rows a[idx] copied into fresh buffers (used to materialise an indirection)."""
    n, valid = len(idx), None
    if a.validity is not None and a.null_count:  # gather the validity bits of the selected rows too
        valid = pack_bits(unpack_bits(a.validity, a.offset, a.length)[idx])
    if isinstance(a, NullArray):
        return NullArray(n)
    if isinstance(a, _FixedWidth):  # one tensor gather: [length, ...] -> [n, ...]
        return type(a)(a.type, n, tensor_to_buffer(a.to_torch()[idx]), valid)
    if isinstance(a, StructArray):
        return StructArray(a.type, n, {k: take_array(c, idx) for k, c in a.children.items()}, valid)
    # strings and lists: gather each selected row's span of values, then new offsets over them
    pos, new_offsets = _ranges_index(*a._spans(idx))
    if isinstance(a, StringArray):
        data = frombuffer(a.data, torch.uint8, len(a.data))[pos]  # gather the bytes
        return StringArray(n, tensor_to_buffer(new_offsets), tensor_to_buffer(data), valid)
    return ListArray(a.type, n, tensor_to_buffer(new_offsets), take_array(a.child, pos), valid)


def concat_arrays(arrays: list[Array]) -> Array:
    """One Array holding the rows of all `arrays` (same type) back to back."""
    t = arrays[0].type
    _expect(all(a.type == t for a in arrays), f"cannot concat arrays of types {sorted({str(a.type) for a in arrays})}")
    if len(arrays) == 1:
        return arrays[0]
    n = sum(a.length for a in arrays)
    valid = None
    if any(a.validity is not None and a.null_count for a in arrays):
        valid = pack_bits(torch.cat([torch.ones(a.length, dtype=torch.bool) if a.validity is None
                                     else unpack_bits(a.validity, a.offset, a.length) for a in arrays]))
    if isinstance(t, NullType):
        return NullArray(n)
    if isinstance(arrays[0], _FixedWidth):
        return type(arrays[0])(t, n, tensor_to_buffer(torch.cat([x.to_torch() for x in arrays])), valid)
    if isinstance(t, StructType):
        return StructArray(t, n, {k: concat_arrays([x.children[k] for x in arrays]) for k in t.fields}, valid)
    # strings and lists: the parts' row lengths back to back, summed into new offsets
    parts = [x.compact() for x in arrays]
    lens = torch.cat([p._offsets_tensor().diff() for p in parts])  # [n]: the number of values of each row
    offsets = tensor_to_buffer(torch.cat([lens.new_zeros(1), lens.cumsum(0)]))  # [n+1]
    if isinstance(t, StringType):
        return StringArray(n, offsets, memoryview(b"".join(p.data for p in parts)), valid)
    return ListArray(t, n, offsets, concat_arrays([p.child for p in parts]), valid)


# ---- tables -----------------------------------------------------------------------------------------
# A Table is chunked like pyarrow.Table: a list of RecordBatches (equal-length named Arrays), one schema.

Schema = dict  # column name -> DataType, in column order


def _schema_str(schema: Schema) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in schema.items()) + "}"


def _require(schema: Schema, columns: str | Iterable[str], what: str = "no columns") -> list[str]:
    """`columns` (one name or several) as a list, each checked: a KeyError names the missing and the real ones."""
    columns = [columns] if isinstance(columns, str) else list(columns)
    missing = [c for c in columns if c not in schema]
    _expect(not missing, f"{what} {missing}; columns are {list(schema)}", KeyError)
    return columns


class RecordBatch:
    """Named columns of one length: one chunk of a Table (and one batch of a .nano file)."""
    def __init__(self, columns: dict[str, Array]):
        lengths = {k: a.length for k, a in columns.items()}
        if len(set(lengths.values())) > 1:  # a row is position i in every column: lengths must agree
            raise NanosetsError(f"columns of one batch must have equal lengths, got {lengths}")
        self.columns = dict(columns)
        self.num_rows = next(iter(lengths.values()), 0)

    @property
    def schema(self) -> Schema:
        return {k: a.type for k, a in self.columns.items()}

    @classmethod
    def from_pydict(cls, data: dict[str, list], schema: dict | None = None) -> "RecordBatch":
        """{column: list | tensor | Array} -> RecordBatch; `schema` pins some columns' types."""
        schema = {k: parse_type(v) for k, v in (schema or {}).items()}
        unknown = set(schema) - set(data)
        _expect(not unknown, f"schema names columns {sorted(unknown)} that the data does not have")
        cols = {}
        for k, v in data.items():
            if isinstance(v, Array):  # already columnar: used as is
                cols[k] = v
            elif isinstance(v, torch.Tensor) and k not in schema:
                cols[k] = array_from_tensor(v)  # zero-copy
            else:
                cols[k] = array_from_pylist(v.tolist() if isinstance(v, torch.Tensor) else list(v), schema.get(k), k)
        return cls(cols)

    def slice(self, start: int, stop: int) -> "RecordBatch":
        return RecordBatch({k: a.slice(start, stop) for k, a in self.columns.items()})


def _read_rows(a: Array, local, as_tensors: bool = False):
    """Rows `local` of one chunk's column: a (start, stop) range or an index tensor. As Python values,
    or with as_tensors as one tensor (numbers) / a list of per-row tensors (list<number>)."""
    if not as_tensors:  # a range decodes a window in one pass; indices gather row by row
        return a.slice(*local).to_pylist() if isinstance(local, tuple) else a.take_pylist(local)
    if not isinstance(a, ListArray):  # a range is a zero-copy view; indices are a tensor gather
        return a.slice(*local).to_torch() if isinstance(local, tuple) else a.to_torch()[local]
    starts, ends = a._spans(local)
    vals = a.child.to_torch()  # [total values], a view of the child
    return [vals[s:e] for s, e in zip(starts.tolist(), ends.tolist())]  # views into the file


def _merge(pieces: list, n: int):
    """Per-chunk results -> one result of n rows in output order. pieces = [(values, positions)]:
    positions None means the pieces are consecutive ranges (concatenate them); else each piece's
    values go to its output positions (an index tensor). Values are lists or tensors."""
    first, in_order = pieces[0][0], pieces[0][1] is None
    if in_order and len(pieces) == 1:
        return first  # the common case: one chunk, in order, returned untouched (views stay views)
    is_tensor = isinstance(first, torch.Tensor)  # numbers: one tensor [n, ...] (a copy: the chunks are apart)
    if in_order:
        return torch.cat([p for p, _ in pieces]) if is_tensor else [v for p, _ in pieces for v in p]
    out = first.new_empty((n, *first.shape[1:])) if is_tensor else [None] * n  # [n, ...] or n values
    for p, pos in pieces:
        if is_tensor:
            out[pos] = p
        else:  # Python values (or per-row tensors): scattered one by one
            for i, v in zip(pos.tolist(), p):
                out[i] = v
    return out


class Table:
    """Chunked columnar table: `batches` share one schema; rows are numbered across chunks.
    _starts[c] is the global row of chunk c's first row, so a row is found by bisection and a range of
    rows visits only the chunks it overlaps. Chunks are what make concatenate_datasets and multi-file
    loads zero-copy; operations that need one buffer per column call combine_chunks()."""
    def __init__(self, batches: list[RecordBatch], schema: Schema | None = None):
        self.schema = schema = dict(schema if schema is not None else (batches[0].schema if batches else {}))
        for i, b in enumerate(batches):
            if list(b.schema.items()) != list(schema.items()):
                raise NanosetsError(f"batch {i} has schema {_schema_str(b.schema)}, expected {_schema_str(schema)}")
        if not batches:  # keep one (empty) chunk, so every column always has an Array to read
            batches = [RecordBatch.from_pydict({k: [] for k in self.schema}, self.schema)]
        self.batches = [b for b in batches if b.num_rows] or batches[:1]  # empty chunks only cost lookups
        self._starts = list(itertools.accumulate((b.num_rows for b in self.batches), initial=0))  # [chunks+1]
        self.num_rows = self._starts[-1]

    @property
    def column_names(self) -> list[str]:
        return list(self.schema)

    @classmethod
    def from_pydict(cls, data: dict[str, list], schema: dict | None = None) -> "Table":
        return cls([RecordBatch.from_pydict(data, schema)])

    @classmethod
    def from_pylist(cls, rows: list[dict], schema: dict | None = None) -> "Table":
        """Row dicts -> Table. Columns appear in order of first appearance; a missing key is a null."""
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            raise NanosetsError(f"row {bad} is a {type(rows[bad]).__name__}, expected a dict of column -> value")
        names = dict.fromkeys([k for r in rows for k in r] + list(schema or {}))  # schema columns no row has: null
        return cls.from_pydict({k: [r.get(k) for r in rows] for k in names}, schema)

    def split_rows(self, rows) -> list[tuple[int, Any, torch.Tensor | None]]:
        """Global rows -> [(chunk, local rows, output positions)]. A (start, stop) range gives local ranges in order
        (positions None); an index tensor gives per-chunk local indices plus where their values go in the output."""
        if isinstance(rows, tuple):
            start, stop = rows
            parts, c = [], max(0, bisect.bisect_right(self._starts, start) - 1)  # the chunk holding `start`
            while c < len(self.batches) and self._starts[c] < stop:  # ...and every chunk until `stop`
                s0 = self._starts[c]  # clip the range to this chunk, in its own row numbers
                parts.append((c, (max(start - s0, 0), min(stop - s0, self.batches[c].num_rows)), None))
                c += 1
            return parts or [(0, (0, 0), None)]
        if len(self.batches) == 1:  # one chunk: global rows are local rows, output order is kept
            return [(0, rows, None)]
        chunk = torch.bucketize(rows, torch.tensor(self._starts, dtype=torch.int64), right=True) - 1  # [k]
        parts = []
        for c in chunk.unique().tolist():
            where = (chunk == c).nonzero().squeeze(1)  # output positions of this chunk's rows
            parts.append((c, rows[where] - self._starts[c], where))
        return parts or [(0, rows, None)]

    def to_pydict(self, rows, columns: list[str], as_tensors=()) -> dict[str, Any]:
        """Rows as {column: list}: rows is a (start, stop) range or an int64 index tensor (any order).
        Columns in `as_tensors` come back as tensors instead (see _read_rows).
        Python's cyclic garbage collector is paused meanwhile: decoding a batch allocates hundreds of
        thousands of lists, CPython would scan them for reference cycles every 700 allocations, and
        lists of ints and strs never form one (~1.3x faster; reference counting still frees them)."""
        n = rows[1] - rows[0] if isinstance(rows, tuple) else len(rows)
        parts, was_enabled = self.split_rows(rows), gc.isenabled()
        gc.disable()
        try:
            return {k: _merge([(_read_rows(self.batches[c].columns[k], local, k in as_tensors), pos)
                               for c, local, pos in parts], n) for k in columns}
        finally:
            if was_enabled:
                gc.enable()

    def column(self, name: str) -> Array:
        """The whole column as one Array: zero-copy when the table has one chunk, else concatenated."""
        _require(self.schema, [name])
        return concat_arrays([b.columns[name] for b in self.batches])

    def select(self, names: list[str]) -> "Table":
        names = _require(self.schema, names)
        return Table([RecordBatch({n: b.columns[n] for n in names}) for b in self.batches],
                     {n: self.schema[n] for n in names})

    def rename(self, mapping: dict[str, str]) -> "Table":
        new = [mapping.get(n, n) for n in self.schema]
        _expect(len(set(new)) == len(new), f"renaming {mapping} would give duplicate column names {new}")
        batches = [RecordBatch({mapping.get(k, k): a for k, a in b.columns.items()}) for b in self.batches]
        return Table(batches, {mapping.get(k, k): t for k, t in self.schema.items()})

    def take(self, idx: torch.Tensor) -> "Table":
        """Rows idx copied into one new chunk (materialises a select/shuffle/filter indirection)."""
        if len(self.batches) > 1:  # take_array gathers inside one Array: join the chunks first
            return self.combine_chunks().take(idx)
        return Table([RecordBatch({k: take_array(a, idx) for k, a in self.batches[0].columns.items()})], self.schema)

    def combine_chunks(self) -> "Table":
        """One chunk holding every row (copies each column once when there are several chunks)."""
        return self if len(self.batches) <= 1 else Table([RecordBatch({k: self.column(k) for k in self.schema})])


# ---- the .nano file ---------------------------------------------------------------------------------
# Layout in the module docstring. Writing streams each buffer straight from its memoryview into a
# temp file (no serialisation step) while computing its crc32, then renames; reading maps the file
# and validates every number in the metadata against the file size and the type before trusting it.

MAGIC, TAIL, VERSION, HEADER, ALIGN = b"NANOSET\0", b"NANOEND\0", 2, 64, 64
_HEADER_FMT = "<8sIIQQQI20x"  # magic, version, header size, file size, meta offset, meta length, crc
_CHUNK = 1 << 24  # buffers are checksummed and written 16 MB at a time: the chunk is still in cache


def _write_buffer(f, buf) -> list[int] | None:
    """Write one buffer at the next 64-byte boundary; returns its metadata [offset, nbytes, crc32]."""
    if buf is None:
        return None
    f.write(bytes(-f.tell() % ALIGN))  # zeros up to the next multiple of 64: aligned for any dtype and SIMD
    off, crc = f.tell(), 0
    mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf  # bytes
    for s in range(0, mv.nbytes, _CHUNK):
        chunk = mv[s : s + _CHUNK]
        crc = zlib.crc32(chunk, crc)  # running crc: chunk by chunk equals the crc of the whole buffer
        f.write(chunk)
    return [off, mv.nbytes, crc]


def _write_node(f, a: Array) -> dict:
    """Write one Array's buffers (children after their parent) and return its metadata node."""
    a = a.compact()  # offset 0: the file stores exactly this array's rows
    bufs: dict[str, list[int] | None] = {"validity": _write_buffer(f, a._compact_validity())}
    children = []
    if isinstance(a, _FixedWidth):  # numbers and tensors: one flat buffer
        bufs["values"] = _write_buffer(f, a.values)
    elif isinstance(a, StringArray):
        bufs["offsets"], bufs["data"] = _write_buffer(f, a.offsets), _write_buffer(f, a.data)
    elif isinstance(a, ListArray):
        bufs["offsets"] = _write_buffer(f, a.offsets)
        children = [_write_node(f, a.child)]  # the values: any type, written by the same function
    elif isinstance(a, StructArray):
        children = [_write_node(f, c) for c in a.children.values()]  # one child per field, in order
    return {"length": a.length, "null_count": a.null_count, "buffers": bufs, "children": children}


def _atomic_write(path: str, suffix: str, write: Callable, mode: str = "wb", **open_kw) -> None:
    """Run write(f) on a temp file next to `path`, then rename it over `path`: a crash (or Ctrl-C)
    leaves either the old file or none, never half of one, and no temp file behind."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # same folder, so the rename cannot cross filesystems; a leading dot keeps it out of load_dataset(folder)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, mode, **open_kw) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a dataset is meant to be shared
        os.replace(tmp, path)  # atomic on POSIX
    except BaseException:  # also KeyboardInterrupt: no half-written temp file stays behind
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_nano(path: str | os.PathLike, table: Table | Iterable[RecordBatch], metadata: dict | None = None,
               schema: Schema | None = None) -> None:
    """Write a Table (or a stream of RecordBatches with `schema`) to `path` atomically. Batches are
    written as they come, so a large dataset never has to be in memory at once. Every buffer's crc32
    is computed on the way out (~+25% write time, see BENCHMARKS.md) and stored in the metadata."""
    if isinstance(table, Table):  # a Table is its batches plus their schema
        schema, table = table.schema, table.batches
    _expect(schema is not None, "write_nano needs schema= when given batches instead of a Table")

    def write(f):
        f.write(bytes(HEADER))  # placeholder, patched at the end when we know the offsets
        batches, num_rows = [], 0
        for i, b in enumerate(table):  # one batch in memory at a time (a generator may produce them)
            if list(b.schema.items()) != list(schema.items()):
                raise NanosetsError(f"batch {i} has schema {_schema_str(b.schema)}, expected {_schema_str(schema)}")
            batches.append({"length": b.num_rows, "columns": [_write_node(f, b.columns[k]) for k in schema]})
            num_rows += b.num_rows
        meta = json.dumps({"version": VERSION, "num_rows": num_rows,  # the metadata goes last: only now known
                           "schema": [[k, type_to_json(t)] for k, t in schema.items()],
                           "batches": batches, "metadata": metadata or {}}).encode()
        f.write(bytes(-f.tell() % ALIGN))  # the metadata starts aligned too
        meta_off = f.tell()
        f.write(meta + TAIL)
        size = f.tell()  # recorded, so a truncated copy is caught at open
        f.seek(0)
        f.write(struct.pack(_HEADER_FMT, MAGIC, VERSION, HEADER, size, meta_off, len(meta), zlib.crc32(meta)))

    _atomic_write(os.fspath(path), ".nano", write)


class _Reader:
    """Turns metadata nodes back into Arrays over the mapped file, checking every range first.
    It also records every buffer it hands out (with its stored crc32) and every offsets buffer, which
    is all that verify() needs: checking is a pass over those lists, not a second walk of the tree."""
    def __init__(self, path: str, mv: memoryview, data_end: int, version: int):
        self.path, self.mv, self.data_end, self.version = path, mv, data_end, version
        self.buffers: list[tuple[str, str, memoryview, int | None]] = []  # (where, name, view, crc32)
        self.offsets_views: list[tuple[str, memoryview]] = []  # (where, view) of every offsets buffer

    def fail(self, where: str, msg: str):
        raise NanosetsError(f"{self.path}: corrupt .nano file at {where}: {msg}")

    def buffer(self, node: dict, name: str, where: str, size: int | None = None):
        """The view of buffer `name` of a node (None when absent), after checking it lies inside the
        data region, is 64-byte aligned and has exactly `size` bytes when the type fixes the size."""
        bufs = node.get("buffers", {})  # JSON from the file: check every shape before using it
        if not isinstance(bufs, dict):
            self.fail(where, f"'buffers' should be an object, got {type(bufs).__name__}")
        spec = bufs.get(name)
        if spec is None:
            return None
        want = ["offset", "nbytes", "crc32"][: 3 if self.version >= 2 else 2]  # version 1 has no crc32
        if not (isinstance(spec, list) and len(spec) == len(want) and all(isinstance(x, int) for x in spec)):
            self.fail(where, f"buffer {name!r} should be [{', '.join(want)}], got {spec!r}")
        off, n = spec[0], spec[1]
        # inside [header end, metadata start): a bad number must never map the header or the metadata
        if off < HEADER or n < 0 or off + n > self.data_end or off % ALIGN:
            self.fail(where, f"buffer {name!r} [{off}, {off + n}) is outside the data region "
                             f"[{HEADER}, {self.data_end}) or not {ALIGN}-byte aligned")
        if size is not None and n != size:
            self.fail(where, f"buffer {name!r} has {n} bytes, expected {size}")
        view = self.mv[off : off + n]  # a view of the map: nothing is read from disk yet
        self.buffers.append((where, name, view, spec[2] if len(spec) == 3 else None))
        return view

    def offsets(self, node, where, length) -> tuple[memoryview, int]:
        """The (length+1) int64 offsets of a string/list node, and where they end. O(1): only the
        first and last are read here; the ones between are checked by each read and by verify."""
        buf = self.buffer(node, "offsets", where, (length + 1) * 8)
        if buf is None:
            self.fail(where, "missing offsets buffer")
        first, last = struct.unpack_from("<q", buf, 0)[0], struct.unpack_from("<q", buf, length * 8)[0]  # 2 reads
        if first != 0 or last < 0:
            self.fail(where, f"offsets run from {first} to {last}; expected 0 to a non-negative end")
        self.offsets_views.append((where, buf))
        return buf, last

    def node(self, node, t: DataType, batch: int, name: str) -> Array:
        """Metadata node of type t -> Array. `name` is the column's path ("ids[]" for a list's values,
        "meta.level" for a struct field), so every error names the column and the buffer."""
        where = f"batch {batch}, column {name!r}"
        if not isinstance(node, dict) or not isinstance(node.get("length"), int) or node["length"] < 0:
            self.fail(where, f"expected a node with a non-negative length, got {str(node)[:80]}")
        n = node["length"]
        validity = self.buffer(node, "validity", where, (n + 7) // 8)  # one bit per row, when present
        kids = node.get("children", [])
        if isinstance(t, NullType):
            return NullArray(n)
        if isinstance(t, PrimitiveType):  # the type and the length fix the size exactly
            return PrimitiveArray(t, n, self.buffer(node, "values", where, n * t.itemsize), validity)
        if isinstance(t, TensorType):
            return TensorArray(t, n, self.buffer(node, "values", where, n * t.numel * t.value.itemsize), validity)
        if isinstance(t, StringType):
            offsets, last = self.offsets(node, where, n)
            data = self.buffer(node, "data", where, last)  # the offsets' end fixes the data's size
            return StringArray(n, offsets, data if data is not None else memoryview(b""), validity)
        if isinstance(t, ListType):
            offsets, last = self.offsets(node, where, n)
            if len(kids) != 1:
                self.fail(where, f"a list node needs 1 child, has {len(kids)}")
            child = self.node(kids[0], t.value, batch, name + "[]")
            if child.length != last:  # the last offset must land exactly on the end of the values
                self.fail(where, f"offsets end at {last} but the values child has {child.length} rows")
            return ListArray(t, n, offsets, child, validity)
        if isinstance(t, StructType):
            if len(kids) != len(t.fields):
                self.fail(where, f"struct has {len(t.fields)} fields but {len(kids)} children")
            children = {k: self.node(c, ft, batch, f"{name}.{k}") for (k, ft), c in zip(t.fields.items(), kids)}
            if any(c.length != n for c in children.values()):
                self.fail(where, "struct children differ in length from the struct")
            return StructArray(t, n, children, validity)
        self.fail(where, f"unknown type {t}")

    def verify(self, table: Table) -> None:
        """The O(size) check of the module docstring. With open's first = 0 and last = size checks,
        non-decreasing offsets put every span in range. Version 1 (no checksums) decodes every row."""
        if self.version == 1:  # decode in 64k-row windows, so memory stays bounded
            for bi, b in enumerate(table.batches):
                for k, a in b.columns.items():
                    for s in range(0, a.length, 65536):
                        try:
                            a.slice(s, s + 65536).to_pylist()
                        except NanosetsError as e:
                            raise NanosetsError(f"{self.path}: batch {bi}, column {k!r}, rows {s}+: {e}") from None
            warnings.warn(f"{self.path}: a version-1 .nano file has no buffer checksums, so verify checked "
                          "its structure and strings but cannot see a changed number; rebuild the file "
                          "(for prepare_data.py output: rerun it with --overwrite) to get checksums", stacklevel=3)
            return
        for where, name, view, crc in self.buffers:
            got = zlib.crc32(view)  # releases the GIL; ~2.3 GB/s on one core of this machine
            _expect(got == crc, f"{self.path}: {where}, buffer {name!r}: checksum mismatch (stored crc32 {crc:08x}, "
                    f"the bytes give {got:08x}): the data changed after it was written; rebuild the file from "
                    "its source")
        for where, view in self.offsets_views:  # crc-clean but written wrong: still refuse it
            o = frombuffer(view, torch.int64, len(view) // 8)  # [length+1]
            if bool((o[1:] < o[:-1]).any()):
                row = int((o[1:] < o[:-1]).nonzero()[0])
                self.fail(where, f"offsets run backwards at row {row} ({int(o[row])} -> {int(o[row + 1])})")


def read_nano(path: str | os.PathLike, verify: bool = False) -> tuple[Table, dict]:
    """Map a .nano file and return (Table, user metadata). Reads only the header and metadata, so it
    is O(1) in the data size; verify=True adds the O(size) checksum pass (see the module docstring)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        _expect(size >= HEADER + 8, f"{path}: {size} bytes is too small for a .nano file (at least {HEADER + 8})")
        # ACCESS_COPY = MAP_PRIVATE: pages come from the page cache on first touch (nothing is read
        # now), and a write through a tensor view changes only this process's copy, never the file.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    magic, version, hsize, fsize, moff, mlen, crc = struct.unpack_from(_HEADER_FMT, mm, 0)
    _expect(magic == MAGIC, f"{path}: not a .nano file (magic {magic!r}, expected {MAGIC!r})")
    if version not in (1, VERSION):
        raise NanosetsError(f"{path}: .nano format version {version}; this nanosets reads versions 1 and {VERSION}")
    _expect(fsize == size, f"{path}: truncated or padded: the header says {fsize} bytes, the file has {size}")
    if hsize != HEADER or moff < HEADER or moff + mlen + len(TAIL) != size or mm[size - 8 :] != TAIL:
        raise NanosetsError(f"{path}: corrupt .nano header (metadata at {moff}+{mlen} in a {size}-byte file)")
    meta_bytes = mm[moff : moff + mlen]  # the only bytes an open reads besides the header and the tail
    _expect(zlib.crc32(meta_bytes) == crc, f"{path}: metadata checksum mismatch: the file is corrupt")
    reader = _Reader(path, memoryview(mm), moff, version)  # every buffer must end before the metadata
    try:
        meta = json.loads(meta_bytes)
        schema = {name: type_from_json(t) for name, t in meta["schema"]}
        batches = []
        for bi, b in enumerate(meta["batches"]):
            if len(b["columns"]) != len(schema):
                reader.fail(f"batch {bi}", f"{len(b['columns'])} columns, schema has {len(schema)}")
            cols = {k: reader.node(node, t, bi, k) for (k, t), node in zip(schema.items(), b["columns"])}
            if any(a.length != b["length"] for a in cols.values()):
                reader.fail(f"batch {bi}", "columns differ in length from the batch")
            batches.append(RecordBatch(cols))
    except NanosetsError:
        raise
    except (KeyError, TypeError, ValueError) as e:  # JSON of the wrong shape: name the file
        raise NanosetsError(f"{path}: corrupt .nano metadata: {type(e).__name__}: {e}") from None
    table = Table(batches, schema)
    if table.num_rows != meta.get("num_rows"):  # a cross-check of the batch lengths
        raise NanosetsError(f"{path}: metadata says {meta.get('num_rows')} rows, batches hold {table.num_rows}")
    if verify:
        reader.verify(table)
    return table, meta.get("metadata", {})


def verify_nano(path: str | os.PathLike) -> int:
    """Open `path` and check every data buffer against its crc32 (O(size); the cost is in the module
    docstring). Returns the number of rows; raises NanosetsError naming the file, column and buffer."""
    return read_nano(path, verify=True)[0].num_rows


# ---- Dataset: the HF-datasets-like API -----------------------------------------------------------
# A Dataset = Table + optional `indices`: row operations only build indices; saving materialises them.

def _index_tensor(indices, n: int) -> torch.Tensor:
    """list/range/tensor of row numbers -> int64 tensor, checked against the dataset size n."""
    if isinstance(indices, range):  # no Python list of a million ints for select(range(...))
        indices = torch.arange(indices.start, indices.stop, indices.step)
    idx = torch.as_tensor(indices if isinstance(indices, torch.Tensor) else list(indices), dtype=torch.int64)
    idx = idx.reshape(-1)  # [k]
    if len(idx) and (int(idx.min()) < -n or int(idx.max()) >= n):  # two reductions, not a Python loop
        bad = idx[(idx < -n) | (idx >= n)][0]
        raise IndexError(f"index {int(bad)} out of range for a dataset of {n} rows")
    return torch.where(idx < 0, idx + n, idx)  # negative rows count from the end, as in Python


class DatasetDict(dict):
    """HF's DatasetDict as a plain {split: Dataset}: from train_test_split and load_dataset(folder or data_files)."""
    def __repr__(self):
        return "DatasetDict({" + ", ".join(f"{k!r}: {v!r}" for k, v in self.items()) + "})"


class Dataset:
    """Rows over a Table, with HF datasets' API (ds[i], ds[a:b], ds["col"], map, filter, shuffle, ...).

    Why an index indirection: a shuffle of a 1 GB file should not copy 1 GB. `_indices` (int64
    [len]) maps logical row i to physical row _indices[i] of `_table`; row operations compose it and
    leave the columns (often views of an mmap'd file) untouched. Reads turn logical rows into
    physical ones (_physical), then gather them per chunk. `_format` says what reads return:
    Python objects, or tensors ("torch") that are zero-copy views when the rows are contiguous."""
    def __init__(self, table: Table, indices: torch.Tensor | None = None, format: dict | None = None,
                 metadata: dict | None = None):
        self._table, self._indices = table, indices  # indices None: logical row i is physical row i
        self._format = format or {"type": "python", "columns": None}  # columns None: all of them
        self.metadata = metadata or {}  # free-form JSON, saved in the .nano file

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
        """A new Dataset sharing everything not given (the one place row/column operations build one)."""
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
        """Logical rows -> physical rows: a (start, stop) range when contiguous, else an index tensor.
        Ranges matter: a range of a single chunk is read as zero-copy slices, never gathered."""
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))  # Python's slice rules (negatives, clamping)
            if step == 1 and self._indices is None:  # no indirection: logical rows are physical rows
                return start, max(start, stop)
            key = range(start, stop, step)
        idx = _index_tensor(key, len(self))
        idx = idx if self._indices is None else self._indices[idx]  # compose with the indirection
        if len(idx) > 1 and int(idx[-1]) - int(idx[0]) == len(idx) - 1 and bool((idx[1:] > idx[:-1]).all()):
            return int(idx[0]), int(idx[-1]) + 1  # a run like 7,8,9: read it as a zero-copy range
        return idx

    def _fetch(self, rows, columns: list[str]) -> dict[str, Any]:
        """{column: values} of physical rows. Python format: lists. Torch format: numbers come back as
        tensors (zero-copy views when the rows are contiguous inside one chunk, a gather otherwise) and
        list<number> rows as one tensor each (views); columns with nulls, strings and nested types stay
        Python values, since no tensor holds a None."""
        as_tensors = set()
        for k in columns if self._format["type"] == "torch" else []:
            t, chunks = self.schema[k], [b.columns[k] for b in self._table.batches]
            lists = isinstance(t, ListType) and isinstance(t.value, PrimitiveType)
            if (lists or isinstance(t, (PrimitiveType, TensorType))) and \
                    not any(a.null_count or (lists and a.child.null_count) for a in chunks):
                as_tensors.add(k)
        return self._table.to_pydict(rows, columns, as_tensors)

    def __getitem__(self, key):
        """ds[i] -> row dict; ds[a:b] / ds[[i, j]] -> {column: values}; ds["col"] -> the column."""
        columns = [c for c in self._format["columns"] or () if c in self._table.schema] or self.column_names  # existing
        if isinstance(key, str):
            return self._fetch(self._physical(slice(None)), _require(self.schema, [key]))[key]
        if isinstance(key, int) or (isinstance(key, torch.Tensor) and key.dim() == 0):
            i = _row_index(int(key), len(self), "a dataset")
            p = i if self._indices is None else int(self._indices[i])
            if self._format["type"] == "torch":
                return {k: v[0] for k, v in self._fetch((p, p + 1), columns).items()}  # one-row batch -> row
            # the hot path of random access, ~20 us for a row of ~500 token ids: no tensors, no slicing
            c = bisect.bisect_right(self._table._starts, p) - 1  # the last chunk starting at or before p
            cols = self._table.batches[c].columns
            return {k: cols[k].get(p - self._table._starts[c]) for k in columns}
        return self._fetch(self._physical(key), columns)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.iter(batch_size=1024):  # decode in batches (fast), hand out rows
            yield from _rows_of(batch)

    def iter(self, batch_size: int = 1000, drop_last_batch: bool = False) -> Iterator[dict[str, list]]:
        """Yield {column: values} batches in order (tensors under with_format('torch'))."""
        _expect(batch_size > 0, f"batch_size must be positive, got {batch_size}", ValueError)
        stop = len(self) - batch_size + 1 if drop_last_batch else len(self)  # drop_last: full batches only
        for start in range(0, stop, batch_size):
            yield self[start : start + batch_size]

    # -- formats --
    def with_format(self, type: str | None = None, columns: list[str] | None = None) -> "Dataset":
        """'torch': numbers as tensors (zero-copy views when possible); None/'python': Python objects."""
        _expect(type in (None, "python", "torch"), f"format {type!r}: expected None, 'python' or 'torch'", ValueError)
        columns = None if columns is None else _require(self.schema, columns)
        return self._derive(format={"type": type or "python", "columns": columns})

    def reset_format(self) -> "Dataset":
        return self.with_format(None)

    # -- row selection: all of these only build `indices` --
    def select(self, indices) -> "Dataset":
        """Rows `indices` (list, range or tensor; repeats and negatives allowed), in that order."""
        idx = _index_tensor(indices, len(self))
        return self._derive(indices=idx if self._indices is None else self._indices[idx])

    def shuffle(self, seed: int | None = None) -> "Dataset":
        """A seeded random permutation of the rows (a fresh random seed when None)."""
        seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
        # a private generator: shuffling never touches (or depends on) torch's global RNG state
        return self.select(torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)))

    def sort(self, column: str, reverse: bool = False) -> "Dataset":
        """Rows ordered by `column` (stable: equal values keep their order); nulls last either way."""
        values = self.reset_format()[column]  # Python values: sorted() compares them like Python does
        nonnull = sorted((i for i, v in enumerate(values) if v is not None), key=values.__getitem__, reverse=reverse)
        return self.select(nonnull + [i for i, v in enumerate(values) if v is None])

    def _calls(self, function: Callable, batched: bool, batch_size: int, with_indices: bool,
               fn_kwargs: dict | None, progress: bool | None, desc: str) -> Iterator[tuple[int, Any]]:
        """The loop map and filter share: yields (n, out) per batch of batch_size rows, where out is
        function(batch[, indices]) when batched, else [function(row[, index]) for each row]."""
        src, kw, bar = self.reset_format(), fn_kwargs or {}, None
        if progress or (progress is None and len(self) >= 50_000):  # a bar for jobs big enough to watch
            try:
                from tqdm.auto import tqdm
                bar = tqdm(total=len(self), desc=desc, unit="rows")
            except ImportError:
                pass  # no tqdm: no bar
        with bar if bar is not None else nullcontext():  # closes the bar, also when the caller stops early
            for start in range(0, len(self), batch_size):
                batch = src[start : start + batch_size]  # {column: values}, decoded in one pass
                n = len(next(iter(batch.values()), []))
                idx = list(range(start, start + n))  # logical row numbers, for with_indices
                if batched:
                    out = function(*((batch, idx) if with_indices else (batch,)), **kw)
                else:
                    rows = _rows_of(batch, n)  # columns -> row dicts
                    out = [function(*((r, i) if with_indices else (r,)), **kw) for r, i in zip(rows, idx)]
                yield n, out
                if bar is not None:
                    bar.update(n)

    def filter(self, function: Callable, batched: bool = False, batch_size: int = 1000,
               with_indices: bool = False, fn_kwargs: dict | None = None, progress: bool | None = None) -> "Dataset":
        """Keep rows where function(row) is true (function(batch) -> list of bools when batched)."""
        keep, start = [], 0  # the kept logical rows; the first row of the next batch
        for n, mask in self._calls(function, batched, batch_size, with_indices, fn_kwargs, progress, "filter"):
            mask = list(mask)
            _expect(len(mask) == n, f"filter function returned {len(mask)} values for a batch of {n} rows")
            keep.extend(start + j for j, m in enumerate(mask) if m)
            start += n
        return self.select(keep)  # an index list: the kept rows are not copied

    def shard(self, num_shards: int, index: int, contiguous: bool = True) -> "Dataset":
        """The index-th of num_shards pieces (contiguous blocks, or every num_shards-th row)."""
        _expect(0 <= index < num_shards, f"shard index {index} is not in [0, {num_shards})", ValueError)
        if contiguous:
            div, mod = divmod(len(self), num_shards)  # the first `mod` shards get one extra row
            start = index * div + min(index, mod)
            return self.select(range(start, start + div + (index < mod)))
        return self.select(range(index, len(self), num_shards))

    def train_test_split(self, test_size: float | int | None = None, train_size: float | int | None = None,
                         shuffle: bool = True, seed: int | None = None) -> DatasetDict:
        """{"train", "test"} as two index selections. Sizes are fractions or counts, rounded as HF does (test =
        ceil, train = floor) once float noise is gone (0.07 * 100 = 7.000000000000001); the default test is 0.25."""
        n = len(self)

        def count(x, rounding):
            return None if x is None else (rounding(round(x * n, 9)) if isinstance(x, float) else int(x))

        n_test, n_train = count(test_size, math.ceil), count(train_size, math.floor)
        if n_test is None:  # one size given: the other is the rest
            n_test = n - n_train if n_train is not None else math.ceil(0.25 * n)
        if n_train is None:
            n_train = n - n_test
        if n_test < 1 or n_train < 1 or n_test + n_train > n:
            raise ValueError(f"cannot split {n} rows into train={n_train} and test={n_test}")
        order = self.shuffle(seed) if shuffle else self  # one permutation, cut in two: disjoint by design
        return DatasetDict(train=order.select(range(n_train)), test=order.select(range(n_train, n_train + n_test)))

    # -- column operations: metadata only, no copy --
    def select_columns(self, columns: str | list[str]) -> "Dataset":
        return self._derive(table=self._table.select(columns))

    def remove_columns(self, columns: str | list[str]) -> "Dataset":
        drop = _require(self.schema, columns, "cannot remove columns")
        return self.select_columns([c for c in self.column_names if c not in drop])

    def rename_column(self, original: str, new: str) -> "Dataset":
        return self.rename_columns({original: new})

    def rename_columns(self, mapping: dict[str, str]) -> "Dataset":
        _require(self.schema, mapping, "cannot rename missing columns")
        cols = self._format["columns"]  # with_format(columns=...): a renamed column keeps its format
        fmt = cols and {**self._format, "columns": [mapping.get(c, c) for c in cols]}
        return self._derive(table=self._table.rename(mapping), format=fmt)

    # -- map: the one operation that builds new columns --
    def map(self, function: Callable, batched: bool = False, batch_size: int = 1000, with_indices: bool = False,
            remove_columns: str | list[str] | None = None, fn_kwargs: dict | None = None,
            schema: dict | None = None, progress: bool | None = None, desc: str = "map") -> "Dataset":
        """Apply function to rows (or batches) and return a Dataset with its outputs as columns.
        function(row) -> dict, or function(batch: {col: list}) -> {col: list} when batched (a batched
        function may change the row count if every input column is removed or returned). Returned
        columns replace or add columns; columns neither returned nor removed are carried over as
        they are, without re-encoding. `schema` pins output types (e.g. {"ids": "list<int32>"})."""
        remove = _require(self.schema, remove_columns or [], "remove_columns names missing columns")
        outputs, n_out = {}, 0  # output column -> its values so far (n_out rows)
        for n, out in self._calls(function, batched, batch_size, with_indices, fn_kwargs, progress, desc):
            if batched:
                out = {} if out is None else out
                _expect(isinstance(out, dict), f"map function must return a dict of lists, got {type(out).__name__}")
                lens = {k: len(v) for k, v in out.items()}
                _expect(len(set(lens.values())) <= 1, f"map function returned columns of different lengths: {lens}")
                m = next(iter(lens.values()), n)  # rows this batch produced (n when it returned nothing)
            else:
                bad = next((j for j, r in enumerate(out) if r is not None and not isinstance(r, dict)), None)
                if bad is not None:
                    raise NanosetsError(f"map function must return a dict, got {type(out[bad]).__name__} "
                                        f"at row {n_out + bad}")
                rows = [r or {} for r in out]  # rows -> columns; a key some rows lack is null there
                out, m = {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)}, n
            for k in out:  # a column first seen in this batch is null in the earlier rows
                outputs.setdefault(k, [None] * n_out)
            for k in outputs:
                outputs[k].extend(out[k] if k in out else [None] * m)
            n_out += m
        keep = [c for c in self.column_names if c not in remove and c not in outputs]
        _expect(not keep or n_out == len(self), f"map changed the row count ({len(self)} -> {n_out}) but keeps "
                f"columns {keep}: remove them with remove_columns= or return them")
        # carried-over columns: materialised in the current row order, one chunk, no re-encoding
        cols = dict(self.select_columns(keep).flatten_indices()._table.combine_chunks().batches[0].columns) \
            if keep else {}
        new = RecordBatch.from_pydict(outputs, schema) if outputs else RecordBatch({})  # encode the outputs once
        cols.update(new.columns)
        # returned columns keep their old position; new ones come after, in order of first appearance
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
        # a generator of batches: a shuffled 10 GB dataset is gathered and written 64k rows at a time
        write_nano(target, self._batches(), metadata=self.metadata, schema=self.schema)
        return target

    def to_dict(self) -> dict[str, list]:
        return self.reset_format()[:]

    def to_list(self) -> list[dict]:
        return list(self.reset_format())

    def to_jsonl(self, path: str | os.PathLike) -> None:
        """One JSON object per line (UTF-8), written atomically."""
        lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in self.reset_format())  # Python values
        _atomic_write(os.fspath(path), ".jsonl", lambda f: f.writelines(lines), "w", encoding="utf-8")

    def to_arrow(self):
        return to_arrow(Table(list(self._batches()), self.schema))

    @classmethod
    def from_arrow(cls, table) -> "Dataset":
        return cls(from_arrow(table))


def concatenate_datasets(datasets: list[Dataset]) -> Dataset:
    """Rows of all datasets in order. Zero-copy: chunks are appended and indices offset."""
    _expect(datasets, "concatenate_datasets needs at least one dataset", ValueError)
    for i, d in enumerate(datasets):
        _expect(list(d.schema.items()) == list(datasets[0].schema.items()), f"cannot concatenate: dataset {i} has "
                f"schema {_schema_str(d.schema)}, dataset 0 has {_schema_str(datasets[0].schema)}")
    table = Table([b for d in datasets for b in d._table.batches], datasets[0].schema)  # their chunks, no copy
    indices = None
    if any(d._indices is not None for d in datasets):  # each dataset's rows, shifted past the chunks before it
        bases = itertools.accumulate((d._table.num_rows for d in datasets), initial=0)
        indices = torch.cat([(torch.arange(d._table.num_rows) if d._indices is None else d._indices) + base
                             for d, base in zip(datasets, bases)])
    return Dataset(table, indices, dict(datasets[0]._format))


# ---- loading files --------------------------------------------------------------------------------
# load_dataset follows HF datasets where it can (its docstring says where it differs): a folder's
# split names come from its file names, so the splits of a prepare_data.py output are never mixed.

SUPPORTED = (".nano", ".parquet", ".jsonl", ".json")  # also the order a folder's format is chosen in
# HF's split keywords: a file whose name holds one of these words (between '-', '_', '.', ' ' or
# digits) belongs to that split: "train.nano", "gsm8k_test.jsonl", "validation-00001-of-00004.parquet".
SPLIT_WORDS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "testing": "test", "eval": "test",
               "evaluation": "test"}


def _read_json_rows(path: str) -> list[dict]:
    """JSON lines, or in a .json file a JSON list of rows, {"data": [rows]}, a dict of columns or one
    object -> a list of row dicts. Errors name the file and the line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # a bare UnicodeDecodeError names neither the file nor the line
        line = raw.count(b"\n", 0, e.start) + 1
        raise NanosetsError(f"{path}, line {line}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if path.endswith(".json") and text.lstrip()[:1] in ("[", "{"):  # a tuple: "" (an empty file) is `in` any str
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:  # "Extra data": JSON lines saved as .json; else one broken document
            _expect(e.msg == "Extra data", f"{path}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})")
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        elif isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):  # {column: values}
            lens = {k: len(v) for k, v in obj.items()}
            _expect(len(set(lens.values())) == 1, f"{path}: a dict of columns needs equal lengths, got {lens}")
            obj = _rows_of(obj)
        elif isinstance(obj, dict):
            obj = [obj]  # one object is one row
        if isinstance(obj, list):
            return obj  # Table.from_pylist refuses an item that is not an object, naming it
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


def _expand(paths, what: str) -> list[str]:
    """Files and globs -> a list of files (globs sorted). A folder is refused here: inside a list or
    a data_files dict it could only mean "all its files", which is how splits get mixed."""
    out = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else list(paths):
        p = os.fspath(p)
        if any(c in p for c in "*?["):
            found = sorted(f for f in glob.glob(p) if os.path.isfile(f))
            _expect(found, f"{what}: no files match {p!r}", FileNotFoundError)
            out.extend(found)
        elif os.path.isdir(p):
            raise NanosetsError(f"{what}: {p!r} is a folder; pass files or a glob, or load_dataset({p!r}) "
                                "alone to get its splits")
        elif not os.path.exists(p):
            raise FileNotFoundError(f"{what}: no such file: {p!r}")
        else:
            out.append(p)
    return out


def _folder_splits(folder: str) -> dict[str, list[str]]:
    """A folder's data files grouped by split, as HF datasets groups them.

    The folder is read in ONE format: the first of .nano, .parquet, .jsonl, .json that it holds, so
    manifest.json next to train.nano/test.nano is not data. Hidden files (.tmp-* left by an
    interrupted write) are skipped. Files named after a split go to it; when no file names a split,
    every file is "train" (HF's rule); a mix of named and unnamed files is refused, not guessed."""
    names = sorted(f for f in os.listdir(folder) if not f.startswith(".") and os.path.isfile(os.path.join(folder, f)))
    ext = next((e for e in SUPPORTED if any(f.endswith(e) for f in names)), None)
    _expect(ext is not None, f"folder {folder!r} holds no {'/'.join(SUPPORTED)} files", FileNotFoundError)
    splits: dict[str | None, list[str]] = {}
    for f in (f for f in names if f.endswith(ext)):
        found = {SPLIT_WORDS[w] for w in re.split(r"[-_. 0-9]+", f.lower()) if w in SPLIT_WORDS}
        _expect(len(found) <= 1, f"{f!r} names more than one split ({sorted(found)}); rename it")
        splits.setdefault(found.pop() if found else None, []).append(os.path.join(folder, f))  # None: no split
    unnamed = splits.pop(None, [])
    if not splits:
        return {"train": unnamed}
    if unnamed:
        raise NanosetsError(f"folder {folder!r}: {os.path.basename(unnamed[0])} names no split while "
                            f"{', '.join(os.path.basename(v[0]) for v in splits.values())} do; rename it "
                            "(train*/validation*/test*) or pass data_files={split: files}")
    return dict(sorted(splits.items(), key=lambda kv: ["train", "validation", "test"].index(kv[0])))


def load_from_disk(path: str | os.PathLike, verify: bool = False) -> Dataset:
    """Open save_to_disk's .nano file (or folder with data.nano): O(1), zero-copy; verify=True: checksums, O(size)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        _expect(os.path.isfile(os.path.join(path, "data.nano")), f"folder {path!r} has no data.nano (what save_to_disk "
                "writes); for a folder of split files use load_dataset(folder)", FileNotFoundError)
        path = os.path.join(path, "data.nano")
    table, meta = read_nano(path, verify=verify)
    return Dataset(table, metadata=meta)


def _load_files(files: list[str], schema: dict | None, verify: bool) -> Dataset:
    """One Dataset from files of one split. JSON rows are pooled first so types are inferred over every
    file at once; .nano and parquet files become chunks of one table (no copy)."""
    bad = [f for f in files if os.path.splitext(f)[1] not in SUPPORTED]
    if bad:
        raise NanosetsError(f"cannot load {bad[0]!r}: supported endings are {SUPPORTED}")
    if {os.path.splitext(f)[1] for f in files} <= {".jsonl", ".json"}:
        rows = [r for f in files for r in _read_json_rows(f)]
        try:
            return Dataset.from_list(rows, schema)
        except NanosetsError as e:
            raise NanosetsError(f"{files[0] if len(files) == 1 else files}: {e}") from None
    parts = []
    for f in files:
        if f.endswith(".nano"):
            parts.append(load_from_disk(f, verify))
        elif f.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise NanosetsError(f"reading {f} needs pyarrow (pip install pyarrow)") from None
            parts.append(Dataset(from_arrow(pq.read_table(f))))
        else:
            parts.append(_load_files([f], schema, verify))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def load_dataset(path=None, data_files=None, split: str | None = None, schema: dict | None = None,
                 verify: bool = False):
    """Load jsonl / json / .nano / parquet files into a Dataset, or a folder into a DatasetDict.

    load_dataset("train.jsonl"), a glob ("parts/*.jsonl") or a list of files -> one Dataset
    load_dataset("data/gsm8k_sft") -> DatasetDict {"train": ..., "test": ...}: split names from file
        names (see _folder_splits); non-data files such as manifest.json are ignored
    load_dataset("json", data_files={"train": ..., "test": ...}) -> DatasetDict
    split="test" -> that split's Dataset only (the other splits are not opened). A file, glob or list
        is HF's "train" split, so split="train" returns it and other names are refused.
    schema pins column types of JSON input; verify=True checks every .nano buffer's checksum.
    Unlike HF, a file or list gives a Dataset, not {"train": Dataset}. Hub names are not fetched
    (prepare_data.py downloads hub files, then loads them with this)."""
    if path in ("json", "jsonl", "nano", "parquet", None):
        _expect(data_files is not None, "pass a path, or a format name with data_files=", ValueError)
        path = data_files
    if isinstance(path, dict):
        splits, source = {k: _expand(v, f"data_files[{k!r}]") for k, v in path.items()}, "data_files"
    elif isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
        splits, source = _folder_splits(os.fspath(path)), f"folder {os.fspath(path)!r}"
    else:  # files: one Dataset, which HF would call the train split
        files = _expand(path, "load_dataset")
        _expect(split in (None, "train"), f"split={split!r}: a file, glob or list of files is the one split 'train'; "
                "pass a folder or data_files={split: files} to choose between splits")
        return _load_files(files, schema, verify)
    if split is None:
        return DatasetDict({k: _load_files(v, schema, verify) for k, v in splits.items()})
    _expect(split in splits, f"no split {split!r} in {source}; its splits are {list(splits)}")
    return _load_files(splits[split], schema, verify)


# ---- pyarrow interop (optional: pyarrow is imported only here) -----------------------------------
# Our buffers ARE Arrow's layout (validity bits, int64 offsets, flat values), so conversion in either
# direction hands over the same memory. Two exceptions copy: bool (Arrow packs bools into bits, we
# keep a byte per value) and bfloat16 (Arrow has no such type: widened to float32).

def _pa_type(t: DataType):
    """DataType -> pyarrow type (large_string/large_list: Arrow's 64-bit-offset variants, like ours)."""
    import pyarrow as pa
    simple = {"bfloat16": pa.float32, "bool": pa.bool_, "string": pa.large_string, "null": pa.null}
    if t.name in simple or isinstance(t, PrimitiveType):
        return (simple.get(t.name) or getattr(pa, t.name))()  # the other primitives have pyarrow's names
    if isinstance(t, ListType):
        return pa.large_list(_pa_type(t.value))
    if isinstance(t, StructType):
        return pa.struct([(k, _pa_type(v)) for k, v in t.fields.items()])
    return pa.fixed_shape_tensor(_pa_type(t.value), list(t.shape))


def _to_pa(a: Array):
    """Array -> pyarrow Array over the same memory (bool and bfloat16 are converted)."""
    import pyarrow as pa
    a, t, n = a.compact(), a.type, a.length  # pyarrow buffers start at row 0 (compact also re-bases validity)
    val = None if a.validity is None else pa.py_buffer(a.validity)
    if isinstance(a, NullArray):
        return pa.nulls(n)
    if isinstance(a, PrimitiveArray):
        if t.name == "bool":  # Arrow packs bools into bits
            return pa.Array.from_buffers(pa.bool_(), n, [val, pa.py_buffer(pack_bits(a.to_torch()))])
        values = tensor_to_buffer(a.to_torch().float()) if t.name == "bfloat16" else a.values
        return pa.Array.from_buffers(_pa_type(t), n, [val, pa.py_buffer(values)])
    if isinstance(a, (StringArray, ListArray)):
        a._spans()  # pyarrow trusts offsets blindly: a bad one would read out of bounds
    if isinstance(a, StringArray):
        return pa.Array.from_buffers(pa.large_string(), n, [val, pa.py_buffer(a.offsets), pa.py_buffer(a.data)])
    if isinstance(a, ListArray):
        child = _to_pa(a.child)
        return pa.Array.from_buffers(pa.large_list(child.type), n, [val, pa.py_buffer(a.offsets)], children=[child])
    if isinstance(a, StructArray):
        kids = [_to_pa(c) for c in a.children.values()]
        return pa.Array.from_buffers(_pa_type(t), n, [val], children=kids)
    # tensor: Arrow stores it as fixed_size_list<T>[numel] storage wrapped in the extension type
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
    """pyarrow Array -> Array over pyarrow's buffers where the layouts agree. An arrow array may start
    at a nonzero `offset` (a slice): numbers keep it by slicing the view, offsets are re-based."""
    import pyarrow as pa
    t, n, off = arr.type, len(arr), arr.offset
    if isinstance(arr, pa.ExtensionArray):
        _expect(hasattr(t, "shape"), f"column {name!r}: arrow extension type {t} is not supported")
        storage = _from_pa(arr.storage, name)  # a tensor<T>[numel]; give it the real shape
        return TensorArray(TensorType(storage.type.value, tuple(t.shape)), n, storage.values, storage.validity)
    if pa.types.is_string(t) or pa.types.is_list(t):
        large = pa.large_string() if pa.types.is_string(t) else pa.large_list(t.value_type)
        return _from_pa(arr.cast(large), name)  # 32-bit offsets -> 64-bit (copies the offsets only)
    bufs = arr.buffers()
    validity = None
    if arr.null_count and bufs[0] is not None:  # byte-aligned: share it; else repack from bit `off`
        validity = pack_bits(unpack_bits(memoryview(bufs[0]), off, n)) if off % 8 else memoryview(bufs[0])[off // 8 :]
    if pa.types.is_null(t):
        return NullArray(n)
    if pa.types.is_boolean(t):
        values = tensor_to_buffer(unpack_bits(memoryview(bufs[1]), off, n))  # bits -> one byte per value
        return PrimitiveArray(PRIMITIVES["bool"], n, values, validity)
    if pa.types.is_large_string(t) or pa.types.is_large_list(t):
        offs = frombuffer(memoryview(bufs[1]), torch.int64, n + 1, off * 8)  # [n+1]
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
        _expect(isinstance(flat, PrimitiveArray), f"column {name!r}: fixed-size lists must hold numbers, got {t}")
        return TensorArray(TensorType(flat.type, (k,)), n, flat.compact().values, validity)
    pname = {"bool": "bool", "halffloat": "float16", "float": "float32", "double": "float64"}.get(str(t), str(t))
    _expect(pname in PRIMITIVES, f"column {name!r} has arrow type {t}, which nanosets does not support")
    p = PRIMITIVES[pname]
    return PrimitiveArray(p, n, memoryview(bufs[1])[off * p.itemsize : (off + n) * p.itemsize], validity)


def from_arrow(table) -> Table:
    """pyarrow.Table -> nanosets Table, sharing pyarrow's buffers wherever the layouts agree."""
    import pyarrow as pa
    batches = [RecordBatch({name: _from_pa(b.column(i), name) for i, name in enumerate(b.schema.names)})
               for b in table.to_batches()]
    if not batches:  # an empty table still has a schema: one empty batch of the right types
        batches = [RecordBatch({f.name: _from_pa(pa.array([], f.type), f.name) for f in table.schema})]
    return Table(batches)


# ---- training helpers: packing and a resumable sharded sampler -----------------------------------
# What a trainer needs from its data besides rows: packs without padding (the varlen layout of
# DESIGN.md) and a sampler that splits rows across data-parallel ranks and resumes mid-epoch.

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
    size = 1 << max(n - 1, 0).bit_length()  # leaves: a power of two >= the most packs we can need (n)
    tree = [token_budget] * (2 * size)  # tree[1] = root; leaves tree[size + p] = free space of pack p
    packs: list[list[int]] = []
    for i in order:
        L, node = lengths[i], 1
        while node < size:  # walk down, preferring the left child: the first pack that fits
            node = 2 * node if tree[2 * node] >= L else 2 * node + 1
        p = node - size
        if p == len(packs):  # the first untouched leaf: open a new pack
            packs.append([])
        packs[p].append(i)
        tree[node] -= L
        node //= 2
        while node:  # update the maxima on the way back to the root
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
        cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)  # [B+1]: 0, then the running ends
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
        _expect(0 <= dp_rank < dp_size, f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})", ValueError)
        if num_rows < (dp_size if drop_last else 1):
            raise ValueError(f"{num_rows} rows cannot feed {dp_size} data-parallel ranks")
        self.num_rows, self.dp_rank, self.dp_size = num_rows, dp_rank, dp_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        """Indices this rank gets per epoch."""
        return self.num_rows // self.dp_size if self.drop_last else -(-self.num_rows // self.dp_size)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's indices of one epoch (the same on every call: a pure function of the seed)."""
        g = torch.Generator().manual_seed(self.seed + epoch)  # seeded per epoch: every rank draws the same
        order = torch.randperm(self.num_rows, generator=g) if self.shuffle else torch.arange(self.num_rows)
        total = len(self) * self.dp_size
        if total > self.num_rows:  # pad by wrapping around (more than once when dp_size > 2 * rows): equal counts
            order = order.repeat(-(-total // self.num_rows))[:total]
        return order[self.dp_rank : total : self.dp_size]

    def __iter__(self) -> Iterator[int]:
        while True:
            idx = self.epoch_indices(self.epoch).tolist()
            while self.position < len(idx):
                self.position += 1  # advanced before the yield, so state_dict() counts this index as used
                yield idx[self.position - 1]
            self.epoch, self.position = self.epoch + 1, 0

    def take(self, k: int) -> list[int]:
        """The next k indices (crossing epoch boundaries as needed)."""
        return list(itertools.islice(self, k))

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("epoch", "position", "seed", "num_rows", "dp_rank", "dp_size")}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; refuses one from a different dataset size, dp size or seed."""
        for k in ("num_rows", "dp_size", "seed"):
            if state[k] != getattr(self, k):
                raise ValueError(f"sampler state has {k}={state[k]}, this sampler has {getattr(self, k)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ---- benchmark: python nanosets.py --bench ------------------------------------------------------
# A generated dataset of ~1 GB (int64, float32, string and list<int32> token columns), written as
# .nano and as an Arrow IPC stream (what HF datasets caches), then read by nanosets, pyarrow and HF
# datasets (when installed) in the same run. Opening and RSS are measured in fresh subprocesses.
# One timer (_timeit), one table; the measured numbers live in BENCHMARKS.md.

def _bench_table(gb: float, seed: int = 0) -> Table:
    g = torch.Generator().manual_seed(seed)
    n = max(1000, int(gb * 1e9 / (8 + 4 + 200 + 8 + 512 * 4 + 8)))  # bytes per row, offsets included
    text_len = torch.randint(20, 381, (n,), generator=g)  # ~200 ASCII chars per row
    text = torch.randint(97, 123, (int(text_len.sum()),), generator=g, dtype=torch.uint8)
    text[torch.rand(len(text), generator=g) < 0.15] = 32  # spaces, so it looks like words
    ids_len = torch.randint(64, 961, (n,), generator=g)  # ~512 token ids per row
    ids = torch.randint(0, 151_936, (int(ids_len.sum()),), generator=g, dtype=torch.int32)
    text_offs, ids_offs = (torch.nn.functional.pad(lens.cumsum(0), (1, 0)) for lens in (text_len, ids_len))  # [n+1]
    return Table([RecordBatch({"id": array_from_tensor(torch.arange(n, dtype=torch.int64)),
                               "score": array_from_tensor(torch.rand(n, generator=g)),
                               "text": StringArray(n, tensor_to_buffer(text_offs), tensor_to_buffer(text)),
                               "input_ids": list_array_from_tensors(ids_offs, ids)})])


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _bench_open(kind: str, path: str) -> dict:
    """Run in a fresh process: import everything first, then time the open and the RSS it adds."""
    if kind == "pyarrow":
        import pyarrow as pa
    if kind == "hf":
        import datasets
    gc.collect()
    rss0, t0 = _rss_mb(), time.perf_counter()
    if kind == "nanosets":
        n = len(load_dataset(path))
    elif kind == "pyarrow":
        n = pa.ipc.open_stream(pa.memory_map(path)).read_all().num_rows
    else:
        n = len(datasets.Dataset.from_file(path))
    return {"open_ms": (time.perf_counter() - t0) * 1e3, "rss_mb": _rss_mb() - rss0, "rows": n}


def _timeit(fn, repeat: int = 3) -> float:
    """Best of `repeat` timed runs after one untimed warm-up (page cache, lazy imports): seconds."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(gb: float = 1.0, folder: str | None = None, rows_iter: int = 100_000, rows_random: int = 2000) -> list:
    """Run the benchmark and print its table; returns the rows (metric, ours, pyarrow, HF, ratio).
    Without `folder` the generated files (about 2 x gb) live in a temp folder that is removed at
    the end, also after an error or Ctrl-C; with it they are kept and reused by the next run."""
    try:
        import pyarrow as pa
    except ImportError:
        raise NanosetsError("--bench compares against pyarrow: pip install pyarrow") from None
    try:
        import datasets as hf
    except ImportError:
        hf = None
    scratch = nullcontext(folder) if folder else tempfile.TemporaryDirectory(prefix="nanosets-bench-")
    with warnings.catch_warnings(), scratch as folder:  # both undone on the way out, also on Ctrl-C
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # pyarrow's views
        os.makedirs(folder, exist_ok=True)
        res = _bench_measure(folder, gb, rows_iter, rows_random, pa, hf)
    n, size = res.pop("_rows"), res.pop("_bytes")
    peers = f"pyarrow {pa.__version__}, " + (f"datasets {hf.__version__}" if hf else "HF datasets not installed")
    print(f"\nnanosets bench: {n:,} rows, {size / 1e9:.2f} GB file; torch {torch.__version__}, {peers}; "
          "warm page cache")
    head = f"{'metric':30s} {'nanosets':>10s} {'pyarrow':>10s} {'HF':>10s} {'ratio':>7s}"
    print(head + "\n" + "-" * len(head))
    rows = []
    for metric, v in res.items():
        ours, pa_v, hf_v = v["nanosets"], v.get("pyarrow"), v.get("hf")
        lower = metric.endswith(("(ms)", "(MB)", "(us)"))  # times and memory: smaller is better
        best = (min if lower else max)(x for x in (pa_v, hf_v) if x is not None)
        ratio = (best / ours if ours else math.inf) if lower else ours / best  # > 1: nanosets is better
        fmt = lambda x: "-" if x is None else f"{x:10.2f}"  # noqa: E731
        print(f"{metric:30s} {fmt(ours):>10s} {fmt(pa_v):>10s} {fmt(hf_v):>10s} {ratio:7.2f}")
        rows.append((metric, ours, pa_v, hf_v, ratio))
    print("ratio = nanosets vs the best peer (> 1: nanosets is better)")
    return rows


def _bench_measure(folder: str, gb: float, rows_iter: int, rows_random: int, pa, hf) -> dict:
    """The measurements of bench(): {metric: {"nanosets": x, "pyarrow": y, "hf": z}}."""
    import subprocess
    nano_path, arrow_path = os.path.join(folder, "bench.nano"), os.path.join(folder, "bench.arrow")
    res: dict = {}
    if not (os.path.exists(nano_path) and os.path.exists(arrow_path)):
        table = _bench_table(gb)
        pat = to_arrow(table)  # zero-copy view; cast to the 32-bit-offset types HF uses by default
        pat = pat.cast(pa.schema([("id", pa.int64()), ("score", pa.float32()), ("text", pa.string()),
                                  ("input_ids", pa.list_(pa.int32()))]))

        def write_arrow():  # fsync'd like write_nano, so both times include reaching the disk
            with pa.ipc.new_stream(arrow_path, pat.schema) as w:
                w.write_table(pat)
            with open(arrow_path, "rb") as f:
                os.fsync(f.fileno())

        t_nano, t_arrow = _timeit(lambda: write_nano(nano_path, table), 1), _timeit(write_arrow, 1)
        res["write, crc32 incl. (GB/s)"] = {"nanosets": os.path.getsize(nano_path) / t_nano / 1e9,
                                            "pyarrow": os.path.getsize(arrow_path) / t_arrow / 1e9}
        del table, pat
    size = os.path.getsize(nano_path)
    kinds = ["nanosets", "pyarrow"] + (["hf"] if hf else [])
    opened = {}
    for k in kinds:
        path = nano_path if k == "nanosets" else arrow_path
        for _ in range(2):  # the first run warms the page cache for the metadata; keep the second
            out = subprocess.run([sys.executable, __file__, "--bench-open", k, path], capture_output=True, text=True,
                                 check=True, timeout=600)
        opened[k] = json.loads(out.stdout.strip().splitlines()[-1])
    res["open (ms)"] = {k: opened[k]["open_ms"] for k in kinds}
    res["RSS added by open (MB)"] = {k: opened[k]["rss_mb"] for k in kinds}

    ds = load_dataset(nano_path)
    pt = pa.ipc.open_stream(pa.memory_map(arrow_path)).read_all()
    hds = hf.Dataset.from_file(arrow_path) if hf else None
    n = len(ds)
    rows_iter, rows_random = min(rows_iter, n), min(rows_random, n)
    mb = rows_iter * size / n / 1e6  # file bytes of the rows the iteration benchmarks read

    def first_rows(batches):  # consume (and drop) batches of 1000 rows until rows_iter rows were read
        for _ in itertools.islice(batches, -(-rows_iter // 1000)):
            pass

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:rows_random].tolist()  # distinct rows
    measure = {  # metric -> {library: (function, repeats, scale: result = scale / seconds)}
        "verify, full check (GB/s)": {
            "nanosets": (lambda: verify_nano(nano_path), 3, size / 1e9),
            "pyarrow": (lambda: pt.validate(full=True), 3, os.path.getsize(arrow_path) / 1e9)},
        "scan float32 column (GB/s)": {
            "nanosets": (lambda: ds.with_format("torch")["score"].sum(), 3, n * 4 / 1e9),  # reads every byte
            "pyarrow": (lambda: torch.from_numpy(pt.column("score").combine_chunks().to_numpy(
                zero_copy_only=True)).sum(), 3, n * 4 / 1e9),
            "hf": (lambda: hds.with_format("torch", columns=["score"])[:]["score"].sum(), 1, n * 4 / 1e9)},
        "iterate to Python (MB/s)": {
            "nanosets": (lambda: first_rows(ds.iter(batch_size=1000)), 1, mb),
            "pyarrow": (lambda: first_rows(b.to_pydict() for b in pt.to_batches(max_chunksize=1000)), 1, mb),
            "hf": (lambda: first_rows(hds.iter(batch_size=1000)), 1, mb)},
        "random row (us)": {  # one full row (all four columns) per access
            "nanosets": (lambda: [ds[i] for i in rows], 1, None),
            "pyarrow": (lambda: [pt.slice(i, 1).to_pylist() for i in rows], 1, None),
            "hf": (lambda: [hds[i] for i in rows], 1, None)},
        "shuffled iterate (MB/s)": {  # a permutation of all rows, the first rows_iter read
            "nanosets": (lambda: first_rows(ds.shuffle(seed=0).iter(batch_size=1000)), 1, mb),
            "pyarrow": (lambda: first_rows(pt.take(pa.array(perm[s : s + 1000].numpy())).to_pydict()
                                           for s in range(0, n, 1000)), 1, mb),
            "hf": (lambda: first_rows(hds.shuffle(seed=0).iter(batch_size=1000)), 1, mb)},
    }
    for metric, libs in measure.items():
        res[metric] = {}
        for lib, (fn, repeat, scale) in libs.items():
            if lib in kinds:
                t = _timeit(fn, repeat)
                res[metric][lib] = t / rows_random * 1e6 if scale is None else scale / t
    res["_rows"], res["_bytes"] = n, size
    return res


# ---- self-test and command line ------------------------------------------------------------------

def selftest():
    """`python nanosets.py`: a round trip through a file, the API, a corrupt byte caught by its
    checksum, folder splits, packing and the sampler, in a few seconds."""
    rows = [{"q": "1+1", "ids": [1, 2, 3], "meta": {"level": 1, "tags": ["a"]}, "x": 0.5},
            {"q": "héllo", "ids": [], "meta": None, "x": None},
            {"q": None, "ids": [7], "meta": {"level": 3, "tags": []}, "x": 2.0}]
    ds = Dataset.from_list(rows, schema={"ids": "list<int32>"})
    assert ds.to_list() == rows, ds.to_list()
    with tempfile.TemporaryDirectory() as d:
        path = ds.save_to_disk(os.path.join(d, "train.nano"))
        back = load_dataset(path, verify=True)
        assert back.to_list() == rows and back.schema == ds.schema
        assert back.shuffle(seed=0).sort("ids")[0]["ids"] == []  # list comparison sorts [] first
        ids = back.with_format("torch")[0]["ids"]
        assert ids.dtype == torch.int32 and ids.tolist() == [1, 2, 3]
        m = back.map(lambda r: {"n": len(r["ids"])}, remove_columns=["meta"])
        assert m.column_names == ["q", "ids", "x", "n"] and m["n"] == [3, 0, 1]
        assert back.filter(lambda r: r["x"] is not None)["x"] == [0.5, 2.0]
        # a folder of splits: split names from the file names, manifest.json is not data
        ds.select([2]).save_to_disk(os.path.join(d, "test.nano"))
        with open(os.path.join(d, "manifest.json"), "w") as f:
            f.write("{}")
        dd = load_dataset(d)
        assert list(dd) == ["train", "test"] and len(dd["test"]) == 1
        assert load_dataset(d, split="test")["q"] == [None]
        # one flipped bit in a token id: the open (O(1)) cannot see it, verify names the buffer
        with open(path, "r+b") as f:
            f.seek(f.read().index(struct.pack("<3i", 1, 2, 3)))  # the ids child's values buffer
            f.write(b"\x11")  # token id 1 -> 17: one bit flipped
        assert load_dataset(path)[0]["ids"] == [17, 2, 3]
        try:
            verify_nano(path)
            raise AssertionError("a flipped byte must fail verify")
        except NanosetsError as e:
            assert "'ids[]'" in str(e) and "checksum" in str(e), e
    packs = pack_sequences([[1, 2, 3], [4, 5], [6, 7, 8, 9]], token_budget=5)
    assert [p["cu_seqlens"].tolist() for p in packs] == [[0, 3, 5], [0, 4]]
    s = ShardedSampler(10, dp_rank=1, dp_size=2, seed=0)
    first = s.take(3)
    resumed = ShardedSampler(10, dp_rank=1, dp_size=2, seed=0)
    resumed.load_state_dict(s.state_dict())
    assert first + resumed.take(4) == ShardedSampler(10, 1, 2, seed=0).take(7)
    print("nanosets selftest: OK")


def _verify_cli(paths: list[str]) -> None:
    """--verify: every .nano file given (a folder: its .nano files), one line each with the rate."""
    files = []
    for p in paths:
        found = sorted(glob.glob(os.path.join(p, "*.nano"))) if os.path.isdir(p) else [p]
        _expect(found, f"--verify: folder {p!r} holds no .nano files", FileNotFoundError)
        files += found
    for f in files:
        t0 = time.perf_counter()
        n = verify_nano(f)
        dt, gb = time.perf_counter() - t0, os.path.getsize(f) / 1e9
        print(f"{f}: OK, {n:,} rows, {gb:.3f} GB checked in {dt:.2f} s ({gb / max(dt, 1e-9):.2f} GB/s)")


def main(argv: list[str] | None = None) -> int:
    """The command line: no flag runs the self-test; --verify, --bench (see --help)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, like every other expected error, instead of usage + error
            raise ValueError(f"{message} (see --help)")

    ap = Parser(prog="nanosets.py", description="nanosets: columnar datasets and the .nano file. "
                "With no flag: the CPU self-test (seconds).")
    ap.add_argument("--verify", nargs="+", metavar="PATH",
                    help="check every data buffer's crc32 of these .nano files (a folder: its .nano files)")
    ap.add_argument("--bench", action="store_true", help="benchmark against pyarrow and HF datasets (needs pyarrow)")
    ap.add_argument("--gb", type=float, default=1.0, help="--bench: size of the generated dataset in GB")
    ap.add_argument("--dir", default=None, help="--bench: keep the generated files here and reuse them "
                    "(default: a temp folder, removed at the end)")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of every error")
    ap.add_argument("--bench-open", nargs=2, help=argparse.SUPPRESS)  # internal: one fresh-process open
    a = ap.parse_args(argv)
    if a.bench_open:
        print(json.dumps(_bench_open(*a.bench_open)))
    elif a.verify:
        _verify_cli(a.verify)
    elif a.bench:
        _expect(a.gb > 0, f"--gb must be positive, got {a.gb}", ValueError)
        bench(a.gb, a.dir)
    else:
        selftest()
    return 0


def cli(argv: list[str] | None = None) -> int:
    """main() under the project's error convention: an expected error (a bad flag, a missing or
    corrupt file) prints one line to stderr and returns 2; --debug shows every traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv)
    except (ValueError, OSError, TimeoutError) as e:
        if "--debug" in argv:
            raise
        print(f"nanosets.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
