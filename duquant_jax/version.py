"""The library version, written into every packed checkpoint's metadata."""

__version__ = "0.1.0"
