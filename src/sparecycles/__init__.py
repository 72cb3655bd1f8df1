"""sparecycles: an LLM inference network on the spare cycles of devices people already own."""

__version__ = "0.1.0"
