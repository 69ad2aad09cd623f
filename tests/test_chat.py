"""Chat: prompt rendering equals transformers' apply_chat_template; replies split into reasoning/answer."""

from __future__ import annotations

import base64
import io
import pathlib

import numpy as np
import pytest
import tiny_models
from conftest import random_image

from glm4v_mtmd import ConfigError, GenerationConfig, Session
from glm4v_mtmd.chat import (
    GLM41V,
    GLM45V,
    IMAGE_MARKER,
    OutputSplitter,
    detect_family,
    normalize_messages,
    render_builtin,
    render_template,
    split_output,
)

IMG = random_image(84, 84, seed=3)
IMG2 = random_image(56, 112, seed=4)

CONVERSATIONS = {
    "user-text": [{"role": "user", "content": "Hello there"}],
    "system-user-image": [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": [{"type": "image", "image": IMG}, {"type": "text", "text": "What is this?"}]},
    ],
    "multi-turn-two-images": [
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "image": IMG}]},
        {"role": "assistant", "content": "<think>It is noise.</think>A noisy picture."},
        {"role": "user", "content": [{"type": "image", "image": IMG2}, {"type": "text", "text": "And this one?"}]},
    ],
}
DATA = pathlib.Path(__file__).parent / "data" / "chat_templates"
# name -> (template, family, arch of the tiny checkpoint whose tokenizer renders it). Provenance of each in
# tests/data/chat_templates/SOURCES.md: GLM-4.1V-Thinking is the published text; the GLM-4.5V-family texts
# are the best copies available offline (not byte-verified against the model repositories).
TEMPLATES = {
    "glm4v": ((DATA / "glm-4.1v-thinking.jinja").read_text(encoding="utf-8"), GLM41V, "glm4v"),
    "glm4v_moe": (tiny_models.GLM45V_CHAT_TEMPLATE, GLM45V, "glm4v_moe"),
    "glm-4.6v-candidate": ((DATA / "glm-4.6v-candidate.jinja").read_text(encoding="utf-8"), GLM45V, "glm4v"),
}


def test_tiny_glm4v_checkpoints_carry_the_published_template():
    assert tiny_models.GLM41V_CHAT_TEMPLATE == TEMPLATES["glm4v"][0]


def _thinking_modes(family):
    return [None] if family.always_thinks else [None, True, False]


@pytest.fixture(scope="module")
def hf_tokenizer(hf_checkpoint):
    from transformers import AutoTokenizer

    return {arch: AutoTokenizer.from_pretrained(hf_checkpoint(arch)) for arch in ("glm4v", "glm4v_moe")}


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_rendering_equals_apply_chat_template(name, conv, hf_tokenizer):
    template, family, arch = TEMPLATES[name]
    msgs, _ = normalize_messages(CONVERSATIONS[conv])
    for thinking in _thinking_modes(family):
        extra = {} if thinking is None else {"enable_thinking": thinking}
        expected = hf_tokenizer[arch].apply_chat_template(
            msgs, chat_template=template, tokenize=False, add_generation_prompt=True, **extra)
        assert render_template(template, msgs, enable_thinking=thinking) == expected
        assert render_builtin(family, msgs, enable_thinking=thinking) == expected


def test_nothink_renders_the_empty_think_block():
    msgs, _ = normalize_messages(CONVERSATIONS["user-text"])
    text = render_builtin(GLM45V, msgs, enable_thinking=False)
    assert text.endswith("Hello there/nothink<|assistant|>\n<think></think>\n")


def test_image_parts_become_markers_in_order():
    msgs, images = normalize_messages(CONVERSATIONS["multi-turn-two-images"])
    assert [id(i) for i in images] == [id(IMG), id(IMG2)]
    assert render_builtin(GLM41V, msgs, enable_thinking=None).count(IMAGE_MARKER) == 2


def test_image_url_data_and_path_parts(tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(IMG).save(buf, format="PNG")
    path = tmp_path / "x.png"
    path.write_bytes(buf.getvalue())
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    _, images = normalize_messages([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "image_url", "image_url": {"url": str(path)}}]}])
    assert images[0] == buf.getvalue() and images[1] == path


@pytest.mark.parametrize("bad", [
    [], "hi", [{"content": "no role"}], [{"role": "tool", "content": "x"}],
    [{"role": "user", "content": [{"type": "audio"}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
])
def test_bad_messages_raise_config_error(bad):
    with pytest.raises(ConfigError):
        normalize_messages(bad)


@pytest.mark.parametrize("arch, family", [("glm4v", GLM41V), ("glm4v_moe", GLM45V)])
def test_family_detection(arch, family):
    template = TEMPLATES[arch][0]
    assert detect_family("glm4moe" if arch == "glm4v_moe" else "glm4", template, "x") is family
    assert detect_family("glm4", None, "GLM-4.6V-Flash") is GLM45V
    assert detect_family("glm4", TEMPLATES["glm-4.6v-candidate"][0], "x") is GLM45V  # 4.6V-Flash: glm4v + this


def test_split_output_of_each_family():
    assert split_output("<think>Let me see.</think><answer>A cat.</answer>") == ("Let me see.", "A cat.")
    assert split_output("<think>\nhmm\n</think>\nA dog.") == ("hmm", "A dog.")
    assert split_output("Just the answer.", thinking=False) == ("", "Just the answer.")
    assert split_output("<think>unfinished") == ("unfinished", "")


def test_splitter_handles_tags_split_across_chunks():
    splitter = OutputSplitter(thinking=True)
    pieces = []
    for chunk in ["<th", "ink>abc</thi", "nk><ans", "wer>x < y</answer>"]:
        pieces += splitter.feed(chunk)
    pieces += splitter.feed("", final=True)
    reasoning = "".join(t for t, k in pieces if k == "reasoning")
    answer = "".join(t for t, k in pieces if k == "answer")
    assert (reasoning, answer) == ("abc", "x < y")


# ----------------------------------------------------------------------------- on the tiny models

GREEDY = GenerationConfig(max_tokens=12, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["glm4v", "glm4v_moe"])
def session(request, gguf_pair):
    with Session(*gguf_pair(request.param, 0, "f32"), n_ctx=1024, n_threads=2, kv_cache_type="f32",
                 flash_attn=False) as s:
        yield s


def test_session_uses_the_gguf_template(session):
    assert session.chat_template and IMAGE_MARKER in session.chat_template
    expected = GLM45V if session.architecture == "glm4moe" else GLM41V
    assert session.chat_family is expected


def test_chat_equals_generate_on_the_rendered_prompt(session):
    msgs = CONVERSATIONS["system-user-image"]
    session.reset()
    result = session.chat(msgs, GREEDY)
    rendered = render_template(session.chat_template, normalize_messages(msgs)[0], enable_thinking=None)
    before, after = rendered.split(IMAGE_MARKER)
    session.reset()
    direct = session.generate([before, IMG, after], GREEDY)
    assert result.text == direct.text
    assert result.usage.completion_tokens == len(direct.token_ids) == 12
    assert result.finish_reason == "length"
    assert (result.reasoning, result.answer) == split_output(result.text, thinking=True)


def test_stream_and_chat_give_the_same_text(session):
    msgs = CONVERSATIONS["multi-turn-two-images"]
    session.reset()
    full = session.chat(msgs, GREEDY)
    session.reset()
    chunks = list(session.chat_stream(msgs, GREEDY))
    assert "".join(c.text for c in chunks if c.kind == "reasoning").strip() == full.reasoning
    assert "".join(c.text for c in chunks if c.kind == "answer").strip() == full.answer
    assert chunks[-1].finish_reason == "length"
    # The last chunk carries what ChatResult does: usage (a fresh context: nothing reused) and boxes.
    assert chunks[-1].usage == full.usage
    assert chunks[-1].boxes == full.boxes
    assert all(c.usage is None for c in chunks[:-1])


def test_second_turn_evaluates_only_new_tokens(session):
    first = CONVERSATIONS["system-user-image"]
    session.reset()
    reply = session.chat(first, GREEDY)
    second = first + [{"role": "assistant", "content": reply.answer or "ok"},
                      {"role": "user", "content": "Tell me more."}]
    follow = session.chat(second, GREEDY)
    # Everything up to the end of the first user turn (the image included) is reused.
    assert follow.usage.reused_cells >= reply.usage.prompt_tokens - 4
    assert follow.usage.reused_cells > 9 + 5  # more than the 3x3 image's cells alone
    assert follow.timings.prompt_tokens == follow.usage.prompt_tokens


def test_thinking_false_is_refused_for_glm41v_and_rendered_for_glm45v(session):
    msgs = CONVERSATIONS["user-text"]
    if session.chat_family is GLM41V:
        with pytest.raises(ConfigError, match="always reasons"):
            session.chat(msgs, GREEDY, thinking=False)
    else:
        session.reset()
        result = session.chat(msgs, GREEDY, thinking=False)
        assert result.reasoning == ""
        assert np.isfinite(result.usage.prompt_tokens)


def test_images_of_earlier_turns_come_from_the_embedding_cache(session):
    first = CONVERSATIONS["system-user-image"]
    session.reset()
    session.image_cache.clear()
    reply = session.chat(first, GREEDY)
    hits, misses = session.image_cache.hits, session.image_cache.misses
    session.chat(first + [{"role": "assistant", "content": reply.answer or "ok"},
                          {"role": "user", "content": "More?"}], GREEDY)
    assert session.image_cache.hits == hits + 1 and session.image_cache.misses == misses


def _emb(width, height):
    from glm4v_mtmd import ImageEmbedding

    return ImageEmbedding(np.zeros((1, 4), np.float32), (1, 1), (width, height), (28, 28), "d")


def test_boxes_are_mapped_to_the_most_recent_image():
    from glm4v_mtmd.chat import ground_boxes

    answer = "The cat <|begin_of_box|>[[100,200,500,1000]]<|end_of_box|> sits."
    (box,) = ground_boxes(answer, [_emb(640, 480), _emb(1000, 2000)], -1)
    assert box.image_index == 1 and box.pixels == (100, 400, 500, 2000)
    (first,) = ground_boxes(answer, [_emb(640, 480), _emb(1000, 2000)], 0)
    assert first.image_index == 0 and first.pixels == (64, 96, 320, 480)
    with pytest.raises(ConfigError, match="box_image"):
        ground_boxes(answer, [_emb(640, 480)], 3)
    assert ground_boxes(answer, [], -1)[0].pixels is None


def test_a_chat_template_given_to_the_model_replaces_the_ggufs(gguf_pair):
    from glm4v_mtmd import Model

    template = ("[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n{% if m.content is string %}{{ m.content }}"
                "{% else %}{% for p in m.content %}{% if p.type == 'image' %}<|begin_of_image|><|image|>"
                "<|end_of_image|>{% else %}{{ p.text }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
                "<|assistant|>\nOVERRIDE")
    with Model(*gguf_pair("glm4v", 0, "f32"), n_ctx=256, n_threads=1, chat_template=template) as m:
        assert m.chat_template == template
        with m.context() as ctx:
            result = ctx.chat([{"role": "user", "content": [{"type": "image", "image": random_image(56, 56)},
                                                            {"type": "text", "text": "Hi"}]}], GREEDY)
            text = len(m.tokenize("[gMASK]<sop><|user|>\n")) + len(m.tokenize("Hi<|assistant|>\nOVERRIDE"))
            image = m.encode_image(random_image(56, 56)).n_tokens  # after the reference's min_pixels upscale
            assert result.usage.prompt_tokens == text + 2 + image
