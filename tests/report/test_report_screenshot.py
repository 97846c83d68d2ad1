"""report.html renders in headless Chromium (infra/report_screenshot.py); skipped without Chromium."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from reportfixtures import tokenizer_dir, write_run

from raycompress.report.report import write_report

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "report_screenshot.py"
sys.path.insert(0, str(SCRIPT.parent))
from report_screenshot import find_browser  # noqa: E402

pytestmark = pytest.mark.skipif(find_browser() is None,
                                reason="no Chromium on PATH (apt-get install -y chromium) to render report.html")


def test_report_page_screenshot_is_the_asked_size_and_not_blank(tmp_path):
    from PIL import Image

    run = write_run(tmp_path / "run", tokenizer_dir(tmp_path / "tok"))
    write_report(None, run)
    png = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(run / "report.html"), "--output", str(png),
                           "--size", "1280,3000"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (info["width"], info["height"]) == (1280, 3000) and png.is_file()
    assert info["colors"] > 100  # text, tables and plots; a blank or failed page has one or two colours
    with Image.open(png) as img:
        top, plots = img.convert("L").crop((0, 0, 1280, 300)), img.convert("L").crop((0, 700, 1280, 1500))
        assert top.getextrema()[0] < 80  # the dark title text rendered at the top
        assert len(plots.getcolors(maxcolors=4096) or range(4096)) > 20  # figures below the tables
