"""``glm4v-mtmd serve``: an OpenAI-compatible HTTP server in front of one :class:`~glm4v_mtmd.Model`.

Needs the ``[server]`` extra (Starlette and uvicorn). :func:`run` is what the command line calls;
:func:`~glm4v_mtmd.server.app.create_app` builds the ASGI app for embedding in another server.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Any

from .protocol import Limits, RequestError

__all__ = ["Limits", "RequestError", "ServerOptions", "create_app", "is_loopback", "run"]


def _require() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        from ..errors import ConfigError

        raise ConfigError(
            f"glm4v-mtmd serve needs the server extra ({exc.name} is missing): pip install 'glm4v-mtmd[server]'"
        ) from None


def __getattr__(name: str) -> Any:
    if name in ("ServerOptions", "create_app", "ServerState"):
        _require()
        from . import app

        return getattr(app, name)
    raise AttributeError(name)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address) reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def run(options: Any, loader: Callable[[], Any], *, host: str = "127.0.0.1", port: int = 8080,
        log_level: str = "info") -> int:
    """Serve until Ctrl-C (or SIGTERM); the model loads in the background while ``/health`` says 503.

    Returns 0, or 1 when the port cannot be bound or the model does not load.
    """
    _require()
    import uvicorn

    from .app import ServerState, create_app

    state = ServerState(options)
    app = create_app(state, loader)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=5, lifespan="on", server_header=False,
                            limit_concurrency=options.max_connections)
    server = uvicorn.Server(config)
    state.on_load_error = lambda: setattr(server, "should_exit", True)
    logging.getLogger("glm4v_mtmd.server").setLevel(logging.INFO)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled once it has shut down
        pass
    if state.load_error:
        return 1
    return 0 if server.started else 1
