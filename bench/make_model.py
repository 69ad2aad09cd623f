"""Build the benchmark model: a seeded random GLM-4.1V checkpoint, converted to GGUF.

The vision tower is GLM-4.1V's (depth 24, hidden 1536, 12 heads, patch 14, merger FFN 13696 as
in the released model). transformers ties two of its widths to the text model's hidden size
(``out_hidden_size``: the blocks' MLP width and the merger's output), so only ``--preset 9b``
has the real encode cost; with a 2048-wide text model it is about 2/3 of it. The text model keeps
GLM-4's shape ratios (head dim 128, 2 KV heads, FFN = 3.34 x hidden) at a size
picked by ``--preset``:

- ``quick``: hidden 2048, 4 layers (~0.2 B text parameters) - for ``run.py --quick``;
- ``1b``:    hidden 2048, 20 layers (~1.0 B text parameters) - the default full run;
- ``9b``:    hidden 4096, 40 layers - GLM-4.1V-9B's real text shape (needs ~40 GB of disk);
- ``first-image``: hidden 4096, 5 layers of the 9B shape (~1 B text parameters) - for
  ``first_image.py``: the real encode cost and the real per-layer prefill cost.

The vocabulary is the random checkpoint's tiny byte-level one (a few hundred tokens), so the
output projection costs almost nothing; the real model's 151k-token head adds ~0.6 GFLOP/token.

Weights are written with numpy (no torch) by :mod:`glm4v_mtmd.random_checkpoint`, then converted
by the package's own converter. Usage::

    python bench/make_model.py --preset quick --out ~/.cache/glm4v-mtmd/bench/models --outtype q4_k_m f16
"""

from __future__ import annotations

import argparse
import json
import pathlib
from dataclasses import dataclass

from glm4v_mtmd.convert import FLOAT_OUTTYPES, convert
from glm4v_mtmd.random_checkpoint import RandomModelShape, write_random_checkpoint

# GLM-4.1V's chat format for one user turn (what llama-mtmd-cli needs to build its prompt; the
# random checkpoint ships no template). Matches the prompt run.py gives Session.generate.
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TextShape:
    """Text-model dimensions with GLM-4's ratios."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int = 2
    ffn: int = 0

    def ffn_size(self) -> int:
        """GLM-4's FFN width: 13696 / 4096 of the hidden size, rounded to a multiple of 64."""
        return self.ffn or round(self.hidden * 13696 / 4096 / 64) * 64


PRESETS: dict[str, TextShape] = {
    "quick": TextShape(hidden=2048, layers=4, heads=16),
    "1b": TextShape(hidden=2048, layers=20, heads=16),
    "9b": TextShape(hidden=4096, layers=40, heads=32, ffn=13696),
    "first-image": TextShape(hidden=4096, layers=5, heads=32, ffn=13696),
}


def model_shape(text: TextShape) -> RandomModelShape:
    """The checkpoint shape: real GLM-4.1V vision tower + ``text``."""
    return RandomModelShape.real_vision(
        text_hidden=text.hidden, text_layers=text.layers, text_heads=text.heads,
        text_kv_heads=text.kv_heads, text_ffn=text.ffn_size(),
    )


def text_parameters(text: TextShape) -> int:
    """Parameters of the text decoder layers (embeddings and head excluded: the vocab is tiny)."""
    head_dim = text.hidden // text.heads
    attn = 2 * text.hidden * text.hidden + 2 * text.hidden * text.kv_heads * head_dim
    return text.layers * (attn + 3 * text.hidden * text.ffn_size())


def build(preset: str, out: pathlib.Path, outtypes: list[str], seed: int = 0) -> dict[str, list[str]]:
    """Write the checkpoint (once) and convert it to each of ``outtypes``; returns the GGUF paths."""
    hf_dir = out / f"glm4v-bench-{preset}"
    if not (hf_dir / "config.json").exists():
        write_random_checkpoint(hf_dir, model_shape(PRESETS[preset]), seed=seed, dtype="bfloat16")
        (hf_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    files: dict[str, list[str]] = {"hf_dir": [str(hf_dir)]}
    for outtype in outtypes:
        model = out / "gguf" / f"{hf_dir.name}-{outtype.upper()}.gguf"
        mmtype = outtype if outtype in FLOAT_OUTTYPES else "f16"  # as convert() picks it
        mmproj = out / "gguf" / f"mmproj-{hf_dir.name}-{mmtype.upper()}.gguf"
        if not (model.exists() and mmproj.exists()):
            model, mmproj = convert(hf_dir, out / "gguf", outtype=outtype, progress=False)
        files[outtype] = [str(model), str(mmproj)]
    return files


def main() -> None:
    """Command-line entry point; prints the GGUF paths as JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    default_out = pathlib.Path.home() / ".cache" / "glm4v-mtmd" / "bench" / "models"
    ap.add_argument("--out", type=pathlib.Path, default=default_out)
    ap.add_argument("--outtype", nargs="+", default=["q4_k_m", "f16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    files = build(args.preset, args.out, args.outtype, args.seed)
    print(json.dumps({"preset": args.preset, "text_parameters": text_parameters(PRESETS[args.preset]), **files},
                     indent=1))


if __name__ == "__main__":
    main()
