"""Calibration-set selection methods, registered by name in `registry.SELECTORS`."""
from raycompress.selection import perplexity, random_select, routing, zipcal, zipf  # noqa: F401  (register the methods)
