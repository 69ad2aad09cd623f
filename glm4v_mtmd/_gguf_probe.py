"""Read and check a GGUF file's header without the engine.

Used to reject wrong files (a text model given as projector, a truncated download, a damaged or
hostile file) with a clear message before the native loader sees them.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple, Optional, Union

from .errors import ModelLoadError

_MAGIC = b"GGUF"
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 1 << 26  # 64 MiB: no metadata string is larger; bigger values mean corruption


def _read(f: BinaryIO, n: int, path: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ModelLoadError(f"'{path}' is truncated (the GGUF header ends early)")
    return data


def _read_string(f: BinaryIO, path: str) -> str:
    (n,) = struct.unpack("<Q", _read(f, 8, path))
    if n > _MAX_STRING:
        raise ModelLoadError(f"'{path}' is corrupt (a metadata string claims {n} bytes)")
    return _read(f, n, path).decode("utf-8", "replace")


def _skip_value(f: BinaryIO, vtype: int, path: str) -> object:
    if vtype in _SCALAR:
        fmt = "<" + _SCALAR[vtype]
        return struct.unpack(fmt, _read(f, struct.calcsize(fmt), path))[0]
    if vtype == _STRING:
        return _read_string(f, path)
    if vtype == _ARRAY:
        (etype,) = struct.unpack("<I", _read(f, 4, path))
        (count,) = struct.unpack("<Q", _read(f, 8, path))
        if etype in _SCALAR:
            size = struct.calcsize("<" + _SCALAR[etype]) * count
            if size > os.fstat(f.fileno()).st_size:
                raise ModelLoadError(f"'{path}' is corrupt (an array is larger than the file)")
            f.seek(size, os.SEEK_CUR)
        elif etype == _STRING:
            for _ in range(count):
                (n,) = struct.unpack("<Q", _read(f, 8, path))
                if n > _MAX_STRING:
                    raise ModelLoadError(f"'{path}' is corrupt (a metadata string claims {n} bytes)")
                f.seek(n, os.SEEK_CUR)
        else:
            raise ModelLoadError(f"'{path}' is corrupt (array of unknown type {etype})")
        return None
    raise ModelLoadError(f"'{path}' is corrupt (metadata value of unknown type {vtype})")


# ----------------------------------------------------------------------------- whole header

#: ggml type id -> (elements per block, bytes per block), as ggml's type traits (and gguf-py's
#: GGML_QUANT_SIZES, which a test compares with). Ids not listed are rejected.
GGML_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}
GGML_F32, GGML_F16 = 0, 1
#: Types a weight matrix may have: the float types and the block-quantised weight types (not the
#: integer types, F64, or Q8_1 / Q8_K, which exist only as the other operand of a dot product).
MATRIX_TYPES = frozenset(t for t in GGML_TYPE_SIZES if t not in (9, 15, 24, 25, 26, 27, 28))
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NAME = 63  # GGML_MAX_NAME - 1
_MIN_KV_BYTES = 8 + 1 + 4  # key length, a one-byte key, value type (the value itself may be empty)
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, one dim, type, offset


class GGUFArray(NamedTuple):
    """A metadata array: element type, length, and the values when short enough to matter (<= 4096
    numbers: per-layer arrays are at most LLAMA_MAX_LAYERS = 512 long, and the engine refuses others)."""

    etype: int
    count: int
    values: Optional[tuple[Union[int, float, bool], ...]]


def _small_array(f: BinaryIO, start: int, etype: int, count: int) -> Optional[tuple[Union[int, float, bool], ...]]:
    if etype not in _SCALAR or count > 4096:
        return None
    end = f.tell()
    fmt = "<" + _SCALAR[etype] * count
    f.seek(start + 12)
    values = struct.unpack(fmt, _read(f, struct.calcsize(fmt), f.name))
    f.seek(end)
    return values


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a GGUF file's tensor table."""

    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (contiguous) first
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class Header:
    """Metadata (scalars, strings, arrays as :class:`GGUFArray`) and tensor table of a GGUF file."""

    path: str
    metadata: dict[str, object]
    value_types: dict[str, int]  # GGUF value type of each key (4 = uint32, 8 = string, 9 = array, ...)
    tensors: dict[str, TensorInfo]
    data_start: int
    file_size: int


def read_header(path: Union[str, os.PathLike]) -> Header:
    """Parse and check a GGUF file's whole header: every count, string, type, shape and data range.

    The checks are the structural ones a corrupt or hostile file can break (ggml would otherwise
    read out of bounds or abort): counts that cannot fit in the file, tensor names too long or
    repeated, unknown types, 0 or more than 4 dimensions, a first dimension that is not a whole
    number of blocks, misaligned data, data past the end of the file.

    Raises:
        ModelLoadError: the file is missing, not GGUF, truncated or corrupt (the message says where).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"'{path}': no such file")
    size = os.path.getsize(path)
    metadata: dict[str, object] = {}
    value_types: dict[str, int] = {}
    tensors: dict[str, TensorInfo] = {}
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise ModelLoadError(f"'{path}' is not a GGUF file (bad magic)")
        version, n_tensors, n_kv = struct.unpack("<IQQ", _read(f, 20, path))
        if version not in (2, 3):
            raise ModelLoadError(f"'{path}' has unsupported GGUF version {version}")
        if n_kv * _MIN_KV_BYTES > size or n_tensors * _MIN_TENSOR_INFO_BYTES > size:
            raise ModelLoadError(f"'{path}' is corrupt ({n_kv} metadata entries, {n_tensors} tensors: more than fit)")
        for _ in range(n_kv):
            key = _read_string(f, path)
            (vtype,) = struct.unpack("<I", _read(f, 4, path))
            if vtype == _ARRAY:
                here = f.tell()
                etype, count = struct.unpack("<IQ", _read(f, 12, path))
                if key == "tokenizer.ggml.tokens" and etype == _STRING:
                    _check_unique_tokens(f, count, path)  # llama.cpp asserts it (an abort, not an error)
                else:
                    f.seek(here)
                    _skip_value(f, vtype, path)
                value: object = GGUFArray(etype, count, _small_array(f, here, etype, count))
            else:
                value = _skip_value(f, vtype, path)
            if key in metadata:
                raise ModelLoadError(f"'{path}' is corrupt (metadata key '{key}' appears twice)")
            metadata[key] = value
            value_types[key] = vtype
        for _ in range(n_tensors):
            name = _read_string(f, path)
            if not name or len(name.encode()) > _MAX_NAME:
                raise ModelLoadError(f"'{path}' is corrupt (a tensor name of {len(name.encode())} bytes)")
            (n_dims,) = struct.unpack("<I", _read(f, 4, path))
            if not 1 <= n_dims <= _MAX_DIMS:
                raise ModelLoadError(f"'{path}' is corrupt (tensor '{name}' has {n_dims} dimensions)")
            shape = struct.unpack(f"<{n_dims}Q", _read(f, 8 * n_dims, path))
            ggml_type, offset = struct.unpack("<IQ", _read(f, 12, path))
            if name in tensors:
                raise ModelLoadError(f"'{path}' is corrupt (tensor '{name}' appears twice)")
            tensors[name] = _tensor_info(path, name, shape, ggml_type, offset, size)
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ModelLoadError(f"'{path}' is corrupt (general.alignment={alignment!r})")
        data_start = -(-f.tell() // alignment) * alignment
    for t in tensors.values():
        if t.offset % alignment or data_start + t.offset + t.nbytes > size:
            raise ModelLoadError(
                f"'{path}' is corrupt or truncated (tensor '{t.name}': {t.nbytes} bytes at data offset {t.offset}, "
                f"file {size} bytes)"
            )
    return Header(path, metadata, value_types, tensors, data_start, size)


def _check_unique_tokens(f: BinaryIO, count: int, path: str) -> None:
    if count * 8 > os.fstat(f.fileno()).st_size:
        raise ModelLoadError(f"'{path}' is corrupt (the vocabulary claims {count} tokens)")
    seen: set[bytes] = set()
    for i in range(count):
        (n,) = struct.unpack("<Q", _read(f, 8, path))
        if n > _MAX_STRING:
            raise ModelLoadError(f"'{path}' is corrupt (a metadata string claims {n} bytes)")
        token = _read(f, n, path)
        if token in seen:
            raise ModelLoadError(f"'{path}' is corrupt (token {i}, {token[:40]!r}, is in the vocabulary twice)")
        seen.add(token)


def _tensor_info(path: str, name: str, shape: tuple[int, ...], ggml_type: int, offset: int, size: int) -> TensorInfo:
    if ggml_type not in GGML_TYPE_SIZES:
        raise ModelLoadError(f"'{path}' is corrupt (tensor '{name}' has unknown type {ggml_type})")
    block, type_size = GGML_TYPE_SIZES[ggml_type]
    n = 1
    for d in shape:
        if d == 0 or d > size * block:  # no dimension can hold more elements than the file has bytes
            raise ModelLoadError(f"'{path}' is corrupt (tensor '{name}' has shape {list(shape)})")
        n *= d
    if shape[0] % block or n // block * type_size > size:
        raise ModelLoadError(f"'{path}' is corrupt (tensor '{name}': shape {list(shape)} does not fit its type)")
    return TensorInfo(name, tuple(shape), ggml_type, offset, n // block * type_size)
