"""fervid: batch video emotion analytics."""

__version__ = "0.1.0"
