"""Calibration-set selection methods, registered by name in `registry.SELECTORS`."""
from raycompress.selection import random_select, zipcal  # noqa: F401  (register the methods)
