"""Torch-free Hugging Face -> GGUF converter for GLM-4.xV (placeholder docstring)."""

from ._convert import ALL_OUTTYPES, ENGINE_OUTTYPES, FLOAT_OUTTYPES, QuantizeFn, convert

__all__ = ["convert", "ALL_OUTTYPES", "ENGINE_OUTTYPES", "FLOAT_OUTTYPES", "QuantizeFn"]
