"""The offline self-check and its torch-free random checkpoint."""

from __future__ import annotations

import numpy as np

from glm4v_mtmd.random_checkpoint import RandomModelShape, write_random_checkpoint
from glm4v_mtmd.selfcheck import run_selfcheck, sample_image


def test_selfcheck_passes_offline(tmp_path):
    lines: list[str] = []
    assert run_selfcheck(str(tmp_path), report=lines.append), "\n".join(lines)
    assert lines[-1].startswith("self-check passed")


def test_sample_image_is_shipped():
    from PIL import Image

    with Image.open(sample_image()) as im:
        assert im.size == (640, 448)


def test_random_checkpoint_loads_in_transformers_without_missing_keys(tmp_path):
    import torch
    from transformers import Glm4vForConditionalGeneration

    path = write_random_checkpoint(tmp_path, RandomModelShape(), dtype="float32")
    model, info = Glm4vForConditionalGeneration.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert np.isfinite(model.lm_head.weight.detach().numpy()).all()


def test_random_checkpoint_bf16_shards_are_readable(tmp_path):
    from safetensors import safe_open

    path = write_random_checkpoint(tmp_path, RandomModelShape(), max_shard_bytes=64 << 10)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").is_file()
    with safe_open(str(shards[0]), "pt") as f:
        name = next(iter(f.keys()))
        assert str(f.get_tensor(name).dtype) in ("torch.bfloat16", "torch.float32")
