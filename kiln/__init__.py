"""Kiln: a declarative build system for deep-learning applications on embedded boards."""

__version__ = "0.1.0"
