"""Tiny random GLM-4.xV checkpoints for tests.

Builds, in a few seconds and fully deterministically, a Hugging Face checkpoint directory that looks like a
real GLM-4.1V (``glm4v``) or GLM-4.5V (``glm4v_moe``) release: ``config.json`` + ``model.safetensors`` written
by transformers' ``save_pretrained``, a byte-level BPE ``tokenizer.json`` with the GLM-4 pre-tokenizer and the
GLM added tokens in their real order, ``tokenizer_config.json`` / ``chat_template.jinja`` with the real chat
template, ``generation_config.json`` and ``preprocessor_config.json``.

This module has no pytest dependency; torch / transformers / tokenizers are imported lazily inside functions
so that importing it is cheap.
"""

from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass
from typing import Any

MODEL_KINDS = ("glm4v", "glm4v_moe")

# ------------------------------------------------------------------------------------------------------------
# Tokenizer facts
# ------------------------------------------------------------------------------------------------------------

# GLM-4 pre-tokenizer split pattern, as in the GLM-4 tokenizer.json (Split, behavior Isolated) and as
# llama.cpp's `glm4` pre-tokenizer (LLAMA_VOCAB_PRE_TYPE_CHATGLM4, src/llama-vocab.cpp) implements it.
GLM4_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# Added tokens in vocabulary order, with their `special` flag.  GLM-4.1V order as given for this project
# (image 151343, video 151344 in the real vocab, i.e. offsets 14/15 after <|endoftext|>).  The tokens up to
# <|end_of_transcription|> are special; the later ones are plain added tokens, as in the GLM-4.5 family
# tokenizer_config (only the first 18 are special there).  llama.cpp's converter still types every `<|...|>`
# token as CONTROL (`does_token_look_special`), so only /nothink, <think>, </think>, <answer>, </answer> end
# up USER_DEFINED.
GLM41V_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("[MASK]", True),
    ("[gMASK]", True),
    ("[sMASK]", True),
    ("<sop>", True),
    ("<eop>", True),
    ("<|system|>", True),
    ("<|user|>", True),
    ("<|assistant|>", True),
    ("<|observation|>", True),
    ("<|begin_of_image|>", True),
    ("<|end_of_image|>", True),
    ("<|begin_of_video|>", True),
    ("<|end_of_video|>", True),
    ("<|image|>", True),
    ("<|video|>", True),
    ("<|begin_of_audio|>", True),
    ("<|end_of_audio|>", True),
    ("<|begin_of_transcription|>", True),
    ("<|end_of_transcription|>", True),
    ("<|code_prefix|>", False),
    ("<|code_middle|>", False),
    ("<|code_suffix|>", False),
    ("/nothink", False),
    ("<think>", False),
    ("</think>", False),
    ("<answer>", False),
    ("</answer>", False),
    ("<|begin_of_box|>", False),
    ("<|end_of_box|>", False),
)

# GLM-4.5V / 4.6V order (GLM-4.5 text vocabulary): <|image|> / <|video|> come last (151363 / 151364 in the
# real vocab, offsets 34/35), which catches code that hard-codes the GLM-4.1V ids.  First 18 special, as in
# the real config.
_GLM45V_NAMES = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
    "<|end_of_video|>", "<|begin_of_audio|>", "<|end_of_audio|>", "<|begin_of_transcription|>",
    "<|end_of_transcription|>", "<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>", "<think>",
    "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<arg_key>",
    "</arg_key>", "<arg_value>", "</arg_value>", "/nothink", "<|begin_of_box|>", "<|end_of_box|>",
    "<|image|>", "<|video|>",
)
GLM45V_ADDED_TOKENS: tuple[tuple[str, bool], ...] = tuple((t, i < 18) for i, t in enumerate(_GLM45V_NAMES))

# Stop tokens of every GLM-4.xV generation_config.json.
EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")

# GLM-4.1V-9B-Thinking chat template, verbatim (its sha256 of json.dumps(template) is
# 5232dbe7ee947df4d2009f2b262b70a22d4f2d2f0590e2af4ef2a78096171e90, as recorded from the official
# tokenizer_config).
GLM41V_CHAT_TEMPLATE = (
    "[gMASK]<sop>\n{%- for msg in messages %}\n    {%- if msg.role == 'system' %}\n"
    "<|system|>\n{{ msg.content }}\n    {%- elif msg.role == 'user' %}\n"
    "<|user|>{{ '\\n' }}\n\n        {%- if msg.content is string %}\n"
    "{{ msg.content }}\n        {%- else %}\n            {%- for item in msg.content %}\n"
    "                {%- if item.type == 'video' or 'video' in item %}\n"
    "<|begin_of_video|><|video|><|end_of_video|>\n"
    "                {%- elif item.type == 'image' or 'image' in item %}\n"
    "<|begin_of_image|><|image|><|end_of_image|>\n                {%- elif item.type == 'text' %}\n"
    "{{ item.text }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n    {%- elif msg.role == 'assistant' %}\n"
    "        {%- if msg.metadata %}\n<|assistant|>{{ msg.metadata }}\n"
    "{{ msg.content }}\n        {%- else %}\n<|assistant|>\n{{ msg.content }}\n"
    "        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{% if add_generation_prompt %}<|assistant|>\n"
    "{% endif %}"
)

# GLM-4.5V / 4.6V family template (the GLM-4.6V-style template with tools, /nothink and `<think></think>` for
# enable_thinking=False; taken from the GLM-OCR copy of it, not byte-verified against GLM-4.5V).
GLM45V_CHAT_TEMPLATE = """[gMASK]<sop>
{%- if tools -%}
<|system|>
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{% for tool in tools %}
{{ tool | tojson(ensure_ascii=False) }}
{% endfor %}
</tools>

For each function call, output the function name and arguments within the following XML format:
<tool_call>{function-name}
<arg_key>{arg-key-1}</arg_key>
<arg_value>{arg-value-1}</arg_value>
<arg_key>{arg-key-2}</arg_key>
<arg_value>{arg-value-2}</arg_value>
...
</tool_call>{%- endif -%}
{%- macro visible_text(content) -%}
    {%- if content is string -%}
        {{- content }}
    {%- elif content is iterable and content is not mapping -%}
        {%- for item in content -%}
            {%- if item is mapping and item.type == 'text' -%}
                {{- item.text }}
            {%- elif item is mapping and (item.type == 'image' or 'image' in item) -%}
                <|begin_of_image|><|image|><|end_of_image|>
            {%- elif item is mapping and (item.type == 'video' or 'video' in item) -%}
                <|begin_of_video|><|video|><|end_of_video|>
            {%- elif item is string -%}
                {{- item }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{- content }}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(last_user_index=-1) %}
{%- for m in messages %}
    {%- if m.role == 'user' %}
        {% set ns.last_user_index = loop.index0 -%}
    {%- endif %}
{%- endfor %}
{% for m in messages %}
{%- if m.role == 'user' -%}<|user|>
{% if m.content is string %}
{{ m.content }}
{%- else %}
{%- for item in m.content %}
{% if item.type == 'video' or 'video' in item %}
<|begin_of_video|><|video|><|end_of_video|>{% elif item.type == 'image' or 'image' in item %}
<|begin_of_image|><|image|><|end_of_image|>{% elif item.type == 'text' %}
{{ item.text }}
{%- endif %}
{%- endfor %}
{%- endif %}
{{- '/nothink' if (enable_thinking is defined and not enable_thinking and not visible_text(m.content).endswith("/nothink")) else '' -}}
{%- elif m.role == 'assistant' -%}
<|assistant|>
{%- set reasoning_content = '' %}
{%- set content = visible_text(m.content) %}
{%- if m.reasoning_content is string %}
    {%- set reasoning_content = m.reasoning_content %}
{%- else %}
    {%- if '</think>' in content %}
        {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
        {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
    {%- endif %}
{%- endif %}
{%- if loop.index0 > ns.last_user_index and reasoning_content -%}
{{ '\\n<think>' + reasoning_content.strip() +  '</think>'}}
{%- else -%}
{{ '\\n<think></think>' }}
{%- endif -%}
{%- if content.strip() -%}
{{ '\\n' + content.strip() }}
{%- endif -%}
{% if m.tool_calls %}
{% for tc in m.tool_calls %}
{%- if tc.function %}
    {%- set tc = tc.function %}
{%- endif %}
{{ '\\n<tool_call>' + tc.name }}
{% set _args = tc.arguments %}
{% for k, v in _args.items() %}
<arg_key>{{ k }}</arg_key>
<arg_value>{{ v | tojson(ensure_ascii=False) if v is not string else v }}</arg_value>
{% endfor %}
</tool_call>{% endfor %}
{% endif %}
{%- elif m.role == 'tool' -%}
{%- if m.content is string -%}
{%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
    {{- '<|observation|>' }}
{%- endif %}
{{- '\\n<tool_response>\\n' }}
{{- m.content }}
{{- '\\n</tool_response>' }}
{%- else -%}
<|observation|>{% for tr in m.content %}

<tool_response>
{{ tr.output if tr.output is defined else tr }}
</tool_response>{% endfor -%}
{% endif -%}
{%- elif m.role == 'system' -%}
<|system|>
{{ visible_text(m.content) }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|assistant|>
{{'<think></think>\\n' if (enable_thinking is defined and not enable_thinking) else ''}}
{%- endif -%}"""

# preprocessor_config.json of the real checkpoints (GLM-4.1V / 4.5V / 4.6V share it).
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "size": {"shortest_edge": 12544, "longest_edge": 9633792},
    "do_rescale": True,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Glm4vImageProcessor",
    "processor_class": "Glm4vProcessor",
}

# Small deterministic English training text for the BPE merges (the vocabulary only needs to be plausible).
_CORPUS = """\
The picture shows a small red house next to a tall green tree. A black cat sits on the wooden fence and
watches two birds in the blue sky. Describe the image in one sentence, then answer the question.
What colour is the car? The car is yellow, and it is parked in front of the old station at 10:45.
Please describe what you see. I see a white dog, three people, a bicycle and a bright window.
The text on the sign reads "OPEN 24 HOURS". Count the apples: there are 7 apples and 12 oranges.
Where is the ball? It's under the table, isn't it? We'll find out; they're looking for it now.
Give the bounding box of the person on the left, with coordinates between 0 and 1000.
The answer is [[120, 340, 560, 980]]. The model thinks first, then it writes the final answer.
In the morning the market is busy; in the evening the streets are quiet and the lights are warm.
A photo of a mountain lake with clear water, grey rocks and snow on the high peaks behind it.
Question: how many windows does the building have? Answer: the building has nine windows.
This is a test of the tokenizer: numbers 1, 22, 333, 4444 and 55555; symbols (a+b)*c = d / e!
Images, videos and text are all part of the conversation between the user and the assistant.
"""


@dataclass(frozen=True)
class TokenizerInfo:
    """What `make_tokenizer` wrote: the directory, the number of tokens and the added-token ids."""

    path: pathlib.Path
    n_tokens: int
    ids: dict[str, int]


def added_tokens_for(arch: str) -> tuple[tuple[str, bool], ...]:
    """The GLM added tokens (content, special) in vocabulary order for `arch` ("glm4v" or "glm4v_moe")."""
    _check_arch(arch)
    return GLM41V_ADDED_TOKENS if arch == "glm4v" else GLM45V_ADDED_TOKENS


def chat_template_for(arch: str) -> str:
    """The real chat template of the model family behind `arch`."""
    _check_arch(arch)
    return GLM41V_CHAT_TEMPLATE if arch == "glm4v" else GLM45V_CHAT_TEMPLATE


def _check_arch(arch: str) -> None:
    if arch not in MODEL_KINDS:
        raise ValueError(f"arch must be one of {MODEL_KINDS}, got {arch!r}")


# ------------------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------------------


def _train_bpe(base_vocab_size: int) -> Any:
    """Train the byte-level BPE (GLM-4 split regex + ByteLevel) on the built-in corpus (a `Tokenizer`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tok


def _add_glm_tokens(tok: Any, arch: str) -> None:
    """Append the GLM added tokens (never normalized, special flag as in the real tokenizer)."""
    from tokenizers import AddedToken

    for content, special in added_tokens_for(arch):
        tok.add_tokens([AddedToken(content, special=special, normalized=False, single_word=False,
                                   lstrip=False, rstrip=False)])


def _finalize_tokenizer_json(path: pathlib.Path) -> None:
    """Set `ignore_merges` so HF matches llama.cpp's `glm4` pre-tokenizer, which sets ignore_merges = true
    (a whole pre-token that is itself in the vocab is taken as one token without running the merges)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model"]["ignore_merges"] = True
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def _tokenizer_config(arch: str, ids: dict[str, int]) -> dict[str, Any]:
    """tokenizer_config.json shaped like the real GLM-4.xV one (no BOS, eos/pad <|endoftext|>, pad left)."""
    decoder = {
        str(ids[content]): {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special,
        }
        for content, special in added_tokens_for(arch)
    }
    return {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [c for c, special in added_tokens_for(arch) if special][1:],
        "chat_template": chat_template_for(arch),
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": 65536,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_preprocessor_config(out_dir: str | pathlib.Path) -> pathlib.Path:
    """Write the real checkpoints' preprocessor_config.json (Glm4vImageProcessor, 14 px patches, merge 2)."""
    path = pathlib.Path(out_dir) / "preprocessor_config.json"
    path.write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n", encoding="utf-8")
    return path


def make_tokenizer(
    out_dir: str | pathlib.Path, arch: str = "glm4v", base_vocab_size: int = 512
) -> TokenizerInfo:
    """Write tokenizer.json, tokenizer_config.json, chat_template.jinja and preprocessor_config.json to
    `out_dir`.

    The BPE has `base_vocab_size` byte-level tokens (256 bytes + merges) followed by the GLM added tokens of
    `arch` (GLM-4.1V order for "glm4v", GLM-4.5V order for "glm4v_moe").  Deterministic: same files on every
    run.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_bpe(base_vocab_size)
    _add_glm_tokens(tok, arch)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    _finalize_tokenizer_json(out / "tokenizer.json")
    ids = {content: tok.token_to_id(content) for content, _ in added_tokens_for(arch)}
    config = _tokenizer_config(arch, ids)
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                encoding="utf-8")
    (out / "chat_template.jinja").write_text(chat_template_for(arch), encoding="utf-8")
    write_preprocessor_config(out)
    return TokenizerInfo(path=out, n_tokens=tok.get_vocab_size(with_added_tokens=True), ids=ids)


# ------------------------------------------------------------------------------------------------------------
# Model configs
# ------------------------------------------------------------------------------------------------------------

_TEXT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 65536,
    "rms_norm_eps": 1e-5,
    "attention_bias": True,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
}
_ROPE_THETA = 10000.0
_PARTIAL_ROTARY_FACTOR = 0.5

_MOE_TEXT_DEFAULTS: dict[str, Any] = {
    "moe_intermediate_size": 32,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 1.0,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
}

_VISION_DEFAULTS: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 64,
    "num_heads": 4,  # head_dim 16: the 2-D vision rope needs head_dim % 4 == 0
    # Merger FFN width (context_dim); the ViT block MLP width is out_hidden_size in transformers'
    # Glm4VisionMlp.
    "intermediate_size": 96,
    "image_size": 56,  # 4x4 learned position grid: every test image (>= 6x6 patches) exercises the resampling
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "in_channels": 3,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
}

_TEXT_EXTRA_KEYS = ("vocab_size", "head_dim", "rope_parameters", "eos_token_id", "pad_token_id")
_SAVE_KEYS = ("max_shard_size",)
_INIT_KEYS = ("init_std",)


def _padded_vocab(n_tokens: int, multiple: int = 64) -> int:
    """Round the vocab up like the real checkpoints (151552 rows for ~151365 tokens): exercises [PAD] rows."""
    return int(math.ceil(n_tokens / multiple) * multiple)


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict, dict, dict, dict]:
    """Route `make_checkpoint` overrides: text keys, `vision_*` keys, save/init options and top-level keys."""
    text_o, vision_o, top_o, misc = {}, {}, {}, {}
    for key, value in overrides.items():
        if key in _SAVE_KEYS or key in _INIT_KEYS or key == "config_style":
            misc[key] = value
        elif key == "text_config":
            text_o.update(value)
        elif key == "vision_config":
            vision_o.update(value)
        elif key.startswith("vision_"):
            vision_o[key[len("vision_"):]] = value
        elif key in _TEXT_DEFAULTS or key in _MOE_TEXT_DEFAULTS or key in _TEXT_EXTRA_KEYS:
            text_o[key] = value
        else:
            top_o[key] = value
    return text_o, vision_o, top_o, misc


def _mrope_section(head_dim: int, partial_rotary_factor: float) -> list[int]:
    """(temporal, height, width) frequency counts summing to rotary_dim / 2, in the real 8:12:12 proportion
    ([2, 1, 1] for head_dim 16, [8, 12, 12] for head_dim 128)."""
    n = int(head_dim * partial_rotary_factor) // 2
    spatial = 3 * n // 8
    return [n - 2 * spatial, spatial, spatial]


def _text_config(arch: str, tok: TokenizerInfo, text_o: dict[str, Any]) -> dict[str, Any]:
    """Text config: defaults, token ids from the tokenizer, overrides; head_dim and mrope_section follow
    hidden_size / num_attention_heads unless given (transformers' Glm4vTextAttention always uses
    hidden_size // num_heads, so a stale head_dim would make llama.cpp's key_length wrong)."""
    text = dict(_TEXT_DEFAULTS)
    if arch == "glm4v_moe":
        text.update(_MOE_TEXT_DEFAULTS)
    text.update(
        vocab_size=_padded_vocab(tok.n_tokens),
        eos_token_id=[tok.ids[t] for t in EOS_TOKENS],
        pad_token_id=tok.ids["<|endoftext|>"],
    )
    text.update(text_o)
    text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    text.setdefault("rope_parameters", {
        "rope_type": "default",
        "rope_theta": _ROPE_THETA,
        "partial_rotary_factor": _PARTIAL_ROTARY_FACTOR,
        "mrope_section": _mrope_section(text["head_dim"], _PARTIAL_ROTARY_FACTOR),
    })
    return text


def _token_id_config(ids: dict[str, int]) -> dict[str, Any]:
    """Top-level multimodal token ids (Glm4vConfig / Glm4vMoeConfig fields) taken from the tokenizer."""
    return {
        "image_token_id": ids["<|image|>"],
        "video_token_id": ids["<|video|>"],
        "image_start_token_id": ids["<|begin_of_image|>"],
        "image_end_token_id": ids["<|end_of_image|>"],
        "video_start_token_id": ids["<|begin_of_video|>"],
        "video_end_token_id": ids["<|end_of_video|>"],
    }


def build_config(arch: str, tok: TokenizerInfo, **overrides: Any) -> tuple[Any, dict[str, Any]]:
    """The transformers config for a tiny `arch` model; returns (config, leftover save/init options)."""
    from transformers import Glm4vConfig, Glm4vMoeConfig

    _check_arch(arch)
    text_o, vision_o, top_o, misc = _split_overrides(overrides)
    text = _text_config(arch, tok, text_o)
    vision = {**_VISION_DEFAULTS, "out_hidden_size": text["hidden_size"], **vision_o}
    cls = Glm4vConfig if arch == "glm4v" else Glm4vMoeConfig
    config = cls(text_config=text, vision_config=vision, **{**_token_id_config(tok.ids), **top_o})
    return config, misc


# ------------------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------------------


def _is_norm_weight(name: str, tensor: Any) -> bool:
    return tensor.ndim == 1 and name.endswith(".weight") and ("norm" in name)


def init_weights(model: Any, seed: int, std: float = 0.2) -> None:
    """Overwrite every parameter (and the MoE `e_score_correction_bias` buffers) with seeded N(0, std) draws.

    Norm weights become 1 + N(0, std) so they stay scale-like but differ from ones (a norm that a converter
    drops shows up).  std 0.2 (instead of transformers' 0.02) makes the image features actually move the
    logits.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
            param.copy_(noise + 1.0 if _is_norm_weight(name, param) else noise)
        for name, buf in model.named_buffers():
            # The router's selection bias is a persistent buffer (zeros after transformers' init); real
            # GLM-4.5V checkpoints carry learned values, and llama.cpp reads it as exp_probs_b, so give it
            # values.
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=gen, dtype=torch.float32) * std)


def _zero_padded_lm_head(model: Any, n_tokens: int) -> None:
    """Zero the lm_head rows past the tokenizer ([PAD] ids): logit 0, so greedy decoding never picks them."""
    import torch

    with torch.no_grad():
        model.lm_head.weight[n_tokens:].zero_()


def _cast(model: Any, dtype: str) -> None:
    """Cast to `dtype`; the MoE router stays float32 (transformers' `_keep_in_fp32_modules_strict`)."""
    import torch

    model.to(getattr(torch, dtype))
    for name, module in model.named_modules():
        if name.endswith("mlp.gate") and hasattr(module, "e_score_correction_bias"):
            module.to(torch.float32)


# ------------------------------------------------------------------------------------------------------------
# config.json layout
# ------------------------------------------------------------------------------------------------------------


def _to_hub_layout(cfg: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Rewrite transformers-5 `rope_parameters` into the layout of the published checkpoints (written by
    transformers 4.5x): text_config.rope_scaling {"type": "default", "mrope_section"}, rope_theta and
    partial_rotary_factor as plain text_config keys, no vision rope_parameters, `torch_dtype`.  transformers 5
    reads it back into the same `rope_parameters` (standardize_rope_params) and llama.cpp's converter sees the
    same dict, so both layouts give identical models."""
    text = dict(cfg["text_config"])
    rope = dict(text.pop("rope_parameters"))
    text["rope_scaling"] = {"type": rope.get("rope_type", "default"), "mrope_section": rope["mrope_section"]}
    text["rope_theta"] = rope["rope_theta"]
    text["partial_rotary_factor"] = rope["partial_rotary_factor"]
    text["torch_dtype"] = dtype
    vision = dict(cfg["vision_config"])
    vision.pop("rope_parameters", None)
    out = {k: v for k, v in cfg.items() if k not in ("dtype",)}
    out.update(text_config=text, vision_config=vision, torch_dtype=dtype)
    return out


def _rewrite_config(out: pathlib.Path, style: str, dtype: str) -> None:
    if style == "v5":
        return
    if style != "hub":
        raise ValueError(f"config_style must be 'hub' or 'v5', got {style!r}")
    path = out / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(_to_hub_layout(cfg, dtype), indent=2, sort_keys=True) + "\n", encoding="utf-8")


# Sampling defaults from the model cards (GLM-4.1V: temperature 1.0, top_k 2; GLM-4.5V / 4.6V: top_p 0.6,
# top_k 2, temperature 0.8, repetition penalty 1.1); llama.cpp's converter copies them into
# general.sampling.*.
_SAMPLING = {
    "glm4v": {"do_sample": True, "temperature": 1.0, "top_k": 2},
    "glm4v_moe": {"do_sample": True, "temperature": 0.8, "top_k": 2, "top_p": 0.6, "repetition_penalty": 1.1},
}


def _write_generation_config(out: pathlib.Path, tok: TokenizerInfo, arch: str) -> None:
    """generation_config.json like the real one: the three GLM stop ids, pad = <|endoftext|>, no BOS."""
    gen = {
        "_from_model_config": False,
        "eos_token_id": [tok.ids[t] for t in EOS_TOKENS],
        "pad_token_id": tok.ids["<|endoftext|>"],
        **_SAMPLING[arch],
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------------------


def make_checkpoint(
    out_dir: str | pathlib.Path,
    arch: str = "glm4v",
    seed: int = 0,
    dtype: str = "float32",
    **overrides: Any,
) -> pathlib.Path:
    """Build and save a tiny random GLM-4.xV checkpoint (plus tokenizer files); returns `out_dir` as a Path.

    arch: "glm4v" (Glm4vForConditionalGeneration, GLM-4.1V / 4.6V-Flash layout) or "glm4v_moe"
        (Glm4vMoeForConditionalGeneration, GLM-4.5V / 4.6V layout: layer 0 dense, layer 1 MoE with 4 routed
        experts, top-2, 1 shared expert).
    seed: weights are a deterministic function of (seed, arch).
    dtype: "float32", "bfloat16" or "float16" for the saved tensors (the MoE router stays float32).
    overrides:
        - any text-config key (num_hidden_layers=3, hidden_size=128, n_routed_experts=8, ...) or
          text_config={...}; head_dim and mrope_section follow hidden_size / num_attention_heads;
        - vision keys prefixed with ``vision_`` (vision_depth=3, vision_image_size=84) or vision_config={...};
        - max_shard_size="20KB" (passed to save_pretrained: a sharded checkpoint with an index);
        - init_std=0.2; config_style="hub" (default: the published checkpoints' layout with rope_scaling) or
          "v5" (what transformers 5 writes: rope_parameters);
        - anything else goes to the top-level config (e.g. tie_word_embeddings=True).
    """
    import torch
    from transformers import Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration

    out = pathlib.Path(out_dir)
    tok = make_tokenizer(out, arch=arch)
    config, misc = build_config(arch, tok, **overrides)
    torch.manual_seed(seed)  # transformers' own init draws from the global RNG before we overwrite everything
    cls = Glm4vForConditionalGeneration if arch == "glm4v" else Glm4vMoeForConditionalGeneration
    model = cls(config).eval()
    # Mix the architecture into the seed so the two kinds do not share an identical vision tower (a test that
    # pairs a text model with the other kind's projector must see different numbers).
    init_weights(model, seed=seed * len(MODEL_KINDS) + MODEL_KINDS.index(arch), std=misc.get("init_std", 0.2))
    _zero_padded_lm_head(model, tok.n_tokens)
    _cast(model, dtype)
    save_kwargs = {k: misc[k] for k in _SAVE_KEYS if k in misc}
    model.save_pretrained(out, safe_serialization=True, **save_kwargs)
    _rewrite_config(out, misc.get("config_style", "hub"), dtype)
    _write_generation_config(out, tok, arch)
    return out


def token_ids(hf_dir: str | pathlib.Path) -> dict[str, int]:
    """Added-token ids (content -> id) of a checkpoint written by `make_checkpoint` / `make_tokenizer`."""
    cfg = json.loads((pathlib.Path(hf_dir) / "tokenizer_config.json").read_text(encoding="utf-8"))
    return {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}


__all__ = [
    "MODEL_KINDS",
    "GLM4_SPLIT_REGEX",
    "GLM41V_ADDED_TOKENS",
    "GLM45V_ADDED_TOKENS",
    "GLM41V_CHAT_TEMPLATE",
    "GLM45V_CHAT_TEMPLATE",
    "EOS_TOKENS",
    "PREPROCESSOR_CONFIG",
    "TokenizerInfo",
    "added_tokens_for",
    "build_config",
    "chat_template_for",
    "init_weights",
    "make_checkpoint",
    "make_tokenizer",
    "token_ids",
    "write_preprocessor_config",
]
