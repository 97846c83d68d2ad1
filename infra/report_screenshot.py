"""Screenshot a report.html with headless Chromium to check the page renders; prints ONE JSON line.

    .venv/bin/python infra/report_screenshot.py runs/demo/report.html [--output shot.png] [--size 1280,4000]

Needs Debian's `chromium` (`apt-get install -y chromium`) or another Chrome on PATH. The JSON line
gives the PNG path, its size in pixels and the number of distinct colours (a blank page has 1).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """Path of the first Chromium-like browser on PATH, or None."""
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def screenshot(html: Path, png: Path, size: tuple[int, int] = (1280, 4000), timeout_s: float = 120.0) -> Path:
    """Render `html` in headless Chromium at `size` (width, height) and write the screenshot to `png`.

    Raises:
        FileNotFoundError: no Chromium on PATH, or `html` does not exist.
        RuntimeError: Chromium exited without writing the PNG (its stderr is in the message).
    """
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError(f"no browser among {BROWSERS} on PATH: apt-get install -y chromium")
    if not html.is_file():
        raise FileNotFoundError(f"{html} does not exist")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               f"--user-data-dir={profile}", f"--screenshot={png.resolve()}", f"--window-size={size[0]},{size[1]}",
               html.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return png


def describe(png: Path) -> dict:
    """{"png", "width", "height", "colors"} of a screenshot (colors: distinct RGB values, capped at 4096)."""
    from PIL import Image

    with Image.open(png) as img:
        rgb = img.convert("RGB")
        colors = rgb.getcolors(maxcolors=4096)
        return {"png": str(png), "width": rgb.width, "height": rgb.height,
                "colors": len(colors) if colors is not None else 4096}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("html", type=Path)
    p.add_argument("--output", type=Path, help="PNG path (default: next to the HTML, .png)")
    p.add_argument("--size", default="1280,4000", help="window WIDTH,HEIGHT in pixels")
    args = p.parse_args(argv)
    width, height = (int(x) for x in args.size.split(","))
    png = screenshot(args.html, args.output or args.html.with_suffix(".png"), (width, height))
    print(json.dumps(describe(png)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
