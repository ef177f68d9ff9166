"""The package version, in one place below every layer (run records carry it)."""

__version__ = "0.1.0"
