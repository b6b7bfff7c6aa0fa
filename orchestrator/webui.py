"""A small web page that lists a sweep's trial runs and launches their reruns and ablations.

    python -m orchestrator.webui --tracking-uri http://head:5000 [--ray-address http://head:8265] [--port 8265]

Pages: ``/`` lists the sweeps (parent runs) of every experiment; ``/sweep/<run id>`` shows the
sweep's results table and one line per trial run (method, cell, seed, test accuracy, objective,
best-in-cell flag) with a *Rerun* button and one button per ablation of the method; ``/jobs`` lists
the launched reruns with their status and the end of their log (with ``--ray-address``: every rerun
job the cluster knows, also those launched before this page was restarted).

A button runs exactly the command that the trial run's description in the MLflow UI shows
(``python -m orchestrator.rerun RUN_ID --tracking-uri ... [--ablation NAME]``). With
``--ray-address`` (the Ray dashboard, ``http://<head>:8265``) it is submitted as a Ray job, so the
rerun's driver runs on the cluster's head node and its trials on the cluster; without it, the
command runs as a local process (a laptop, or this page running on the head node itself).
Standard library only (plus the MLflow client and Ray's job SDK): one file, no front-end build.
"""

from __future__ import annotations

import argparse
import hmac
import html
import os
import secrets
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from orchestrator import runs

STYLE = (
    "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #bbb;padding:3px 8px;font-size:14px}th{background:#eee}"
    "button{margin:1px;font-size:12px}.best{background:#e6f7ec}pre{background:#f6f6f6;padding:6px}"
)


def rerun_command(run_id: str, tracking_uri: str, ablation: str | None = None) -> list[str]:
    argv = [sys.executable, "-m", "orchestrator.rerun", run_id, "--tracking-uri", tracking_uri]
    return argv + (["--ablation", ablation] if ablation else [])


def shown_command(argv: list[str]) -> str:
    """The command line as the jobs page shows it: ``python ...`` with credentials taken out of URIs."""
    return shlex.join(["python", *(runs.redact(arg) for arg in argv[1:])])


@dataclass
class Job:
    """A launched rerun as the jobs page shows it."""

    job_id: str
    command: str
    started: float = field(default_factory=time.time)
    status: str = "PENDING"
    log: str = ""


class LocalLauncher:
    """Runs each rerun as a local process (its driver connects to the grid's Ray cluster itself).
    The processes outlive this page; the list of them does not."""

    kind = "local process"

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self._jobs: dict[str, tuple[Job, subprocess.Popen, Path]] = {}

    def submit(self, argv: list[str], metadata: dict[str, str]) -> str:
        job_id = f"rerun-{len(self._jobs) + 1}-{int(time.time())}"
        log_path = self.log_dir / f"{job_id}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._jobs[job_id] = (Job(job_id, shown_command(argv)), process, log_path)
        return job_id

    def jobs(self) -> list[Job]:
        out = []
        for job, process, log_path in self._jobs.values():
            code = process.poll()
            job.status = "RUNNING" if code is None else ("SUCCEEDED" if code == 0 else f"FAILED (exit {code})")
            job.log = log_path.read_text(errors="replace")
            out.append(job)
        return out


class LauncherError(RuntimeError):
    """The Ray cluster's job API cannot be used (unreachable, or it wants a token)."""


class RayJobLauncher:
    """Submits each rerun as a Ray job through the cluster's dashboard (job submission API). The
    jobs page lists every rerun job the cluster knows (also those launched before a restart of
    this page), recognised by their metadata.

    A cluster with token authentication (Ray 2.60 turns it on for a local ``ray.init()`` cluster, and
    for ``ray start`` when a token exists) needs the
    token here too: ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; when one
    is present and ``RAY_AUTH_MODE`` is unset, token mode is switched on for this process."""

    kind = "Ray job"
    TAG = "coreg_rerun_of"

    def __init__(self, address: str):
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        _enable_token_auth_if_token_present()
        try:
            self.client = JobSubmissionClient(address)
        except AuthenticationError as err:
            raise LauncherError(
                f"the Ray dashboard at {address} wants an authentication token: put the cluster's token in "
                f"RAY_AUTH_TOKEN (or a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token). {str(err).splitlines()[0]}"
            ) from None
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise LauncherError(f"no Ray job API at {address} (the head node's dashboard, http://<head>:8265): {err}") from None

    def submit(self, argv: list[str], metadata: dict[str, str], wait_for_agent_s: float = 60.0) -> str:
        # The job runs on the head node in the project's environment: the module, not this interpreter.
        entrypoint = shlex.join(["python", *argv[1:]])
        deadline = time.monotonic() + wait_for_agent_s
        while True:
            try:
                return self.client.submit_job(entrypoint=entrypoint, metadata=metadata)
            except RuntimeError as err:  # a head that just started answers before its job agent is up
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def jobs(self) -> list[Job]:
        out = []
        for info in self.client.list_jobs():
            if self.TAG not in (info.metadata or {}):
                continue
            job_id = info.submission_id or info.job_id
            out.append(
                Job(job_id, shown_command(shlex.split(info.entrypoint)), (info.start_time or 0) / 1000, str(info.status.value), self.client.get_job_logs(job_id))
            )
        return out


def _enable_token_auth_if_token_present() -> None:
    if os.environ.get("RAY_AUTH_MODE"):
        return
    token_path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_path.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


SAFE_TAGS = frozenset({"table", "thead", "tbody", "tr", "th", "td", "caption", "h2", "h3", "h4", "p", "b", "strong", "em", "code", "br"})


class _TableSanitiser(HTMLParser):
    """Rebuilds stored results HTML from its text and a few table tags, without attributes: a
    results artifact is written by whoever can write to the tracking server, so nothing in it
    (scripts, handlers, links, styles) reaches the page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skipping = 0  # inside <script> / <style> / <title>: their text is dropped too

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "style", "title"):
            self.skipping += 1
        elif tag in SAFE_TAGS and not self.skipping:
            self.out.append(f"<{tag}>")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "title"):
            self.skipping = max(self.skipping - 1, 0)
        elif tag in SAFE_TAGS and not self.skipping and tag != "br":
            self.out.append(f"</{tag}>")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.out.append(html.escape(data))


def sanitised_tables(text: str) -> str:
    """The results tables of a stored ``results.html``, with every tag but :data:`SAFE_TAGS` removed."""
    parser = _TableSanitiser()
    parser.feed(text)
    parser.close()
    return "".join(parser.out)


class App:
    """The pages. ``token`` (random per start) is in every launch form and required by
    ``POST /launch``: another site can make a browser send a POST, but cannot read the token."""

    def __init__(self, tracking_uri: str, launcher: Any):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.launcher = launcher
        self.lock = threading.Lock()
        self.token = secrets.token_urlsafe(24)

    # Pages -------------------------------------------------------------------------------------

    def index(self) -> str:
        rows = []
        for exp in self.client.search_experiments():
            for run in self.client.search_runs([exp.experiment_id], runs.sweeps_filter(), order_by=runs.NEWEST_FIRST):
                rows.append(
                    f"<tr><td>{html.escape(exp.name)}</td><td><a href='/sweep/{html.escape(run.info.run_id)}'>{html.escape(run.info.run_name or run.info.run_id)}</a></td>"
                    f"<td>{html.escape(run.info.status)}</td><td>{html.escape(run.data.params.get('num_trials', ''))}</td></tr>"
                )
        body = "<table><tr><th>experiment</th><th>sweep</th><th>status</th><th>trials</th></tr>" + "".join(rows) + "</table>"
        return self._page("Sweeps", body if rows else "<p>No sweeps in this tracking store yet.</p>")

    def sweep(self, parent: str) -> str:
        from trainables.registry import ALGORITHMS

        run = self.client.get_run(parent)
        trials = self.client.search_runs(
            [run.info.experiment_id], runs.trials_filter(parent), order_by=runs.TRIALS_ORDER, max_results=5000
        )
        table = ""
        try:
            table = sanitised_tables(Path(self.client.download_artifacts(parent, runs.RESULTS_HTML)).read_text())
        except Exception:  # a sweep without tables yet: the runs list is still useful
            table = "<p>(no results table yet)</p>"
        lines = []
        for t in trials:
            tags, metrics = t.data.tags, t.data.metrics
            run_id = t.info.run_id
            spec = ALGORITHMS.get(tags.get(runs.METHOD, ""))
            buttons = [self._button(run_id, None, "Rerun", self.token)]
            buttons += [self._button(run_id, name, name, self.token) for name in (spec.ablations if spec else {})]
            variant = f" [{html.escape(tags[runs.VARIANT])}]" if tags.get(runs.VARIANT) else ""
            best = tags.get(runs.BEST_IN_CELL) == "true"
            lines.append(
                f"<tr class='{'best' if best else ''}' data-run='{html.escape(run_id)}'>"
                f"<td>{html.escape(tags.get(runs.METHOD, ''))}{variant}</td><td>{html.escape(tags.get(runs.CELL, ''))}</td>"
                f"<td>{html.escape(t.info.status)}</td><td>{100 * metrics.get(runs.TEST_ACC, float('nan')):.2f}</td>"
                f"<td>{metrics.get(tags.get(runs.OBJECTIVE, ''), float('nan')):.4f}</td>"
                f"<td>{'yes' if best else ''}</td><td>{''.join(buttons)}</td></tr>"
            )
        body = (
            f"<p><a href='/'>all sweeps</a> · <a href='/jobs'>launched reruns</a> · reruns run as: {self.launcher.kind}</p>"
            + table
            + f"<h3>Trial runs ({len(trials)})</h3><table><tr><th>method</th><th>cell</th><th>status</th>"
            "<th>test acc %</th><th>objective</th><th>best in cell</th><th>launch</th></tr>"
            + "".join(lines)
            + "</table>"
        )
        return self._page(run.info.run_name or parent, body)

    def jobs(self) -> str:
        rows = []
        for job in sorted(self.launcher.jobs(), key=lambda j: -j.started):
            rows.append(
                f"<tr data-job='{html.escape(job.job_id)}'><td>{html.escape(job.job_id)}</td><td class='status'>{html.escape(job.status)}</td>"
                f"<td><code>{html.escape(job.command)}</code><pre>{html.escape(job.log[-3000:])}</pre></td></tr>"
            )
        body = "<p><a href='/'>all sweeps</a></p><table><tr><th>job</th><th>status</th><th>command and log</th></tr>" + "".join(rows) + "</table>"
        return self._page("Launched reruns", body)

    def launch(self, run_id: str, ablation: str | None) -> str:
        from orchestrator.rerun import check_ablations

        run = self.client.get_run(run_id)  # unknown ids raise before anything is launched
        if ablation:
            check_ablations([ablation], run.data.tags[runs.METHOD])
        metadata = {RayJobLauncher.TAG: run_id, "ablation": ablation or ""}
        with self.lock:
            return self.launcher.submit(rerun_command(run_id, self.uri, ablation), metadata)

    # Helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _button(run_id: str, ablation: str | None, label: str, token: str) -> str:
        hidden = f"<input type='hidden' name='ablation' value='{html.escape(ablation)}'>" if ablation else ""
        return (
            f"<form method='post' action='/launch' style='display:inline'><input type='hidden' name='run_id' value='{html.escape(run_id)}'>"
            f"<input type='hidden' name='token' value='{token}'>{hidden}<button type='submit' data-ablation='{html.escape(ablation or '')}'>{html.escape(label)}</button></form>"
        )

    @staticmethod
    def _page(title: str, body: str) -> str:
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style></head>"
            f"<body><h2>{html.escape(title)}</h2>{body}</body></html>"
        )


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def allowed_hosts(host: str, port: int) -> set[str] | None:
    """The ``Host`` headers the page answers: its own address (and, on loopback, the loopback
    names), so that a page from another site that rebinds its DNS name to this address gets
    nothing. None (any host) only when bound to every interface, where the launch token guards."""
    if host in ("0.0.0.0", "::", ""):
        return None
    names = set(LOOPBACK) if host in LOOPBACK else {host}
    return {f"[{n}]:{port}" if ":" in n else f"{n}:{port}" for n in names}


def refusal(headers: Any, hosts: set[str] | None, post: bool) -> str | None:
    """Why a request is refused (None: served): a foreign ``Host``, or a POST from another origin."""
    host = headers.get("Host", "")
    if hosts is not None and host not in hosts:
        return f"unexpected Host header {host!r}"
    origin = headers.get("Origin")
    if post and origin is not None and origin != f"http://{host}":
        return f"cross-origin request from {origin!r}"
    return None


def make_server(app: App, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, text: str, location: str | None = None) -> None:
            data = text.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'")
            if location:
                self.send_header("Location", location)
            self.end_headers()
            self.wfile.write(data)

        def _refused(self, post: bool) -> bool:
            reason = refusal(self.headers, allowed_hosts(host, self.server.server_port), post)
            if reason is not None:
                self._send(403, App._page("Refused", f"<p>{html.escape(reason)}</p>"))
            return reason is not None

        def do_GET(self) -> None:  # noqa: N802
            if self._refused(post=False):
                return
            path = urlparse(self.path).path
            try:
                if path == "/":
                    self._send(200, app.index())
                elif path.startswith("/sweep/"):
                    self._send(200, app.sweep(path.rsplit("/", 1)[-1]))
                elif path == "/jobs":
                    self._send(200, app.jobs())
                else:
                    self._send(404, App._page("Not found", f"<p>{html.escape(path)}</p>"))
            except Exception as err:  # shown, not swallowed: the page is a research tool
                self._send(500, App._page("Error", f"<pre>{html.escape(repr(err))}</pre>"))

        def do_POST(self) -> None:  # noqa: N802
            if self._refused(post=True):
                return
            if urlparse(self.path).path != "/launch":
                self._send(404, App._page("Not found", ""))
                return
            length = min(int(self.headers.get("Content-Length", "0") or 0), 1 << 16)
            form = parse_qs(self.rfile.read(length).decode(errors="replace"))
            if not hmac.compare_digest(form.get("token", [""])[0], app.token):
                self._send(403, App._page("Refused", "<p>missing or wrong launch token: reload the page</p>"))
                return
            try:
                app.launch(form["run_id"][0], form.get("ablation", [None])[0])
            except Exception as err:
                self._send(400, App._page("Cannot launch", f"<pre>{html.escape(str(err))}</pre>"))
                return
            self._send(303, "", location="/jobs")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.webui", description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{Path('results/mlflow.db').resolve()}"))
    parser.add_argument("--ray-address", help="Ray dashboard address (http://<head>:8265): submit reruns as Ray jobs")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    try:
        launcher = RayJobLauncher(args.ray_address) if args.ray_address else LocalLauncher(Path(tempfile.mkdtemp(prefix="reruns-")))
    except LauncherError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    server = make_server(App(args.tracking_uri, launcher), args.host, args.port)
    print(f"rerun page on http://{args.host}:{server.server_port} (tracking {runs.redact(args.tracking_uri)}; reruns as {launcher.kind})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
