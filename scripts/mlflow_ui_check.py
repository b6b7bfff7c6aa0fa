"""Look at a sweep in the MLflow UI with a real headless Chromium, check what it shows, save screenshots.

    python scripts/mlflow_ui_check.py http://127.0.0.1:5000 coreg-digits-default --screenshot docs/mlflow_ui.png

The MLflow UI is a React app: each page is opened by its hash route and the script waits (up to
``--timeout`` seconds of real time) until the expected text has been rendered. Checked:

1. the experiment's runs page (``#/experiments/<id>/runs``) lists the sweep's parent run (the latest
   run tagged ``kind=sweep``, or ``--run-id``) and, once its row is expanded, its nested runs
   (annotation and trial runs; the first ``--max-nested`` of them, the table only renders what fits);
2. the parent run's artifacts page (``#/experiments/<id>/runs/<run>/artifacts``) lists the expected
   artifacts (``--artifacts``, by default the results tables ``tables/results.{md,csv,html}``),
   folders opened to see the files in them. Expected artifacts that the run does not have (asked
   through the tracking API) are replaced by the run's own top-level artifacts, so the check also
   works for sweeps that predate the tables;
3. the artifacts page of a finished trial run that has plots lists ``plots/`` (opened: the learning
   curves are shown), ``student/`` and ``resolved_config.json``;
4. the experiment's saved results view (``?viewStateShareKey=results``, the experiment tag the
   sweep writes) lists the trial runs by their short names with the result columns
   (``test/acc_selected``, ``cell_winner``);
5. the parent run's chart view (``.../runs/<parent>/model-metrics``) shows its summary metrics;
6. the compare view (``#/compare-runs``) of the chosen runs (``best_in_cell``) of one cell's
   methods shows each of them.

Screenshots (``--screenshot PATH``): the runs page with the nested runs expanded at PATH, the
parent run's artifacts page showing the first expected artifact at ``PATH`` with suffix
``_artifacts``, the trial run's learning curves with suffix ``_trial``, and ``_results``,
``_charts``, ``_compare`` for checks 4-6 (those run only for a sweep that has the results view,
summary metrics and chosen runs).

Chromium is driven through the DevTools protocol with aiohttp's websocket client (an MLflow
dependency). Exit status 0 when every check passed, 1 otherwise (one line per check), 2 when no
Chromium is found.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

DEFAULT_ARTIFACTS = ("tables/results.md", "tables/results.csv", "tables/results.html")
NEWEST_FIRST = ["attributes.start_time DESC"]
VIEW_TAG = "mlflow.sharedViewState.results"
"""The experiment tag of the sweep's saved results view (``orchestrator.runs.VIEW_STATE_TAG``)."""
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# The expander of a parent run's row in the runs table (MLflow 3's RunNameCellRenderer).
EXPANDER = 'button[data-component-id*="runnamecellrenderer"]'
TREE_NODE = '[data-testid="artifact-tree-node"][artifact-name="{name}"]'
# Cosmetic, for the screenshots: close the assistant side panel, switch the UI to "Model training".
TIDY = """(() => {
  const close = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (close) close.click();
  const mode = [...document.querySelectorAll('div[role="button"]')].find(d => d.innerText.trim() === 'Model training');
  if (mode) mode.click();
  return Boolean(close || mode);
})()"""
CLOSE_ASSISTANT = """(() => {
  const close = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (close) close.click();
  return Boolean(close);
})()"""


def find_chromium(explicit: str | None = None) -> str | None:
    """The Chromium (or Chrome) binary: ``explicit``, ``$CHROMIUM``, or the first on PATH."""
    for name in (explicit, os.environ.get("CHROMIUM"), *BROWSERS):
        if name and (path := shutil.which(name)):
            return path
    return None


@dataclass
class Expected:
    """What the UI should show, read from the tracking API."""

    experiment_id: str
    parent_id: str
    parent_name: str
    nested: list[str]
    artifacts: list[str]
    trial_id: str | None = None
    """A trial run with plots: its artifacts page is checked too."""
    trial_artifacts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    view: bool = False
    """The experiment has the saved results view."""
    trial_names: list[str] = field(default_factory=list)
    summary_metrics: list[str] = field(default_factory=list)
    """The parent run's summary metrics (``<column>/<row>/<stat>``)."""
    compared: dict[str, str] = field(default_factory=dict)
    """Run id -> name of the chosen runs of one cell's methods (the compare view)."""


def expected_from_tracking(url: str, experiment: str, run_id: str | None, artifacts: list[str]) -> Expected:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} on {url}")
    if run_id is None:
        sweeps = client.search_runs([exp.experiment_id], "tags.kind = 'sweep'", order_by=NEWEST_FIRST, max_results=1)
        if not sweeps:
            raise SystemExit(f"experiment {experiment!r} has no run tagged kind=sweep")
        run_id = sweeps[0].info.run_id
    parent = client.get_run(run_id)
    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'", order_by=NEWEST_FIRST, max_results=1000
    )
    have, notes = [], []
    for path in artifacts:
        folder = os.path.dirname(path) or None
        if path in {a.path for a in client.list_artifacts(run_id, folder)}:
            have.append(path)
        else:
            notes.append(f"the run has no artifact {path}: not expected in the UI")
    if not have:
        have = [a.path for a in client.list_artifacts(run_id)]
        notes.append(f"checking the run's own artifacts instead: {', '.join(have) or 'none'}")
    nested = [r.info.run_name for r in children]
    expected = Expected(exp.experiment_id, run_id, parent.info.run_name, nested, have, notes=notes)
    trials = [c for c in children if c.data.tags.get("kind") == "trial"]
    expected.view = VIEW_TAG in exp.tags
    expected.trial_names = sorted(r.info.run_name for r in trials)
    expected.summary_metrics = sorted(k for k in parent.data.metrics if k.endswith("/acc_selected_mean"))
    chosen = [r for r in trials if r.data.tags.get("best_in_cell") == "true"]
    if chosen:
        cell = chosen[0].data.tags.get("cell")
        expected.compared = {r.info.run_id: r.info.run_name for r in chosen if r.data.tags.get("cell") == cell}
    for child in children:
        if child.data.tags.get("kind") == "trial" and child.info.status == "FINISHED":
            tops = {a.path for a in client.list_artifacts(child.info.run_id)}
            if "plots" in tops:
                expected.trial_id = child.info.run_id
                expected.trial_artifacts = sorted(tops & {"plots", "student", "resolved_config.json"})
                break
    return expected


@contextlib.contextmanager
def chromium(binary: str, width: int, height: int, startup_s: float = 60.0) -> Iterator[int]:
    """A headless Chromium with the DevTools protocol on a free port; yields the port."""
    with tempfile.TemporaryDirectory() as profile:
        args = [
            binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--hide-scrollbars", f"--window-size={width},{height}", "--remote-debugging-port=0",
            f"--user-data-dir={profile}", "about:blank",
        ]  # fmt: skip
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + startup_s
            while not (port_file.exists() and port_file.read_text().strip()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{binary} did not start (exit code {proc.poll()})")
                time.sleep(0.2)
            yield int(port_file.read_text().split()[0])
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the browser and its renderer / zygote children
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class Page:
    """One browser tab over the DevTools protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws, self.last_id = ws, 0

    async def call(self, method: str, **params) -> dict:
        self.last_id += 1
        await self.ws.send_json({"id": self.last_id, "method": method, "params": params})
        async for message in self.ws:
            reply = json.loads(message.data)
            if reply.get("id") == self.last_id:  # anything else is an event
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
        raise RuntimeError("the browser closed the connection")

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    async def text(self) -> str:
        return await self.evaluate("document.body ? document.body.innerText : ''") or ""

    async def wait_for_text(self, needles: list[str], timeout: float) -> list[str]:
        """Wait until every needle is on the page; returns those still missing at the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = await self.text()
            except RuntimeError as err:  # the page is between documents (a form posted, a reload)
                if "navigated or closed" not in str(err) or time.monotonic() > deadline:
                    raise
                text = ""
            missing = [n for n in needles if n not in text]
            if not missing or time.monotonic() > deadline:
                return missing
            await asyncio.sleep(0.5)

    async def open(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def click_all(self, selector: str, settle_s: float = 0.5) -> int:
        """Click every element matching ``selector``; returns how many there were."""
        count = await self.evaluate(
            f"(() => {{ const found = document.querySelectorAll({json.dumps(selector)}); "
            "found.forEach(e => e.click()); return found.length; })()"
        )
        await asyncio.sleep(settle_s)
        return count

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))


def shot_path(screenshot: Path | None, suffix: str) -> Path | None:
    """``docs/mlflow_ui.png`` -> ``docs/mlflow_ui_<suffix>.png`` (None stays None)."""
    return None if screenshot is None else screenshot.with_name(f"{screenshot.stem}_{suffix}{screenshot.suffix}")


def outcome(what: str, missing: list[str]) -> tuple[bool, str]:
    return not missing, what + (f"; missing {missing}" if missing else "")


async def check_runs_page(page: Page, base: str, exp: Expected, timeout: float, max_nested: int, shot: Path | None):
    """The parent run, then its nested runs once the parent's row is expanded."""
    runs_page = f"{base}/#/experiments/{exp.experiment_id}/runs"
    await page.open(runs_page)
    missing = await page.wait_for_text([exp.parent_name], timeout)
    if not missing and await page.evaluate(TIDY):
        await page.open(runs_page)
        missing = await page.wait_for_text([exp.parent_name], timeout)
    results = [outcome(f"runs page lists the parent run {exp.parent_name!r}", missing)]
    nested = exp.nested[:max_nested]
    if nested and not missing:
        expanded = await page.click_all(EXPANDER)
        missing = await page.wait_for_text(nested, timeout)
        seen = len(nested) - len(missing)
        results.append(outcome(f"{seen}/{len(nested)} nested runs visible after expanding {expanded} parent row(s)", missing))
    if shot is not None:
        await asyncio.sleep(1.0)  # let the last rows paint
        await page.screenshot(shot)
    return results


async def check_artifacts(
    page: Page, base: str, exp: Expected, run_id: str, paths: list[str], timeout: float, shot: Path | None
) -> list[str]:
    """A run's artifacts page lists ``paths``, their folders opened; the first one is previewed."""
    await page.open(f"{base}/#/experiments/{exp.experiment_id}/runs/{run_id}/artifacts")
    missing = await page.wait_for_text(sorted({p.split("/")[0] for p in paths}), timeout)
    for folder in sorted({os.path.dirname(p) for p in paths} - {""}):
        for part in folder.split("/"):
            await page.click_all(TREE_NODE.format(name=part))
    names = [os.path.basename(p) for p in paths]
    missing += await page.wait_for_text(names, timeout)
    if shot is not None:
        await page.click_all(TREE_NODE.format(name=names[0]), settle_s=2.0)  # the preview loads through the API
        await page.screenshot(shot)
    return missing


async def check_results_pages(page: Page, base: str, exp: Expected, timeout: float, screenshot: Path | None):
    """Checks 4-6: the saved results view, the parent run's charts, the compare view of one cell."""
    results = []
    pages = []
    if exp.view:
        url = f"{base}/#/experiments/{exp.experiment_id}/runs?viewStateShareKey=results"
        pages.append(("results", url, [*exp.trial_names, "test/acc_selected", "cell_winner"], "the results view lists the trial runs with the result columns"))
    if exp.summary_metrics:
        url = f"{base}/#/experiments/{exp.experiment_id}/runs/{exp.parent_id}/model-metrics"
        sections = sorted({k.rsplit("/", 1)[0] for k in exp.summary_metrics})[:3]  # one section per column/row
        pages.append(("charts", url, [*sections, "acc_selected_mean"], "the parent run's charts show its summary metrics"))
    if len(exp.compared) > 1:
        ids = json.dumps(sorted(exp.compared))
        url = f"{base}/#/compare-runs?runs={urllib.parse.quote(ids)}&experiments={urllib.parse.quote(json.dumps([exp.experiment_id]))}"
        pages.append(("compare", url, sorted(exp.compared.values()), "the compare view shows one cell's chosen runs"))
    for suffix, url, needles, what in pages:
        await page.open(url)
        missing = await page.wait_for_text(needles, timeout)
        await page.evaluate(CLOSE_ASSISTANT)
        await asyncio.sleep(1.5)  # charts draw after their data arrives
        results.append(outcome(what, missing))
        if (shot := shot_path(screenshot, suffix)) is not None:
            await page.screenshot(shot)
    return results


async def check_ui(
    port: int, url: str, exp: Expected, *, timeout: float, max_nested: int, screenshot: Path | None, window: tuple[int, int]
) -> list[tuple[bool, str]]:
    """Every check, as (passed, description)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
        target = next(t for t in json.load(response) if t["type"] == "page")
    base = url.rstrip("/")
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            width, height = window
            await page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
            results = await check_runs_page(page, base, exp, timeout, max_nested, screenshot)
            shot = shot_path(screenshot, "artifacts")
            missing = await check_artifacts(page, base, exp, exp.parent_id, exp.artifacts, timeout, shot)
            results.append(outcome(f"parent run's artifacts page lists {', '.join(exp.artifacts)}", missing))
            if exp.trial_id is not None:  # a trial's plots (the learning curves shown) and its student model
                paths = ["plots/learning_curves.png"] + [a for a in exp.trial_artifacts if a != "plots"]
                shot = shot_path(screenshot, "trial")
                missing = await check_artifacts(page, base, exp, exp.trial_id, paths, timeout, shot)
                results.append(outcome(f"a trial run's artifacts page lists {', '.join(paths)}", missing))
            results += await check_results_pages(page, base, exp, timeout, screenshot)
    return results


def check_page(url: str, needles: list[str], screenshot: Path | None, *, timeout: float = 60.0,
               window: tuple[int, int] = (1400, 900), binary: str | None = None) -> list[str]:
    """Open one page (any web app: the Optuna dashboard, the rerun page) in a headless Chromium,
    wait for ``needles``, save a screenshot. Returns the needles still missing."""

    async def run(port: int) -> list[str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            target = next(t for t in json.load(response) if t["type"] == "page")
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Emulation.setDeviceMetricsOverride", width=window[0], height=window[1], deviceScaleFactor=1, mobile=False)
                await page.open(url)
                missing = await page.wait_for_text(needles, timeout)
                await asyncio.sleep(1.5)  # plots draw after their data arrives
                if screenshot is not None:
                    await page.screenshot(screenshot)
                return missing

    with chromium(binary or find_chromium() or "chromium", *window) as port:
        return asyncio.run(run(port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="tracking server URL, e.g. http://127.0.0.1:5000")
    parser.add_argument("experiment", help="MLflow experiment name (grid.yaml `experiment`)")
    parser.add_argument("--run-id", help="the sweep's parent run (default: the latest run tagged kind=sweep)")
    parser.add_argument(
        "--artifacts", default=",".join(DEFAULT_ARTIFACTS), help="comma-separated artifact paths expected on the parent"
    )
    parser.add_argument("--screenshot", type=Path, help="PNG of the runs page (also <name>_artifacts, <name>_trial)")
    parser.add_argument("--chromium", help="browser binary (default: $CHROMIUM or chromium on PATH)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each page to render")
    parser.add_argument("--max-nested", type=int, default=8, help="nested runs that must be visible (at most)")
    parser.add_argument("--window", default="1400x900", help="window size WIDTHxHEIGHT")
    args = parser.parse_args(argv)

    binary = find_chromium(args.chromium)
    if binary is None:
        print(f"error: no Chromium found (tried {', '.join(BROWSERS)}; apt-get install chromium)", file=sys.stderr)
        return 2
    width, height = (int(v) for v in args.window.lower().split("x"))
    artifacts = [a for a in args.artifacts.split(",") if a]
    expected = expected_from_tracking(args.url, args.experiment, args.run_id, artifacts)
    for note in expected.notes:
        print(f"note: {note}")
    with chromium(binary, width, height) as port:
        checks = check_ui(
            port, args.url, expected, timeout=args.timeout, max_nested=args.max_nested, screenshot=args.screenshot,
            window=(width, height),
        )  # fmt: skip
        results = asyncio.run(checks)
    for ok, what in results:
        print(f"{'ok' if ok else 'FAILED'}: {what}")
    if args.screenshot is not None:
        shots = [args.screenshot] + [shot_path(args.screenshot, s) for s in ("artifacts", "trial", "results", "charts", "compare")]
        print("screenshots: " + ", ".join(str(p) for p in shots if p.exists()))
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
