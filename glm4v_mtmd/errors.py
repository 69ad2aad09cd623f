"""Exception hierarchy of glm4v-mtmd.

Every failure that reaches Python is a :class:`Glm4vError`; subclasses say which
part of the pipeline failed so callers can catch what they can handle.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "Glm4vError",
    "ConfigError",
    "ModelLoadError",
    "ImageError",
    "ContextOverflowError",
    "SessionClosedError",
    "NoFreeContextError",
    "GenerationError",
    "ConversionError",
    "EngineError",
    "RpcError",
    "RemoteError",
]


class Glm4vError(Exception):
    """Base class of every error raised by glm4v-mtmd."""


class ConfigError(Glm4vError, ValueError):
    """An option has an invalid value (a session argument or a GenerationConfig field)."""


class ModelLoadError(Glm4vError):
    """A model or projector file is missing, corrupt or of the wrong kind."""


class ImageError(Glm4vError, ValueError):
    """An image could not be read or violates a preprocessing rule."""


class ContextOverflowError(Glm4vError):
    """A prompt (plus the requested generation) does not fit in ``n_ctx``."""


class SessionClosedError(Glm4vError):
    """A method was called on a :class:`~glm4v_mtmd.Session`, ``Model`` or ``Context`` after ``close()``."""


class NoFreeContextError(Glm4vError):
    """``Model.context()`` was called while all ``n_parallel`` contexts of the model are open."""


class GenerationError(Glm4vError):
    """Prompt evaluation or decoding failed inside the engine."""


class ConversionError(Glm4vError):
    """A Hugging Face checkpoint could not be converted to GGUF."""


class EngineError(Glm4vError):
    """The native engine reported an unexpected failure."""


class RpcError(GenerationError):
    """An RPC server of the model (``rpc_servers=``) was lost or did not answer within
    ``rpc_timeout_s`` during a call. The model's layers and KV cache on that server are gone: every
    later call on the model raises this again; close the model and load it again."""


class RemoteError(Glm4vError):
    """A remote endpoint (:func:`glm4v_mtmd.connect`) could not be reached, refused a request or
    answered something unreadable.

    Attributes:
        status: the HTTP status code, or None when there was no HTTP answer (connection refused,
            timeout, a reply cut off or malformed).
    """

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status
