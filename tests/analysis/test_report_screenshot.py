"""The report as a reader sees it: rendered by headless Chromium, not blank, with every figure loaded.

Chromium runs with a fresh profile in a temporary folder, no network features and no sandbox (containers), in a
process session of its own that is killed afterwards. Skipped where no Chromium binary is installed (Debian
package ``chromium``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from analysis.report import write_report
from tests.analysis.fixtures import make_sweep
from tests.browser import FLAGS, require_chromium

Image = pytest.importorskip("PIL.Image")

WIDTH, HEIGHT = 1280, 2000
TIMEOUT_S = 120
# Appended to a copy of the page (the report itself has no scripts): after every image settled, write each
# image's source and natural size into the DOM that --dump-dom prints.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images).map(i => [i.getAttribute("src"), i.complete, i.naturalWidth]);
  const out = document.createElement("pre"); out.id = "probe"; out.textContent = JSON.stringify(images);
  const boxes = Array.from(document.querySelectorAll("table")).map(t => {
    const box = t.parentElement;
    return [box.className, box.scrollWidth, box.clientWidth, getComputedStyle(box).overflowX, t.scrollWidth];
  });
  const layout = document.createElement("pre"); layout.id = "layout";
  layout.textContent = JSON.stringify({page: [document.documentElement.scrollWidth, window.innerWidth], boxes});
  document.body.appendChild(out); document.body.appendChild(layout);
});
</script>"""


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    profile.mkdir()
    env = {**os.environ, "HOME": str(profile)}  # crash reports and caches stay in the temp folder
    process = subprocess.Popen(
        [binary, *FLAGS, f"--user-data-dir={profile}", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stdout, stderr = "", f"chromium did not finish in {TIMEOUT_S} s"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # its zygote and helpers too
        except ProcessLookupError:
            pass
        process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def chromium() -> str:
    return require_chromium("render the report headlessly")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return write_report(make_sweep(tmp_path_factory.mktemp("runs")))


def test_report_screenshot_is_not_blank(chromium, report, tmp_path):
    png = tmp_path / "report.png"
    result = run_chromium(
        chromium, tmp_path / "profile", f"--screenshot={png}", f"--window-size={WIDTH},{HEIGHT}", report.as_uri()
    )
    assert png.is_file(), f"no screenshot (exit {result.returncode}):\n{result.stderr[-3000:]}"
    with Image.open(png) as image:
        assert image.size == (WIDTH, HEIGHT)
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 10, "the screenshot is (nearly) one colour"
    dark = pixels < 128  # text and table rules on a white page
    assert 0.002 < dark.mean() < 0.5, dark.mean()
    rows_with_ink = dark.any(axis=1).mean()
    assert rows_with_ink > 0.2, f"only {rows_with_ink:.0%} of the screenshot's rows hold anything"


def test_report_figures_load_in_chromium(chromium, report, tmp_path):
    sources = re.findall(r'<img src="([^"]+)"', report.read_text(encoding="utf-8"))
    assert len(sources) == 5
    for source in sources:
        assert (report.parent / source).is_file(), source
    probe_page = report.with_name("probe.html")  # next to index.html: the same relative links resolve
    probe_page.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    result = run_chromium(
        chromium, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri()
    )
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert found, f"no probe output (exit {result.returncode}):\n{result.stderr[-3000:]}"
    images = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert [src for src, _, _ in images] == sources
    for src, complete, width in images:
        assert complete and width > 100, (src, complete, width)  # a broken image has natural width 0
    # Nothing is cut off: the page itself is no wider than the window, and every table sits in a box that scrolls
    # sideways, so a table wider than the page can still be read whole.
    found = re.search(r'<pre id="layout">(.*?)</pre>', result.stdout, re.S)
    assert found, "no layout probe output"
    layout = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    page_width, window_width = layout["page"]
    assert page_width <= window_width, layout["page"]
    assert len(layout["boxes"]) >= 15
    for class_name, scroll_width, _, overflow, table_width in layout["boxes"]:
        assert class_name == "wide" and overflow == "auto", (class_name, overflow)
        assert scroll_width >= table_width  # the box's scrollable width holds the whole table
