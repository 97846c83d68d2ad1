"""Calibration sweeps: a grid of job variants and seeds, run on Ray and compared (`raycompress sweep`).

`config` expands a sweep file into ordinary jobs (the *what*); `distributed.sweep` runs them (the
*how* and *where*); `report.sweep` writes the sweep report, with its statistics in
`report.sweep_stats`. Imports go one way: `report` may use the sweep's data types, `sweep`
imports nothing from `report` or `distributed`.
"""
