"""Bounded GGUF header reader for untrusted model files (pure Python, no llama.cpp).

Layout (GGUF v2/v3, little-endian, see ggml/docs/gguf.md):
magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count | kv pairs | tensor infos | data.
Every length read from the file is checked against a cap before anything is allocated, and
every read is checked against the bytes actually present, so a hostile or truncated file
raises `ModelError` instead of exhausting memory or crashing.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeAlias

from mongarsd.errors import ModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

MAX_KV_COUNT = 65_536
MAX_TENSOR_COUNT = 1_048_576
MAX_KEY_BYTES = 65_535
MAX_STRING_BYTES = 4 * 1024 * 1024  # chat templates are tens of KiB; 4 MiB is generous
MAX_ARRAY_LEN = 1 << 24  # vocabularies are ~50k-260k entries
MAX_NESTING = 4
MAX_METADATA_BYTES = 256 * 1024 * 1024  # bytes consumed by kv pairs + tensor infos
MAX_TENSOR_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME_BYTES = 256
KEEP_ARRAY_ITEMS = 1024  # arrays longer than this are summarised, not kept
READ_CHUNK_BYTES = 1 << 20

# gguf_type
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32 = 0, 1, 2, 3, 4, 5, 6
T_BOOL, T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = 7, 8, 9, 10, 11, 12

_SCALARS: dict[int, struct.Struct] = {
    T_UINT8: struct.Struct("<B"),
    T_INT8: struct.Struct("<b"),
    T_UINT16: struct.Struct("<H"),
    T_INT16: struct.Struct("<h"),
    T_UINT32: struct.Struct("<I"),
    T_INT32: struct.Struct("<i"),
    T_FLOAT32: struct.Struct("<f"),
    T_BOOL: struct.Struct("<?"),
    T_UINT64: struct.Struct("<Q"),
    T_INT64: struct.Struct("<q"),
    T_FLOAT64: struct.Struct("<d"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# llama_ftype -> quantization label (llama.h, enum llama_ftype)
FILE_TYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
}


@dataclass(frozen=True, slots=True)
class ArrayInfo:
    """Summary of a metadata array too long to keep (e.g. a vocabulary)."""

    item_type: int
    length: int


MetaValue: TypeAlias = "int | float | bool | str | list[MetaValue] | ArrayInfo"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor description from the header."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass(frozen=True, slots=True)
class GGUFInfo:
    """Parsed GGUF header: version, counts, metadata and tensor infos."""

    version: int
    tensor_count: int
    metadata: Mapping[str, MetaValue]
    tensors: tuple[TensorInfo, ...] = field(default=())
    header_bytes: int = 0

    def _str(self, key: str) -> str | None:
        value = self.metadata.get(key)
        return value if isinstance(value, str) else None

    def _int(self, key: str) -> int | None:
        value = self.metadata.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        return value

    @property
    def architecture(self) -> str | None:
        return self._str("general.architecture")

    @property
    def name(self) -> str | None:
        return self._str("general.name")

    @property
    def size_label(self) -> str | None:
        return self._str("general.size_label")

    @property
    def parameter_count(self) -> int | None:
        """Return general.parameter_count, else the sum of tensor element counts."""
        declared = self._int("general.parameter_count")
        if declared is not None:
            return declared
        if not self.tensors:
            return None
        return sum(math.prod(t.shape) for t in self.tensors)

    @property
    def file_type(self) -> int | None:
        return self._int("general.file_type")

    @property
    def quantization(self) -> str | None:
        ftype = self.file_type
        if ftype is None:
            return None
        return FILE_TYPES.get(ftype & ~1024, "FTYPE_" + str(ftype))

    @property
    def context_length(self) -> int | None:
        arch = self.architecture
        return None if arch is None else self._int(arch + ".context_length")

    @property
    def chat_template(self) -> str | None:
        return self._str("tokenizer.chat_template")


class _Reader:
    """Chunked, bounds-checked little-endian reader over a binary stream."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self._stream = stream
        self._size = size
        self._buf = b""
        self._pos = 0  # position within _buf
        self._base = 0  # file offset of _buf[0]
        self.budget = MAX_METADATA_BYTES

    @property
    def offset(self) -> int:
        return self._base + self._pos

    def _fill(self, n: int) -> None:
        if n > self.budget:
            raise ModelError("GGUF metadata exceeds " + str(MAX_METADATA_BYTES) + " bytes")
        if self.offset + n > self._size:
            raise ModelError("GGUF file is truncated: needs " + str(self.offset + n) + " bytes, has " + str(self._size))
        have = len(self._buf) - self._pos
        if have >= n:
            return
        rest = self._buf[self._pos :]
        self._base += self._pos
        self._pos = 0
        want = max(n - have, READ_CHUNK_BYTES)
        data = self._stream.read(want)
        self._buf = rest + data
        if len(self._buf) < n:
            raise ModelError("GGUF file is truncated (short read)")

    def take(self, n: int) -> bytes:
        self._fill(n)
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        self.budget -= n
        return out

    def unpack(self, st: struct.Struct) -> object:
        self._fill(st.size)
        (value,) = st.unpack_from(self._buf, self._pos)
        self._pos += st.size
        self.budget -= st.size
        return value

    def u32(self) -> int:
        value = self.unpack(_U32)
        assert isinstance(value, int)
        return value

    def u64(self) -> int:
        value = self.unpack(_U64)
        assert isinstance(value, int)
        return value

    def skip(self, n: int) -> None:
        if n > self.budget:
            raise ModelError("GGUF metadata exceeds " + str(MAX_METADATA_BYTES) + " bytes")
        if self.offset + n > self._size:
            raise ModelError("GGUF file is truncated inside an array")
        have = len(self._buf) - self._pos
        self.budget -= n
        if n <= have:
            self._pos += n
            return
        self._base = self.offset + n
        self._buf = b""
        self._pos = 0
        self._stream.seek(self._base)

    def skip_strings(self, count: int, cap: int, what: str) -> None:
        """Skip `count` length-prefixed strings without decoding them."""
        unpack_from = _U64.unpack_from
        for _ in range(count):
            if len(self._buf) - self._pos < 8:
                self._fill(8)
            (n,) = unpack_from(self._buf, self._pos)
            self._pos += 8
            if n > cap:
                raise ModelError(what + " item is " + str(n) + " bytes, over the cap")
            if len(self._buf) - self._pos < n:
                self._fill(n)
            self._pos += n
            self.budget -= 8 + n
        if self.budget < 0:
            raise ModelError("GGUF metadata exceeds " + str(MAX_METADATA_BYTES) + " bytes")

    def string(self, cap: int, what: str) -> str:
        n = self.u64()
        if n > cap:
            raise ModelError(what + " is " + str(n) + " bytes, over the cap of " + str(cap))
        raw = self.take(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ModelError(what + " is not valid UTF-8") from err


def _read_value(r: _Reader, vtype: int, key: str, depth: int) -> MetaValue:
    st = _SCALARS.get(vtype)
    if st is not None:
        value = r.unpack(st)
        assert isinstance(value, int | float | bool)
        if vtype == T_BOOL:
            return bool(value)
        return value
    if vtype == T_STRING:
        return r.string(MAX_STRING_BYTES, "value of " + repr(key))
    if vtype == T_ARRAY:
        if depth >= MAX_NESTING:
            raise ModelError("array nesting too deep in " + repr(key))
        item_type = r.u32()
        length = r.u64()
        if length > MAX_ARRAY_LEN:
            raise ModelError("array " + repr(key) + " has " + str(length) + " items, over the cap")
        item_st = _SCALARS.get(item_type)
        if length > KEEP_ARRAY_ITEMS:
            if item_st is not None:
                r.skip(length * item_st.size)
            elif item_type == T_STRING:
                r.skip_strings(length, MAX_STRING_BYTES, "array " + repr(key))
            else:
                for _ in range(length):
                    _read_value(r, item_type, key, depth + 1)
            return ArrayInfo(item_type, length)
        return [_read_value(r, item_type, key, depth + 1) for _ in range(length)]
    raise ModelError("unknown GGUF value type " + str(vtype) + " for " + repr(key))


def parse_gguf(stream: BinaryIO, size: int, *, read_tensors: bool = True) -> GGUFInfo:
    """Parse a GGUF header from `stream` holding `size` bytes (blocking I/O)."""
    r = _Reader(stream, size)
    if size < 4:
        raise ModelError("not a GGUF file: only " + str(size) + " bytes")
    magic = r.take(4)
    if magic != GGUF_MAGIC:
        raise ModelError("not a GGUF file: bad magic " + repr(magic[:4]))
    version = r.u32()
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
            raise ModelError("big-endian GGUF files are not supported")
        raise ModelError("unsupported GGUF version " + str(version) + " (need 2 or 3)")
    tensor_count = r.u64()
    kv_count = r.u64()
    if tensor_count > MAX_TENSOR_COUNT:
        raise ModelError("GGUF tensor count " + str(tensor_count) + " is over the cap")
    if kv_count > MAX_KV_COUNT:
        raise ModelError("GGUF metadata count " + str(kv_count) + " is over the cap")
    metadata: dict[str, MetaValue] = {}
    for _ in range(kv_count):
        key = r.string(MAX_KEY_BYTES, "metadata key")
        vtype = r.u32()
        metadata[key] = _read_value(r, vtype, key, 0)
    tensors: list[TensorInfo] = []
    if read_tensors:
        for _ in range(tensor_count):
            name = r.string(MAX_TENSOR_NAME_BYTES, "tensor name")
            n_dims = r.u32()
            if n_dims == 0 or n_dims > MAX_TENSOR_DIMS:
                raise ModelError("tensor " + repr(name) + " has " + str(n_dims) + " dims")
            shape = tuple(r.u64() for _ in range(n_dims))
            if any(d == 0 or d > 1 << 40 for d in shape):
                raise ModelError("tensor " + repr(name) + " has a bad shape " + str(shape))
            ggml_type = r.u32()
            offset = r.u64()
            if offset >= size:
                raise ModelError("tensor " + repr(name) + " lies past the end of the file")
            tensors.append(TensorInfo(name, shape, ggml_type, offset))
    return GGUFInfo(
        version=version,
        tensor_count=tensor_count,
        metadata=metadata,
        tensors=tuple(tensors),
        header_bytes=r.offset,
    )


def parse_gguf_bytes(data: bytes, *, read_tensors: bool = True) -> GGUFInfo:
    """Parse a GGUF header held in memory."""
    return parse_gguf(io.BytesIO(data), len(data), read_tensors=read_tensors)


def read_gguf(path: Path, *, read_tensors: bool = True) -> GGUFInfo:
    """Read the GGUF header of the file at `path` (blocking I/O)."""
    try:
        with path.open("rb") as stream:
            size = path.stat().st_size
            return parse_gguf(stream, size, read_tensors=read_tensors)
    except OSError as err:
        raise ModelError("cannot read model file " + str(path) + ": " + str(err)) from err
