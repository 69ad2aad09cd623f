"""Session behaviour and bad input: typed exceptions, and the session keeps working afterwards."""

from __future__ import annotations

import io
import math
import pathlib
import shutil

import gguf
import numpy as np
import pytest
from conftest import GREEDY, PROMPT, random_image
from tolerances import REBATCHED_LOGITS_MAX_ABS

import glm4v_mtmd
from glm4v_mtmd import (
    ConfigError,
    ContextOverflowError,
    GenerationConfig,
    Glm4vError,
    ImageError,
    ModelLoadError,
    Session,
    SessionClosedError,
)


@pytest.fixture(scope="module")
def pair(gguf_pair):
    return gguf_pair("glm4v", 0, "f32")


@pytest.fixture(scope="module")
def session(pair):
    with Session(*pair, n_ctx=256, n_threads=2, kv_cache_type="f32", flash_attn=False) as s:
        yield s


@pytest.fixture(scope="module")
def baseline(session):
    """Greedy ids of PROMPT on a fresh cache: what a healthy session answers."""
    session.reset()
    return session.generate(PROMPT, GREEDY).token_ids


def assert_still_works(session: Session, baseline: tuple[int, ...]) -> None:
    session.reset()
    assert session.generate(PROMPT, GREEDY).token_ids == baseline


# ----------------------------------------------------------------------------- behaviour


def test_engine_info_reports_pinned_engine_and_backends():
    info = glm4v_mtmd.engine_info()
    if info["engine_origin"] != "user checkout":  # GLM4V_LLAMA_CPP_DIR builds report their own commit
        assert info["engine_commit"] == "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
        assert info["engine_package"] == "llama-cpp-python==0.3.36"
    assert "CPU" in info["backends"]


def test_tokenize_detokenize_round_trip_with_special_pieces(session):
    text = "[gMASK]<sop><|user|>\nhello world<|assistant|>\n"
    ids = session.tokenize(text, special=True)
    assert ids[0] == session.tokenize("[gMASK]", special=True)[0]
    assert session.detokenize(ids, special=True) == text


def test_special_pieces_are_plain_text_without_special(session):
    assert len(session.tokenize("<|user|>", special=False)) > 1
    assert len(session.tokenize("<|user|>", special=True)) == 1


def test_encode_image_reports_grid_and_sizes(session):
    emb = session.encode_image(random_image(56, 112))
    assert emb.grid == (2, 4)
    assert emb.n_tokens == 8
    assert emb.array.shape == (8, session.n_embd) and emb.array.dtype == np.float32
    assert emb.original_size == emb.resized_size == (112, 56)
    assert emb.n_positions == 4


def test_image_inputs_of_every_kind_give_the_same_embedding(session, tmp_path):
    from PIL import Image

    arr = random_image(84, 112, seed=9)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    reference = session.encode_image(arr).array
    for image in (str(path), path, path.read_bytes(), io.BytesIO(path.read_bytes()), Image.fromarray(arr)):
        np.testing.assert_array_equal(session.encode_image(image).array, reference)


def test_embedding_can_be_reused_in_a_prompt(session):
    emb = session.encode_image(PROMPT[1])
    a = session.evaluate(PROMPT)
    session.reset()
    b = session.evaluate([PROMPT[0], emb, PROMPT[2]])
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-5)


def test_follow_up_prompt_reuses_the_cached_prefix(session):
    session.reset()
    first = session.evaluate(PROMPT)
    turn2 = PROMPT[:2] + ["Describe this image.<|assistant|>\nA picture.<|user|>\nWhat else?<|assistant|>\n"]
    follow = session.evaluate(turn2)
    assert follow.reused >= len(first.tokens) - 3
    session.reset()
    fresh = session.evaluate(turn2)
    assert fresh.reused == 0
    np.testing.assert_array_equal(follow.positions, fresh.positions)
    np.testing.assert_allclose(follow.logits, fresh.logits, rtol=0, atol=REBATCHED_LOGITS_MAX_ABS)


def test_generation_continues_the_cache_consistently(session):
    """A prompt that extends prompt + generated text reuses the generated tokens' cells."""
    session.reset()
    out = session.generate(PROMPT, GREEDY)
    n_prompt = out.prompt_tokens
    assert session.n_cells == n_prompt + len(out.token_ids) - 1  # the last sampled id is not decoded yet
    ev = session.evaluate(PROMPT + [session.detokenize(out.token_ids[:3])])
    assert ev.reused >= n_prompt


def test_stream_yields_the_same_text_and_ids_as_generate(session):
    session.reset()
    full = session.generate(PROMPT, GREEDY)
    session.reset()
    chunks = list(session.stream(PROMPT, GREEDY))
    assert "".join(c.text for c in chunks) == full.text
    assert tuple(t for c in chunks for t in c.token_ids) == full.token_ids
    assert chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_stop_token_ends_generation_with_reason_stop(session):
    session.reset()
    first = session.generate(PROMPT, GREEDY).token_ids
    session.reset()
    stopped = session.generate(PROMPT, GenerationConfig(
        max_tokens=8, temperature=0.0, repetition_penalty=1.0, stop_token_ids=(first[2],), ignore_eos=True))
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == first[:2]


def test_sampling_is_reproducible_with_a_seed(session):
    config = GenerationConfig(max_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=1234, ignore_eos=True)
    session.reset()
    a = session.generate(PROMPT, config).token_ids
    session.reset()
    b = session.generate(PROMPT, config).token_ids
    assert a == b


def test_timings_are_reported(session):
    session.reset()
    out = session.generate(PROMPT, GREEDY)
    assert out.timings.prompt_ms > 0
    assert out.timings.generated_tokens == len(out.token_ids) - 1
    assert out.timings.prompt_tokens == out.prompt_tokens == len(session.evaluate(PROMPT).tokens)


def _split_with_token_embeddings_last(model: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    """``model`` rewritten as a two-file split GGUF whose second file holds only token_embd.weight."""
    reader = gguf.GGUFReader(model)
    writer = gguf.GGUFWriter(out_dir / "split.gguf", reader.fields["general.architecture"].contents(),
                             split_max_tensors=len(reader.tensors) - 1)
    for f in reader.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            array = f.types[0] == gguf.GGUFValueType.ARRAY
            writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if array else None)
    for t in sorted(reader.tensors, key=lambda t: t.name == "token_embd.weight"):
        writer.add_tensor(t.name, t.data, raw_shape=[int(n) for n in reversed(t.shape)], raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_dir / "split-00001-of-00002.gguf"


def test_text_and_images_share_the_engine_batches(pair, tmp_path):
    """An image prompt is evaluated in ceil(cells / n_batch) engine calls, text rows read from the model
    file as embeddings; a split model whose first file lacks the embedding table goes part by part
    (<sop>..., <|begin_of_image|>, the image, <|end_of_image|>, the question). Same logits both ways."""
    n_batch = 16
    split = _split_with_token_embeddings_last(pair[0], tmp_path)
    results = {}
    for name, model in (("one file", pair[0]), ("split", split)):
        with Session(model, pair[1], n_ctx=256, n_threads=2, kv_cache_type="f32", flash_attn=False,
                     n_batch=n_batch) as s:
            out = s.generate(PROMPT, GREEDY)
            s.reset()
            results[name] = (out, s.evaluate(PROMPT))
    (merged, merged_ev), (by_part, by_part_ev) = results["one file"], results["split"]
    assert merged.prompt_tokens == by_part.prompt_tokens > n_batch
    assert merged.timings.prompt_batches == math.ceil(merged.prompt_tokens / n_batch)
    assert by_part.timings.prompt_batches == 5
    assert merged.token_ids == by_part.token_ids
    np.testing.assert_array_equal(merged_ev.positions, by_part_ev.positions)
    np.testing.assert_allclose(merged_ev.logits, by_part_ev.logits, rtol=0, atol=REBATCHED_LOGITS_MAX_ABS)


def test_text_parts_share_the_engine_batches(session):
    parts = ["[gMASK]<sop><|user|>\n", "Describe this image.", "<|assistant|>\n"]
    session.reset()
    out = session.generate(parts, GREEDY)
    assert out.timings.prompt_batches == 1
    session.reset()
    assert session.generate(["".join(parts)], GREEDY).token_ids == out.token_ids


def test_image_timings_count_only_the_images_this_call_encoded(session):
    image = random_image(56, 84, seed=31)
    first = session.generate([PROMPT[0], image, PROMPT[2]], GREEDY).timings
    assert first.preprocess_ms > 0 and first.encode_ms > 0
    emb = session.encode_image(random_image(56, 84, seed=32))
    given = session.generate([PROMPT[0], emb, PROMPT[2]], GREEDY).timings
    assert given.preprocess_ms == given.encode_ms == 0.0
    assert given.prompt_ms > 0


def test_close_is_idempotent_and_context_manager_closes(pair):
    s = Session(*pair, n_ctx=128, n_threads=1)
    s.close()
    s.close()
    assert s.closed
    with Session(*pair, n_ctx=128, n_threads=1) as t:
        assert not t.closed
    assert t.closed


def test_logs_go_to_the_package_logger(pair, caplog):
    with caplog.at_level(5, logger="glm4v_mtmd"):
        Session(*pair, n_ctx=128, n_threads=1).close()
    assert any(r.name == "glm4v_mtmd" for r in caplog.records)


# ----------------------------------------------------------------------------- bad input


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        Session(tmp_path / "nope.gguf")


def test_non_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        Session(bad)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_model_file(pair, tmp_path, keep):
    data = pair[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        Session(cut, pair[1])


def test_truncated_mmproj_file(pair, tmp_path):
    data = pair[1].read_bytes()
    cut = tmp_path / "mmproj-cut.gguf"
    cut.write_bytes(data[: int(len(data) * 0.8)])
    with pytest.raises(ModelLoadError, match="mmproj-cut.gguf"):
        Session(pair[0], cut)


def test_projector_given_as_model(pair):
    with pytest.raises(ModelLoadError, match="projector"):
        Session(pair[1], pair[0])


def test_text_model_given_as_projector(pair):
    with pytest.raises(ModelLoadError, match="not a projector"):
        Session(pair[0], pair[0])


def test_projector_width_differs_from_model(pair, hf_checkpoint, tmp_path):
    from glm4v_mtmd.convert import convert

    other = hf_checkpoint("glm4v", 0, vision_out_hidden_size=32)
    _, narrow_mmproj = convert(other, tmp_path, outtype="f32", progress=False)
    with pytest.raises(ModelLoadError, match="n_embd"):
        Session(pair[0], narrow_mmproj)


@pytest.mark.parametrize(
    "kwargs",
    [{"n_ctx": 0}, {"n_ctx": -5}, {"n_threads": 0}, {"kv_cache_type": "f8"}, {"flash_attn": "yes"},
     {"n_gpu_layers": -2}, {"min_pixels": 10, "max_pixels": 5}],
)
def test_invalid_session_options(pair, kwargs):
    with pytest.raises(ConfigError):
        Session(*pair, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_tokens": -1}, {"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1},
     {"min_p": 1.0}, {"repetition_penalty": 0.0}, {"seed": -1}, {"temperature": float("nan")}],
)
def test_invalid_generation_config(kwargs):
    with pytest.raises(ConfigError):
        GenerationConfig(**kwargs)


@pytest.mark.parametrize(
    "image, rule",
    [
        (b"definitely not an image", "cannot be decoded"),
        (np.zeros((0, 10, 3), dtype=np.uint8), "positive"),
        (np.zeros((10, 10, 3), dtype=np.float32), "uint8"),
        (np.zeros((2, 600, 3), dtype=np.uint8), "aspect ratio"),
        ("/no/such/image.png", "no such file"),
    ],
    ids=["garbage-bytes", "zero-side", "float-array", "aspect-ratio", "missing-file"],
)
def test_unreadable_image_raises_image_error_and_session_survives(session, baseline, image, rule):
    with pytest.raises(ImageError, match=rule):
        session.encode_image(image)
    # In a prompt, strings are text: an image path goes in as a pathlib.Path.
    part = pathlib.Path(image) if isinstance(image, str) else image
    with pytest.raises(ImageError):
        session.generate(["[gMASK]<sop><|user|>\n", part, "Hi<|assistant|>\n"], GREEDY)
    assert_still_works(session, baseline)


def test_truncated_png_raises_image_error(session, baseline, tmp_path):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.fromarray(random_image(84, 84)).save(path)
    with pytest.raises(ImageError):
        session.encode_image(path.read_bytes()[:200])
    assert_still_works(session, baseline)


def test_prompt_longer_than_context(session, baseline):
    long_prompt = ["[gMASK]<sop><|user|>\n" + "hello world " * 200 + "<|assistant|>\n"]
    with pytest.raises(ContextOverflowError, match="n_ctx"):
        session.evaluate(long_prompt)
    assert_still_works(session, baseline)


def test_images_count_one_cell_per_token_against_n_ctx(pair):
    with Session(*pair, n_ctx=64, n_threads=1) as s:
        side = int(np.ceil(np.sqrt(s.n_ctx + 1)))  # side**2 image tokens > n_ctx cells (the engine may round n_ctx up)
        big = random_image(28 * side, 28 * side)
        with pytest.raises(ContextOverflowError, match="KV cells"):
            s.evaluate(["[gMASK]<sop><|user|>\n", big, "Hi<|assistant|>\n"])


def test_generation_stops_at_a_full_context_with_reason_context(pair):
    with Session(*pair, n_ctx=64, n_threads=1) as s:
        config = GenerationConfig(max_tokens=500, temperature=0.0, ignore_eos=True)
        out = s.generate(PROMPT[:1] + ["Hi<|assistant|>\n"], config)
        assert out.finish_reason == "context"  # not "length": max_tokens was not reached
        assert len(out.token_ids) < 500
        assert s.n_cells <= s.n_ctx


def test_closed_session_raises(pair):
    s = Session(*pair, n_ctx=128, n_threads=1)
    s.close()
    for call in (lambda: s.tokenize("hi"), lambda: s.encode_image(PROMPT[1]), lambda: s.generate(PROMPT, GREEDY)):
        with pytest.raises(SessionClosedError):
            call()


def test_wrong_embedding_width_is_rejected(session, baseline):
    emb = session.encode_image(PROMPT[1])
    bad = type(emb)(np.zeros((emb.n_tokens, 7), dtype=np.float32), emb.grid, emb.original_size, emb.resized_size, "x")
    with pytest.raises(Glm4vError):
        session.evaluate([PROMPT[0], bad, PROMPT[2]])
    assert_still_works(session, baseline)


def test_empty_prompt_is_rejected(session):
    with pytest.raises(ConfigError):
        session.evaluate([""])


def test_unsupported_text_architecture(tmp_path):
    import gguf

    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="'llama' model"):
        Session(path)


def test_files_are_not_modified_by_failed_loads(pair, tmp_path):
    copy = tmp_path / "model.gguf"
    shutil.copy(pair[0], copy)
    before = copy.read_bytes()
    with pytest.raises(ModelLoadError):
        Session(copy, copy)
    assert pathlib.Path(copy).read_bytes() == before


def test_stop_string_cuts_the_text_in_generate_and_stream(session):
    session.reset()
    free = session.generate(PROMPT, GenerationConfig(
        max_tokens=24, temperature=0.0, repetition_penalty=1.0, ignore_eos=True))
    stop = free.text[6:9]
    assert len(stop) == 3
    config = GenerationConfig(max_tokens=24, temperature=0.0, repetition_penalty=1.0, ignore_eos=True, stop=(stop,))
    session.reset()
    cut = session.generate(PROMPT, config)
    expected = free.text[: free.text.find(stop)]
    assert cut.finish_reason == "stop" and cut.text == expected
    session.reset()
    chunks = list(session.stream(PROMPT, config))
    assert "".join(c.text for c in chunks) == expected and chunks[-1].finish_reason == "stop"


def test_stop_strings_must_be_non_empty_strings():
    with pytest.raises(ConfigError):
        GenerationConfig(stop=("",))
    assert GenerationConfig(stop="###").stop == ("###",)


def test_text_that_is_not_valid_unicode_is_a_config_error(session, baseline):
    with pytest.raises(ConfigError, match="not valid Unicode"):
        session.evaluate(["[gMASK]<sop><|user|>\nbad \udcff text<|assistant|>\n"])
    assert_still_works(session, baseline)


def test_cancel_stops_a_stream_at_the_next_token_and_the_session_survives(session, baseline):
    session.reset()
    chunks = []
    for chunk in session.stream(PROMPT, GenerationConfig(max_tokens=200, temperature=0.0, ignore_eos=True)):
        chunks.append(chunk)
        if len(chunks) == 3:
            session.cancel()
    assert len(chunks) <= 4 and chunks[-1].finish_reason == "cancelled"
    assert_still_works(session, baseline)


def test_cancel_from_another_thread_ends_a_stream(session, baseline):
    import threading

    session.reset()
    started, chunks = threading.Event(), []
    canceller = threading.Thread(target=lambda: (started.wait(10), session.cancel()))
    canceller.start()
    for chunk in session.stream(PROMPT, GenerationConfig(max_tokens=200, temperature=0.0, ignore_eos=True)):
        chunks.append(chunk)
        started.set()
    canceller.join()
    # The other thread runs while this one is inside the engine (the GIL is released there).
    assert len(chunks) < 150 and chunks[-1].finish_reason == "cancelled"
    assert_still_works(session, baseline)
