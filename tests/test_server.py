"""``glm4v-mtmd serve``: a real uvicorn server on loopback, talked to with the real ``openai`` client.

Servers run in a thread of the test process (uvicorn on 127.0.0.1, a free port) with the tiny random
models; raw HTTP (``http.client``, sockets) is used where the client would hide what is tested:
``[DONE]``, disconnects, hostile bodies.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import pathlib
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import uvicorn  # noqa: E402
from conftest import random_image  # noqa: E402
from PIL import Image  # noqa: E402
from serving import Server, png_url, user  # noqa: E402

from glm4v_mtmd import Model, parse_boxes  # noqa: E402
from glm4v_mtmd.server.app import ServerOptions, ServerState, create_app  # noqa: E402
from glm4v_mtmd.server.protocol import Limits  # noqa: E402

KEY = "test-key"


@pytest.fixture(scope="module")
def tiny_f16(gguf_pair: Any) -> tuple[pathlib.Path, pathlib.Path]:
    return gguf_pair("glm4v", outtype="f16")


@pytest.fixture(scope="module")
def server(tiny_f16: Any) -> Iterator[Server]:
    srv = Server(tiny_f16, parallel=2)
    yield srv
    srv.stop()


GREEDY = {"temperature": 0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
LONG = {**GREEDY, "ignore_eos": True, "max_tokens": 3500}


def sse_events(resp: http.client.HTTPResponse) -> Iterator[str]:
    """The ``data:`` payloads of an SSE response, as they arrive."""
    for line in resp:
        line = line.strip()
        if line.startswith(b"data: "):
            yield line[6:].decode()


def open_stream(srv: Server, body: dict[str, Any]) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}).encode(),
                 headers={"Content-Type": "application/json", **srv.auth})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


# ------------------------------------------------------------------------------------- answers


def test_plain_and_streamed_answers_equal(server: Server) -> None:
    client = server.client()
    messages = [user("Describe this image.", png_url())]
    extra = {"top_k": 0, "repetition_penalty": 1.0}
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                           top_p=1.0, extra_body=extra)
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-")
    assert plain.choices[0].message.role == "assistant"
    assert plain.usage.completion_tokens > 0 and plain.usage.prompt_tokens > 20
    timings = plain.model_extra["timings"]
    assert timings["predicted_n"] == plain.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                                 top_p=1.0, extra_body=extra, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == plain.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == plain.usage.prompt_tokens
    assert usage_chunk.model_extra["timings"]["predicted_n"] == plain.usage.completion_tokens


def test_stream_ends_with_done_and_usage_chunk(server: Server) -> None:
    _, resp = open_stream(server, {"messages": [user("Hi")], "max_tokens": 5, **GREEDY,
                                   "stream_options": {"include_usage": True}})
    assert resp.getheader("content-type").startswith("text/event-stream")
    events = list(sse_events(resp))
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert all(o["object"] == "chat.completion.chunk" for o in objs)
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["total_tokens"] > 0
    assert objs[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_late_first_token_is_preceded_by_keepalive_pings(tiny_f16: Any) -> None:
    """A prefill longer than keepalive_s: the stream starts at once with SSE comments, then the reply."""
    srv = Server(tiny_f16, parallel=1, keepalive_s=0.01)
    try:
        images = [png_url(112, 112, seed=k) for k in range(6)]  # encodes take longer than 10 ms
        conn, resp = open_stream(srv, {"messages": [user("Compare them.", *images)], "max_tokens": 3, **GREEDY})
        lines = [line.strip() for line in resp if line.strip()]
        pings = [i for i, line in enumerate(lines) if line == b": ping"]
        data = [i for i, line in enumerate(lines) if line.startswith(b"data: ")]
        assert pings and max(pings) < min(data)  # only before the first event
        assert lines[-1] == b"data: [DONE]"
        assert json.loads(lines[data[0]][6:])["choices"][0]["delta"]["role"] == "assistant"
        # A failure after the stream started is an error event (here: the prompt does not fit). New
        # pictures, so their encodes (before the size check) outlast keepalive_s: the first ones are
        # cached now, and without encodes the check can answer within 10 ms, as a plain 400.
        long = "word " * 5000
        fresh = [png_url(112, 112, seed=100 + k) for k in range(6)]
        conn, resp = open_stream(srv, {"messages": [user(long, *fresh)], "max_tokens": 3})
        events = [line.strip() for line in resp if line.strip().startswith(b"data: ")]
        assert len(events) == 1 and "error" in json.loads(events[0][6:])
    finally:
        srv.stop()


def test_follow_up_about_the_same_image_reuses_cache(server: Server) -> None:
    client = server.client()
    url = png_url(112, 140, seed=11)
    first_messages = [user("What is in the picture?", url)]
    greedy = {"temperature": 0, "top_p": 1.0, "extra_body": {"top_k": 0, "repetition_penalty": 1.0}}
    first = client.chat.completions.create(model="tiny", messages=first_messages, max_tokens=8, **greedy)
    assert first.model_extra["timings"]["encode_ms"] > 0
    encodes = server.metric("image_encodes_total")
    follow = [*first_messages, {"role": "assistant", "content": first.choices[0].message.content},
              {"role": "user", "content": "And the colours?"}]
    second = client.chat.completions.create(model="tiny", messages=follow, max_tokens=8, **greedy)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # The picture is 20 image tokens: everything up to the first reply is still in the KV cache.
    assert cached > 20 and cached < second.usage.prompt_tokens
    assert second.model_extra["timings"]["encode_ms"] == 0
    assert second.model_extra["timings"]["cache_n"] == cached
    assert server.metric("image_encodes_total") == encodes


def test_same_picture_at_once_is_encoded_once(server: Server) -> None:
    url = png_url(168, 196, seed=21)
    before = server.metric("image_encodes_total")
    results: list[int] = []

    def ask(i: int) -> None:
        status, body, _ = server.post({"messages": [user(f"Question {i}", url)], "max_tokens": 4, **GREEDY})
        results.append(status)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 4
    assert server.metric("image_encodes_total") == before + 1


def test_two_streams_progress_together(server: Server) -> None:
    times: dict[int, list[float]] = {0: [], 1: []}

    def run(i: int) -> None:
        _, resp = open_stream(server, {"messages": [user(f"Story {i}")], **LONG, "max_tokens": 400})
        for event in sse_events(resp):
            times[i].append(time.monotonic())
            if event == "[DONE]":
                break

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # A chunk carries every token ready (at most one chunk per 40 ms): many chunks per stream all the same.
    assert len(times[0]) > 10 and len(times[1]) > 10
    # Each stream had produced text before the other finished.
    assert times[0][2] < times[1][-1] and times[1][2] < times[0][-1]


def test_logit_bias_forces_a_token(server: Server) -> None:

    status, body, _ = server.post({"messages": [user("Hi")], **GREEDY, "ignore_eos": True, "max_tokens": 6,
                                   "logit_bias": {"65": 100}})
    assert status == 200, body
    model: Model = server.state.model
    assert body["choices"][0]["message"]["content"] == model.detokenize([65] * 6).strip()
    status, body, _ = server.post({"messages": [user("Hi")], "logit_bias": {"999999": 1}})
    assert status == 400 and "logit_bias" in body["error"]["message"]


# ------------------------------------------------------------------------------------- reasoning and boxes


@pytest.fixture(scope="module")
def replay_moe(gguf_pair: Any) -> Iterator[Server]:
    """GLM-4.5V family (thinking switchable), replies replaced by a fixed text with a box."""
    srv = Server(gguf_pair("glm4v_moe", outtype="f16"), parallel=1,
                 replay="<think>The cat is left.</think>It is here: <|begin_of_box|>[100,200,500,750]<|end_of_box|>")
    yield srv
    srv.stop()


def test_reasoning_split_and_boxes(replay_moe: Server) -> None:
    client = replay_moe.client()
    url = png_url(100, 200, seed=5)  # original 200 x 100 pixels
    reply = client.chat.completions.create(model="tiny", messages=[user("Where is the cat?", url)])
    msg = reply.choices[0].message
    assert msg.content == "It is here: <|begin_of_box|>[100,200,500,750]<|end_of_box|>"  # markers kept
    assert msg.model_extra["reasoning_content"] == "The cat is left."
    assert msg.model_extra["reasoning"] == "The cat is left."
    expected = parse_boxes(msg.content)[0].to_pixels(200, 100)
    assert msg.model_extra["boxes"] == [{"box": [100, 200, 500, 750], "point": False, "pixels": list(expected),
                                         "image_index": 0}]

    chunks = list(client.chat.completions.create(model="tiny", messages=[user("Where is the cat?", url)],
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    assert reasoning == "The cat is left."
    assert "".join(d.content or "" for d in deltas) == msg.content
    assert deltas[-1].model_extra["boxes"] == msg.model_extra["boxes"]

    # Reasoning off: /nothink in the prompt (more prompt tokens), no reasoning in the reply.
    off = client.chat.completions.create(model="tiny", messages=[user("Where is the cat?", url)],
                                         reasoning_effort="none")
    assert "reasoning_content" not in off.choices[0].message.model_extra
    assert off.usage.prompt_tokens > reply.usage.prompt_tokens
    off2 = client.chat.completions.create(model="tiny", messages=[user("Where is the cat?", url)],
                                          extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off2.usage.prompt_tokens == off.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="enable_thinking"):
        client.chat.completions.create(model="tiny", messages=[user("x")],
                                       extra_body={"chat_template_kwargs": {"enable_thinking": "no"}})
    # Reasoning on assistant history is accepted under both names.
    for name in ("reasoning_content", "reasoning"):
        history = [user("Where?", url), {"role": "assistant", "content": "Here.", name: "Looked."}, user("Sure?")]
        assert client.chat.completions.create(model="tiny", messages=history).choices[0].message.content


def test_thinking_off_is_refused_for_glm41v(server: Server) -> None:
    status, body, _ = server.post({"messages": [user("Hi")], "reasoning_effort": "none"})
    assert status == 400 and "always reasons" in body["error"]["message"]


# ------------------------------------------------------------------------------------- load and cancel


def test_disconnect_stops_generation(server: Server) -> None:
    before = server.metric("generations_cancelled_total")
    conn, resp = open_stream(server, {"messages": [user("Go on")], **LONG})
    events = sse_events(resp)
    next(events)
    next(events)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    server.wait_metric("generations_cancelled_total", before + 1, timeout=10)
    server.wait_metric("contexts_busy", 0)

    # Non-streaming: the client gives up while the reply is generated.
    sock = _raw_request(server, {"messages": [user("Go on")], **LONG})
    server.wait_metric("contexts_busy", 1)
    sock.close()
    server.wait_metric("generations_cancelled_total", before + 2, timeout=10)
    server.wait_metric("contexts_busy", 0)
    # The server answers at once afterwards.
    status, reply, _ = server.post({"messages": [user("Hi")], "max_tokens": 2})
    assert status == 200


def test_disconnect_during_the_image_encode_stops_it(server: Server) -> None:
    """A picture of ~6,000 tokens takes seconds to encode on the tiny model; the client leaves at once, and
    the encode stops at its next check point (the engine's cancel flag, counted only when the vision graph
    stopped part-way). The model encodes normally afterwards."""
    gradient = np.linspace(0, 255, 2184, dtype=np.uint8)
    pixels = np.stack([np.add.outer(gradient, gradient[::-1]) // 2, np.add.outer(gradient, gradient) // 2,
                       np.tile(gradient, (2184, 1))], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")  # smooth: a small body
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    before = server.metric("image_encodes_cancelled_total")
    sock = _raw_request(server, {"messages": [user("What is it?", url)], **LONG})
    server.wait_metric("contexts_busy", 1)
    sock.close()
    server.wait_metric("image_encodes_cancelled_total", before + 1, timeout=20)
    server.wait_metric("contexts_busy", 0)
    status, reply, _ = server.post({"messages": [user("What is it?", png_url(seed=12))], "max_tokens": 2})
    assert status == 200 and reply["usage"]["prompt_tokens"] > 6


def _raw_request(srv: Server, body: dict[str, Any]) -> socket.socket:
    """A request sent on a raw socket, left unread (close the socket to disconnect)."""
    sock = socket.create_connection(("127.0.0.1", srv.port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def test_queue_full_is_503_and_a_client_gone_from_the_queue_never_runs(tiny_f16: Any) -> None:
    srv = Server(tiny_f16, parallel=1, max_queue=1)
    try:
        conn, resp = open_stream(srv, {"messages": [user("Long")], **LONG})
        events = sse_events(resp)
        next(events)
        queued = _raw_request(srv, {"messages": [user("Next")], "max_tokens": 2})
        srv.wait_metric("queue_depth", 1)
        with pytest.raises(openai.APIStatusError) as info:
            srv.client().chat.completions.create(model="tiny", messages=[user("Third")], max_tokens=2)
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"] == "1"
        assert srv.metric("queue_rejections_total") == 1
        # The queued client leaves: its request is dropped, not run once the context is free.
        queued.close()
        srv.wait_metric("queue_depth", 0)
        conn.close()
        srv.wait_metric("contexts_busy", 0)
        assert srv.metric("generations_total") == 1
        waiting: list[int] = []
        t = threading.Thread(target=lambda: waiting.append(srv.post({"messages": [user("Next")], "max_tokens": 2})[0]))
        t.start()
        t.join(30)
        assert waiting == [200] and srv.metric("generations_total") == 2
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------- safety


def test_api_key(tiny_f16: Any) -> None:
    srv = Server(tiny_f16, parallel=1, api_keys=(KEY, "second-key"))
    try:
        assert srv.get("/health")[0] == 200  # public
        wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="tiny", messages=[user("Hi")], max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert srv.get("/metrics")[0] == 401
        assert srv.client().chat.completions.create(model="tiny", messages=[user("Hi")], max_tokens=2).choices
        status, _, _ = srv.post({"messages": [user("Hi")], "max_tokens": 2},
                                headers={"Authorization": "", "X-Api-Key": "second-key"})
        assert status == 200
        assert srv.client().models.list().data[0].id == "tiny"
    finally:
        srv.stop()


def test_no_cors_headers_unless_asked(server: Server, tiny_f16: Any) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port)
    conn.request("OPTIONS", "/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                             "Access-Control-Request-Method": "POST"})
    resp = conn.getresponse()
    resp.read()
    assert resp.getheader("access-control-allow-origin") is None
    srv = Server(tiny_f16, parallel=1, cors_origins=("http://app.example",))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port)
        conn.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, x-stainless-os"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200 and resp.getheader("access-control-allow-origin") == "http://app.example"
        assert resp.getheader("access-control-allow-credentials") is None
        conn.request("OPTIONS", "/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                                 "Access-Control-Request-Method": "POST"})
        resp = conn.getresponse()
        resp.read()
        assert resp.getheader("access-control-allow-origin") is None
    finally:
        srv.stop()


@contextlib.contextmanager
def listener() -> Iterator[tuple[int, list[Any]]]:
    """A loopback TCP port that records every connection made to it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.settimeout(0.1)
    seen: list[Any] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                seen.append(sock.accept())
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield sock.getsockname()[1], seen
    finally:
        stop.set()
        t.join()
        sock.close()


def test_image_urls_other_than_data_are_refused(server: Server, tmp_path: pathlib.Path) -> None:
    with listener() as (port, seen):
        for url in ("file:///etc/passwd", "/etc/passwd", "etc/passwd", f"http://127.0.0.1:{port}/cat.png",
                    f"https://127.0.0.1:{port}/cat.png", f"ftp://127.0.0.1:{port}/x"):
            status, body, _ = server.post({"messages": [user("What?", url)], "max_tokens": 2})
            assert 400 <= status < 500, (url, body)
            assert "image_url" in body["error"]["message"]
        time.sleep(0.3)
        assert seen == []


def test_media_dir(tiny_f16: Any, tmp_path: pathlib.Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    Image.fromarray(random_image(56, 56, seed=2)).save(media / "ok.png")
    (tmp_path / "secret.png").write_bytes((media / "ok.png").read_bytes())
    (media / "link.png").symlink_to(tmp_path / "secret.png")
    srv = Server(tiny_f16, parallel=1, limits=Limits(media_dir=media.resolve()))
    try:
        status, body, _ = srv.post({"messages": [user("What?", f"file://{media}/ok.png")], "max_tokens": 2})
        assert status == 200, body
        for url in (f"file://{media}/link.png", f"file://{media}/../secret.png", "file:///etc/passwd"):
            status, body, _ = srv.post({"messages": [user("What?", url)], "max_tokens": 2})
            assert status == 403, (url, body)
        status, _, _ = srv.post({"messages": [user("What?", f"file://{media}/missing.png")]})
        assert status == 404
    finally:
        srv.stop()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's header), with a tiny body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def hostile_bodies() -> list[tuple[str, bytes]]:
    ok = {"messages": [user("Hi")], "max_tokens": 2}
    cases: list[tuple[str, Any]] = [
        ("not json", b"{"), ("empty", b""), ("array", b"[]"), ("string", b'"x"'), ("null", b"null"),
        ("nan", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}'),
        ("deep", b"[" * 100_000 + b"]" * 100_000),
        ("huge int", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1' + b"0" * 5000 + b"}"),
        ("binary", bytes(range(256)) * 10),
    ]
    integer = ["x", [], {}, 1.5, True, 2**70, 1e308]
    number = ["x", [], {}, True, 1e308, -1e308, float("nan"), float("inf")]
    flag = ["x", 1, [], {}]
    bad: dict[str, list[Any]] = {
        "max_tokens": [*integer, -1], "max_completion_tokens": [*integer, -1], "top_k": [*integer, -2],
        "seed": ["x", 1.5, [], 2**70], "temperature": [*number, -0.5, 101], "top_p": [*number, 0, 1.5],
        "min_p": [*number, 1], "repetition_penalty": [*number, 0, -1], "presence_penalty": [*number, 3],
        "frequency_penalty": [*number, -3], "repeat_last_n": ["x", -2, 10**6],
        "stop": [5, [1], {}, ["s"] * 100, "x" * 1000], "stream": flag, "ignore_eos": flag,
        "logit_bias": ["x", 5, {"abc": 1}, {"1": "x"}, {"1": 1e9}, {"-1": 1}, [[1]]],
        "stream_options": ["x", 5], "chat_template_kwargs": ["x", 5, {"enable_thinking": "yes"}],
        "reasoning_effort": ["x", 5, "none"], "n": [0, 2, "x", True], "messages": [None, "x", 5, {}],
    }
    for name, values in bad.items():
        for value in values:
            for stream in (False, True):
                body = {**ok, "stream": stream, name: value} if name != "stream" else {**ok, name: value}
                cases.append((f"{name}={value!r} stream={stream}", json.dumps(body).encode()))

    def image(url: Any) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]

    def b64(data: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(data).decode()

    audio = {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
    for msgs in ([], [{}], [{"role": "tool", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": 5}],
                 [{"role": "user", "content": [audio]}], image("data:image/png;base64,!!!"),
                 image("data:text/html;base64,AAAA"), image(b64(b"not an image")),
                 image(b64(_png_header_only(100_000, 100_000))), image(5), image("data:image/png;base64,"),
                 image("data:image/png,abc"), [{"role": "user", "content": [{"type": "image_url"}]}],
                 [{"role": "user", "content": "x"}, {"role": "assistant", "content": "prefill"}],
                 [{"role": "user", "content": [{"type": "text", "text": 7}]}],
                 [{"role": "user", "content": "x" * (10 << 20)}]):
        cases.append((f"messages={str(msgs)[:40]}", json.dumps({"messages": msgs}).encode()))
    for name, value in (("tools", [{"type": "function", "function": {"name": "f"}}]),
                        ("response_format", {"type": "json_object"}), ("n", 2), ("logprobs", True),
                        ("top_logprobs", 2), ("audio", {"voice": "x"}), ("tool_choice", "required"),
                        ("modalities", ["audio"])):
        cases.append((name, json.dumps({**ok, name: value}).encode()))
    return cases


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_hostile_requests_get_4xx_and_the_server_survives(server: Server) -> None:
    cases = hostile_bodies()
    assert len(cases) >= 200
    rss_before = _rss()
    for name, body in cases:
        status, reply, _ = server.post(body)
        assert 400 <= status < 500, (name, status, reply)
        assert "message" in reply.get("error", {}), name
    # Refused fields are named.
    status, reply, _ = server.post({"messages": [user("Hi")], "tools": [{"type": "function"}]})
    assert reply["error"]["param"] == "tools"
    status, reply, _ = server.post(b"x" * (33 << 20))
    assert status == 413
    # Still answers, and memory did not run away (the 33 MB body and 10 MB prompt are gone).
    status, reply, _ = server.post({"messages": [user("Hi", png_url())], "max_tokens": 2})
    assert status == 200
    assert _rss() - rss_before < 400 << 20


def test_max_tokens_must_fit_the_context(server: Server) -> None:
    status, body, _ = server.post({"messages": [user("Hi")], "max_tokens": 100_000})
    assert status == 400 and body["error"]["type"] == "exceed_context_size_error"


# ------------------------------------------------------------------------------------- the command line


def test_serve_command(tiny_f16: Any, tmp_path: pathlib.Path) -> None:
    text, proj = tiny_f16
    # cwd outside the source tree, so the installed package (with its compiled module) is imported
    refused = subprocess.run([sys.executable, "-m", "glm4v_mtmd", "serve", "-m", str(text), "--host", "0.0.0.0"],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert refused.returncode == 1 and "--api-key" in refused.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "glm4v_mtmd", "serve", "-m", str(text), "--port", str(port),
                             "--n-ctx", "1024", "--parallel", "2", "--no-ui", "--max-connections", "4"],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(model=text.name, messages=[user("Hi", png_url())], max_tokens=3)
        assert reply.model == text.name and reply.choices[0].message.content is not None
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/")
        assert conn.getresponse().status == 404  # --no-ui: no chat page
        conn.close()
        client.close()

        def wait_health(status: int, what: str) -> None:
            deadline = time.monotonic() + 10
            while True:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                try:
                    c.request("GET", "/health")
                    if c.getresponse().status == status:
                        return
                finally:
                    c.close()
                assert time.monotonic() < deadline, what
                time.sleep(0.05)

        # --max-connections 4: four idle connections, and the next request is refused at once, not queued
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        wait_health(503, "the connection limit did not apply")
        for sock in idle:
            sock.close()
        wait_health(200, "the server did not recover once the idle connections left")
    finally:
        proc.send_signal(2)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "chat page" not in err


def test_serve_command_reports_a_model_that_does_not_load(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "glm4v_mtmd", "serve", "-m", str(bad), "--port", str(port)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 1
    assert "failed to load" in result.stderr


def test_random_array_image_is_accepted(server: Server) -> None:
    arr = (np.random.default_rng(3).integers(0, 255, (30, 900, 3))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    status, body, _ = server.post({"messages": [user("Wide", url)], "max_tokens": 2})
    assert status == 200, body


def test_stop_strings_and_seeds(server: Server) -> None:
    messages = [user("Tell me more.")]
    status, plain, _ = server.post({"messages": messages, "max_tokens": 24, **GREEDY, "ignore_eos": True})
    text = plain["choices"][0]["message"]["content"]
    stop = text[8:11]
    status, cut, _ = server.post({"messages": messages, "max_tokens": 24, **GREEDY, "ignore_eos": True,
                                  "stop": ["never-there", stop]})
    assert status == 200
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["message"]["content"] == text[:text.index(stop)].strip()
    sampled = [server.post({"messages": messages, "max_tokens": 16, "temperature": 1.5, "top_k": 0, "top_p": 1.0,
                            "seed": seed, "ignore_eos": True})[1]["choices"][0]["message"]["content"]
               for seed in (5, 5, 6)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_health_is_503_while_the_model_loads(tiny_f16: Any) -> None:
    release = threading.Event()

    def slow_load() -> Model:
        release.wait(60)
        return Model(*tiny_f16, n_ctx=512, n_parallel=1, n_threads=1)

    state = ServerState(ServerOptions(model_name="tiny"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(state, slow_load), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("GET", "/health")
        resp = conn.getresponse()
        assert resp.status == 503 and json.loads(resp.read())["error"]["message"] == "Loading model"
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="tiny", messages=[user("Hi")], max_tokens=2)
        assert info.value.status_code == 503
        release.set()
        deadline = time.monotonic() + 60
        while state.model is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.chat.completions.create(model="tiny", messages=[user("Hi")], max_tokens=2).choices
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)
