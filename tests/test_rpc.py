"""ggml RPC: the tiny MoE model's layers on two `glm4v-mtmd rpc-server` processes on loopback.

Bit-exactness holds because both sides are the same build (same kernels and patches), the servers
run the same thread count as the client (`-t 2` = n_threads = n_threads_batch: the CPU kernels'
chunking depends on it), and the local run keeps its weights as stored (`cpu_repack=False`): servers
never repack, while a local CPU repacks quantized weights and, on AMX machines with GGML_CPU_AMX=1,
F16 ones too (max |Δ| 0.008 measured that way).
"""

from __future__ import annotations

import contextlib
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import tiny_models
from conftest import random_image, terminate

from glm4v_mtmd import GenerationConfig, ModelLoadError, Session, engine_info
from glm4v_mtmd.errors import ConfigError
from glm4v_mtmd.rpc import parse_endpoints, probe, protocol_version

THREADS = 2
#: How long a probe of a dead or silent endpoint may take (its timeout is 5 s).
PROBE_LIMIT_S = 8.0
PROMPT = ["[gMASK]<sop><|user|>\n", random_image(84, 84, seed=3), "Describe this image.<|assistant|>\n"]
GREEDY32 = GenerationConfig(max_tokens=32, temperature=0.0, ignore_eos=True)
EXACT = dict(n_ctx=1024, n_threads=THREADS, kv_cache_type="f32", flash_attn=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_path: pathlib.Path, port: int, *extra: str) -> subprocess.Popen:
    # cwd outside the source tree, so the installed package (with its compiled module) is imported
    return subprocess.Popen(
        [sys.executable, "-m", "glm4v_mtmd", "rpc-server", "--port", str(port), "-t", str(THREADS), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)


def wait_ready(endpoint: str, proc: subprocess.Popen, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rpc-server exited early: {proc.stdout.read() if proc.stdout else ''}")
        with contextlib.suppress(ModelLoadError):
            probe(endpoint, timeout=2.0)
            return
        time.sleep(0.2)
    raise RuntimeError(f"rpc-server on {endpoint} not ready within {limit_s} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two RPC servers on 127.0.0.1, stopped at the end of the module."""
    tmp = tmp_path_factory.mktemp("rpc")
    procs, endpoints = [], []
    try:
        for _ in range(2):
            port = free_port()
            procs.append(start_server(tmp, port))
            endpoints.append(f"127.0.0.1:{port}")
        for ep, proc in zip(endpoints, procs):
            wait_ready(ep, proc)
        yield endpoints
    finally:
        for proc in procs:
            stop(proc)


@pytest.fixture(scope="module")
def moe4(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[pathlib.Path, pathlib.Path]]:
    """The tiny glm4v_moe model with 4 layers (so two servers get two each), as F32 or F16 GGUFs."""
    from glm4v_mtmd.convert import convert

    ckpt = tiny_models.make_checkpoint(tmp_path_factory.mktemp("moe4-ckpt"), arch="glm4v_moe", num_hidden_layers=4)
    built: dict[str, tuple[pathlib.Path, pathlib.Path]] = {}

    def get(outtype: str) -> tuple[pathlib.Path, pathlib.Path]:
        if outtype not in built:
            built[outtype] = convert(ckpt, tmp_path_factory.mktemp(f"moe4-{outtype}"), outtype=outtype,
                                     progress=False)
        return built[outtype]

    return get


def run(text: pathlib.Path, proj: pathlib.Path, **extra: object) -> tuple[np.ndarray, list[int]]:
    """Last-token logits of the image prompt and 32 greedy tokens."""
    with Session(text, proj, **EXACT, **extra) as s:
        logits = np.array(s.evaluate(PROMPT).logits)
        s.reset()
        return logits, list(s.generate(PROMPT, GREEDY32).token_ids)


# ------------------------------------------------------------------------------------------ build and probe


def test_engine_is_built_with_rpc_and_lists_devices() -> None:
    info = engine_info()
    assert "RPC" in info["backends"]
    assert any(d["type"] == "CPU" and d["memory_total"] > 0 for d in info["devices"])
    assert protocol_version() == (7, 0, 0)


def test_probe_reports_a_running_server(servers: list[str]) -> None:
    info = probe(servers[0])
    assert info.endpoint == servers[0]
    assert info.version == protocol_version()
    assert info.n_devices == 1


@pytest.mark.parametrize("bad", ["nohost", "h:", ":1", "h:0", "h:70000", "h:p", "[::1]:5", "::1:5"])
def test_malformed_endpoints_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match="host:port|IPv4"):
        parse_endpoints([bad])


def test_endpoint_lists() -> None:
    assert parse_endpoints("a:1, b:2") == ["a:1", "b:2"]
    assert parse_endpoints(["a:1"]) == ["a:1"]
    assert parse_endpoints(None) == [] and parse_endpoints("") == []
    with pytest.raises(ConfigError, match="more than once"):
        parse_endpoints("a:1,a:1")


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_layers_on_two_servers_are_bit_exact(servers: list[str], moe4: Callable, outtype: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    text, proj = moe4(outtype)
    local_logits, local_ids = run(text, proj, cpu_repack=False)
    caplog.set_level("DEBUG", logger="glm4v_mtmd")
    rpc_logits, rpc_ids = run(text, proj, rpc_servers=servers, tensor_split=[1, 1])
    # The layers really went to both servers (the engine's load log names each buffer's device).
    log = caplog.text
    for ep in servers:
        assert f"[{ep}] model buffer size" in log
        assert f"[{ep}] KV buffer size" in log
    assert np.array_equal(local_logits, rpc_logits), float(np.abs(local_logits - rpc_logits).max())
    assert rpc_ids == local_ids


def test_projector_local_and_on_a_server(servers: list[str], moe4: Callable,
                                         caplog: pytest.LogCaptureFixture) -> None:
    text, proj = moe4("f32")
    local_logits, local_ids = run(text, proj)
    for where in ("local", servers[1]):
        caplog.clear()
        caplog.set_level("DEBUG", logger="glm4v_mtmd")
        # every layer on the first server: the second one holds the projector or nothing
        logits, ids = run(text, proj, rpc_servers=servers, tensor_split=[1, 0], mmproj_device=where)
        on_server = f"[{servers[1]}]" in caplog.text
        assert on_server == (where != "local"), where
        assert np.array_equal(local_logits, logits), where
        assert ids == local_ids, where


def test_placement_arguments_are_checked(servers: list[str], moe4: Callable) -> None:
    text, proj = moe4("f32")
    with pytest.raises(ConfigError, match="mmproj_device"):
        Session(text, proj, rpc_servers=servers[0], mmproj_device="127.0.0.1:1")
    with pytest.raises(ConfigError, match="mmproj_device"):
        Session(text, proj, mmproj_device="CPU")
    with pytest.raises(ConfigError, match="tensor_split"):
        Session(text, proj, tensor_split=[1, 1])
    with pytest.raises(ConfigError, match="tensor_split"):
        Session(text, proj, rpc_servers=servers, tensor_split=[0, 0])
    with pytest.raises(ModelLoadError, match="tensor_split has 3 entries for 2 devices"):
        Session(text, proj, rpc_servers=servers, tensor_split=[1, 1, 1])


# ------------------------------------------------------------------------------------------ failures before load


def _load_fails_fast(text: pathlib.Path, proj: pathlib.Path, endpoint: str, match: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match=match) as err:
        Session(text, proj, n_ctx=256, rpc_servers=[endpoint])
    assert endpoint in str(err.value)
    assert time.monotonic() - t0 < PROBE_LIMIT_S


def test_wrong_port_is_a_load_error(moe4: Callable) -> None:
    text, proj = moe4("f32")
    _load_fails_fast(text, proj, f"127.0.0.1:{free_port()}", "cannot connect")


@contextlib.contextmanager
def listener(reply: bytes) -> Iterator[str]:
    """A plain TCP server that is not an RPC server: it answers every connection with ``reply``
    (or nothing) and keeps it open until the test ends."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    done = threading.Event()
    conns: list[socket.socket] = []

    def accept() -> None:
        srv.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            conns.append(conn)
            if reply:
                conn.sendall(reply)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        done.set()
        thread.join()
        for c in conns:
            c.close()
        srv.close()


def test_plain_tcp_listener_is_a_load_error(moe4: Callable) -> None:
    text, proj = moe4("f32")
    with listener(b"") as ep:  # accepts, never answers: the hello times out
        _load_fails_fast(text, proj, ep, "no RPC hello")
    with listener(b"HTTP/1.1 400 Bad Request\r\n\r\n") as ep:  # answers something else
        _load_fails_fast(text, proj, ep, "not a ggml RPC server")


def test_other_protocol_version_is_a_load_error(moe4: Callable) -> None:
    import struct

    text, proj = moe4("f32")
    hello = struct.pack("<Q", 28) + bytes([7, 1, 0, 0]) + bytes(24)  # a 7.1.0 server
    with listener(hello) as ep:
        _load_fails_fast(text, proj, ep, r"protocol 7\.1\.0, this build speaks 7\.0\.0")


def test_after_failed_loads_a_healthy_load_works(servers: list[str], moe4: Callable) -> None:
    text, proj = moe4("f32")
    with pytest.raises(ModelLoadError):
        Session(text, proj, n_ctx=256, rpc_servers=[servers[0], f"127.0.0.1:{free_port()}"])
    local_logits, _ = run(text, proj)
    logits, _ = run(text, proj, rpc_servers=servers)
    assert np.array_equal(local_logits, logits)


# ------------------------------------------------------------------------------------------ the server command


def test_rpc_server_refuses_a_taken_port(tmp_path: pathlib.Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "glm4v_mtmd", "rpc-server", "--port", str(port)],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr


@pytest.mark.parametrize("args,match", [(["--host", "::1"], "IPv4"), (["--threads", "0"], "threads"),
                                        (["--port", "0"], "port")])
def test_rpc_server_refuses_bad_options(tmp_path: pathlib.Path, args: list[str], match: str) -> None:
    out = subprocess.run([sys.executable, "-m", "glm4v_mtmd", "rpc-server", *args],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 1 and match in out.stderr, out.stderr


def test_rpc_server_stops_on_ctrl_c(tmp_path: pathlib.Path) -> None:
    port = free_port()
    proc = start_server(tmp_path, port)
    try:
        wait_ready(f"127.0.0.1:{port}", proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == -signal.SIGINT
    finally:
        stop(proc)
    # the port is free again at once
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_cli_run_with_rpc(servers: list[str], moe4: Callable, tmp_path: pathlib.Path) -> None:
    text, proj = moe4("f32")
    img = tmp_path / "pic.png"
    from PIL import Image

    Image.fromarray(random_image(84, 84, seed=3)).save(img)
    base = [sys.executable, "-m", "glm4v_mtmd", "run", "-m", str(text), "--mmproj", str(proj), "-i", str(img),
            "-p", "Describe.", "--max-tokens", "8", "--temperature", "0", "-t", str(THREADS), "--n-ctx", "512"]
    local = subprocess.run(base, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    remote = subprocess.run(base + ["--rpc", ",".join(servers), "--tensor-split", "1,1"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout and local.stdout.strip()
    bad = subprocess.run(base + ["--tensor-split", "1,1"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert bad.returncode == 1 and "--rpc" in bad.stderr


# ------------------------------------------------------------------------------------------ failures during calls
# Engine patch 0006: a lost server fails the call (RpcError) instead of aborting the process. Each case
# runs in a child process so that, were the patch missing, only the child would die.

CHILD = r"""
import sys, time
from glm4v_mtmd import GenerationConfig, RpcError, Session
text, proj, ep, healthy, mode = sys.argv[1:6]
cfg = GenerationConfig(max_tokens=400, temperature=0.0, ignore_eos=True)
prompt = ["[gMASK]<sop><|user|>\nhello<|assistant|>\n"]
s = Session(text, proj, n_ctx=1024, n_threads=2, rpc_servers=[ep], rpc_timeout_s=3)
if mode == "kill":
    stream = s.stream(prompt, cfg)
    next(iter(stream))
    print("READY", flush=True); sys.stdin.readline()      # the parent kills the server now
    t0 = time.monotonic()
    try:
        for _ in stream:
            pass
        print("NO ERROR", flush=True)
    except RpcError as e:
        print(f"RPCERROR {time.monotonic() - t0:.2f} {e}", flush=True)
else:
    print("READY", flush=True); sys.stdin.readline()      # the parent stops the server now
    t0 = time.monotonic()
    try:
        s.evaluate(["[gMASK]<sop><|user|>\n" + "hello " * 150 + "<|assistant|>\n"])
        print("NO ERROR", flush=True)
    except RpcError as e:
        print(f"RPCERROR {time.monotonic() - t0:.2f} {e}", flush=True)
try:
    s.generate(prompt, GenerationConfig(max_tokens=2))
    print("SECOND CALL WORKED", flush=True)
except RpcError:
    print("STILL RPCERROR", flush=True)
s.close()
with Session(text, proj, n_ctx=1024, n_threads=2, rpc_servers=[healthy]) as s2:
    print("HEALTHY", len(s2.generate(prompt, GenerationConfig(max_tokens=4, ignore_eos=True)).token_ids), flush=True)
"""


@pytest.mark.parametrize("mode", ["kill", "stop"])
def test_server_lost_during_a_call_is_an_rpc_error(servers: list[str], moe4: Callable, tmp_path: pathlib.Path,
                                                   mode: str) -> None:
    text, proj = moe4("f32")
    port = free_port()
    victim = start_server(tmp_path, port)
    ep = f"127.0.0.1:{port}"
    try:
        wait_ready(ep, victim)
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(text), str(proj), ep, servers[0], mode],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=tmp_path)
        assert child.stdout.readline().strip() == "READY"
        if mode == "kill":
            victim.kill()
            victim.wait(timeout=10)
        else:
            victim.send_signal(signal.SIGSTOP)
        child.stdin.write("\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err[-2000:]
        lines = out.splitlines()
        assert lines[0].startswith("RPCERROR"), out
        elapsed = float(lines[0].split()[1])
        # a killed server fails at once; a stopped one after rpc_timeout_s (3 s)
        assert elapsed < (2.0 if mode == "kill" else 3.0 + 5.0), lines[0]
        if mode == "stop":
            assert elapsed >= 2.5, lines[0]
        assert ep in lines[0] and "load it again" in lines[0]
        assert lines[1] == "STILL RPCERROR"
        assert lines[2] == "HEALTHY 4"
    finally:
        if victim.poll() is None:
            victim.send_signal(signal.SIGCONT)
        stop(victim)


# ------------------------------------------------------------------------------------------ failures during load


class Relay:
    """A TCP relay in front of an RPC server that fails the connection which carries the weights.

    Each client connection gets its own link to the server. Once a connection has sent more than
    ``after`` bytes towards the server (the probe's few bytes never get there; a load's tensor
    uploads do), the relay either closes both sides ("cut": the server died) or stops forwarding
    and holds them open ("stall": the server froze).
    """

    def __init__(self, target: str, mode: str, after: int = 64 << 10) -> None:
        self.target = target.rsplit(":", 1)
        self.mode, self.after = mode, after
        self.tripped = threading.Event()
        self.held: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection((self.target[0], int(self.target[1])))
            self.held += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        sent = 0
        with contextlib.suppress(OSError):
            while not self.tripped.is_set():
                data = src.recv(1 << 16)
                if not data:
                    break
                if upstream and sent + len(data) > self.after:
                    self.tripped.set()
                    if self.mode == "cut":
                        for s in (src, dst):
                            s.close()
                    return  # "stall": nothing more is forwarded; the sockets stay open
                dst.sendall(data)
                sent += len(data)
        if not self.tripped.is_set():  # one side closed: so does the other (a server serves one client)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        for s in self.held:
            with contextlib.suppress(OSError):
                s.close()


LOAD_CHILD = r"""
import sys, time
from glm4v_mtmd import GenerationConfig, ModelLoadError, Session
text, proj, ep, healthy = sys.argv[1:5]
t0 = time.monotonic()
try:
    Session(text, proj, n_ctx=512, n_threads=2, rpc_servers=[ep], rpc_timeout_s=3)
    print("LOADED", flush=True)
except ModelLoadError as e:
    print(f"LOADERROR {time.monotonic() - t0:.2f} {e}", flush=True)
with Session(text, proj, n_ctx=512, n_threads=2, rpc_servers=[healthy]) as s:
    cfg = GenerationConfig(max_tokens=4, ignore_eos=True)
    print("HEALTHY", len(s.generate(["[gMASK]<sop><|user|>\nhi<|assistant|>\n"], cfg).token_ids), flush=True)
"""


@pytest.mark.parametrize("mode", ["cut", "stall"])
def test_server_lost_during_load_is_a_load_error(servers: list[str], moe4: Callable, tmp_path: pathlib.Path,
                                                 mode: str) -> None:
    text, proj = moe4("f32")
    assert text.stat().st_size > 4 * (64 << 10)  # the weights cross the relay's limit
    port = free_port()
    backend = start_server(tmp_path, port)
    relay = None
    try:
        wait_ready(f"127.0.0.1:{port}", backend)
        relay = Relay(f"127.0.0.1:{port}", mode)
        out = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(text), str(proj), relay.endpoint, servers[1]],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        assert relay.tripped.is_set()
        lines = out.stdout.splitlines()
        assert lines[0].startswith("LOADERROR"), out.stdout
        # a dead server fails the load at once; a frozen one after rpc_timeout_s (3 s)
        elapsed = float(lines[0].split()[1])
        assert elapsed < (10.0 if mode == "cut" else 3.0 + 10.0), lines[0]
        assert f"failed to load: RPC server {relay.endpoint}: the connection was lost" in lines[0]
        assert lines[1] == "HEALTHY 4"
    finally:
        if relay is not None:
            relay.close()
        stop(backend)


# ------------------------------------------------------------------------------------------ serve --rpc


def test_serve_with_rpc_and_a_lost_server(servers: list[str], moe4: Callable, tmp_path: pathlib.Path) -> None:
    """``glm4v-mtmd serve --rpc``: the answers of a local model; a lost server turns the server
    unavailable (503 with the endpoint, on /health too) without killing it."""
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    import http.client

    from glm4v_mtmd import Model, RemoteError, connect

    text, proj = moe4("f32")
    victim_port, http_port = free_port(), free_port()
    victim = start_server(tmp_path, victim_port)
    victim_ep = f"127.0.0.1:{victim_port}"
    serve = None
    try:
        wait_ready(victim_ep, victim)
        serve = subprocess.Popen(
            [sys.executable, "-m", "glm4v_mtmd", "serve", "-m", str(text), "--mmproj", str(proj),
             "--port", str(http_port), "--parallel", "1", "--n-ctx", "1024", "-t", str(THREADS),
             "--rpc", f"{servers[0]},{victim_ep}", "--tensor-split", "1,1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)

        def health() -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
            try:
                conn.request("GET", "/health")
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        deadline = time.monotonic() + 90
        while True:
            assert serve.poll() is None, serve.stdout.read() if serve.stdout else ""
            with contextlib.suppress(OSError):
                if health()[0] == 200:
                    break
            assert time.monotonic() < deadline, "serve --rpc did not come up"
            time.sleep(0.2)
        messages = [{"role": "user", "content": [{"type": "image", "image": random_image(84, 84, seed=3)},
                                                 {"type": "text", "text": "Describe this image."}]}]
        cfg = GenerationConfig(max_tokens=16, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                               ignore_eos=True)
        remote = connect(f"http://127.0.0.1:{http_port}")
        reply = remote.chat(messages, cfg)
        with Model(text, proj, n_ctx=1024, n_threads=THREADS, n_parallel=1, cpu_repack=False) as model:
            with model.context() as ctx:
                local = ctx.chat(messages, cfg)
        assert (reply.reasoning, reply.answer) == (local.reasoning, local.answer)
        assert reply.usage.completion_tokens == 16

        victim.kill()
        victim.wait(timeout=10)
        with pytest.raises(RemoteError) as lost:
            remote.chat(messages, cfg)
        assert lost.value.status == 503 and victim_ep in str(lost.value), str(lost.value)
        status, body = health()
        assert status == 503 and victim_ep.encode() in body and b"restart" in body
        assert serve.poll() is None  # the server lives on, saying why it cannot answer
    finally:
        if serve is not None:
            terminate(serve)
        stop(victim)
