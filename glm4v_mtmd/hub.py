"""Resolve a GGUF model pair (text model + ``mmproj``) from a local directory or a hub repository."""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Sequence
from typing import Optional, Union

from .errors import ModelLoadError

#: The model used when none is named: the GLM-4.6V-Flash GGUF pair published by ggml-org.
DEFAULT_REPO = "ggml-org/GLM-4.6V-Flash-GGUF"


def _is_mmproj(name: str) -> bool:
    return os.path.basename(name).lower().startswith("mmproj")


def _quant_of(name: str) -> Optional[str]:
    """The quantization label in a GGUF file name (``...-Q4_K_M.gguf`` -> ``Q4_K_M``)."""
    m = re.search(r"[-_.]((?:I?Q\d[A-Z0-9_]*)|F16|BF16|F32)\.gguf$", os.path.basename(name), re.I)
    return m.group(1).upper() if m else None


def projector_preference(float_type: Optional[str] = None) -> tuple[str, ...]:
    """Projector precisions in the order :func:`choose_files` prefers them on this machine.

    The precision the engine runs fastest here first (:func:`glm4v_mtmd.preferred_float_type`:
    BF16 where the CPU backend has BF16 dot products, else F16); BF16 comes last without BF16
    kernels, after Q8_0, whose integer kernels encoded 1.36x slower than F16 on an AVX2 CPU
    (see ``glm4v_mtmd._cpu``).
    """
    if float_type is None:
        from ._cpu import preferred_float_type

        float_type = preferred_float_type()
    return ("BF16", "F16", "Q8_0") if float_type == "bf16" else ("F16", "Q8_0", "BF16")


def choose_files(
    files: Sequence[str], quant: str, mmproj: Optional[str], where: str, prefer: Optional[Sequence[str]] = None
) -> tuple[str, str]:
    """Pick the text model by ``quant`` and the projector (``mmproj*``) from a list of file names.

    Where several projectors are published, ``prefer`` (default: :func:`projector_preference`
    for this machine) orders their precisions.

    Raises:
        ModelLoadError: listing the available files when the choice is missing or ambiguous.
    """
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    listing = ", ".join(os.path.basename(f) for f in ggufs) or "no .gguf files"
    models = [f for f in ggufs if not _is_mmproj(f) and (_quant_of(f) or "") == quant.upper()]
    if len(models) != 1:
        what = "no" if not models else "several"
        raise ModelLoadError(f"{where}: {what} text-model file with quant {quant.upper()!r} (available: {listing})")
    projectors = [f for f in ggufs if _is_mmproj(f)]
    if mmproj is not None:
        projectors = [f for f in projectors if os.path.basename(f) == mmproj or f == mmproj]
    if len(projectors) > 1:
        for pref in projector_preference() if prefer is None else prefer:
            preferred = [f for f in projectors if _quant_of(f) == pref]
            if len(preferred) == 1:
                projectors = preferred
                break
    if len(projectors) != 1:
        what = "no" if not projectors else "several"
        hint = "" if projectors else "; pass mmproj= with the projector's file name"
        raise ModelLoadError(f"{where}: {what} projector (mmproj*.gguf) file{hint} (available: {listing})")
    return models[0], projectors[0]


def resolve_pair(
    repo_id_or_dir: Union[str, os.PathLike],
    quant: str = "Q4_K_M",
    mmproj: Optional[str] = None,
    *,
    revision: Optional[str] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    local_files_only: bool = False,
) -> tuple[pathlib.Path, pathlib.Path]:
    """Local paths of (text model, projector) for a directory or a hub repository id.

    A hub repository is listed (or, with ``local_files_only``, its cached snapshot is read) and
    only the two chosen files are downloaded, with huggingface_hub's own progress bars.
    """
    path = pathlib.Path(repo_id_or_dir).expanduser()
    if path.is_dir():
        model, proj = choose_files([p.name for p in path.iterdir()], quant, mmproj, str(path))
        return path / model, path / proj
    try:
        import huggingface_hub as hub
    except ImportError as exc:
        raise ModelLoadError(
            f"{repo_id_or_dir!r} is not a directory; downloading from the hub needs `pip install huggingface_hub`"
        ) from exc
    repo = str(repo_id_or_dir)
    try:
        if local_files_only:
            snapshot = pathlib.Path(hub.snapshot_download(repo, revision=revision, cache_dir=cache_dir,
                                                          local_files_only=True))
            files = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*.gguf")]
        else:
            files = hub.list_repo_files(repo, revision=revision)
        model, proj = choose_files(files, quant, mmproj, repo)
        return tuple(  # type: ignore[return-value]
            pathlib.Path(hub.hf_hub_download(repo, f, revision=revision, cache_dir=cache_dir,
                                             local_files_only=local_files_only))
            for f in (model, proj)
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # huggingface_hub raises many types (offline, 404, auth)
        raise ModelLoadError(f"could not resolve {repo!r} on the hub: {exc}") from exc
