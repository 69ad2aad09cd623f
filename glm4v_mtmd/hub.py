"""Resolve a GGUF model pair (text model + ``mmproj``) from a local directory or a hub repository."""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any, Optional, Union

from .errors import ModelLoadError

#: The model used when none is named: the GLM-4.6V-Flash GGUF pair published by ggml-org.
DEFAULT_REPO = "ggml-org/GLM-4.6V-Flash-GGUF"
#: The text model taken from a directory or repository that holds several quantizations.
DEFAULT_QUANT = "Q4_K_M"
#: Seconds to wait for the hub before falling back to the cache or failing.
HUB_TIMEOUT_S = 3.0


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
    files: Sequence[str], quant: Optional[str], mmproj: Optional[str], where: str,
    prefer: Optional[Sequence[str]] = None,
) -> tuple[str, str]:
    """Pick the text model and the projector (``mmproj*``) from a list of file names.

    ``quant`` (e.g. ``"Q4_K_M"``, the label in the file name) chooses the text model; ``None``
    takes the only one there is, or :data:`DEFAULT_QUANT` among several. Where several projectors
    are published, ``prefer`` (default: :func:`projector_preference` for this machine) orders
    their precisions.

    Raises:
        ModelLoadError: listing the available files when the choice is missing or ambiguous.
    """
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    listing = ", ".join(os.path.basename(f) for f in ggufs) or "no .gguf files"
    candidates = [f for f in ggufs if not _is_mmproj(f)]
    wanted = quant
    if quant is None and len(candidates) != 1:
        wanted = DEFAULT_QUANT
    models = candidates if wanted is None else [f for f in candidates if (_quant_of(f) or "") == wanted.upper()]
    if len(models) != 1:
        if not candidates:
            raise ModelLoadError(f"{where}: no text-model .gguf file (available: {listing})")
        quants = ", ".join(sorted({_quant_of(f) or os.path.basename(f) for f in candidates}))
        what = "no" if not models else "several"
        raise ModelLoadError(f"{where}: {what} text-model file with quant {str(wanted).upper()!r}; choose one of "
                             f"{quants} with --quant / quant= (available: {listing})")
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
    quant: Optional[str] = None,
    mmproj: Optional[str] = None,
    *,
    revision: Optional[str] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    local_files_only: bool = False,
) -> tuple[pathlib.Path, pathlib.Path]:
    """Local paths of (text model, projector) for a directory or a hub repository id.

    A hub repository is listed and only the two chosen files are downloaded, with huggingface_hub's
    own progress bars. When the hub cannot be reached (one try, :data:`HUB_TIMEOUT_S`), or with
    ``local_files_only`` / ``HF_HUB_OFFLINE=1``, the cached snapshot is used; without one the error
    says what to do instead.
    """
    path = pathlib.Path(repo_id_or_dir).expanduser()
    if path.is_dir():
        model, proj = choose_files([p.name for p in path.iterdir()], quant, mmproj, str(path))
        return path / model, path / proj
    if path.suffix.lower() == ".gguf" and not path.exists():
        raise ModelLoadError(f"{str(repo_id_or_dir)!r}: no such file or directory")
    try:
        import huggingface_hub as hub
        from huggingface_hub import constants
    except ImportError as exc:
        raise ModelLoadError(
            f"{repo_id_or_dir!r} is not a directory; downloading from the hub needs `pip install huggingface_hub`"
        ) from exc
    repo = str(repo_id_or_dir)
    offline = local_files_only or bool(constants.HF_HUB_OFFLINE)
    problem = None if offline else _unreachable(constants.ENDPOINT)
    if offline or problem:
        try:
            return _from_cache(hub, repo, quant, mmproj, revision, cache_dir)
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - no cached snapshot (huggingface_hub's many error types)
            why = problem or "offline mode (HF_HUB_OFFLINE / local_files_only)"
            raise ModelLoadError(
                f"could not resolve {repo!r}: {why}, and it is not in the local cache ({type(exc).__name__}). "
                "Ways forward: pass a local GGUF file or a directory holding the pair with --model PATH "
                "(Model.from_pretrained(PATH)); download it once while online (it is then cached); or run "
                "`glm4v-mtmd selfcheck` to check the install offline with a tiny random model"
            ) from None
    try:
        files = hub.list_repo_files(repo, revision=revision)
        model, proj = choose_files(files, quant, mmproj, repo)
        return tuple(  # type: ignore[return-value]
            pathlib.Path(hub.hf_hub_download(repo, f, revision=revision, cache_dir=cache_dir)) for f in (model, proj)
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # huggingface_hub raises many types (404, auth, network)
        raise ModelLoadError(f"could not resolve {repo!r} on the hub: {exc}") from exc


def _from_cache(hub: Any, repo: str, quant: Optional[str], mmproj: Optional[str], revision: Optional[str],
                cache_dir: Union[str, os.PathLike, None]) -> tuple[pathlib.Path, pathlib.Path]:
    snapshot = pathlib.Path(hub.snapshot_download(repo, revision=revision, cache_dir=cache_dir,
                                                  local_files_only=True))
    files = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*.gguf")]
    model, proj = choose_files(files, quant, mmproj, f"{repo} (cached snapshot)")
    return snapshot / model, snapshot / proj


def _unreachable(endpoint: str) -> Optional[str]:
    """Why the hub at ``endpoint`` cannot be reached (one connection, a short timeout), or None."""
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    host = parts.hostname
    if not host:
        return f"the hub endpoint {endpoint!r} is not a URL"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None  # a proxy decides what is reachable: let huggingface_hub try
    import socket

    try:
        with socket.create_connection((host, port), timeout=HUB_TIMEOUT_S):
            return None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return f"the hub ({parts.scheme}://{host}:{port}) cannot be reached: {reason}"
