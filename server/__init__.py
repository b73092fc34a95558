"""Antiphon: a real-time predictive performance server (RNN + mixture density network)."""

__version__ = "0.1.0"
