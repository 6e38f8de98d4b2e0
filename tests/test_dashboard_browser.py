"""The dashboard in a real browser: the server started as `fedtune dashboard` starts it, on
127.0.0.1, against the coordinator database of ``dashboard_data``; each of the five pages
opened in Chromium (driven by Playwright), waited for until its script has finished and its
charts are drawn, its key text and numbers checked, and a screenshot of it kept.

Screenshots go to ``$FEDTUNE_ARTEFACTS`` when set, else ``test-artefacts/dashboard/`` in the
repository. Needs the ``playwright`` Python package and a Chromium (Debian's ``chromium``;
``FEDTUNE_CHROMIUM`` names another); never ``playwright install``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import func, select

from dashboard_data import BUDGET_REASON, CAPS, RUN_ID, CoordinatorData, build_coordinator_database
from fedtune.common.database import transaction
from fedtune.dashboard.launch import streamlit_command
from fedtune.platform.db.storage import NodeCost, open_database

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="the browser test needs Playwright's Python package: pip install playwright",
)
CHROMIUM = (
    os.environ.get("FEDTUNE_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
)
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="the browser test needs Chromium: apt-get install chromium (or set "
        "FEDTUNE_CHROMIUM)",
    ),
]

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MAIN = '[data-testid="stMain"]'
WIDTH, HEIGHT = 1400, 1000  # the browser window
CHART = '[data-testid="stVegaLiteChart"]'
# Every chart drawn by vega-embed: a canvas, or an svg holding marks (lines, points, bars).
DRAWN = f"""() => [...document.querySelectorAll('{CHART}')].every(chart =>
    chart.querySelector(':scope > canvas.marks')
    || chart.querySelector(':scope > svg.marks .role-mark'))"""
# How many tables hold cells (the grid draws them after the page arrives; a table in a
# closed expander is never drawn).
FILLED = """() => [...document.querySelectorAll('[data-testid="stDataFrame"]')]
    .filter(table => table.querySelector('table[role="grid"] td')).length"""
START_SECONDS = 60
WAIT_MS = 60_000
REPOSITORY = Path(__file__).resolve().parents[1]


def artefacts() -> Path:
    """Where the screenshots are kept (created if need be)."""
    folder = Path(
        os.environ.get("FEDTUNE_ARTEFACTS") or REPOSITORY / "test-artefacts" / "dashboard"
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Dashboard:
    url: str  # http://127.0.0.1:PORT
    data: CoordinatorData


def wait_for_health(url: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().decode() == "ok":
                    return
        except OSError:
            time.sleep(0.5)
    output = ""  # what the server said before it exited, if it did
    if server.poll() is not None and server.stdout is not None:
        output = server.stdout.read().decode(errors="replace")
    raise AssertionError(f"the dashboard did not answer on {url} in {START_SECONDS} s\n{output}")


def stop(server: subprocess.Popen[bytes]) -> None:
    """Stop the server and everything it started (its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGINT)  # as Ctrl-C does
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)  # whatever is left of the group
    server.wait()
    if server.stdout is not None:
        server.stdout.close()


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    data = build_coordinator_database(tmp_path_factory.mktemp("dashboard-browser"))
    port = free_port()
    server = subprocess.Popen(
        streamlit_command(data.url, host="127.0.0.1", port=port),
        start_new_session=True,  # its own process group: stop() stops all of it
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, server)
        yield Dashboard(url=url, data=data)
    finally:
        stop(server)
        with pytest.raises(ProcessLookupError):  # nothing of it is left
            os.killpg(server.pid, 0)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
    context.set_default_timeout(WAIT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def open_page(page: Page, url: str, *, title: str, charts: int, tables: int) -> None:
    """Open ``url`` and wait until its script has finished, its ``charts`` are drawn and its
    ``tables`` hold their cells: a screenshot taken earlier catches a half-rendered page."""
    page.goto(url)
    heading = page.get_by_role("heading", name=title, level=1)
    sync_api.expect(heading).to_be_visible(timeout=WAIT_MS)
    finished(page)
    sync_api.expect(page.locator(CHART)).to_have_count(charts, timeout=WAIT_MS)
    page.wait_for_function(DRAWN)
    page.wait_for_function(f"() => ({FILLED})() >= {tables}")
    assert page.locator('[data-testid="stException"]').count() == 0, page.inner_text("body")


def finished(page: Page) -> None:
    """Wait until the page's script run is over and the status widget (``Running…``) is gone."""
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')
    page.wait_for_selector('[data-testid="stStatusWidget"]', state="hidden")


def screenshot(page: Page, name: str) -> Path:
    """Save the whole page as ``name.png``. Streamlit scrolls inside its main area, not the
    document, so the window is made as tall as the page for the picture."""
    height = page.evaluate(f"document.querySelector('{MAIN}').scrollHeight")
    page.set_viewport_size({"width": WIDTH, "height": max(HEIGHT, int(height))})
    try:
        page.wait_for_function(DRAWN)
        path = artefacts() / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.set_viewport_size({"width": WIDTH, "height": HEIGHT})
    assert path.stat().st_size > 10_000, f"{path} looks empty"
    return path


def main_text(page: Page) -> str:
    return page.locator(MAIN).inner_text()


def table_cells(page: Page, index: int) -> list[str]:
    """The cells of the ``index``-th table on the page (its accessible grid)."""
    frame = page.locator('[data-testid="stDataFrame"]').nth(index)
    return [cell.strip() for cell in frame.locator("td").all_inner_texts()]


def metric(page: Page, label: str) -> str:
    """The value (and delta) of the metric labelled ``label``."""
    card = page.locator('[data-testid="stMetric"]').filter(
        has=page.locator('[data-testid="stMetricLabel"]', has_text=label)
    )
    return card.inner_text()


def numbers(cells: list[str]) -> list[float]:
    """The cells that are numbers (the grid's cells hold the values, not their format)."""
    found = []
    for cell in cells:
        with contextlib.suppress(ValueError):
            found.append(float(cell.replace(",", "")))
    return found


def test_overview_in_the_browser(dashboard, page):
    open_page(page, dashboard.url, title="Overview", charts=0, tables=2)

    assert re.search(r"Runs\s+1", metric(page, "Runs"))
    assert re.search(r"Finished\s+1", metric(page, "Finished"))
    runs = table_cells(page, 0)
    assert RUN_ID in runs and "3 / 3" in runs and "bank, hospital" in runs
    assert f"bank declined: {BUDGET_REASON}" in table_cells(page, 1)
    screenshot(page, "1-overview")


def test_privacy_budget_in_the_browser(dashboard, page):
    open_page(page, f"{dashboard.url}/privacy", title="Privacy budget", charts=1, tables=3)

    bank = dashboard.data.epsilons["bank"][-1]
    shown = metric(page, "bank · d2d2d2d2")
    assert f"ε {bank:.3f} of {CAPS['bank']:g}" in shown
    assert f"{CAPS['bank'] - bank:.3f} left" in shown
    assert table_cells(page, 2).count("✅ verifies") == 2
    assert "Rounds declined for lack of budget" in main_text(page)
    page.wait_for_function(f"() => ({FILLED})() >= 4")
    levels = numbers(table_cells(page, 3))  # each node's own epsilon beside the coordinator's
    assert any(v == pytest.approx(dashboard.data.epsilons["hospital"][-1]) for v in levels)
    assert sum(v == pytest.approx(dashboard.data.node_level[-1]) for v in levels) == 2
    screenshot(page, "2-privacy")


def test_ab_tests_in_the_browser(dashboard, page):
    open_page(page, f"{dashboard.url}/ab_tests", title="A/B tests", charts=1, tables=2)

    text = main_text(page)
    assert "b better — B − A = -0.29, 95% CI [-0.41, -0.17], p = 4e-05" in text
    assert "95%: [-0.41, -0.17]" in table_cells(page, 0)
    screenshot(page, "3-ab-tests")


def test_model_health_in_the_browser(dashboard, page):
    open_page(page, f"{dashboard.url}/health", title="Model health", charts=3, tables=2)

    assert "update-norm unavailable (rounds 1-3; bank, hospital)" in main_text(page)
    assert "declined" in table_cells(page, 0)
    screenshot(page, "4-health")


def stored_cost(url: str, node: str, number: int) -> tuple[int, float, int]:
    """A node's tokens and training device-seconds in one round, and all tokens of the run,
    as the database holds them."""
    engine = open_database(url, create=False)
    with transaction(engine) as session:
        tokens, seconds = session.execute(
            select(
                func.sum(NodeCost.train_tokens) + func.sum(NodeCost.evaluate_tokens),
                func.sum(NodeCost.train_device_seconds),
            ).where(NodeCost.node_name == node, NodeCost.round == number)
        ).one()
        total = session.scalar(
            select(func.sum(NodeCost.train_tokens) + func.sum(NodeCost.evaluate_tokens))
        )
    engine.dispose()
    return int(tokens), float(seconds), int(total)


def test_protections_and_costs_in_the_browser(dashboard, page):
    open_page(page, f"{dashboard.url}/costs", title="Protections and costs", charts=1, tables=1)

    tokens, seconds, total = stored_cost(dashboard.data.url, "bank", 2)
    assert f"{total:,}" in metric(page, "Tokens read")
    costs = numbers(table_cells(page, 0))
    assert tokens in costs and any(v == pytest.approx(seconds) for v in costs)
    protections = page.locator('[data-testid="stTable"]').inner_text()
    assert "secure aggregation" in protections and "node-level DP (coordinator)" in protections
    assert f"ε {dashboard.data.node_level[-1]:.3f} after round 3" in protections
    assert "3 of 5 ledger entries of this run countersigned" in protections
    screenshot(page, "7-protections-and-costs")


def test_audit_in_the_browser(dashboard, page):
    open_page(page, f"{dashboard.url}/audit", title="Audit", charts=0, tables=1)

    assert "2 of 2 entries shown." in main_text(page)
    assert table_cells(page, 0)[:1] == ["1"]
    screenshot(page, "5-audit")

    page.get_by_role("button", name="Verify this ledger copy").click()

    verdict = page.get_by_text("bank's ledger copy verifies: 2 entries")
    sync_api.expect(verdict).to_be_visible(timeout=WAIT_MS)
    finished(page)
    screenshot(page, "6-audit-verified")
