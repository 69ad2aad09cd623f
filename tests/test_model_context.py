"""One Model, several Contexts: batched decoding that equals each conversation alone, and the
per-call contracts (timings, embedding identity, cancel, finish reasons, Ctrl-C state)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import reference
from conftest import ARCHS, GREEDY, PROMPT, random_image, rel_l2
from tolerances import EMBED_REL_L2, REBATCHED_LOGITS_MAX_ABS

from glm4v_mtmd import (
    ConfigError,
    ContextOverflowError,
    GenerationConfig,
    GenerationError,
    ImageEmbedding,
    ImageError,
    Model,
    NoFreeContextError,
    Session,
    SessionClosedError,
    Tokens,
)
from glm4v_mtmd._handles import EncodeCancel
from glm4v_mtmd.context import STREAM_AHEAD

PROMPT_B = ["[gMASK]<sop><|user|>\n", random_image(56, 112, seed=9), "What is it?<|assistant|>\n"]
GREEDY_48 = GenerationConfig(max_tokens=48, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                             ignore_eos=True)


@pytest.fixture(scope="module")
def pair(gguf_pair):
    return gguf_pair("glm4v", 0, "f32")


@pytest.fixture(scope="module")
def model(pair):
    """Exact settings (F32 weights and KV cache, no flash attention), two contexts."""
    with Model(*pair, n_ctx=512, n_parallel=2, n_threads=2, kv_cache_type="f32", flash_attn=False) as m:
        yield m


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request, gguf_pair):
    """(arch, exact-settings Model with two contexts) for each architecture."""
    pair = gguf_pair(request.param, 0, "f32")
    with Model(*pair, n_ctx=512, n_parallel=2, n_threads=2, kv_cache_type="f32", flash_attn=False) as m:
        yield request.param, m


def _run_together(fns):
    """Run the callables in threads that start together; their results in order (exceptions re-raised)."""
    barrier = threading.Barrier(len(fns))
    results: list = [None] * len(fns)

    def run(i):
        barrier.wait()
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


# ----------------------------------------------------------------------------- batched decoding


def test_two_contexts_generating_together_give_their_answers_alone(arch_model):
    _, model = arch_model
    prompts = [PROMPT, PROMPT_B]
    with model.context() as a, model.context() as b:
        alone = [a.generate(prompts[0], GREEDY_48), b.generate(prompts[1], GREEDY_48)]
        a.reset()
        b.reset()
        steps0, served0 = model.engine_steps
        together = _run_together([lambda: a.generate(prompts[0], GREEDY_48),
                                  lambda: b.generate(prompts[1], GREEDY_48)])
        steps1, served1 = model.engine_steps
    for x, y in zip(alone, together):
        assert y.token_ids == x.token_ids
        assert y.finish_reason == "length"
    # The tokens really shared engine passes (without batching every request is a pass of its own).
    shared = (served1 - served0) - (steps1 - steps0)
    assert shared >= 24, f"{served1 - served0} requests in {steps1 - steps0} engine steps"


def test_steps_of_contexts_generating_together_follow_back_to_back(model):
    """With several contexts the engine thread runs each generation call whole (it samples too):
    two contexts asking for 48 tokens at once take one shared step per token, not one per request."""
    with model.context() as a, model.context() as b:
        a.evaluate(PROMPT)
        b.evaluate(PROMPT_B)
        steps0, served0 = model.engine_steps
        together = _run_together([lambda: a.generate(PROMPT, GREEDY_48), lambda: b.generate(PROMPT_B, GREEDY_48)])
        steps1, served1 = model.engine_steps
    assert [len(r.token_ids) for r in together] == [48, 48]
    # 47 decodes each (the last token is not decoded) plus each prompt's last cell re-evaluated; the
    # contexts start a few tokens apart at most.
    assert served1 - served0 >= 2 * 47
    assert steps1 - steps0 <= 47 + 8, f"{served1 - served0} requests in {steps1 - steps0} steps"


def _settled_steps(model, timeout=20.0):
    """The engine's step count once it stopped moving for 0.3 s."""
    deadline = time.monotonic() + timeout
    last, since = model.engine_steps[0], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = model.engine_steps[0]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > 0.3:
            return now
    raise AssertionError("the engine never settled")


def test_a_stream_decodes_ahead_of_its_reader_up_to_stream_ahead(model):
    """With several contexts the engine goes on decoding a stream while its reader is away, and stops
    STREAM_AHEAD tokens ahead; the reader's chunks and the context's cells are those of the tokens
    handed out, and the whole stream equals the non-streamed answer."""
    with model.context() as a:
        alone = a.generate(PROMPT, GREEDY_48)
        a.reset()
        stream = a.stream(PROMPT, GREEDY_48)
        first = next(stream)
        assert len(first.token_ids) == 1
        n_prompt = a.n_cells  # the first token is sampled from the prompt's logits: no decode yet
        at_first = model.engine_steps[0]
        settled = _settled_steps(model)
        assert settled - at_first == STREAM_AHEAD, (at_first, settled)
        assert a.n_cells == n_prompt  # the decoded-ahead cells are not the reader's yet
        chunks = [first, *stream]
    ids = tuple(t for c in chunks for t in c.token_ids)
    assert ids == alone.token_ids
    assert "".join(c.text for c in chunks) == alone.text
    assert chunks[-1].finish_reason == "length"
    assert max(len(c.token_ids) for c in chunks) > 1  # the tokens decoded meanwhile came together


def test_a_stream_closed_early_leaves_only_the_cells_of_the_tokens_it_handed_out(model):
    """Cells decoded ahead for tokens nobody read are dropped: a follow-up built on the tokens handed out
    reuses them and gets the logits of a fresh context."""
    with model.context() as a, model.context() as fresh:
        n_prompt = len(a.evaluate(PROMPT).tokens)
        a.reset()
        stream = a.stream(PROMPT, GREEDY_48)
        seen: list[int] = []
        for chunk in stream:
            seen.extend(chunk.token_ids)
            if len(seen) >= 3:
                break
        _settled_steps(model)  # the engine ran ahead of the reader
        stream.close()
        assert a.n_cells == n_prompt + len(seen) - 1  # the last token handed out is not decoded yet
        follow = PROMPT + [Tokens(seen), "More.<|user|>\nAnd?<|assistant|>\n"]
        out = a.evaluate(follow)
        assert out.reused == n_prompt + len(seen) - 1
        ref = fresh.evaluate(follow)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logits, ref.logits, rtol=0, atol=REBATCHED_LOGITS_MAX_ABS)


def test_closing_a_stream_does_not_wait_for_another_contexts_encode(model):
    """A stream closed while the engine encodes another conversation's picture (seconds) returns at once:
    its decode-ahead call waits in the engine's list, outside any step, and is simply taken out."""
    long = GenerationConfig(max_tokens=400, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                            ignore_eos=True)
    big = random_image(1120, 1120, seed=5)
    with model.context() as a:
        stream = a.stream(PROMPT, long)
        next(stream)
        _settled_steps(model)  # STREAM_AHEAD tokens wait: the call is out of the engine's list
        encode = threading.Thread(target=model.encode_image, args=(big,))
        encode.start()
        time.sleep(0.5)  # the encode is under way (it takes seconds)
        assert len(next(stream).token_ids) == STREAM_AHEAD  # ... and the call is back in the list
        stream.close()
        closed_while_encoding = encode.is_alive()
        encode.join(120)
        n_cells = a.n_cells
        n_prompt = len(a.evaluate(PROMPT).tokens)
    assert closed_while_encoding
    assert n_cells == n_prompt + STREAM_AHEAD  # 1 + STREAM_AHEAD handed out, the last one not decoded


def test_a_stream_on_one_sequence_hands_out_each_token_as_it_comes(pair):
    """Without the engine thread nothing runs between calls: every chunk is one token."""
    with Model(*pair, n_ctx=512, n_threads=2, kv_cache_type="f32", flash_attn=False) as one:
        alone = one.context().generate(PROMPT, GREEDY)
        chunks = list(one.context().stream(PROMPT, GREEDY))
    assert [len(c.token_ids) for c in chunks] == [1] * len(alone.token_ids)
    assert tuple(t for c in chunks for t in c.token_ids) == alone.token_ids


def test_a_cancel_stops_an_engine_run_call_and_leaves_the_other_context_alone(model):
    """A generation call of many tokens on the engine thread (a non-streamed generate) ends at its
    next step once cancelled; the context generating beside it gives its full answer."""
    long = GenerationConfig(max_tokens=400, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                            ignore_eos=True)
    with model.context() as a, model.context() as b:
        alone = b.generate(PROMPT_B, GREEDY_48)
        b.reset()
        steps0 = model.engine_steps[0]

        def cancel_soon():
            while model.engine_steps[0] < steps0 + 30:  # ~30 tokens in: inside a's first call of 64
                threading.Event().wait(0.001)
            a.cancel()

        def run_a():
            return a.generate(PROMPT, long)

        out_a, out_b, _ = _run_together([run_a, lambda: b.generate(PROMPT_B, GREEDY_48), cancel_soon])
    assert out_a.finish_reason == "cancelled"
    assert 0 < len(out_a.token_ids) < 400
    assert out_b.finish_reason == "length" and out_b.token_ids == alone.token_ids


def test_a_cancelled_encode_stops_and_leaves_nothing_behind(model, reference_model):
    """The server's per-request flag (EncodeCancel, set when the client leaves) stops an image encode at a
    check point of the vision graph: set first, the encode stops at the first one. Nothing is cached, and
    the same picture then encodes whole, as transformers does."""
    img = random_image(280, 224, seed=21)
    flag = EncodeCancel()
    flag.set()
    with pytest.raises(GenerationError, match="cancelled"):
        model._encode(img, None, cancel=flag)
    emb = model.encode_image(img).array
    expected = reference.reference_image_features(reference_model("glm4v"), img, f16_conv=True)
    assert rel_l2(emb, expected) <= EMBED_REL_L2


def test_a_full_context_ends_an_engine_run_call_with_reason_context(pair):
    with Model(*pair, n_ctx=64, n_parallel=2, n_threads=1) as m, m.context() as ctx:
        out = ctx.generate(PROMPT[:1] + ["hello<|assistant|>\n"],
                           GenerationConfig(max_tokens=10_000, temperature=0.0, ignore_eos=True))
        assert out.finish_reason == "context"
        assert ctx.n_cells == m.n_ctx
        ctx.reset()
        assert ctx.generate(PROMPT, GREEDY).finish_reason == "length"  # the context still works


def test_concurrent_prompts_give_the_logits_and_positions_of_transformers(arch_model, hf_checkpoint,
                                                                            reference_model):
    arch, model = arch_model
    prompts = [PROMPT, PROMPT_B]
    with model.context() as a, model.context() as b:
        alone = [a.evaluate(prompts[0]), b.evaluate(prompts[1])]
        a.reset()
        b.reset()
        together = _run_together([lambda: a.evaluate(prompts[0]), lambda: b.evaluate(prompts[1])])
    ref = reference_model(arch)
    for prompt, x, y in zip(prompts, alone, together):
        inputs = reference.build_inputs(hf_checkpoint(arch), prompt)
        np.testing.assert_array_equal(y.tokens, inputs["input_ids"][0].numpy())
        np.testing.assert_array_equal(y.positions, reference.reference_positions(ref, inputs))
        # Batched kernels may sum in another order: float32 summation order only.
        assert float(np.max(np.abs(y.logits - x.logits))) <= REBATCHED_LOGITS_MAX_ABS


def test_a_follow_up_reuses_only_its_own_contexts_prefix(model):
    turn2 = PROMPT[:2] + ["Describe this image.<|assistant|>\nA picture.<|user|>\nWhat else?<|assistant|>\n"]
    with model.context() as a, model.context() as b:
        first = a.evaluate(PROMPT)
        b.evaluate(PROMPT_B)
        follow = a.evaluate(turn2)
        assert follow.reused >= len(first.tokens) - 3
        # b holds another conversation: nothing of a's cells is visible to it.
        other = b.evaluate(turn2)
        # Only what b's own prompt shared with turn2: the opening text and <|begin_of_image|>.
        assert other.reused == len(model.tokenize(PROMPT[0])) + 1
        np.testing.assert_allclose(other.logits, follow.logits, rtol=0, atol=REBATCHED_LOGITS_MAX_ABS)


def test_one_more_context_than_n_parallel_raises_until_one_closes(model):
    a, b = model.context(), model.context()
    with pytest.raises(NoFreeContextError, match="n_parallel=2"):
        model.context()
    b.close()
    c = model.context()
    assert model.n_open_contexts == 2
    a.close()
    c.close()
    assert model.n_open_contexts == 0


def test_a_prompt_larger_than_one_context_raises_with_the_numbers(pair):
    with Model(*pair, n_ctx=64, n_parallel=2, n_threads=1) as m, m.context() as ctx:
        assert m.n_ctx >= 64  # the engine may round a context's cells up (to 256 here)
        with pytest.raises(ContextOverflowError, match=f"n_ctx={m.n_ctx}"):
            ctx.evaluate(["[gMASK]<sop>" + "hello " * m.n_ctx])


def test_closing_the_model_closes_its_contexts(pair):
    m = Model(*pair, n_ctx=128, n_parallel=2, n_threads=1)
    ctx = m.context()
    m.close()
    assert ctx.closed
    with pytest.raises(SessionClosedError):
        ctx.evaluate(["hello"])
    m.close()


# ----------------------------------------------------------------------------- token-id prompt parts


def test_token_ids_are_evaluated_as_given(model):
    with model.context() as ctx:
        text = ctx.evaluate(PROMPT)
        ctx.reset()
        ids = model.tokenize(PROMPT[0]), model.tokenize(PROMPT[2])
        given = ctx.evaluate([Tokens(ids[0]), PROMPT[1], Tokens(np.asarray(ids[1], dtype=np.int64))])
    np.testing.assert_array_equal(given.tokens, text.tokens)
    np.testing.assert_allclose(given.logits, text.logits, rtol=0, atol=REBATCHED_LOGITS_MAX_ABS)


def test_token_ids_outside_the_vocabulary_raise_config_error(model):
    with model.context() as ctx:
        with pytest.raises(ConfigError, match="outside the vocabulary"):
            ctx.evaluate([Tokens([1, model.n_vocab])])
    with pytest.raises(ConfigError):
        Tokens(["a", "b"])


# ----------------------------------------------------------------------------- chat_many


def test_chat_many_answers_in_order_like_single_chats(model, capsys):
    question = {"type": "text", "text": "What is it?"}
    images = [random_image(56, 56 * (1 + i % 3), seed=20 + i) for i in range(5)]
    conversations = [[{"role": "user", "content": [{"type": "image", "image": img}, question]}] for img in images]
    config = GenerationConfig(max_tokens=12, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
    with model.context() as ctx:
        singles = []
        for conv in conversations:
            ctx.reset()
            singles.append(ctx.chat(conv, config).text)
    many = model.chat_many(conversations, config, progress=True)
    assert [r.text for r in many] == singles
    assert "chat_many" in capsys.readouterr().err  # the tqdm bar
    assert model.n_open_contexts == 0


# ----------------------------------------------------------------------------- contracts


def test_chat_reports_the_encode_of_its_new_image(pair):
    image = random_image(84, 112, seed=31)
    msg = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    config = GenerationConfig(max_tokens=2, temperature=0.0)
    with Session(*pair, n_ctx=256, n_threads=1) as s:
        first = s.chat(msg, config)
        assert first.timings.encode_ms > 0 and first.timings.preprocess_ms > 0
        again = s.chat(msg, config)  # from the embedding cache: nothing encoded in this call
        assert again.timings.encode_ms == 0 and again.timings.preprocess_ms == 0
        streamed = list(s.chat_stream([{"role": "user", "content": [
            {"type": "image", "image": random_image(56, 56, seed=32)}, {"type": "text", "text": "Hi"}]}], config))
        assert streamed[-1].timings is not None and streamed[-1].timings.encode_ms > 0


def test_embeddings_of_different_arrays_are_never_mixed_up(model):
    with model.context() as ctx:
        real = model.encode_image(PROMPT[1])
        rng = np.random.default_rng(0)
        other = rng.standard_normal(real.array.shape).astype(np.float32)
        first = ImageEmbedding(real.array.copy(), real.grid, (84, 84), (84, 84))  # digest from the content
        second = ImageEmbedding(other, real.grid, (84, 84), (84, 84))
        assert first.digest == real.digest and second.digest != first.digest
        ctx.evaluate([PROMPT[0], first, PROMPT[2]])
        ev = ctx.evaluate([PROMPT[0], second, PROMPT[2]])
        n_text = len(model.tokenize(PROMPT[0]))
        assert ev.reused == n_text + 1  # the text and <|begin_of_image|>, none of the image's cells
        ctx.reset()
        fresh = ctx.evaluate([PROMPT[0], second, PROMPT[2]])
    np.testing.assert_allclose(ev.logits, fresh.logits, rtol=0, atol=REBATCHED_LOGITS_MAX_ABS)


def test_an_embedding_whose_grid_does_not_match_its_rows_raises_image_error():
    with pytest.raises(ImageError, match="does not match"):
        ImageEmbedding(np.zeros((6, 8), np.float32), (2, 4), (1, 1), (1, 1))
    with pytest.raises(ImageError, match="2-D float32"):
        ImageEmbedding(np.zeros((8,), np.float32), (2, 4), (1, 1), (1, 1))


def test_a_writeable_array_is_copied_so_later_changes_cannot_alter_the_embedding():
    arr = np.ones((2, 4), np.float32)
    emb = ImageEmbedding(arr, (1, 2), (1, 1), (1, 1))
    arr[:] = 5
    assert float(emb.array.max()) == 1.0 and not emb.array.flags.writeable


def test_a_cancel_between_evaluation_and_generation_is_kept(model):
    from glm4v_mtmd._handles import Sampling
    from glm4v_mtmd._native import lib
    from glm4v_mtmd._prompt import CallStats

    with model.context() as ctx:
        h = ctx._ctx
        h.begin_call()
        ctx._evaluate(PROMPT, CallStats())
        ctx.cancel()  # lands after the prompt, before generation starts
        h.gen_begin(Sampling(0.0, 0, 1.0, 0.0, 1.0, 64, 0.0, 0.0, 0), (), 50)
        _, ids, finish = h.gen_step(50)
        h.gen_end()
        assert finish == lib.GLM4V_FINISH_CANCELLED and ids == []


def test_a_cancel_with_no_call_running_does_not_stop_the_next_call(model):
    with model.context() as ctx:
        ctx.cancel()
        out = ctx.generate(PROMPT, GREEDY)
    assert out.finish_reason == "length" and len(out.token_ids) == GREEDY.max_tokens


def test_cancel_ends_a_generation_with_reason_cancelled(model):
    with model.context() as ctx:
        chunks = []
        for chunk in ctx.stream(PROMPT, GenerationConfig(max_tokens=200, temperature=0.0, ignore_eos=True)):
            chunks.append(chunk)
            if len(chunks) == 2:
                ctx.cancel()
    assert chunks[-1].finish_reason == "cancelled" and len(chunks) <= 3


def test_a_caught_ctrl_c_belongs_to_its_call_only():
    from glm4v_mtmd import _native

    with _native.call_scope() as call:
        call.interrupts.append(KeyboardInterrupt())
    # The next call (here: a status check outside it) does not inherit what an earlier call caught...
    _native.check(_native.lib.GLM4V_OK)
    # ...nor does a call in another thread see this thread's.
    seen = []
    with _native.call_scope() as call:
        call.interrupts.append(KeyboardInterrupt())
        t = threading.Thread(target=lambda: seen.append(_native.current_call()))
        t.start()
        t.join()
        with pytest.raises(KeyboardInterrupt):
            _native.check(_native.lib.GLM4V_OK)
    assert seen == [None]


def test_the_image_cache_is_consistent_under_concurrent_encodes(pair):
    images = [random_image(56, 56 * (1 + i), seed=40 + i) for i in range(4)]
    with Model(*pair, n_ctx=128, n_parallel=1, n_threads=1) as m:
        expected = [m.encode_image(img).array for img in images]
        m.image_cache.clear()
        got = _run_together([lambda i=i: m.encode_image(images[i % 4]).array for i in range(12)])
        assert len(m.image_cache) == 4
        assert m.image_cache.size_bytes == sum(e.nbytes for e in expected)
    for i, arr in enumerate(got):
        np.testing.assert_array_equal(arr, expected[i % 4])


def test_a_picture_asked_for_by_several_threads_at_once_is_encoded_once(pair):
    from glm4v_mtmd._prompt import CallStats

    image = random_image(112, 140, seed=50)
    with Model(*pair, n_ctx=128, n_parallel=1, n_threads=1) as m:
        stats = [CallStats() for _ in range(4)]
        got = _run_together([lambda i=i: m._encode(image, stats[i]) for i in range(4)])
        assert sum(s.encode_ms > 0 for s in stats) == 1
        assert all(g is got[0] for g in got)
        # With the cache off every request encodes (nothing to share through).
    with Model(*pair, n_ctx=128, n_parallel=1, n_threads=1, image_cache_mb=0) as m:
        stats = [CallStats() for _ in range(2)]
        _run_together([lambda i=i: m._encode(image, stats[i]) for i in range(2)])
        assert all(s.encode_ms > 0 for s in stats)


def test_logit_bias_bans_and_forces_tokens(model):
    ctx = model.context()
    try:
        plain = ctx.generate(PROMPT, GREEDY)
        banned = dict.fromkeys(plain.token_ids, -np.inf)
        other = ctx.generate(PROMPT, GenerationConfig(**{**GREEDY.__dict__, "logit_bias": banned}))
        assert not set(other.token_ids) & set(banned)
        forced = ctx.generate(PROMPT, GenerationConfig(**{**GREEDY.__dict__, "logit_bias": {7: 100.0}}))
        assert forced.token_ids == (7,) * GREEDY.max_tokens
        with pytest.raises(ConfigError, match="outside the vocabulary"):
            ctx.generate(PROMPT, GenerationConfig(**{**GREEDY.__dict__, "logit_bias": {model.n_vocab: 1.0}}))
    finally:
        ctx.close()


@pytest.mark.parametrize("bias", [{-1: 1.0}, {1: float("nan")}, {1: float("inf")}, {1: "x"}, {True: 1.0}, "x"])
def test_bad_logit_bias_raises_config_error(bias):
    with pytest.raises(ConfigError, match="logit_bias"):
        GenerationConfig(logit_bias=bias)
