"""The transaction-cost report rendered by a real browser: Debian's Chromium, headless, runs
the page's plotly JavaScript, and every chart is drawn."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from app.report import CHARTS, render_report
from unit.test_report import orders_and_executions

pytestmark = pytest.mark.slow


def test_chromium_draws_every_chart_of_the_report(tmp_path: Path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed (apt-get install chromium; .ci/run installs it)"
    page = tmp_path / "report.html"
    page.write_text(render_report(*orders_and_executions()))
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    dom = done.stdout
    assert done.returncode == 0 and "</html>" in dom, done.stderr[-2000:]
    # plotly marks a div it has drawn with js-plotly-plot and puts its SVG layers inside
    drawn = re.findall(r'<div[^>]*id="(chart-\d+)"[^>]*class="[^"]*js-plotly-plot', dom) + \
        re.findall(r'<div[^>]*class="[^"]*js-plotly-plot[^"]*"[^>]*id="(chart-\d+)"', dom)
    assert sorted(set(drawn)) == sorted(f"chart-{i}" for i in range(CHARTS)), drawn
    assert dom.count('class="main-svg"') >= CHARTS
    assert "implementation shortfall (mean, pips)" in dom  # a title drawn into the SVG
