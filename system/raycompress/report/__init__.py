"""Reports: report.json / .md / .html of a job folder (report.py), and comparisons of several runs (compare.py)."""
