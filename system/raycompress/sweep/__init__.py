"""Calibration sweeps: a grid of job variants and seeds, run on Ray and compared (`raycompress sweep`).

`config` expands a sweep file into ordinary jobs (the *what*); `runner` runs them (the *how* and
*where*); `stats` holds the pure statistics; `report.sweep` writes the sweep report.
"""
