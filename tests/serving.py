"""A real ``glm4v-mtmd serve`` app (uvicorn on 127.0.0.1, a free port) in a thread of the test process."""

from __future__ import annotations

import base64
import http.client
import io
import json
import pathlib
import socket
import threading
import time
from typing import Any

import openai
import uvicorn
from conftest import random_image
from PIL import Image

from glm4v_mtmd import Model
from glm4v_mtmd.server.app import ServerOptions, ServerState, create_app


def png_url(height: int = 56, width: int = 84, seed: int = 0) -> str:
    buf = io.BytesIO()
    Image.fromarray(random_image(height, width, seed)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, *urls: str) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


class Server:
    """A uvicorn server in a thread, serving one Model."""

    def __init__(self, model_files: tuple[pathlib.Path, pathlib.Path], *, parallel: int = 2, n_ctx: int = 4096,
                 **options: Any) -> None:
        self.options = ServerOptions(model_name="tiny", **options)
        state = ServerState(self.options)
        self.state = state
        app = create_app(state, lambda: Model(*model_files, n_ctx=n_ctx, n_parallel=parallel, n_threads=2))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while self.get("/health")[0] != 200:
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.05)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        except OSError:
            return 0, b""

    def post(self, body: Any, headers: dict[str, str] | None = None, path: str = "/v1/chat/completions"
             ) -> tuple[int, dict[str, Any], http.client.HTTPResponse]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Content-Type": "application/json", **self.auth, **(headers or {})}
        conn.request("POST", path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = {"raw": raw}
        return resp.status, parsed, resp

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.options.api_keys[0]}"} if self.options.api_keys else {}

    def client(self) -> Any:
        key = self.options.api_keys[0] if self.options.api_keys else "sk-no-key-required"
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=60)

    def metric(self, name: str) -> float:
        status, text = self.get("/metrics", self.auth)
        assert status == 200
        for line in text.decode().splitlines():
            if line.startswith(f"glm4v_{name} ") or line.startswith(f"glm4v_{name}{{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def wait_metric(self, name: str, value: float, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.metric(name) != value:
            assert time.monotonic() < deadline, f"{name} stayed {self.metric(name)}, expected {value}"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
