"""``convert()``: validate everything, write both files under temporary names, then rename."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Optional, Union

from ..errors import ConversionError
from ._config import load_model_config
from ._source import index_checkpoint
from ._text import text_kv, text_plan
from ._vision import vision_kv, vision_plan
from ._vocab import load_vocab
from ._writer import OUTTYPES, write_gguf

__all__ = ["convert", "FLOAT_OUTTYPES", "ENGINE_OUTTYPES", "ALL_OUTTYPES", "QuantizeFn"]

logger = logging.getLogger("glm4v_mtmd.convert")

#: written by this converter (both files)
FLOAT_OUTTYPES: tuple[str, ...] = tuple(OUTTYPES)
#: text model quantized by the engine's quantizer from a 16-bit intermediate file
ENGINE_OUTTYPES: tuple[str, ...] = (
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q2_k",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_k_s",
    "q4_k_m",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
)
ALL_OUTTYPES: tuple[str, ...] = FLOAT_OUTTYPES + ENGINE_OUTTYPES

#: ``quantize(src_path, dst_path, ftype_name, n_threads)``: quantize the GGUF at ``src_path`` into
#: ``dst_path`` with the llama.cpp file type named ``ftype_name`` (upper case, e.g. ``"Q4_K_M"``)
QuantizeFn = Callable[[str, str, str, int], None]

PathLike = Union[str, "os.PathLike[str]"]


def _default_quantizer() -> QuantizeFn:
    """The engine's quantizer (llama_model_quantize through the C API), imported only when needed."""
    try:
        from .._native import quantize_model
    except ImportError as exc:
        raise ConversionError(
            "engine-quantized outtypes need the compiled engine (glm4v_mtmd._native.quantize_model), "
            f"which is not available ({exc}); convert to f16/bf16/q8_0 instead"
        ) from exc
    return quantize_model


def _check_outtype(value: str, allowed: tuple[str, ...], what: str) -> str:
    v = str(value).strip().lower()
    if v not in allowed:
        known = "unsupported" if v in ALL_OUTTYPES else "unknown"
        raise ConversionError(f"{known} {what} {value!r}; valid: {', '.join(allowed)}")
    return v


def _file_stem(hf_dir: Path) -> str:
    name = hf_dir.name.strip().replace(" ", "-")
    return name or "model"


def _intermediate_type(cfg_sources) -> str:
    """The reference's ``--outtype auto``: BF16 when the weights are BF16, else F16."""
    for t in cfg_sources:
        if len(t.shape) >= 2:
            return "bf16" if t.dtype == "BF16" else "f16"
    return "f16"


def convert(
    hf_dir: PathLike,
    outdir: PathLike,
    outtype: str = "f16",
    mmproj_outtype: Optional[str] = None,
    *,
    progress: Optional[bool] = None,
    quantize_threads: Optional[int] = None,
    quantizer: Optional[QuantizeFn] = None,
) -> tuple[Path, Path]:
    """Convert a GLM-4.xV Hugging Face checkpoint into a text GGUF and an mmproj GGUF.

    Returns ``(model_path, mmproj_path)``: ``<outdir>/<name>-<TYPE>.gguf`` and
    ``<outdir>/mmproj-<name>-<MMTYPE>.gguf`` where ``name`` is the checkpoint directory's name.

    ``outtype``: one of :data:`ALL_OUTTYPES`. ``f32``/``f16``/``bf16``/``q8_0`` are written
    directly; the others are produced by writing a 16-bit text file first (BF16 for a BF16
    checkpoint, F16 otherwise) and passing it to ``quantizer`` (default: the engine's
    quantizer, ``glm4v_mtmd._native.quantize_model``) with ``quantize_threads`` threads.
    ``mmproj_outtype``: one of :data:`FLOAT_OUTTYPES`; defaults to ``outtype`` when that is
    one of them, else ``f16``. ``progress``: ``None`` shows a tqdm bar when stderr is a
    terminal, ``True``/``False`` force it on/off.

    Raises :class:`~glm4v_mtmd.errors.ConversionError` naming the offending file and problem;
    on any failure no output (and no temporary file) is left in ``outdir``.
    """
    outtype = _check_outtype(outtype, ALL_OUTTYPES, "outtype")
    if mmproj_outtype is None:
        mmproj_outtype = outtype if outtype in FLOAT_OUTTYPES else "f16"
    mmproj_outtype = _check_outtype(mmproj_outtype, FLOAT_OUTTYPES, "mmproj outtype")

    hf_path = Path(os.fspath(hf_dir)).expanduser().resolve()
    cfg = load_model_config(hf_path)
    sources = index_checkpoint(hf_path)
    vocab = load_vocab(cfg)

    engine_quant = outtype in ENGINE_OUTTYPES
    text_type = _intermediate_type(sources.values()) if engine_quant else outtype
    text_tensors = text_plan(cfg, sources, text_type)
    vision_tensors = vision_plan(cfg, sources, mmproj_outtype)
    text_meta = text_kv(cfg, OUTTYPES[text_type][0]) + vocab.kv()
    vision_meta = vision_kv(cfg, OUTTYPES[mmproj_outtype][0])
    quantize = (quantizer or _default_quantizer()) if engine_quant else None

    out_path = Path(os.fspath(outdir)).expanduser()
    try:
        out_path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConversionError(f"{out_path}: cannot create output directory: {exc}") from exc
    stem = _file_stem(hf_path)
    text_final = out_path / f"{stem}-{outtype.upper()}.gguf"
    mmproj_final = out_path / f"mmproj-{stem}-{mmproj_outtype.upper()}.gguf"

    temps: list[Path] = []

    def temp_for(final: Path) -> Path:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=out_path)
        os.close(fd)
        temps.append(Path(name))
        return temps[-1]

    try:
        text_tmp = temp_for(text_final)
        write_gguf(
            text_tmp,
            arch=cfg.gguf_arch,
            gguf_type="model",
            hf_dir=hf_path,
            kv=text_meta,
            tensors=text_tensors,
            progress=progress,
            desc=text_final.name,
        )
        if quantize is not None:
            quant_tmp = temp_for(text_final)
            n_threads = quantize_threads or os.cpu_count() or 1
            try:
                quantize(str(text_tmp), str(quant_tmp), outtype.upper(), int(n_threads))
            except ConversionError:
                raise
            except Exception as exc:  # noqa: BLE001 - the hook is foreign code
                raise ConversionError(f"{text_final}: quantizing to {outtype.upper()} failed: {exc}") from exc
            if not quant_tmp.is_file() or quant_tmp.stat().st_size == 0:
                raise ConversionError(f"{text_final}: the quantizer produced no output")
            text_tmp.unlink()
            text_tmp = quant_tmp
        mmproj_tmp = temp_for(mmproj_final)
        write_gguf(
            mmproj_tmp,
            arch="clip",
            gguf_type="mmproj",
            hf_dir=hf_path,
            kv=vision_meta,
            tensors=vision_tensors,
            progress=progress,
            desc=mmproj_final.name,
        )
        os.replace(text_tmp, text_final)
        temps.append(text_final)  # a failure of the second rename must not leave half a pair
        os.replace(mmproj_tmp, mmproj_final)
    except BaseException as exc:
        for t in temps:
            try:
                t.unlink()
            except FileNotFoundError:
                pass
        if isinstance(exc, OSError):
            raise ConversionError(f"{out_path}: cannot write output: {exc}") from exc
        raise
    logger.info("wrote %s and %s", text_final, mmproj_final)
    return text_final, mmproj_final
