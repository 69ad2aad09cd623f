"""Offline self-check: a tiny random GLM4V model through the whole pipeline.

Writes a random checkpoint with numpy, converts it with the package's converter, loads it in the
engine, encodes the bundled sample image, evaluates a prompt and generates, checking the
invariants the package guarantees (prompt layout, M-RoPE positions, streaming = generate).
"""

from __future__ import annotations

import pathlib
import tempfile
import time
from collections.abc import Callable
from typing import Optional

import numpy as np

SAMPLE_IMAGE = pathlib.Path(__file__).resolve().parent / "data" / "sample.jpg"


def sample_image() -> pathlib.Path:
    """Path of the sample picture shipped with the package."""
    return SAMPLE_IMAGE


def run_selfcheck(workdir: Optional[str] = None, report: Callable[[str], None] = print) -> bool:
    """Run the self-check; ``report`` receives one line per step. Returns True when all passed."""
    from . import GenerationConfig, Session, engine_info
    from .convert import convert
    from .random_checkpoint import write_random_checkpoint

    with tempfile.TemporaryDirectory(prefix="glm4v-selfcheck-", dir=workdir) as tmp:
        t0 = time.perf_counter()
        report(f"engine: {engine_info()['engine_commit'][:12]} backends={','.join(engine_info()['backends'])}")
        hf = write_random_checkpoint(pathlib.Path(tmp) / "tiny-glm4v")
        model, mmproj = convert(hf, pathlib.Path(tmp) / "gguf", outtype="f16", progress=False)
        report(f"converted a random checkpoint: {model.name}, {mmproj.name}")
        greedy = GenerationConfig(max_tokens=16, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
        with Session(model, mmproj, n_ctx=2048) as session:
            emb = session.encode_image(SAMPLE_IMAGE)
            report(f"encoded {SAMPLE_IMAGE.name} {emb.original_size} -> {emb.resized_size}, grid {emb.grid}")
            prompt = ["[gMASK]<sop><|user|>\n", emb, "Describe this image.<|assistant|>\n"]
            ev = session.evaluate(prompt)
            n_img = int(np.sum(ev.tokens == session.image_token_ids.image))
            positions_ok = _image_positions_ok(ev.positions, ev.tokens, session.image_token_ids.image, emb.grid)
            checks = {
                "one <|image|> id per image token": n_img == emb.n_tokens,
                "image rows/cols positions": positions_ok,
                "finite logits": bool(np.isfinite(ev.logits).all()),
            }
            out = session.generate(prompt, greedy)
            streamed = list(session.stream(prompt, greedy))
            checks["16 tokens generated"] = len(out.token_ids) == 16
            checks["stream equals generate"] = tuple(t for c in streamed for t in c.token_ids) == out.token_ids
            checks["follow-up reuses the cache"] = session.evaluate(prompt[:2] + ["Again.<|assistant|>\n"]).reused > 0
        for name, ok in checks.items():
            report(f"{'ok ' if ok else 'FAIL'} {name}")
        report(f"self-check {'passed' if all(checks.values()) else 'FAILED'} in {time.perf_counter() - t0:.1f} s")
        return all(checks.values())


def _image_positions_ok(pos: np.ndarray, tokens: np.ndarray, image_token: int, grid: tuple[int, int]) -> bool:
    idx = np.flatnonzero(tokens == image_token)
    st = pos[idx[0], 0]
    rows, cols = np.divmod(np.arange(len(idx)), grid[1])
    expected = np.stack([np.full(len(idx), st), st + rows, st + cols], axis=1)
    after = pos[idx[-1] + 1, 0]  # <|end_of_image|> continues at st + max(rows, cols)
    return bool(np.array_equal(pos[idx], expected) and after == st + max(grid))
