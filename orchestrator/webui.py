"""A small web page that lists a sweep's trial runs and launches their reruns and ablations.

    python -m orchestrator.webui --tracking-uri http://head:5000 [--ray-address http://head:8265] [--port 8265]

Pages: ``/`` lists the sweeps (parent runs) of every experiment; ``/sweep/<run id>`` shows the
sweep's results table and one line per trial run (method linked to its MLflow run page, cell,
status, test accuracy, objective, whether its method won the cell (``cell_winner``, highlighted)
and whether it is its study's best trial (``best_in_cell``)) with a *Rerun* button, one button per
ablation of the method, and fields for other seeds and ``--set`` overrides; a button opens a
confirmation page (the exact command and the trials it will run, checked as the command line
checks them) whose *Launch* button starts it; ``/jobs`` lists the launched reruns with their
status and the end of their log (with ``--ray-address``: every rerun job the cluster knows, also
those launched before this page was restarted), and reloads itself while one runs.

A launch runs exactly the command that the trial run's description in the MLflow UI shows
(``python -m orchestrator.rerun RUN_ID --tracking-uri ... [--ablation NAME] [--seeds ...] [--set ...]``). With
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
    "button{margin:1px;font-size:12px}.best{background:#e6f7ec}input{font-size:12px;width:9em}"
    "pre{background:#f6f6f6;padding:6px;max-height:24em;max-width:90vw;overflow:auto;white-space:pre-wrap;"
    "word-break:break-all}code{word-break:break-all}"
)
REFRESH_S = 5
"""How often ``/jobs`` reloads itself while a rerun is pending or running."""


@dataclass(frozen=True)
class LaunchRequest:
    """What a launch form asks: a rerun of ``run_id``, with an ablation, other seeds, overrides."""

    run_id: str
    ablation: str | None = None
    seeds: tuple[int, ...] = ()
    overrides: tuple[str, ...] = ()
    """``KEY=VALUE`` pairs of ``--set``."""

    @classmethod
    def from_form(cls, form: dict[str, list[str]]) -> "LaunchRequest":
        """From the posted fields; seeds are whole numbers separated by spaces or commas."""
        seeds_text = form.get("seeds", [""])[0].replace(",", " ")
        try:
            seeds = tuple(int(s) for s in seeds_text.split())
        except ValueError:
            raise ValueError(f"seeds: {seeds_text.strip()!r} is not a list of whole numbers (e.g. 0 1 2)") from None
        return cls(
            form["run_id"][0], form.get("ablation", [""])[0] or None, seeds, tuple(shlex.split(form.get("overrides", [""])[0]))
        )

    def fields(self) -> str:
        """The request as hidden form fields (the confirmation page posts it again)."""
        values = {"run_id": self.run_id, "ablation": self.ablation or "", "seeds": " ".join(map(str, self.seeds)),
                  "overrides": shlex.join(self.overrides)}  # fmt: skip
        return "".join(f"<input type='hidden' name='{k}' value='{html.escape(v)}'>" for k, v in values.items())


def rerun_command(
    run_id: str, tracking_uri: str, ablation: str | None = None, seeds: tuple[int, ...] = (), overrides: tuple[str, ...] = ()
) -> list[str]:
    argv = [sys.executable, "-m", "orchestrator.rerun", run_id, "--tracking-uri", tracking_uri]
    argv += ["--ablation", ablation] if ablation else []
    argv += ["--seeds", *map(str, seeds)] if seeds else []
    return argv + [arg for pair in overrides for arg in ("--set", pair)]


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

    def __init__(self, tracking_uri: str, launcher: Any, mlflow_ui: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.mlflow_ui = mlflow_ui or runs.ui_address(tracking_uri)
        """The MLflow UI the run links point to."""
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
        run = self.client.get_run(parent)
        exp = run.info.experiment_id
        trials = self.client.search_runs([exp], runs.trials_filter(parent), order_by=runs.TRIALS_ORDER, max_results=5000)
        table = ""
        try:
            table = sanitised_tables(Path(self.client.download_artifacts(parent, runs.RESULTS_HTML)).read_text())
        except Exception:  # a sweep without tables yet: the runs list is still useful
            table = "<p>(no results table yet)</p>"
        links = (
            f"<p><a href='/'>all sweeps</a> · <a href='/jobs'>launched reruns</a> · "
            f"{self._link(runs.run_url(self.mlflow_ui, exp, parent), 'this sweep in MLflow')} · "
            f"{self._link(runs.run_list_url(self.mlflow_ui, exp), 'its trial runs in MLflow')} · reruns run as: {self.launcher.kind}</p>"
        )
        body = (
            links
            + table
            + f"<h3>Trial runs ({len(trials)})</h3><p>Green: the method that wins the cell (best mean selected test "
            "accuracy of its column). A button asks for confirmation before anything runs; seeds (e.g. <code>0 1 2</code>) "
            "and overrides (e.g. <code>training.lr=0.01 params.warmup_epochs=5</code>) are optional.</p>"
            "<table><tr><th>method</th><th>cell</th><th>status</th><th>test acc %</th><th>objective</th>"
            "<th>cell winner</th><th>best of its study</th><th>rerun</th></tr>"
            + "".join(self._trial_row(t) for t in trials)
            + "</table>"
        )
        return self._page(run.info.run_name or parent, body)

    def _trial_row(self, trial: Any) -> str:
        from trainables.registry import ALGORITHMS

        tags, metrics, run_id = trial.data.tags, trial.data.metrics, trial.info.run_id
        spec = ALGORITHMS.get(tags.get(runs.METHOD, ""))
        variant = f" [{tags[runs.VARIANT]}]" if tags.get(runs.VARIANT) else ""
        winner, study_best = tags.get(runs.CELL_WINNER) == "true", tags.get(runs.BEST_IN_CELL) == "true"
        link = self._link(runs.run_url(self.mlflow_ui, trial.info.experiment_id, run_id), tags.get(runs.METHOD, "") + variant)
        return (
            f"<tr class='{'best' if winner else ''}' data-run='{html.escape(run_id)}'>"
            f"<td>{link}</td><td>{html.escape(tags.get(runs.CELL, ''))} seed={html.escape(tags.get(runs.SEED, ''))}</td>"
            f"<td>{html.escape(trial.info.status)}</td><td>{100 * metrics.get(runs.TEST_ACC, float('nan')):.2f}</td>"
            f"<td>{metrics.get(tags.get(runs.OBJECTIVE, ''), float('nan')):.4f}</td>"
            f"<td>{'yes' if winner else ''}</td><td>{'yes' if study_best else ''}</td>"
            f"<td>{self._launch_form(run_id, spec.ablations if spec else {}, self.token)}</td></tr>"
        )

    def jobs(self) -> str:
        rows = []
        found = sorted(self.launcher.jobs(), key=lambda j: -j.started)
        for job in found:
            rows.append(
                f"<tr data-job='{html.escape(job.job_id)}'><td>{html.escape(job.job_id)}</td><td class='status'>{html.escape(job.status)}</td>"
                f"<td><code>{html.escape(job.command)}</code><pre>{html.escape(job.log[-3000:])}</pre></td></tr>"
            )
        active = any(j.status in ("PENDING", "RUNNING") for j in found)
        note = f"<p>Reloads every {REFRESH_S} s while a rerun is pending or running.</p>" if active else ""
        body = note + "<p><a href='/'>all sweeps</a></p><table><tr><th>job</th><th>status</th><th>command and log</th></tr>" + "".join(rows) + "</table>"
        return self._page("Launched reruns", body, refresh_s=REFRESH_S if active else None)

    def plan(self, request: LaunchRequest) -> tuple[list[str], list[Any]]:
        """The command of ``request`` and the trial specs it will run, checked as ``rerun`` checks
        them (RerunError: an unknown run, ablation or setting)."""
        import json

        from orchestrator.rerun import RerunError, plan_configs
        from trainables.spec import TrialSpec

        try:
            run = self.client.get_run(request.run_id)
        except Exception as err:
            raise RerunError(f"no run {request.run_id}: {str(err).splitlines()[0]}") from None
        if run.data.tags.get(runs.KIND) != runs.TRIAL:
            raise RerunError(f"run {request.run_id} is not a trial run of a sweep")
        with tempfile.TemporaryDirectory() as tmp:
            config = json.loads(Path(self.client.download_artifacts(request.run_id, runs.RESOLVED_CONFIG, tmp)).read_text())
        specs = plan_configs(
            TrialSpec.from_config(config), request.run_id, overrides=list(request.overrides),
            ablations=[request.ablation] if request.ablation else [], seeds=list(request.seeds) or None,
        )  # fmt: skip
        argv = rerun_command(request.run_id, self.uri, request.ablation, request.seeds, request.overrides)
        return argv, specs

    def review(self, request: LaunchRequest) -> str:
        """The confirmation page: the command, the trials it runs, and the button that launches it."""
        argv, specs = self.plan(request)
        run = self.client.get_run(request.run_id)
        trials = "".join(
            f"<tr><td>{html.escape(s.method)} [{html.escape(s.variant or '')}]</td><td>seed={s.seed}</td>"
            f"<td><code>{html.escape(s.signature)}</code></td></tr>"
            for s in specs
        )
        body = (
            f"<p>This runs <b>{len(specs)}</b> trial(s), nested under the sweep of run "
            f"{self._link(runs.run_url(self.mlflow_ui, run.info.experiment_id, request.run_id), request.run_id)}, "
            f"as a {html.escape(self.launcher.kind)}:</p><pre>{html.escape(shown_command(argv))}</pre>"
            f"<table><tr><th>row</th><th>seed</th><th>signature</th></tr>{trials}</table>"
            f"<form method='post' action='/launch'>{request.fields()}<input type='hidden' name='confirm' value='1'>"
            f"<input type='hidden' name='token' value='{self.token}'><button type='submit' id='confirm'>Launch</button></form>"
            f"<p><a href='/sweep/{html.escape(run.data.tags.get(runs.PARENT_TAG, ''))}'>back to the sweep</a> (nothing launched)</p>"
        )
        return self._page("Confirm the rerun", body)

    def post_launch(self, form: dict[str, list[str]]) -> tuple[int, str, str | None]:
        """(status, page, redirect) for a ``POST /launch`` whose token was checked: without
        ``confirm=1`` the confirmation page (nothing runs), with it the launch."""
        try:
            request = LaunchRequest.from_form(form)
            if form.get("confirm", [""])[0] != "1":
                return 200, self.review(request), None
            self.launch(request)
        except Exception as err:
            return 400, self._page("Cannot launch", f"<pre>{html.escape(str(err))}</pre>"), None
        return 303, "", "/jobs"

    def launch(self, request: LaunchRequest) -> str:
        argv, _ = self.plan(request)  # refused here, before anything is launched
        metadata = {RayJobLauncher.TAG: request.run_id, "ablation": request.ablation or ""}
        with self.lock:
            return self.launcher.submit(argv, metadata)

    # Helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _launch_form(run_id: str, ablations: Any, token: str) -> str:
        """One form per trial run: a button per launch (rerun, each ablation) and the optional
        seeds and overrides; it opens the confirmation page."""
        buttons = "<button type='submit' name='ablation' value='' data-ablation=''>Rerun</button>" + "".join(
            f"<button type='submit' name='ablation' value='{html.escape(a)}' data-ablation='{html.escape(a)}'>{html.escape(a)}</button>"
            for a in ablations
        )
        return (
            f"<form method='post' action='/launch' style='display:inline'><input type='hidden' name='run_id' value='{html.escape(run_id)}'>"
            f"<input type='hidden' name='token' value='{token}'>{buttons} "
            "<input name='seeds' placeholder='seeds: its own' title='other seeds, e.g. 0 1 2'> "
            "<input name='overrides' placeholder='--set KEY=VALUE ...' title='e.g. training.lr=0.01 params.warmup_epochs=5'></form>"
        )

    @staticmethod
    def _link(url: str, text: str) -> str:
        return f"<a href='{html.escape(url)}' target='_blank' rel='noopener noreferrer'>{html.escape(text)}</a>"

    @staticmethod
    def _page(title: str, body: str, refresh_s: int | None = None) -> str:
        refresh = f"<meta http-equiv='refresh' content='{refresh_s}'>" if refresh_s else ""
        return (
            f"<!doctype html><html><head><meta charset='utf-8'>{refresh}<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
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
            self._send(*app.post_launch(form))

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.webui", description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{Path('results/mlflow.db').resolve()}"))
    parser.add_argument("--ray-address", help="Ray dashboard address (http://<head>:8265): submit reruns as Ray jobs")
    parser.add_argument("--mlflow-ui", help="the MLflow UI the run links open (default: the tracking server, else "
                        "http://127.0.0.1:5000, where `mlflow ui` serves a local store)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    try:
        launcher = RayJobLauncher(args.ray_address) if args.ray_address else LocalLauncher(Path(tempfile.mkdtemp(prefix="reruns-")))
    except LauncherError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    server = make_server(App(args.tracking_uri, launcher, args.mlflow_ui), args.host, args.port)
    print(f"rerun page on http://{args.host}:{server.server_port} (tracking {runs.redact(args.tracking_uri)}; reruns as {launcher.kind})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
