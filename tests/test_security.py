"""Nothing gets in through a checkpoint: planted pickles are refused, tag paths are checked."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from orchestrator.sweep import checked_checkpoint
from trainables.loop import CHECKPOINT_FILE, load_checkpoint


class _Payload:
    """Unpickling this creates ``marker``: what a planted checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_pickle_in_a_checkpoint_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"algorithm": {}, "epoch": 1, "payload": _Payload(marker)}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_a_checkpoint_tag_is_used_only_inside_the_sweeps_results(tmp_path, capsys):
    storage = tmp_path / "results"
    inside = storage / "ray_results" / "exp" / "trial_1" / "checkpoint_000003"
    assert checked_checkpoint(str(inside), storage) == str(inside.resolve())
    assert checked_checkpoint(None, storage) is None and checked_checkpoint("", storage) is None
    for outside in (str(tmp_path / "elsewhere"), str(storage / "ray_results" / ".." / ".." / "x"), "/etc"):
        assert checked_checkpoint(outside, storage) is None
    assert "outside" in capsys.readouterr().out


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("http://user:s3cret@mlflow.example:5000/path", "http://mlflow.example:5000/path"),
        ("https://token@mlflow.example", "https://mlflow.example"),
        ("http://[::1]:5000", "http://[::1]:5000"),
        ("http://u:p@[::1]:5000", "http://[::1]:5000"),
        ("sqlite:////tmp/results/mlflow.db", "sqlite:////tmp/results/mlflow.db"),
    ],
)
def test_credentials_are_taken_out_of_uris(uri, shown):
    from orchestrator.runs import redact

    assert redact(uri) == shown


class _Recorder:
    """Stands in for the Tracker: records what the sweep run gets."""

    def __init__(self):
        self.logged: list[str] = []

    def find_runs(self, *args, **kwargs):
        return []

    def start_run(self, name, tags):
        return "parent"

    def log_dict(self, run_id, obj, name):
        self.logged.append(json.dumps(obj))

    def log_file(self, run_id, path, artifact_path=None):
        self.logged.append(Path(path).read_text())

    def log_params(self, run_id, params):
        self.logged.append(json.dumps(params))


def test_a_tracking_uri_with_credentials_is_never_logged_or_printed(tmp_path, capsys):
    from orchestrator import runs
    from orchestrator.config import load_grid
    from orchestrator.plan import expand
    from orchestrator.sweep import open_sweep_run

    uri = "http://alice:s3cret-token@127.0.0.1:5999"
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(
        f"experiment: x\ntracking_uri: {uri}\nstorage: {tmp_path}\ndatasets: [{{name: digits}}]\n"
        "annotators: [{kind: synthetic}]\ngrid: {q: [0.3], eta: [0.1]}\nmethods: [{name: cc}]\n"
    )
    grid = load_grid(grid_file)
    tracker = _Recorder()
    open_sweep_run(tracker, grid, grid_file, "sig", resume=False)
    assert tracker.logged and not any("s3cret" in text for text in tracker.logged)
    assert any("http://127.0.0.1:5999" in text for text in tracker.logged)  # the grid file, redacted
    spec = expand(grid)[0].trial_config({}, annotation_key="k", cache_dir="/c", cpus=1)
    assert "s3cret" not in runs.describe_trial(spec, "run1", uri)
    assert "s3cret" not in capsys.readouterr().out


# -- the rerun page ---------------------------------------------------------------------------------


@pytest.fixture
def page(tmp_path):
    """The rerun page on a free loopback port, its launches recorded instead of run."""
    import threading

    from orchestrator.webui import App, make_server

    class Recording:
        kind = "recording"

        def jobs(self):
            return []

    app = App(f"sqlite:///{tmp_path / 'mlflow.db'}", Recording())
    launched: list[tuple] = []
    app.launch = lambda request: launched.append((request.run_id, request.ablation)) or "job-1"
    server = make_server(app)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield app, server.server_port, launched
    server.shutdown()


def _request(port: int, method: str, path: str, body: str = "", **headers: str) -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/x-www-form-urlencoded", **headers}
    conn.request(method, path, body=body, headers=headers)
    status = conn.getresponse().status
    conn.close()
    return status


def test_a_launch_needs_the_pages_token(page):
    app, port, launched = page
    assert _request(port, "POST", "/launch", "run_id=abc&confirm=1") == 403
    assert _request(port, "POST", "/launch", "run_id=abc&token=guess&confirm=1") == 403
    assert launched == []
    # without the confirmation step nothing runs (here: no such run, refused with its reason)
    assert _request(port, "POST", "/launch", f"run_id=abc&ablation=supcon&token={app.token}") == 400
    assert launched == []
    assert _request(port, "POST", "/launch", f"run_id=abc&ablation=supcon&token={app.token}&confirm=1") == 303
    assert launched == [("abc", "supcon")]


def test_cross_origin_posts_and_foreign_host_names_are_refused(page):
    app, port, launched = page
    body = f"run_id=abc&token={app.token}&confirm=1"
    assert _request(port, "POST", "/launch", body, Origin="http://evil.example") == 403
    assert _request(port, "GET", "/jobs", Host=f"evil.example:{port}") == 403  # DNS rebinding
    assert _request(port, "POST", "/launch", body, Host=f"evil.example:{port}") == 403
    assert launched == []
    assert _request(port, "GET", "/jobs", Host=f"localhost:{port}") == 200
    assert _request(port, "POST", "/launch", body, Origin=f"http://127.0.0.1:{port}") == 303


def test_stored_results_html_reaches_the_page_without_scripts_or_attributes():
    from orchestrator.webui import sanitised_tables

    stored = (
        "<html><head><title>t</title><style>b{}</style><script>steal()</script></head><body><h3>Test accuracy</h3>"
        "<table onclick='steal()'><tr><td><b>97.5</b></td><td><a href='javascript:steal()'>x &amp; y</a></td>"
        "<td><img src=x onerror=steal()></td></tr></table></body></html>"
    )
    shown = sanitised_tables(stored)
    assert shown == "<h3>Test accuracy</h3><table><tr><td><b>97.5</b></td><td>x &amp; y</td><td></td></tr></table>"


def test_resource_requests_the_cluster_cannot_meet_are_named_with_the_numbers():
    from orchestrator.config import parse_grid
    from orchestrator.sweep import resource_problems

    grid = parse_grid({
        "experiment": "x", "datasets": [{"name": "digits"}],
        "annotators": [{"kind": "synthetic"}, {"kind": "clip", "gpus_per_actor": 0.5}],
        "grid": {"q": [0.3], "eta": [0.1]}, "methods": [{"name": "cc"}],
        "resources": {"cpus_per_trial": 3, "gpus_per_trial": 0.25},
    })  # fmt: skip
    assert resource_problems(grid, {"CPU": 2.0}) == [
        "resources.cpus_per_trial: 3 CPUs asked, the Ray cluster has 2",
        "resources.gpus_per_trial: 0.25 GPUs asked, the Ray cluster has 0",
        "annotators[1].gpus_per_actor: 0.5 GPUs asked, the Ray cluster has 0",
    ]
    assert resource_problems(grid, {"CPU": 16.0, "GPU": 1.0}) == []


def test_a_request_the_cluster_has_in_all_but_no_node_has_is_named_with_each_nodes_numbers():
    from orchestrator.config import parse_grid
    from orchestrator.sweep import resource_problems

    grid = parse_grid({
        "experiment": "x", "datasets": [{"name": "digits"}],
        "annotators": [{"kind": "clip", "cpus_per_actor": 1, "gpus_per_actor": 1}],
        "grid": {"seeds": [0]}, "methods": [{"name": "cc"}], "resources": {"cpus_per_trial": 2},
    })  # fmt: skip
    one_cpu_nodes = [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert resource_problems(grid, {"CPU": 3.0, "GPU": 1.0}, one_cpu_nodes) == [
        "resources.cpus_per_trial: 2 CPUs asked for one trial, which runs on a single node, and no node of the "
        "Ray cluster has that much (its 3 nodes have 1, 1, 1 CPUs, 3 in all); ask for at most what one node has",
    ]
    # CPUs and GPUs of one actor must be on one node: a CPU-only node and a GPU node without a free CPU do not add up.
    split = [{"CPU": 2.0}, {"CPU": 0.0, "GPU": 1.0}]
    assert resource_problems(grid, {"CPU": 2.0, "GPU": 1.0}, split) == [
        "annotators[0].cpus_per_actor and gpus_per_actor: 1 CPUs and 1 GPUs asked for one actor, which runs on a "
        "single node, and no node of the Ray cluster has that much (its 2 nodes have 2 CPUs + 0 GPUs, 0 CPUs + 1 GPUs); "
        "ask for at most what one node has",
    ]
    assert resource_problems(grid, {"CPU": 3.0, "GPU": 1.0}, [{"CPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]) == []


@pytest.mark.ray
def test_a_local_sweep_asking_more_than_ray_has_stops_before_its_mlflow_run(tmp_path, ray_session):
    from orchestrator.config import GridError, parse_grid
    from orchestrator.sweep import run

    grid = parse_grid({
        "experiment": "x", "storage": str(tmp_path), "datasets": [{"name": "digits"}],
        "annotators": [{"kind": "synthetic"}], "grid": {"q": [0.3], "eta": [0.1]}, "methods": [{"name": "cc"}],
        "resources": {"cpus_per_trial": 64},
    })  # fmt: skip
    with pytest.raises(GridError, match="resources.cpus_per_trial: 64 CPUs asked, the Ray cluster has 2"):
        run(grid)
    assert not (tmp_path / "mlflow.db").exists()


def test_a_resumed_trial_whose_checkpoint_is_gone_restarts_and_says_so(tmp_path, capsys):
    from types import SimpleNamespace

    from orchestrator import runs
    from orchestrator.config import parse_grid
    from orchestrator.plan import expand
    from orchestrator.sweep import Sweep

    grid = parse_grid({
        "experiment": "x", "storage": str(tmp_path), "datasets": [{"name": "digits"}],
        "annotators": [{"kind": "synthetic"}], "grid": {"q": [0.3], "eta": [0.1]}, "methods": [{"name": "cc"}],
    })  # fmt: skip
    study = expand(grid)[0]
    kept = tmp_path / "ray_results" / "exp" / "trial_a" / "checkpoint_000002"
    kept.mkdir(parents=True)
    (kept / CHECKPOINT_FILE).write_bytes(b"")
    gone = tmp_path / "ray_results" / "exp" / "trial_b" / "checkpoint_000004"
    tags: dict[str, dict] = {}

    class Tracker:
        checkpoint = str(kept)

        def find_runs(self, wanted, max_results=None):
            return [SimpleNamespace(info=SimpleNamespace(run_id="run1"), data=SimpleNamespace(tags={runs.CHECKPOINT: self.checkpoint}))]

        def set_tags(self, run_id, new):
            tags.setdefault(run_id, {}).update(new)

    sweep = Sweep.__new__(Sweep)
    sweep.grid, sweep.tracker, sweep.cache_dir = grid, Tracker(), tmp_path / "annotations"
    sweep.annotations = {study.cell.annotation_job: SimpleNamespace(key="k")}
    assert sweep.trial_spec(study, {}, 0, resuming=True).resume_checkpoint == str(kept.resolve())
    assert tags == {}
    sweep.tracker.checkpoint = str(gone)
    spec = sweep.trial_spec(study, {}, 0, resuming=True)
    assert spec.resume_checkpoint is None and spec.mlflow_run_id == "run1"
    assert "is gone; the trial restarts from its first epoch" in tags["run1"][runs.RESTARTED]
    assert "restarts from its first epoch" in capsys.readouterr().out


def test_a_second_driver_on_the_same_storage_is_refused(tmp_path):
    from orchestrator.config import parse_grid
    from orchestrator.sweep import SweepLockedError, run, storage_lock

    grid = parse_grid({
        "experiment": "x", "storage": str(tmp_path), "datasets": [{"name": "digits"}],
        "annotators": [{"kind": "synthetic"}], "grid": {"q": [0.3], "eta": [0.1]}, "methods": [{"name": "cc"}],
    })  # fmt: skip
    with storage_lock(grid.storage_path):  # the first driver
        with pytest.raises(SweepLockedError, match="another sweep is running on storage"):
            run(grid)
    assert not (tmp_path / "mlflow.db").exists()


def test_the_jobs_page_reloads_while_a_rerun_runs_and_keeps_long_logs_in_a_scrolled_box(tmp_path):
    from orchestrator.webui import REFRESH_S, App, Job

    class Listing:
        kind = "listing"
        found: list = []

        def jobs(self):
            return self.found

    app = App(f"sqlite:///{tmp_path / 'mlflow.db'}", Listing())
    Listing.found = [Job("rerun-1", "python -m orchestrator.rerun x", status="RUNNING", log="line\n" * 10_000)]
    running = app.jobs()
    assert f"<meta http-equiv='refresh' content='{REFRESH_S}'>" in running
    assert running.count("line") <= 3000 // 5 + 1  # the end of the log only
    assert "pre{" in running and "max-height" in running and "overflow:auto" in running
    Listing.found = [Job("rerun-1", "python -m orchestrator.rerun x", status="SUCCEEDED")]
    assert "http-equiv='refresh'" not in app.jobs()
