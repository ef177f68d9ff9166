"""qlab — a quantization and compression analysis workbench for small language models."""

__version__ = "0.1.0"
