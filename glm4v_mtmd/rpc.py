"""ggml RPC: a model's layers on other machines, and the server that lends them.

A machine runs ``glm4v-mtmd rpc-server`` (:func:`serve`); the machine that holds the GGUF
loads it with ``Model(..., rpc_servers=["host:port", ...])`` and the engine places the text
model's layers on the servers' devices. Every endpoint is probed from Python first
(:func:`probe`), so a wrong address, a port that is not an RPC server or a server of another
build is a :class:`~glm4v_mtmd.ModelLoadError` naming it, never an abort inside the engine.

The RPC protocol has no authentication and no encryption: any peer that reaches a server can
allocate its memory, read and write its buffers and run graphs on it. Bind servers to loopback
(the default) or to a private, trusted network only.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

from . import _native
from .errors import ConfigError, ModelLoadError

__all__ = ["RpcServerInfo", "probe", "parse_endpoints", "serve", "protocol_version", "DEFAULT_PORT", "SECURITY_WARNING"]

#: The engine's default RPC port.
DEFAULT_PORT = 50052
#: Printed by :func:`serve`: what an RPC server exposes.
SECURITY_WARNING = (
    "WARNING: the RPC protocol has no authentication or encryption. Anyone who can reach this port can use "
    "this machine's memory and run computations on it. Only make it reachable from trusted machines "
    "(loopback, a private network, a VPN or an SSH tunnel)."
)

_CMD_HELLO = 14
_CMD_DEVICE_COUNT = 15
_CAPS = 24  # RPC_CONN_CAPS_SIZE: zero caps ask for plain TCP

RpcServers = Union[str, Sequence[str], None]


@dataclass(frozen=True)
class RpcServerInfo:
    """What :func:`probe` learned from one server."""

    endpoint: str
    version: tuple[int, int, int]
    n_devices: int


def protocol_version() -> tuple[int, int, int]:
    """The RPC protocol version of this build; servers must report exactly this one."""
    v = [_native.ffi.new("int32_t *") for _ in range(3)]
    _native.lib.glm4v_rpc_version(*v)
    return (v[0][0], v[1][0], v[2][0])


def available() -> bool:
    """True when the engine was built with the RPC backend."""
    return bool(_native.lib.glm4v_rpc_available())


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"rpc server {endpoint!r}: expected host:port, e.g. 192.168.1.20:{DEFAULT_PORT}")
    if "," in host or any(c.isspace() for c in host):
        raise ConfigError(f"rpc server {endpoint!r}: expected host:port")
    if host.startswith("[") or ":" in host:
        raise ConfigError(f"rpc server {endpoint!r}: the engine's RPC client speaks IPv4 only (use an IPv4 "
                          "address or a host name)")
    return host, int(port)


def parse_endpoints(servers: RpcServers) -> list[str]:
    """``"h1:p1,h2:p2"`` or a list of ``"host:port"`` → the list, checked; duplicates refused."""
    if servers is None:
        return []
    if isinstance(servers, str):
        items = [s.strip() for s in servers.split(",")] if servers.strip() else []
    elif isinstance(servers, Sequence) and all(isinstance(s, str) for s in servers):
        items = [s.strip() for s in servers]
    else:
        raise ConfigError(f"rpc_servers={servers!r}: a list of 'host:port' strings or one comma-separated string")
    for ep in items:
        _split_endpoint(ep)
    dup = {ep for ep in items if items.count(ep) > 1}
    if dup:
        raise ConfigError(f"rpc_servers lists {', '.join(sorted(dup))} more than once")
    return items


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed the connection")
        data += chunk
    return data


def probe(endpoint: str, timeout: float = 5.0) -> RpcServerInfo:
    """Connect to one RPC server, say hello, compare versions and count its devices.

    Raises :class:`ModelLoadError` naming the endpoint when nothing listens there, when what
    answers is not an RPC server of this build's protocol version, or when it does not answer
    within ``timeout`` seconds (a server serves one client at a time: a busy one is silent).
    """
    host, port = _split_endpoint(endpoint)
    want = protocol_version()
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as e:
        raise ModelLoadError(f"rpc server {endpoint}: cannot resolve '{host}' ({e.strerror})") from None
    except TimeoutError:
        raise ModelLoadError(f"rpc server {endpoint}: no answer to a connection within {timeout:g} s") from None
    except OSError as e:
        raise ModelLoadError(f"rpc server {endpoint}: cannot connect ({e.strerror or e}); is "
                             "`glm4v-mtmd rpc-server` running there?") from None
    with sock:
        try:
            sock.sendall(struct.pack("<BQ", _CMD_HELLO, _CAPS) + bytes(_CAPS))
            (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
            if size != 4 + _CAPS:
                raise ModelLoadError(f"rpc server {endpoint}: not a ggml RPC server (its hello reply is "
                                     f"{size} bytes, expected {4 + _CAPS})")
            reply = _recv_exact(sock, size)
            version = (reply[0], reply[1], reply[2])
            if version != want:
                raise ModelLoadError(
                    f"rpc server {endpoint}: protocol {'.'.join(map(str, version))}, this build speaks "
                    f"{'.'.join(map(str, want))}; run the same glm4v-mtmd build on every machine")
            sock.sendall(struct.pack("<BQ", _CMD_DEVICE_COUNT, 0))
            (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
            if size != 4:
                raise ModelLoadError(f"rpc server {endpoint}: malformed device-count reply ({size} bytes)")
            (n_devices,) = struct.unpack("<I", _recv_exact(sock, 4))
        except TimeoutError:
            raise ModelLoadError(
                f"rpc server {endpoint}: connected, but no RPC hello within {timeout:g} s (not an RPC server, "
                "or one busy with another client: a server serves one client at a time)") from None
        except (ConnectionError, OSError) as e:
            raise ModelLoadError(f"rpc server {endpoint}: not a ggml RPC server, or it failed during the "
                                 f"hello ({e})") from None
    if n_devices == 0:
        raise ModelLoadError(f"rpc server {endpoint}: exposes no devices")
    return RpcServerInfo(endpoint, version, n_devices)


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "glm4v-mtmd", "rpc")


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, threads: Optional[int] = None,
          cache_dir: Optional[str] = None, devices: Optional[str] = None) -> None:
    """Run the engine's RPC server in this process until it fails or Ctrl-C ends it.

    ``host`` is an IPv4 address to bind (loopback by default); ``threads`` CPU threads for the
    computations it runs (default: the CPUs available); ``cache_dir`` keeps tensors over 10 MiB
    on disk so a client that loads the same model again sends only their hashes (``None`` = off);
    ``devices`` is a comma-separated list of the engine's device names (``None``: every GPU,
    else the CPU). Raises :class:`ConfigError` for bad arguments or a port that is taken.
    """
    if not available():
        raise ConfigError("this glm4v-mtmd build has no RPC backend (it was built with -DGGML_RPC=OFF)")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ConfigError(f"--host {host!r}: an IPv4 address to bind, e.g. 127.0.0.1") from None
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"--port {port!r}: must be in 1..65535")
    from .model import _default_threads  # model imports this module: not at the top
    from .server import is_loopback

    if threads is None:
        threads = _default_threads()
    if not isinstance(threads, int) or threads <= 0:
        raise ConfigError(f"--threads {threads!r}: must be a positive integer")
    # The engine reports a taken port only as "failed to create server socket": check first, with
    # the same SO_REUSEADDR it sets, so the error can say which port and why.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server there? "
                              "choose another --port)") from None
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
    if not is_loopback(host):
        print(SECURITY_WARNING, file=sys.stderr, flush=True)
    # The call below blocks in C for the server's lifetime; Python's SIGINT handler would only run
    # after it returns (never). The default action ends the process at once, which is all a server
    # with no state worth saving needs.
    if hasattr(signal, "SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    endpoint = f"{host}:{port}".encode()
    status = _native.lib.glm4v_rpc_serve(endpoint, cache_dir.encode() if cache_dir else _native.ffi.NULL,
                                         threads, devices.encode() if devices else _native.ffi.NULL)
    _native.raise_status(status)
