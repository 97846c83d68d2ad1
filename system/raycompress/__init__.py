"""raycompress: calibration selection, layer-wise compression and evaluation of LLMs on Ray."""

__version__ = "0.1.0"
