"""Reading a Hugging Face safetensors checkpoint one tensor (or one row range) at a time.

The safetensors format is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw data. Only the header is parsed up front;
tensor data is read on demand with ``readinto`` into a buffer of exactly the requested size,
so nothing is loaded (or memory-mapped) before it is needed. The ``safetensors`` package's
numpy front end cannot hand out bfloat16 tensors, which is what GLM checkpoints are made of,
hence the small reader here.

The order of :func:`index_checkpoint`'s result is the order llama.cpp's converter visits the
tensors in: the shard files sorted by name (those listed by ``model.safetensors.index.json``
when it exists, otherwise every ``model*.safetensors``), and inside each shard the tensor
names sorted. The converter's output order follows from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConversionError

__all__ = ["SourceTensor", "index_checkpoint", "read_header"]

# safetensors dtype -> (numpy dtype of the stored values, item size)
_DTYPES: dict[str, tuple[str, int]] = {
    "BF16": ("<u2", 2),  # decoded to float32 by bit shifting
    "F16": ("<f2", 2),
    "F32": ("<f4", 4),
    "F64": ("<f8", 8),
    "I8": ("i1", 1),
    "U8": ("u1", 1),
    "I16": ("<i2", 2),
    "U16": ("<u2", 2),
    "I32": ("<i4", 4),
    "U32": ("<u4", 4),
    "I64": ("<i8", 8),
    "U64": ("<u8", 8),
    "BOOL": ("?", 1),
}
# dtypes llama.cpp's converter only handles through checkpoint-specific dequantisation
_UNSUPPORTED = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2")

_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the checkpoint: where its bytes are and what they hold."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in ``file``
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_rows(self) -> int:
        """Length of the first axis (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_elements(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    def _check_readable(self) -> None:
        if self.dtype not in _DTYPES:
            raise ConversionError(
                f"{self.file}: tensor {self.name!r} has dtype {self.dtype}, which this converter cannot read "
                "(quantized FP8/FP4 checkpoints are not supported; use the BF16 original)"
            )

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the first axis as float32 (the whole tensor for a scalar)."""
        self._check_readable()
        np_dtype, itemsize = _DTYPES[self.dtype]
        if not self.shape:
            start, stop, row = 0, 1, 1
        else:
            row = self.row_elements
        count = (stop - start) * row
        buf = np.empty(count, dtype=np_dtype)
        try:
            with open(self.file, "rb") as f:
                f.seek(self.offset + start * row * itemsize)
                got = f.readinto(memoryview(buf).cast("B"))
        except OSError as exc:
            raise ConversionError(f"{self.file}: cannot read tensor {self.name!r}: {exc}") from exc
        if got != count * itemsize:
            raise ConversionError(f"{self.file}: file is truncated inside tensor {self.name!r}")
        if self.dtype == "BF16":
            wide = buf.astype(np.uint32)
            del buf
            wide <<= 16
            out = wide.view(np.float32)
        elif self.dtype == "F32":
            out = buf
        else:
            # float16 widens exactly; float64 and integers round like torch's .to(float32)
            out = buf.astype(np.float32)
        shape = (stop - start, *self.shape[1:]) if self.shape else ()
        return out.reshape(shape)

    def read(self) -> np.ndarray:
        """The whole tensor as float32."""
        return self.read_rows(0, self.n_rows)


def read_header(path: Path) -> dict[str, SourceTensor]:
    """The tensors of one safetensors file, sorted by name, without reading their data."""
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > _MAX_HEADER or 8 + n > size:
                raise ConversionError(f"{path}: not a safetensors file or truncated (bad header length {n})")
            raw = f.read(n)
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)")

    data_start = 8 + n
    tensors: dict[str, SourceTensor] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(meta["dtype"])
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionError(f"{path}: corrupt safetensors header entry for {name!r}") from exc
        if any(d < 0 for d in shape) or begin < 0 or end < begin or data_start + end > size:
            raise ConversionError(f"{path}: tensor {name!r} lies outside the file (truncated download?)")
        t = SourceTensor(name, path, dtype, shape, data_start + begin, end - begin)
        if dtype in _DTYPES and t.n_elements * _DTYPES[dtype][1] != t.nbytes:
            raise ConversionError(f"{path}: tensor {name!r}: byte size does not match shape {list(shape)}")
        if dtype not in _DTYPES and dtype not in _UNSUPPORTED:
            raise ConversionError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        tensors[name] = t
    return dict(sorted(tensors.items()))


def index_checkpoint(hf_dir: Path) -> dict[str, SourceTensor]:
    """Every tensor of the checkpoint in ``hf_dir``, in llama.cpp's converter order."""
    index_file = hf_dir / "model.safetensors.index.json"
    weight_map: dict[str, str] = {}
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConversionError(f"{index_file}: cannot parse: {exc}") from exc
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise ConversionError(f"{index_file}: no 'weight_map' in the index")
        weight_map = {str(k): str(v) for k, v in wm.items()}
        part_names = sorted(set(weight_map.values()))
        missing = [p for p in part_names if not (hf_dir / p).is_file()]
        if missing:
            raise ConversionError(
                f"{index_file}: missing shard file(s) {', '.join(missing)} in {hf_dir} (incomplete download?)"
            )
    else:
        part_names = sorted(
            p for p in os.listdir(hf_dir) if p.startswith("model") and p.endswith(".safetensors")
        )
        if not part_names:
            raise ConversionError(
                f"{hf_dir}: no model*.safetensors weights found (PyTorch .bin checkpoints are not supported)"
            )

    tensors: dict[str, SourceTensor] = {}
    for part in part_names:
        for name, t in read_header(hf_dir / part).items():
            if name in tensors:
                raise ConversionError(
                    f"{hf_dir / part}: tensor {name!r} also appears in {tensors[name].file.name}"
                )
            tensors[name] = t

    if weight_map:
        missing_t = sorted(set(weight_map) - set(tensors))
        extra = sorted(set(tensors) - set(weight_map))
        if missing_t or extra:
            files = sorted({weight_map[n] for n in missing_t})
            raise ConversionError(
                f"{index_file}: weight map and shard contents disagree: "
                + (
                    f"missing tensors {missing_t[:5]}{'...' if len(missing_t) > 5 else ''} "
                    f"(expected in {', '.join(files)}) "
                    if missing_t
                    else ""
                )
                + (f"unlisted tensors {extra[:5]}{'...' if len(extra) > 5 else ''}" if extra else "")
            )
    return tensors
