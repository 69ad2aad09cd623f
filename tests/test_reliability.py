"""Interrupts, threads, bad images and leaks: the session survives all of them, and says so in numbers.

Ctrl-C is simulated with ``_thread.interrupt_main()``, which trips the SIGINT handler exactly as a
terminal does. No assertion depends on wall time: a test that needs "the engine is busy" makes the
work far longer than anything the machine could finish before the event (e.g. 60,000 tokens).
"""

from __future__ import annotations

import _thread
import contextlib
import io
import logging
import math
import os
import struct
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from conftest import GREEDY, PROMPT, random_image
from PIL import Image

from glm4v_mtmd import GenerationConfig, GenerationError, Glm4vError, ImageError, Session

LONG = GenerationConfig(max_tokens=60_000, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def pair(gguf_pair):
    return gguf_pair("glm4v", 0, "f16")


@pytest.fixture(scope="module")
def session(pair):
    with Session(*pair, n_ctx=65_536, n_threads=1) as s:
        yield s


@pytest.fixture(scope="module")
def baseline(session):
    session.reset()
    return session.generate(PROMPT, GREEDY).token_ids


def assert_still_works(session: Session, baseline: tuple[int, ...]) -> None:
    assert session.generate(PROMPT, GREEDY).token_ids == baseline  # prefix reuse from whatever the cache holds
    session.reset()
    assert session.generate(PROMPT, GREEDY).token_ids == baseline


@contextlib.contextmanager
def _interrupt_after(seconds: float):
    """Press Ctrl-C in ``seconds``, then again every second until the block ends.

    The repeats are what a user does when a press is lost. Python drops a KeyboardInterrupt raised
    where exceptions are ignored (in a ``__del__`` run by garbage collection, say); once, in a full
    test run, the first press was lost and a 60,000-token generation ran on (cause not found).
    """
    done = threading.Event()

    def press() -> None:
        if not done.wait(seconds):
            _thread.interrupt_main()
            while not done.wait(1.0):
                _thread.interrupt_main()

    presser = threading.Thread(target=press, daemon=True)
    presser.start()
    try:
        yield
    finally:
        done.set()
        presser.join()


# ----------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_stops_generate_inside_the_engine_and_the_session_survives(session, baseline):
    # generate() runs up to 64 tokens per call into C; the engine polls for Ctrl-C before every token.
    session.reset()
    n_prompt = len(session.evaluate(PROMPT).tokens)
    with _interrupt_after(0.3), pytest.raises(KeyboardInterrupt):
        session.generate(PROMPT, LONG)
    assert session.n_cells < n_prompt + LONG.max_tokens // 2  # stopped early, not after the whole run
    assert_still_works(session, baseline)


def _words(n: int) -> list[str]:
    return ["[gMASK]<sop><|user|>\n" + "many words of text " * n + "<|assistant|>\n"]  # ~16 tokens per repeat


def test_ctrl_c_stops_a_long_prompt_evaluation(session, baseline):
    # Size the prompt so its evaluation lasts ~3 s, or as long as n_ctx allows (prefill grows at least linearly
    # with length: 20k tokens took ~10 s on one of this project's CPUs, 61k under 1 s on another), and press
    # Ctrl-C at a third of that, at most 0.3 s in (the engine polls every 50 ms).
    session.reset()
    start = time.perf_counter()
    session.evaluate(_words(400))
    per_repeat = (time.perf_counter() - start) / 400  # a lower bound for longer prompts
    repeats = min(3_800, max(400, math.ceil(3.0 / max(per_repeat, 1e-9))))  # 3,800 (~61k tokens) fills n_ctx
    expected = per_repeat * repeats
    session.reset()
    if expected < 0.3:
        pytest.skip(f"the longest prompt n_ctx allows evaluates in {expected:.2f} s here: too short to interrupt")
    with _interrupt_after(min(0.3, expected / 3)), pytest.raises(KeyboardInterrupt):
        session.evaluate(_words(repeats))
    assert session.n_cells == 0  # an interrupted evaluation leaves the cache as it was
    assert_still_works(session, baseline)


def test_ctrl_c_that_lands_in_the_log_callback_is_delivered(pair):
    # A pending Ctrl-C runs its handler on entry to whichever Python callback the engine calls next; the log
    # callback must pass it on (to the next poll and the call's status check), not swallow it with the
    # logging errors it ignores. The model load logs; a handler that raises stands in for the signal.
    class Interrupt(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise KeyboardInterrupt

    logger = logging.getLogger("glm4v_mtmd")
    handler, level = Interrupt(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with pytest.raises(KeyboardInterrupt):
            Session(*pair, n_ctx=512, n_threads=1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    with Session(*pair, n_ctx=512, n_threads=1) as s:  # nothing left pending
        assert len(s.generate(PROMPT, GREEDY).token_ids) == GREEDY.max_tokens


def test_ctrl_c_while_streaming(session, baseline):
    session.reset()
    seen = 0
    with pytest.raises(KeyboardInterrupt):
        for _ in session.stream(PROMPT, LONG):
            seen += 1
            if seen == 5:
                _thread.interrupt_main()
    assert seen < 100
    assert_still_works(session, baseline)


# ----------------------------------------------------------------------------- threads


def test_engine_calls_release_the_gil(session):
    """While one thread is inside a long engine call, another runs Python.

    The switch interval is raised to 100 s, so the interpreter never takes the GIL from a thread by
    itself: the main thread can only count while the worker has released the GIL, i.e. inside C.
    """
    from glm4v_mtmd._native import ffi, lib

    session.reset()
    session.evaluate(PROMPT)
    h = session.context._ctx.ptr()
    lib.glm4v_set_interrupt_poll(h, ffi.NULL, ffi.NULL, 0)  # the worker must not call back into Python
    sp = ffi.new("glm4v_sampling *")
    sp[0] = lib.glm4v_sampling_default()
    stops = ffi.new("int32_t[]", 1)
    assert lib.glm4v_gen_begin(h, sp, stops, 0, 60_000) == lib.GLM4V_OK
    bufs = (ffi.new("char[]", 1 << 20), ffi.new("int32_t *"), ffi.new("int32_t[]", 60_000), ffi.new("int32_t *"),
            ffi.new("int32_t *"), ffi.new("int32_t *"))
    entering, done = threading.Event(), threading.Event()

    def worker():
        entering.set()
        lib.glm4v_gen_step(h, 60_000, bufs[0], 1 << 20, bufs[1], bufs[2], 60_000, bufs[3], bufs[4], bufs[5])
        done.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(100)
    try:
        t = threading.Thread(target=worker)
        t.start()
        entering.wait(30)
        counted = 0
        while not done.is_set() and counted < 2_000_000:
            counted += 1
        session.cancel()
    finally:
        sys.setswitchinterval(old)
    t.join(60)
    session.reset()
    assert counted > 0


def test_two_sessions_in_two_threads_give_their_sequential_answers(pair):
    prompts = [PROMPT, ["[gMASK]<sop><|user|>\n", random_image(56, 112, seed=9), "What is it?<|assistant|>\n"]]
    config = GenerationConfig(max_tokens=48, temperature=0.0, ignore_eos=True)
    with Session(*pair, n_ctx=1024, n_threads=1) as a, Session(*pair, n_ctx=1024, n_threads=1) as b:
        expected = [a.generate(prompts[0], config).token_ids, b.generate(prompts[1], config).token_ids]
        a.reset()
        b.reset()
        results: list = [None, None]

        def run(i, s):
            for _ in range(3):
                s.reset()
                results[i] = s.generate(prompts[i], config).token_ids

        threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate((a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == expected


def test_one_session_shared_by_threads_serialises_calls(session, baseline):
    # Calls on one Session take its lock: they run one after another, each seeing a consistent cache.
    errors, answers = [], []

    def ask():
        try:
            for _ in range(3):
                answers.append(session.generate(PROMPT, GREEDY).token_ids)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and answers == [baseline] * 12


def test_an_open_stream_holds_the_session(session, baseline):
    session.reset()
    stream = session.stream(PROMPT, GREEDY)
    first = next(stream)
    # The same thread cannot start another call while its stream is open ...
    with pytest.raises(GenerationError, match="stream is still open"):
        session.generate(PROMPT, GREEDY)
    # ... another thread's call waits for the stream, and both answers come out whole.
    other: list = []
    started = threading.Event()

    def ask():
        started.set()
        other.append(session.generate(["[gMASK]<sop><|user|>\nhi<|assistant|>\n"], GREEDY).token_ids)

    t = threading.Thread(target=ask)
    t.start()
    started.wait(10)
    rest = list(stream)
    t.join(60)
    assert first.token_ids + tuple(i for c in rest for i in c.token_ids) == baseline
    session.reset()
    assert other == [session.generate(["[gMASK]<sop><|user|>\nhi<|assistant|>\n"], GREEDY).token_ids]


def test_closing_a_stream_early_frees_the_session(session, baseline):
    session.reset()
    stream = session.stream(PROMPT, GREEDY)
    next(stream)
    stream.close()
    assert_still_works(session, baseline)


# ----------------------------------------------------------------------------- bad images


def _encoded(fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(random_image(96, 128, seed=4)).save(buf, fmt, **save)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def bad_images() -> list[tuple[str, object]]:
    rng = np.random.default_rng(0)
    cases: list[tuple[str, object]] = [(f"random-bytes-{i}", rng.bytes(int(n))) for i, n in
                                       enumerate((0, 1, 7, 64, 1000, 50_000))]
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        data = _encoded(fmt)
        for frac in (0.02, 0.1, 0.5, 0.9):
            cases.append((f"truncated-{fmt.lower()}-{int(frac * 100)}%", data[: int(len(data) * frac)]))
        flipped = bytearray(data)
        flipped[len(data) // 3: len(data) // 3 + 16] = rng.bytes(16)
        cases.append((f"corrupted-{fmt.lower()}", bytes(flipped)))
    cases += [
        ("bomb-png-30000x30000", _png_claiming(30_000, 30_000)),
        ("bomb-png-100000x2", _png_claiming(100_000, 2)),
        ("zero-height-png", _png_claiming(50, 0)),
        ("zero-size-array", np.zeros((0, 0, 3), np.uint8)),
        ("one-pixel-array", np.zeros((1, 1, 3), np.uint8)),
        ("aspect-300-array", np.zeros((2, 600, 3), np.uint8)),
        ("float-array", np.zeros((56, 56, 3), np.float32)),
        ("five-channel-array", np.zeros((56, 56, 5), np.uint8)),
        ("4d-array", np.zeros((1, 56, 56, 3), np.uint8)),
        ("empty-path", ""),
        ("directory-path", os.getcwd()),
        ("none", None),
    ]
    return cases


def test_bad_images_raise_image_errors_and_the_session_survives(session, baseline, capsys):
    cases = bad_images()
    outcomes: dict[str, str] = {}
    for name, image in cases:
        try:
            session.encode_image(image)
            outcomes[name] = "accepted"
        except ImageError:
            outcomes[name] = "ImageError"
        except Glm4vError as exc:
            outcomes[name] = type(exc).__name__
    accepted = sorted(n for n, o in outcomes.items() if o == "accepted")
    other = {n: o for n, o in outcomes.items() if o not in ("accepted", "ImageError")}
    with capsys.disabled():
        print(f"\n{len(cases)} bad images: 0 crashes, {len(cases) - len(accepted) - len(other)} ImageError, "
              f"{len(accepted)} decoded anyway ({', '.join(accepted) or '-'})")
    assert len(cases) >= 40
    assert not other
    # Only damage Pillow can still decode (a corrupted middle, a truncated tail it pads) may pass.
    assert all(n.startswith(("corrupted-", "truncated-")) for n in accepted)
    assert_still_works(session, baseline)


def test_animated_images_use_their_first_frame(session):
    frames = [Image.fromarray(np.full((60, 80, 3), c, np.uint8)) for c in (10, 200, 90)]
    for fmt in ("GIF", "WEBP", "PNG"):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
        emb = session.encode_image(buf.getvalue())
        first = session.encode_image(np.asarray(frames[0].convert("RGB")))
        np.testing.assert_array_equal(emb.array, first.array)


# ----------------------------------------------------------------------------- leaks


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


LEAK_BOUND_MIB = 16  # growth allowed over the measured loop, after a warm-up (allocator noise is ~1-4 MiB here)
rss_test = pytest.mark.skipif(
    not os.path.exists("/proc/self/statm") or "libasan" in os.environ.get("LD_PRELOAD", ""),
    reason="RSS is read from /proc (Linux); under AddressSanitizer its quarantine keeps freed memory resident "
    "(the sanitizer run checks memory errors, the normal run checks RSS)",
)


@rss_test
def test_load_close_cycles_keep_rss_flat(pair, capsys):
    def cycle():
        with Session(*pair, n_ctx=256, n_threads=1) as s:
            s.generate(["hello"], GenerationConfig(max_tokens=2))

    for _ in range(20):
        cycle()
    before = _rss_mib()
    for _ in range(200):
        cycle()
    growth = _rss_mib() - before
    with capsys.disabled():
        print(f"\n200 load/generate/close cycles: RSS {growth:+.1f} MiB (bound {LEAK_BOUND_MIB} MiB)")
    assert growth < LEAK_BOUND_MIB


@rss_test
def test_many_short_generations_keep_rss_flat(session, capsys):
    config = GenerationConfig(max_tokens=4, temperature=0.8, seed=1, stop=("zz",))

    def run(n):
        for i in range(n):
            prompt = ["[gMASK]<sop><|user|>\n", PROMPT[1], f"Question {i % 50}<|assistant|>\n"]
            if i % 2:
                session.generate(prompt, config)
            else:
                for _ in session.stream(prompt, config):
                    pass

    session.reset()
    run(100)
    before = _rss_mib()
    run(1000)
    growth = _rss_mib() - before
    with capsys.disabled():
        print(f"\n1000 short generations (half streamed, image prompt): RSS {growth:+.1f} MiB "
              f"(bound {LEAK_BOUND_MIB} MiB)")
    assert growth < LEAK_BOUND_MIB
