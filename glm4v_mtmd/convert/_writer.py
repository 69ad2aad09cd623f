"""Writing a GGUF file from a tensor plan, one chunk of one tensor at a time.

``gguf.GGUFWriter`` writes the header, the key/values and the tensor infos (it only needs each
tensor's name, shape, type and byte size); the tensor data is then streamed into the same file
here: a tensor is produced in row chunks of at most :data:`CHUNK_ELEMENTS` float32 values,
converted/quantized chunk by chunk (every GGUF type written here is row-wise: F32, F16, BF16,
Q8_0) and appended, so peak memory stays around one chunk, or one whole tensor for the few
transforms that mix rows (the Q/K permutation, the patch-embedding split).

Numerics follow llama.cpp's converter exactly: source values are widened to float32 (exact for
BF16/F16) and passed to ``gguf.quants.quantize``, the function the reference uses.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from ..errors import ConversionError
from ._config import load_json
from ._source import SourceTensor

__all__ = [
    "OUTTYPES",
    "OutTensor",
    "Piece",
    "select_qtype",
    "tensor_nbytes",
    "write_gguf",
    "Progress",
]

logger = logging.getLogger("glm4v_mtmd.convert")

#: outtype name -> (llama_ftype value written as general.file_type, default tensor type)
OUTTYPES: dict[str, tuple[int, QT]] = {
    "f32": (0, QT.F32),
    "f16": (1, QT.F16),
    "bf16": (32, QT.BF16),
    "q8_0": (7, QT.Q8_0),
}

CHUNK_ELEMENTS = 4 * 1024 * 1024  # 16 MiB of float32 per chunk
_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT

# tensors the reference keeps in F32 whatever the outtype (besides 1-D tensors, *_norm.weight and
# names not ending in .weight): MODEL_TENSOR.FFN_GATE_INP and V_ENC_EMBD_POS for our architectures
_F32_SUFFIXES = (".ffn_gate_inp.weight",)
_F32_NAMES = ("v.position_embd.weight",)


@dataclass(frozen=True)
class Piece:
    """Rows of an output tensor taken from one source tensor.

    ``kind``: ``"plain"`` (as stored), ``"neox"`` (Q/K rows permuted from interleaved to NeoX
    rotary order; ``args`` = (head_dim, rotary_dim)), ``"temporal"`` (one temporal slice of a
    Conv3d kernel; ``args`` = (t,)).
    """

    src: SourceTensor
    kind: str = "plain"
    args: tuple = ()


@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]  # numpy order, outermost first
    qtype: QT
    pieces: list[Piece] = field(default_factory=list)  # concatenated along the first axis

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)


def tensor_nbytes(shape: tuple[int, ...], qtype: QT) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size


def select_qtype(name: str, shape: tuple[int, ...], outtype: str, *, mmproj: bool) -> QT:
    """The reference's per-tensor type choice (``ModelBase.prepare_tensors``)."""
    ftype_qtype = OUTTYPES[outtype][1]
    qtype: QT | None = None
    if mmproj and (".patch_embd.weight" in name or ".patch_merger.weight" in name):
        # MmprojModel.tensor_force_quant
        qtype = QT.F16 if outtype == "f16" else QT.F32
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        qtype = QT.F32
    if qtype is None and (
        name.endswith(_F32_SUFFIXES)
        or name in _F32_NAMES
        or name[-7:] not in (".weight", ".lora_a", ".lora_b")
    ):
        qtype = QT.F32
    if qtype is None:
        qtype = ftype_qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if block > 1 and (not shape or shape[-1] % block != 0):
        qtype = QT.F16  # gguf.QuantError -> "falling back to F16"
    return qtype


def _normal_to_neox(w: np.ndarray, head_dim: int, rotary_dim: int) -> np.ndarray:
    """Glm4Model.normal_to_neox: per head, rotary rows (even, then odd), then the rest."""
    orig = w.shape
    if w.ndim == 1:
        w = w[:, None]
    r = w.reshape(w.shape[0] // head_dim, head_dim, -1)
    rot = r[:, :rotary_dim]
    out = np.concatenate((rot[:, ::2], rot[:, 1::2], r[:, rotary_dim:]), axis=1)
    return out.reshape(orig)


def _iter_chunks(t: OutTensor) -> Iterator[np.ndarray]:
    for p in t.pieces:
        if p.kind == "plain":
            rows = p.src.n_rows
            step = max(1, CHUNK_ELEMENTS // max(1, p.src.row_elements))
            for s in range(0, rows, step):
                yield p.src.read_rows(s, min(rows, s + step))
        elif p.kind == "neox":
            yield _normal_to_neox(p.src.read(), *p.args)
        elif p.kind == "temporal":
            yield np.ascontiguousarray(p.src.read()[:, :, p.args[0]])
        else:  # pragma: no cover - plan bug
            raise AssertionError(p.kind)


class Progress:
    """A tqdm byte counter when tqdm is importable and enabled, else a no-op."""

    def __init__(self, enabled: bool | None, total: int, desc: str):
        self._bar = None
        if enabled is None:
            enabled = bool(getattr(sys.stderr, "isatty", lambda: False)())
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=True)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _add_kv(w: gguf.GGUFWriter, key: str, kind: str, value: Any) -> None:
    if kind == "str":
        w.add_string(key, value)
    elif kind == "u32":
        w.add_uint32(key, int(value))
    elif kind == "f32":
        w.add_float32(key, float(value))
    elif kind == "bool":
        w.add_bool(key, bool(value))
    elif kind == "array":
        w.add_array(key, list(value))
    else:  # pragma: no cover
        raise AssertionError(kind)


def _add_general_metadata(w: gguf.GGUFWriter, hf_dir: Path) -> None:
    """ModelBase.prepare_metadata: authorship/sampling metadata via gguf.Metadata."""
    total, shared, expert, count = w.get_total_parameter_count()
    try:
        md = gguf.Metadata.load(None, hf_dir, None, total)
    except Exception as exc:  # a malformed model card must not stop the conversion
        logger.warning("ignoring unreadable model card / metadata in %s: %s", hf_dir, exc)
        md = gguf.Metadata()
    gen = load_json(hf_dir / "generation_config.json", required=False)
    if isinstance(gen, dict) and "penalty_repeat" not in gen and "repetition_penalty" in gen:
        # the pinned tree's Metadata also reads transformers' key (PyPI gguf 0.19 does not)
        md.sampling_penalty_repeat = gen["repetition_penalty"]
    if md.name is None:
        md.name = hf_dir.name
    if md.size_label is None and total > 0:
        md.size_label = gguf.size_label(total, shared, expert, count)
    md.set_gguf_meta_model(w)


def write_gguf(
    path: Path,
    *,
    arch: str,
    gguf_type: str,
    hf_dir: Path,
    kv: list[tuple[str, str, Any]],
    tensors: list[OutTensor],
    progress: bool | None,
    desc: str,
    check: Callable[[], None] | None = None,
) -> None:
    """Write one GGUF file at ``path`` (which must not be the final name: callers rename)."""
    w = gguf.GGUFWriter(path=None, arch=arch)
    w.add_type(gguf_type)
    for t in tensors:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    _add_general_metadata(w, hf_dir)
    for key, kind, value in kv:
        _add_kv(w, key, kind, value)

    total = sum(t.nbytes for t in tensors)
    bar = Progress(progress, total, desc)
    try:
        w.write_header_to_file(path=path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None
        fout = w.fout[0]
        fout.write(b"\0" * (-fout.tell() % _ALIGNMENT))
        for t in tensors:
            written = 0
            for chunk in _iter_chunks(t):
                data = np.ascontiguousarray(gguf.quants.quantize(chunk, t.qtype))
                fout.write(memoryview(data).cast("B"))
                written += data.nbytes
                bar.update(data.nbytes)
                del chunk, data
            if written != t.nbytes:
                raise ConversionError(
                    f"internal error: tensor {t.name} produced {written} bytes, expected {t.nbytes}"
                )
            fout.write(b"\0" * (-written % _ALIGNMENT))
            if check is not None:
                check()
        fout.flush()
        os.fsync(fout.fileno())
    except OSError as exc:
        raise ConversionError(f"{path}: write failed: {exc}") from exc
    finally:
        bar.close()
        w.close()
