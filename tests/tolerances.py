"""Numerical tolerances of the parity tests, stated once with the reason for each.

Exact mode: F32 weights, F32 KV cache, flash attention off. The one rounding left is ggml's F16
im2col in the two convolutions (patch embedding, downsample), which the reference mirrors by rounding
the conv inputs and kernels to F16 (tests/reference.py: f16_convolutions). What remains is float32
summation order, ~1e-6 relative per op.
"""

# Image embeddings, relative L2 error, exact mode (issue bound; measured ~1e-5 .. 1e-4).
EMBED_REL_L2 = 1e-4
# Last-position logits, max absolute difference, exact mode (issue bound; measured ~3e-4).
LOGITS_MAX_ABS = 1e-3

# Exact mode, one prompt evaluated in other batches (batch size, text and images in shared or separate batches,
# part of it reused from the cache): float32 summation order only (measured 1.2e-6 on the tiny models' logits).
REBATCHED_LOGITS_MAX_ABS = 1e-4

# Default mode: F16 weights (GGUF outtype f16), F16 KV cache, flash attention chosen by the engine.
# Every weight and every cached K/V is rounded to F16 (relative step 2**-11 ~ 4.9e-4); through two
# vision blocks, the merger and two text layers with std-0.2 random weights this compounds to
# 2.5e-3 .. 4.6e-3 relative in the embeddings and 1.1e-2 .. 7.1e-2 absolute in logits of magnitude
# ~5 (measured over both architectures, 3 seeds, the prompts of test_parity.py). The bounds leave
# about 2x headroom over those measurements.
EMBED_REL_L2_F16 = 1e-2
LOGITS_MAX_ABS_F16 = 1.5e-1

# MoE routing (glm4v_moe): rounding the tiny model's weights to F16 moves its router scores (sigmoid, in [0, 1])
# by up to 3.1e-3 (measured in the reference on test_engine_patches.py's prompts). A token whose last chosen and
# best unchosen expert are closer than twice that may go to the other expert in the engine - admissible, but
# it moves the logits by O(1) (seen: a margin of 2.8e-4 flipped, max |logit difference| 1.15). Prompts whose
# MoE logits are compared against the reference must clear this margin (reference.last_logits_and_router_margin).
ROUTER_MARGIN_MIN = 2 * 3.1e-3

# BF16 mode (GGUF outtype bf16, what preferred_float_type() picks on CPUs with AVX512_BF16): weights and the
# activations fed to BF16 matmuls are rounded to BF16 (relative step 2**-8 ~ 3.9e-3, 8x F16's). Measured on the
# tiny models, seed 0, a 320-patch image and a 188-token prompt, with the engine's tinyBLAS and with patch 0004's
# packed kernel: embeddings 8.0e-3 .. 1.24e-2 relative, logits 0.073 .. 0.155 absolute. About 2x headroom. Only
# the dense architecture's logits are compared: BF16 rounding moves the MoE router's scores past its margins.
EMBED_REL_L2_BF16 = 2.5e-2
LOGITS_MAX_ABS_BF16 = 3e-1


# Greedy ids may differ only at a step where the reference's top-1 margin is below twice the logit
# tolerance (there a different argmax is within the stated numerical error, not a bug).
def margin_needed(logits_tolerance: float) -> float:
    """Smallest top-1 margin at which the argmax is decided beyond numerical error."""
    return 2.0 * logits_tolerance

# AMX paths (engine patches 0009-0014) against the same build's other kernels (GGML_CPU_AMX_BF16=0), on a tiny
# model with head size 32 and flash attention on. F32 weights: only the attention differs; its operands are split
# into BF16 pairs (16 significant bits, F16 K/V exact), ~1e-5 relative per score of |q||k|, which the tiny model's
# large random scores (std-0.2 weights) turn into 1.9e-4 .. 2.1e-4 in embeddings and 2.1e-3 .. 2.4e-3 in logits
# (measured; against transformers both kernels are 1.04e-3 off, from the F16 K/V both round to). About 2x headroom.
# BF16 weights are not compared kernel to kernel: there the vision attention's K/V are BF16 (patch 0011) and the
# tiles also round Q and the softmax weights to BF16, which the F32 kernel does not; each is held to the BF16
# bounds above against transformers float32 instead. That model's embeddings: 1.90e-2 / 2.05e-2 (AMX), 1.85e-2 /
# 2.10e-2 (no AMX), 1.75e-2 / 1.93e-2 before 0011 (F16 K/V); logits 0.207 (AMX), 0.230 (no AMX). It sits closer
# to the bounds than the tiny models they were measured on (their 8.1e-3 .. 1.24e-2 and 0.068 are unchanged by
# 0011): its scores are larger. transformers bfloat16 itself is 3.88e-2 / 4.32e-2 off on the same images.
AMX_EMBED_REL_L2 = 5e-4
AMX_LOGITS_MAX_ABS = 5e-3
