"""Read the first metadata entries of a GGUF file without the engine.

Used to reject wrong files (a text model given as projector, a truncated download)
with a clear message before the native loader sees them.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO, Union

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


def read_metadata(path: Union[str, os.PathLike], keys: tuple[str, ...]) -> dict[str, object]:
    """Values of ``keys`` (scalars and strings) from a GGUF file's metadata.

    Raises:
        ModelLoadError: the file is missing, not GGUF, or its header is truncated/corrupt.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"'{path}': no such file")
    found: dict[str, object] = {}
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise ModelLoadError(f"'{path}' is not a GGUF file (bad magic)")
        version, _n_tensors, n_kv = struct.unpack("<IQQ", _read(f, 20, path))
        if version not in (2, 3):
            raise ModelLoadError(f"'{path}' has unsupported GGUF version {version}")
        for _ in range(n_kv):
            key = _read_string(f, path)
            (vtype,) = struct.unpack("<I", _read(f, 4, path))
            value = _skip_value(f, vtype, path)
            if key in keys:
                found[key] = value
                if len(found) == len(keys):
                    break
    return found
