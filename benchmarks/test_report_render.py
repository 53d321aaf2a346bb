"""The visualisation report opened in a real browser (issue 15): headless Chromium renders ``report.html`` of a smoke
run offline and saves a screenshot, ``benchmarks/results/history/report-screenshot.png``.

Skipped where no Chromium is installed (the tests check the page's offline-ness and every image without a browser).
"""

import dataclasses
import os
import shutil
import subprocess

import pytest

from zopro.train import run, visualize
from zopro.train.config import preset

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _browser():
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def test_report_renders_in_headless_chromium(tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip(f"no Chromium found (looked for {', '.join(BROWSERS)})")
    from PIL import Image

    from benchmarks.common import RESULTS_DIR

    run(dataclasses.replace(preset("smoke"), output_dir=str(tmp_path / "run"), threads=1, snapshot_every=1),
        progress=False)
    assert visualize.main([str(tmp_path / "run"), "--out", str(tmp_path / "report")]) == 0
    shot = tmp_path / "shot.png"
    # no network at all: a page that tried to fetch anything would render without it, and the tests forbid references
    subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--proxy-server=127.0.0.1:9",
                    f"--screenshot={shot}", "--window-size=1400,3000",
                    (tmp_path / "report" / "report.html").as_uri()], check=True, timeout=120, capture_output=True)
    with Image.open(shot) as img:
        colours = img.convert("L").getextrema()
    assert colours[0] < colours[1]  # something was drawn, not a blank page
    os.makedirs(RESULTS_DIR, exist_ok=True)
    shutil.copy(shot, os.path.join(RESULTS_DIR, "report-screenshot.png"))
