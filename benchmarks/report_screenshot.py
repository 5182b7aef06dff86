"""Render a run's report.html to a PNG with headless Chromium, to check how the page looks.

Chromium is not a dependency of numba-recon; on Debian or Ubuntu install it with
``apt-get install chromium``. The browser runs sandboxed from the network (no background
networking, no component updates, no sync) with a throw-away profile, so the check also shows that
the page needs nothing outside itself.

Usage::

    python benchmarks/report_screenshot.py recon/report.html report.png
    python benchmarks/report_screenshot.py recon/report.html report.png --width 1200 --height 3000
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: Names under which Debian, Ubuntu and Google ship the browser.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium (or Chrome) executable on PATH, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def render(html_path: str | os.PathLike, png_path: str | os.PathLike, width: int = 1200, height: int = 3000,
           chromium: str | None = None, timeout_s: float = 120.0) -> Path:
    """Screenshot ``html_path`` into ``png_path`` (``width`` x ``height`` pixels) with headless Chromium.

    Raises
    ------
    FileNotFoundError
        No HTML file, or no Chromium executable.
    RuntimeError
        Chromium failed or wrote no image; the message carries its output.
    """
    html = Path(html_path).resolve()
    if not html.is_file():
        raise FileNotFoundError(f"{html}: no such file")
    browser = chromium or find_chromium()
    if browser is None:
        raise FileNotFoundError("no chromium executable found; install it with `apt-get install chromium`")
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={int(width)},{int(height)}",
               html.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not png.is_file():
        raise RuntimeError(f"chromium exited with status {proc.returncode} and wrote no {png.name}:\n"
                           f"{proc.stdout}\n{proc.stderr}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", help="the report.html to render")
    parser.add_argument("png", help="output PNG")
    parser.add_argument("--width", type=int, default=1200, help="window width in pixels (default 1200)")
    parser.add_argument("--height", type=int, default=3000, help="window height in pixels (default 3000)")
    parser.add_argument("--chromium", default=None, help="browser executable (default: found on PATH)")
    args = parser.parse_args(argv)
    try:
        png = render(args.html, args.png, args.width, args.height, args.chromium)
    except (FileNotFoundError, RuntimeError) as err:
        print(f"report_screenshot: {err}", file=sys.stderr)
        return 2
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
