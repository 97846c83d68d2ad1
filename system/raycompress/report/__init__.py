"""Reports: report.json and report.md from a finished job folder."""
