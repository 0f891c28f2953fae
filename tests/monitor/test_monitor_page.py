"""The monitoring page in a real headless chromium: live counts, a job's details, cancel."""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path

import pytest

from idds_fat import Workflow, work
from idds_fat.testing import wait_until

REPO = Path(__file__).resolve().parents[2]


@work
def trial(gate, x):
    wait_until(lambda: os.path.exists(gate), "the gate", timeout=120)
    return (x - 2.5) ** 2


def _artefacts(tmp_path: Path) -> Path:
    # CI may collect screenshots from a directory of its choice.
    chosen = os.environ.get("TEST_ARTEFACTS_DIR")
    where = Path(chosen) if chosen else tmp_path / "artefacts"
    where.mkdir(parents=True, exist_ok=True)
    return where


def test_page_shows_tasks_live_and_cancels_a_running_task(browser_page, tmp_path):
    from playwright.sync_api import expect

    page = browser_page
    gates = [tmp_path / f"gate{i}" for i in range(3)]
    wf = Workflow(name="detector <design> scan", max_workers=2).open()
    try:
        # Three iterations of two trials; the test opens each gate in turn.
        iterations = [
            trial.map([{"gate": str(gate), "x": 2 * i + k} for k in range(2)])
            for i, gate in enumerate(gates)
        ]
        token = json.loads((wf.work_dir / "connection.json").read_text())["token"]

        page.goto(f"{wf.service_url}/workflows/{wf.id}")
        # Without a token the page shows no data: it asks for the token.
        expect(page.locator("#token-form")).to_be_visible()
        expect(page.locator("#tasks tbody tr")).to_have_count(0)
        page.fill("#token-input", token)
        page.click("#token-form button[type=submit]")
        expect(page.locator("#token-form")).to_be_hidden()

        rows = page.locator("#tasks tbody tr")
        expect(rows).to_have_count(3)
        first = page.locator('#tasks tr[data-key="t0001"]')
        expect(first.locator('td[data-state="running"]')).to_have_text("2")
        expect(page.locator("#wf-name")).to_have_text("detector <design> scan")
        # The page must update by itself: a marker set now survives only without a reload.
        page.evaluate("window.__sameDocument = true")

        gates[0].touch()
        iterations[0].wait(timeout=60)
        expect(first.locator('td[data-state="done"]')).to_have_text("2")
        expect(first.locator('td[data-state="running"]')).to_have_text("0")
        second = page.locator('#tasks tr[data-key="t0002"]')
        expect(second.locator('td[data-state="running"]')).to_have_text("2")
        gates[1].touch()
        iterations[1].wait(timeout=60)
        expect(second.locator('td[data-state="done"]')).to_have_text("2")
        # Best so far over iterations 1-2: x in 0..3, (x - 2.5)**2 is least at x=2 or 3.
        expect(page.locator("#best")).to_have_attribute("data-best", "0.25")
        expect(page.locator("#best path.best-line")).to_have_count(1)
        assert page.evaluate("window.__sameDocument") is True

        # A job's details on click: here a finished one, with its value.
        page.locator('#timeline g[data-job-id="t0001/1"]').click()
        expect(page.locator("#job")).to_be_visible()
        expect(page.locator("#job-summary")).to_contain_text("done")
        expect(page.locator("#job-summary")).to_contain_text("value 2.25")

        third = page.locator('#tasks tr[data-key="t0003"]')
        expect(third.locator('td[data-state="running"]')).to_have_text("2")
        page.screenshot(path=str(_artefacts(tmp_path) / "monitoring-workflow.png"), full_page=True)

        page.once("dialog", lambda dialog: dialog.accept())
        third.locator("button", has_text="Cancel").click()
        expect(page.locator("#message")).to_have_text(re.compile(r"cancelled 2 jobs of task t0003"))
        expect(third.locator('td[data-state="cancelled"]')).to_have_text("2")
        expect(third.locator('td[data-state="running"]')).to_have_text("0")
        expect(third.locator("button")).to_be_disabled()
        wait_until(
            lambda: all(f.cancelled() for f in iterations[2].futures), "the futures to cancel"
        )
        assert [f.result() for f in iterations[0].futures] == [6.25, 2.25]
        expect(page.locator('#timeline g.cancelled[data-job-id^="t0003/"]')).to_have_count(2)
        assert page.evaluate("window.__sameDocument") is True
    finally:
        for gate in gates:
            gate.touch()
        wf.close(cancel=True)


def test_page_with_a_wrong_token_asks_again_and_cancels_nothing(browser_page, tmp_path):
    from playwright.sync_api import expect

    page = browser_page
    gate = tmp_path / "gate"
    wf = Workflow(name="guarded", max_workers=1).open()
    try:
        waiting = trial.map([{"gate": str(gate), "x": 1}])
        page.goto(f"{wf.service_url}/")
        page.fill("#token-input", "not-the-token")
        page.click("#token-form button[type=submit]")
        # The API refused the token: the form comes back, and no workflow is listed.
        expect(page.locator("#token-form")).to_be_visible()
        expect(page.locator("#live")).to_have_text("token refused")
        expect(page.locator("#workflows tbody tr")).to_have_count(0)
        stored = page.evaluate("sessionStorage.getItem('idds-fat-token')")
        assert stored == "not-the-token"  # kept in the tab, never in the address
        assert "not-the-token" not in page.url
        answer = page.evaluate(
            """async (path) => (await fetch(path, {method: 'POST',
                 headers: {Authorization: 'Bearer not-the-token'}})).status""",
            f"/api/workflows/{wf.id}/cancel",
        )
        assert answer == 401
        assert not waiting.futures[0].done()
    finally:
        gate.touch()
        wf.close(cancel=True)


@work
def objective(lr, depth):
    return (lr - 0.1) ** 2 + depth


def test_monitor_url_signs_in_and_the_page_shows_trials_sortable_by_value(browser_page):
    from playwright.sync_api import expect

    page = browser_page
    wf = Workflow(name="hpo", max_workers=2).open()
    try:
        points = [{"lr": lr, "depth": d} for lr, d in ((0.3, 2), (0.1, 1), (0.5, 3))]
        assert objective.map(points).results() == [pytest.approx(v) for v in (2.04, 1.0, 3.16)]
        url = wf.monitor_url
        assert "#token=" in url and "?" not in url  # the token never in the query string
        assert html.escape(url, quote=True) in wf._repr_html_()

        page.goto(url)
        expect(page.locator("#token-form")).to_be_hidden()  # signed in by the link
        expect(page.locator("#trials tbody tr")).to_have_count(3)
        assert "#token" not in page.url  # dropped from the address bar and history
        first_args = page.locator("#trials tbody tr").first.locator("td").nth(1)
        expect(first_args).to_have_text("lr=0.3, depth=2")
        page.click("#sort-value")  # least value first
        expect(first_args).to_have_text("lr=0.1, depth=1")
        page.click("#sort-value")  # greatest first
        expect(first_args).to_have_text("lr=0.5, depth=3")
        page.locator("#trials tbody tr").first.click()
        expect(page.locator("#job-arguments")).to_have_text("lr=0.5, depth=3")
        # A time axis with ticks under the timeline, the first labelled with a clock time.
        ticks = page.locator("#timeline .time-axis line.tick")
        expect(ticks.first).to_be_attached()
        assert ticks.count() >= 2
        labels = page.locator("#timeline .time-axis text").all_text_contents()
        assert labels[1].startswith("+") and labels[1].endswith(" s"), labels
    finally:
        wf.close()
