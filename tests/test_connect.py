"""``glm4v_mtmd.connect``: the local chat API against remote OpenAI-compatible endpoints.

The endpoints are real servers on loopback: ``glm4v-mtmd serve`` (uvicorn in a thread of this process)
and llama.cpp's own ``llama-server`` built from the package's engine tree (a child process). The same
conversation, with the same greedy settings, must give the same answer, reasoning and boxes through
``connect`` as through a local :class:`Context`.
"""

from __future__ import annotations

import http.server
import io
import json
import pathlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from conftest import random_image, terminate  # noqa: E402
from PIL import Image  # noqa: E402
from serving import Server  # noqa: E402

from glm4v_mtmd import (  # noqa: E402
    ConfigError,
    GenerationConfig,
    ImageError,
    Model,
    RemoteError,
    connect,
    parse_boxes,
)
from glm4v_mtmd.remote import _split_content  # noqa: E402

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"

GREEDY = GenerationConfig(max_tokens=24, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
N_CTX = 4096
KEY = "connect-key"
# A reply with two boxes, a point and reasoning, as the scripted server sends it.
REPLAY = ("<think>Two squares and a dot.</think>The left square<|begin_of_box|>[[100,200,300,400]]<|end_of_box|>"
          ", the right one<|begin_of_box|>[[600,150,950,999]]<|end_of_box|> and the dot"
          "<|begin_of_box|>[[500,500]]<|end_of_box|>.")


@pytest.fixture(scope="module")
def moe_f16(gguf_pair: Any) -> tuple[pathlib.Path, pathlib.Path]:
    """The tiny GLM-4.5V-architecture model: its template switches thinking on and off."""
    return gguf_pair("glm4v_moe", outtype="f16")


@pytest.fixture(scope="module")
def local(moe_f16: Any) -> Iterator[Any]:
    """A local context with the server's settings (one context, n_ctx, 2 threads)."""
    model = Model(*moe_f16, n_ctx=N_CTX, n_parallel=1, n_threads=2)
    with model.context() as ctx:
        yield ctx
    model.close()


@pytest.fixture(scope="module")
def served(moe_f16: Any) -> Iterator[Server]:
    srv = Server(moe_f16, parallel=1, n_ctx=N_CTX)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def scripted(moe_f16: Any) -> Iterator[Server]:
    srv = Server(moe_f16, parallel=1, n_ctx=N_CTX, api_keys=(KEY,), replay=REPLAY)
    yield srv
    srv.stop()


def png_bytes(height: int, width: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(random_image(height, width, seed)).save(buf, "PNG")
    return buf.getvalue()


def conversation(image: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "What is in the picture?"}]}]


def same_reply(remote: Any, local: Any) -> None:
    assert remote.answer == local.answer
    assert remote.reasoning == local.reasoning
    assert remote.finish_reason == local.finish_reason
    assert remote.boxes == local.boxes
    assert remote.usage.completion_tokens == local.usage.completion_tokens
    assert remote.usage.prompt_tokens == local.usage.prompt_tokens


# ------------------------------------------------------------------------------------ glm4v-mtmd serve


@pytest.mark.parametrize("thinking", [None, False])
def test_serve_gives_the_local_answer(served: Server, local: Any, thinking: Any, tmp_path: pathlib.Path) -> None:
    # 150 x 97 is resized (to 140 x 84 by smart_resize) before it is sent: the server must see the
    # reference pixels, as the local context does.
    path = tmp_path / "picture.png"
    path.write_bytes(png_bytes(97, 150, seed=11))
    remote = connect(f"http://127.0.0.1:{served.port}")
    assert remote.model == "tiny"
    first_local = local.chat(conversation(path), GREEDY, thinking=thinking)
    first = remote.chat(conversation(path), GREEDY, thinking=thinking)
    same_reply(first, first_local)
    assert first.answer or first.reasoning  # the tiny model said something
    # A second turn: the history (with the first reply) goes back; the image is sent again.
    history = [*conversation(path), {"role": "assistant", "content": first_local.answer},
               {"role": "user", "content": "And the colours?"}]
    same_reply(remote.chat(history, GREEDY, thinking=thinking), local.chat(history, GREEDY, thinking=thinking))


def test_stream_matches_the_whole_reply(served: Server) -> None:
    remote = connect(f"http://127.0.0.1:{served.port}/v1/")
    image = random_image(60, 90, seed=4)
    whole = remote.chat(conversation(image), GREEDY)
    chunks = list(remote.chat_stream(conversation(image), GREEDY))
    last = chunks[-1]
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert last.finish_reason == whole.finish_reason
    assert "".join(c.text for c in chunks if c.kind == "answer").strip() == whole.answer
    assert "".join(c.text for c in chunks if c.kind == "reasoning").strip() == whole.reasoning
    assert last.usage is not None and whole.usage.completion_tokens > 0
    # The second request reuses the first one's prompt cells: only the cached count differs.
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (whole.usage.prompt_tokens,
                                                                        whole.usage.completion_tokens)
    assert last.usage.reused_cells > whole.usage.reused_cells
    assert last.boxes == whole.boxes
    assert last.timings is not None and last.timings.generated_tokens == whole.usage.completion_tokens


def test_boxes_map_to_the_callers_image(scripted: Server) -> None:
    remote = connect(f"http://127.0.0.1:{scripted.port}/v1", api_key=KEY)
    small, large = png_bytes(90, 130, seed=1), png_bytes(449, 641, seed=2)
    messages = [{"role": "user", "content": [
        {"type": "image", "image": small}, {"type": "image", "image": large},
        {"type": "text", "text": "Where are the squares?"}]}]
    expected = parse_boxes(REPLAY)
    assert len(expected) == 3
    result = remote.chat(messages, GREEDY)
    assert result.reasoning == "Two squares and a dot."
    assert "<|begin_of_box|>[[100,200,300,400]]<|end_of_box|>" in result.answer  # boxes stay in the answer
    # The most recent image by default, in its own pixels (641 x 449), not the resized ones.
    assert [b.pixels for b in result.boxes] == [b.to_pixels(641, 449) for b in expected]
    assert [b.image_index for b in result.boxes] == [1, 1, 1]
    first = remote.chat(messages, GREEDY, box_image=0)
    assert [b.pixels for b in first.boxes] == [b.to_pixels(130, 90) for b in expected]
    assert [b.image_index for b in first.boxes] == [0, 0, 0]
    streamed = list(remote.chat_stream(messages, GREEDY, box_image=-2))
    assert streamed[-1].boxes == first.boxes
    # Sent at their own size, the boxes are the same.
    original = connect(f"http://127.0.0.1:{scripted.port}/v1", api_key=KEY, image_size="original")
    assert original.chat(messages, GREEDY).boxes == result.boxes
    # Thinking off reaches the server: the prompt closed the think block, so the replayed <think>
    # block is answer text there, as a local chat files it.
    off = remote.chat(messages, GREEDY, thinking=False)
    assert off.reasoning == "" and off.answer.startswith("Two squares and a dot.The left square")
    assert off.boxes == result.boxes


def test_errors_are_typed(scripted: Server, served: Server) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RemoteError, match="cannot connect") as refused:
        connect(f"http://127.0.0.1:{port}/v1", timeout=5)
    assert refused.value.status is None
    with pytest.raises(RemoteError, match="401") as denied:
        connect(f"http://127.0.0.1:{scripted.port}/v1")
    assert denied.value.status == 401
    with pytest.raises(RemoteError, match="401"):
        connect(f"http://127.0.0.1:{scripted.port}/v1", api_key="wrong")
    for bad in ("127.0.0.1:8080", "ftp://host/v1", "", "http://h/v1?x=1"):
        with pytest.raises(ConfigError):
            connect(bad)
    with pytest.raises(ConfigError, match="image_size"):
        connect(f"http://127.0.0.1:{served.port}", image_size="small")  # type: ignore[arg-type]
    remote = connect(f"http://127.0.0.1:{served.port}")
    with pytest.raises(ConfigError, match="box_image"):
        remote.chat(conversation(random_image(40, 40)), GREEDY, box_image=1)
    with pytest.raises(ConfigError, match="video"):
        remote.chat([{"role": "user", "content": [{"type": "video", "video": [random_image(56, 56)] * 2}]}])
    with pytest.raises(ImageError, match="no such file"):
        remote.chat(conversation("/nonexistent/picture.png"))
    with pytest.raises(ConfigError, match="only data: URLs"):
        remote.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    # A request the server refuses: the server's own message, with its status.
    with pytest.raises(RemoteError, match="max_tokens") as refused_request:
        remote.chat(conversation(random_image(40, 40)), GenerationConfig(max_tokens=N_CTX + 1))
    assert refused_request.value.status == 400


class _Broken(http.server.BaseHTTPRequestHandler):
    """An endpoint that lists a model and then stops a stream half-way or answers non-JSON."""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._send(200, b'{"object": "list", "data": [{"id": "m"}]}', "application/json")

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["stream"]:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            delta = {"choices": [{"index": 0, "delta": {"content": "half"}, "finish_reason": None}]}
            self.wfile.write(b"data: " + json.dumps(delta).encode() + b"\n\n")
            self.wfile.flush()
            return  # the connection closes without a finish_reason or [DONE]
        self._send(200, b"<html>not json</html>", "text/html")

    def _send(self, status: int, data: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_broken_replies_are_remote_errors() -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Broken)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        remote = connect(f"http://127.0.0.1:{httpd.server_address[1]}/v1")
        assert remote.model == "m"
        with pytest.raises(RemoteError, match="not JSON"):
            remote.chat([{"role": "user", "content": "hi"}])
        stream = remote.chat_stream([{"role": "user", "content": "hi"}])
        with pytest.raises(RemoteError, match="without a finish_reason"):
            list(stream)
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(("content", "field", "expected"), [
    ("The answer.", "Because.", ("Because.", "The answer.")),  # split by the endpoint (reasoning field)
    ("<think>Because.</think>The answer.", "", ("Because.", "The answer.")),  # no reasoning parser
    ("Because.</think>The answer.", "", ("Because.", "The answer.")),  # the template opened <think>
    ("<think>Because.</think><answer>The answer.</answer>", "", ("Because.", "The answer.")),  # GLM-4.1V
    ("Plain <|begin_of_box|>[[1,2,3,4]]<|end_of_box|>", "", ("", "Plain <|begin_of_box|>[[1,2,3,4]]<|end_of_box|>")),
])
def test_reasoning_split_of_any_endpoint(content: str, field: str, expected: tuple[str, str]) -> None:
    assert _split_content(content, field) == expected


# ------------------------------------------------------------------------------------------ llama-server


@pytest.fixture(scope="module")
def llama_server(moe_f16: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama.cpp's ``llama-server`` built from the package's engine tree and options (bench/llama_server.py;
    about 5 minutes the first time, cached under the bench scratch directory), serving the tiny model.

    ``--jinja`` renders the GGUF's chat template; ``-sp`` (``--special``) keeps special pieces in the
    text: GGUF types GLM's ``<|begin_of_box|>`` markers as control tokens, which llama-server otherwise
    drops, and the boxes with them.
    """
    sys.path.insert(0, str(BENCH))
    try:
        from batched import SCRATCH
        from cli_target import cli_build_dir
        from llama_server import build_llama_server
    finally:
        sys.path.remove(str(BENCH))
    binary = build_llama_server(cli_build_dir(SCRATCH))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text, proj = moe_f16
    log = (tmp_path_factory.mktemp("llama-server") / "log.txt").open("w")
    proc = subprocess.Popen([str(binary), "-m", str(text), "--mmproj", str(proj), "--host", "127.0.0.1",
                             "--port", str(port), "-np", "1", "-c", str(N_CTX), "-t", "2", "-tb", "2",
                             "--jinja", "-sp", "--no-webui"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"llama-server exited with {proc.returncode}: see {log.name}"
            try:
                connect(url, timeout=5)
                break
            except RemoteError:
                assert time.monotonic() < deadline, f"llama-server did not come up: see {log.name}"
                time.sleep(0.2)
        yield url
    finally:
        terminate(proc)
        log.close()


@pytest.mark.parametrize("thinking", [None, False])
def test_llama_server_gives_the_local_answer(llama_server: str, local: Any, thinking: Any) -> None:
    remote = connect(llama_server)
    # 150 x 97 is not a size llama.cpp leaves alone (it would letterbox it); sent resized as the
    # reference resizes it, the engine sees the local context's pixels.
    image = random_image(97, 150, seed=11)
    for messages in (conversation(image), [{"role": "user", "content": "Say something."}]):
        local_reply = local.chat(messages, GREEDY, thinking=thinking)
        reply = remote.chat(messages, GREEDY, thinking=thinking)
        same_reply(reply, local_reply)
        if thinking is False:  # the whole text, special pieces included (-sp), as the local one
            assert reply.text == local_reply.text
        chunks = list(remote.chat_stream(messages, GREEDY, thinking=thinking))
        assert "".join(c.text for c in chunks if c.kind == "answer").strip() == local_reply.answer
        assert chunks[-1].boxes == local_reply.boxes and chunks[-1].finish_reason == local_reply.finish_reason
        assert chunks[-1].timings is not None and chunks[-1].timings.decode_ms > 0  # llama-server's timings
