"""glm4v-mtmd: run GLM-4.xV vision-language models locally through llama.cpp's mtmd engine."""

from ._cpu import cpu_features, preferred_float_type
from ._native import engine_info
from .boxes import Box, draw_boxes, parse_boxes
from .context import Context
from .errors import (
    ConfigError,
    ContextOverflowError,
    ConversionError,
    EngineError,
    GenerationError,
    Glm4vError,
    ImageError,
    ModelLoadError,
    NoFreeContextError,
    RemoteError,
    RpcError,
    SessionClosedError,
)
from .images import PreprocessedImage, preprocess
from .model import Model
from .remote import Connection, connect
from .rpc import RpcServerInfo
from .selfcheck import sample_image
from .session import Session
from .types import (
    Evaluation,
    GenerationConfig,
    GenerationResult,
    ImageEmbedding,
    StreamChunk,
    Timings,
    Tokens,
    VideoEmbedding,
)
from .video import PreprocessedVideo, VideoError, preprocess_video

__version__ = "0.1.0"

__all__ = [
    "Box",
    "ConfigError",
    "Connection",
    "Context",
    "ContextOverflowError",
    "ConversionError",
    "EngineError",
    "Evaluation",
    "GenerationConfig",
    "GenerationError",
    "GenerationResult",
    "Glm4vError",
    "ImageEmbedding",
    "ImageError",
    "Model",
    "ModelLoadError",
    "NoFreeContextError",
    "PreprocessedImage",
    "PreprocessedVideo",
    "RemoteError",
    "RpcError",
    "RpcServerInfo",
    "Session",
    "SessionClosedError",
    "StreamChunk",
    "Timings",
    "Tokens",
    "VideoEmbedding",
    "VideoError",
    "connect",
    "cpu_features",
    "draw_boxes",
    "engine_info",
    "sample_image",
    "parse_boxes",
    "preferred_float_type",
    "preprocess",
    "preprocess_video",
]
