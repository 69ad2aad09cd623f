"""Session.from_pretrained: file choice, and resolution from a local hub cache (no network)."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from glm4v_mtmd import ModelLoadError, Session
from glm4v_mtmd.hub import choose_files

FILES = ["GLM-4.6V-Flash-Q4_K_M.gguf", "GLM-4.6V-Flash-Q8_0.gguf", "mmproj-GLM-4.6V-Flash-Q8_0.gguf",
         "mmproj-GLM-4.6V-Flash-F16.gguf", "README.md"]


def test_choose_by_quant_and_preferred_projector():
    assert choose_files(FILES, "q4_k_m", None, "repo", prefer=("Q8_0", "F16")) == (
        "GLM-4.6V-Flash-Q4_K_M.gguf", "mmproj-GLM-4.6V-Flash-Q8_0.gguf")
    assert choose_files(FILES, "q4_k_m", None, "repo", prefer=("F16", "Q8_0"))[1] == "mmproj-GLM-4.6V-Flash-F16.gguf"
    # an explicit mmproj= wins over any preference
    assert choose_files(FILES, "Q8_0", "mmproj-GLM-4.6V-Flash-F16.gguf", "repo", prefer=("Q8_0",))[1] == (
        "mmproj-GLM-4.6V-Flash-F16.gguf")


@pytest.mark.parametrize("features, expected", [
    (frozenset({"AVX2", "F16C", "FMA"}), "mmproj-GLM-4.6V-Flash-F16.gguf"),
    (frozenset({"AVX2", "AVX512", "AVX512_BF16"}), "mmproj-GLM-4.6V-Flash-BF16.gguf"),
])
def test_default_projector_follows_the_cpu(monkeypatch, features, expected):
    import glm4v_mtmd._cpu as cpu

    monkeypatch.setattr(cpu, "cpu_features", lambda: features)
    files = FILES + ["mmproj-GLM-4.6V-Flash-BF16.gguf"]
    assert choose_files(files, "q4_k_m", None, "repo")[1] == expected
    # without the preferred float type, F16 machines take Q8_0 before BF16; BF16 machines F16 first
    rest = [f for f in files if f != expected]
    second = "mmproj-GLM-4.6V-Flash-Q8_0.gguf" if expected.endswith("-F16.gguf") else "mmproj-GLM-4.6V-Flash-F16.gguf"
    assert choose_files(rest, "q4_k_m", None, "repo")[1] == second


def test_missing_quant_lists_the_available_files():
    with pytest.raises(ModelLoadError, match=r"Q5_K_M.*available: GLM-4.6V-Flash-Q4_K_M.gguf"):
        choose_files(FILES, "Q5_K_M", None, "repo")


def test_missing_projector_is_explained():
    with pytest.raises(ModelLoadError, match="mmproj"):
        choose_files(FILES[:2], "Q8_0", None, "repo")


def _hub_cache(root, repo, files):
    """The on-disk layout huggingface_hub itself writes: blobs, a snapshot of symlinks, refs/main."""
    base = root / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "blobs").mkdir()
    for name, src in files.items():
        blob = base / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
        shutil.copy(src, blob)
        (snap / name).symlink_to(blob)
    return root


def test_from_pretrained_resolves_a_local_hub_cache(gguf_pair, tmp_path, monkeypatch):
    model, mmproj = gguf_pair("glm4v", 0, "f32")
    cache = _hub_cache(tmp_path / "hub", "someone/Tiny-GGUF",
                       {"Tiny-F32.gguf": model, "mmproj-Tiny-F32.gguf": mmproj})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with Session.from_pretrained("someone/Tiny-GGUF", quant="F32", cache_dir=cache, local_files_only=True,
                                 n_ctx=256, n_threads=1) as s:
        assert s.model_path.endswith("Tiny-F32.gguf") and s.mmproj_path.endswith("mmproj-Tiny-F32.gguf")
        assert s.tokenize("[gMASK]", special=True)


def test_from_pretrained_local_directory(gguf_pair):
    model, _ = gguf_pair("glm4v", 0, "f32")
    with Session.from_pretrained(model.parent, quant="F32", n_ctx=256, n_threads=1) as s:
        assert s.architecture == "glm4"


def test_from_pretrained_unknown_repo_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not resolve"):
        Session.from_pretrained("nobody/Nothing-GGUF", cache_dir=tmp_path, local_files_only=True)
