"""K-quants through the engine's own quantizer: one convert() call from HF to a loadable pair."""

from __future__ import annotations

import gguf
import pytest

from glm4v_mtmd import GenerationConfig, Session
from glm4v_mtmd.convert import convert
from glm4v_mtmd.errors import ConversionError
from glm4v_mtmd.random_checkpoint import RandomModelShape, write_random_checkpoint

# 256-wide rows, so the K-quant block size (256) applies to most tensors instead of a fallback type.
SHAPE = RandomModelShape(text_hidden=256, text_layers=2, text_heads=4, text_kv_heads=2, text_ffn=512,
                         vision_hidden=64, vision_depth=1, vision_heads=4, merger_ffn=256)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", SHAPE)


def _types(path):
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_q4_k_m_pair_loads_and_generates(checkpoint, tmp_path):
    model, mmproj = convert(checkpoint, tmp_path, outtype="q4_k_m", progress=False)
    assert model.name == "tiny-Q4_K_M.gguf" and mmproj.name == "mmproj-tiny-F16.gguf"
    types = _types(model)
    assert "Q4_K" in types.values()
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([model.name, mmproj.name])  # no temporaries left
    image = (255 * (gguf.np.arange(84 * 112 * 3) % 7 == 0)).astype("uint8").reshape(84, 112, 3)
    with Session(model, mmproj, n_ctx=512, n_threads=2) as s:
        out = s.generate(["[gMASK]<sop><|user|>\n", image, "Describe.<|assistant|>\n"],
                         GenerationConfig(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


@pytest.mark.parametrize("outtype, qtype", [("q6_k", "Q6_K"), ("q5_k_m", "Q5_K")])
def test_other_k_quants_use_their_type(checkpoint, tmp_path, outtype, qtype):
    model, _ = convert(checkpoint, tmp_path, outtype=outtype, progress=False)
    assert qtype in _types(model).values()


def test_unknown_outtype_names_the_valid_ones(checkpoint, tmp_path):
    with pytest.raises(ConversionError, match="q4_k_m"):
        convert(checkpoint, tmp_path, outtype="q4_k_z", progress=False)
    assert list(tmp_path.iterdir()) == []
