"""Torch-free Hugging Face -> GGUF converter for GLM-4.xV checkpoints.

``convert(hf_dir, outdir, outtype="f16")`` turns a ``glm4v`` (GLM-4.1V-9B-Thinking,
GLM-4.6V-Flash) or ``glm4v_moe`` (GLM-4.5V, GLM-4.6V) checkpoint into the two files the engine
loads: ``<name>-<TYPE>.gguf`` (architecture ``glm4`` / ``glm4moe``) and
``mmproj-<name>-<TYPE>.gguf`` (``clip``, projector type ``glm4v``). It needs only numpy, gguf
and the standard library (tqdm optional, for the progress bar).

For ``f32``/``f16``/``bf16``/``q8_0`` the output is the same as llama.cpp's own
``convert_hf_to_gguf.py`` at the pinned engine version (``... HF_DIR --outtype T`` and
``... --mmproj``): same metadata keys, types, values and order, same tensor names, order,
types, shapes and bytes, hence byte-identical files apart from the file names. That includes:
the Q/K normal->NeoX permutation (glm4v text only), the Conv3d patch-embedding split into
``v.patch_embd.weight`` / ``v.patch_embd.weight.1``, MoE expert stacking, the per-tensor types
(1-D tensors, ``*_norm.weight``, biases, ``ffn_gate_inp``, ``exp_probs_b`` and
``v.position_embd`` stay F32; ``v.patch_embd.*`` and ``mm.patch_merger.weight`` are F16 in an
f16 file and F32 otherwise; Q8_0 falls back to F16 for rows not divisible by 32), the ``glm4``
pre-tokenizer, token types, merges, special token ids (glm4v: eos/unk/bos ``<|endoftext|>``,
eot ``<|user|>``; glm4v_moe: bos ``[gMASK]``, eot ``<|user|>``, unk ``<|endoftext|>``, eom
``<|observation|>``; eos/pad from the tokenizer config first), the chat template, and the
authorship/sampling metadata (``general.name``, ``size_label``, model-card fields,
``general.sampling.*`` from ``generation_config.json``).

Engine quantization types (``q4_k_m``, ``q5_k_m``, ``q6_k``, ...; see :data:`ENGINE_OUTTYPES`):
the text model is first written as a 16-bit GGUF (BF16 for a BF16 checkpoint, lossless; F16
otherwise; the choice ``--outtype auto`` of the reference makes) to a temporary file, which is
then passed to ``quantizer(src_path, dst_path, "Q4_K_M", n_threads)`` (default: the engine's
``glm4v_mtmd._native.quantize_model``; :class:`ConversionError` when unavailable). The mmproj of
such a run is F16 unless ``mmproj_outtype`` says otherwise (vision towers are small and
sensitive to quantization, and the engine's quantizer does not handle clip files).

Streaming: safetensors headers are read first to plan every output tensor (name, shape, type,
byte size) without touching data; the data pass then reads, converts and writes one chunk of
rows (<= 16 MiB of float32) of one tensor at a time, and stacks MoE experts by writing each
expert's slice in turn, so memory stays around one chunk (one whole tensor for the few
transforms that mix rows: Q/K permutation, patch-embedding split), whatever the model size.

Errors: bad input raises :class:`glm4v_mtmd.errors.ConversionError` naming the file and the
problem before anything is written where possible; outputs are written under temporary names
in ``outdir`` and renamed only when both files are complete, and every temporary is removed on
failure (including KeyboardInterrupt).

Deliberate differences from the reference converter:

* File names: ``<dir name>-<TYPE>.gguf`` / ``mmproj-<dir name>-<TYPE>.gguf`` (e.g.
  ``GLM-4.6V-Flash-Q4_K_M.gguf``, as the published GGUFs are named) instead of the reference's
  ``gguf.naming_convention`` (title-cased name plus size label, e.g. ``Ck_Glm4V-105K-F16.gguf``
  and ``mmproj-Ck_Glm4V-F16.gguf`` for a directory ``ck_glm4v``). ``general.name`` and the
  other metadata are unchanged.
* No transformers: the config defaults and RoPE normalisation of transformers 5's GLM-4.xV
  config classes are reproduced in ``_config.py``; the tokenizer is read from
  ``tokenizer.json`` (non-normalized added tokens are taken verbatim instead of being
  round-tripped through ``decode(encode())``, an identity for GLM's added tokens); the
  pre-tokenizer is written as ``glm4`` without the reference's hash check; ``config.json`` must
  contain ``text_config`` and ``vision_config`` (transformers would silently use defaults).
* Authorship metadata comes from the installed gguf package's ``gguf.Metadata`` (the pinned
  tree's copy additionally maps ``repetition_penalty``, which is patched in here); an
  unreadable model card is ignored with a warning instead of aborting.
* Several named chat templates (``additional_chat_templates/``): ``tokenizer.chat_templates``
  lists them in file order; the reference's order is that of a Python set (arbitrary).
* ``image_mean``/``image_std`` are always written as float arrays.
* Only safetensors checkpoints in BF16/F16/F32 (FP8/FP4-quantized checkpoints, PyTorch
  ``.bin`` files, ``--remote``, split outputs, big-endian output and the ``tq1_0``/``tq2_0``
  types are not supported); expert tensors must be stored per expert (as published).
* Extra validation: tensor shapes are checked against the config, and an unmappable tensor,
  incomplete experts, a truncated shard or an inconsistent index raise ConversionError.
"""

from ._convert import ALL_OUTTYPES, ENGINE_OUTTYPES, FLOAT_OUTTYPES, QuantizeFn, convert

__all__ = ["convert", "ALL_OUTTYPES", "ENGINE_OUTTYPES", "FLOAT_OUTTYPES", "QuantizeFn"]
