"""A sweep without ``ray.address`` starts a Ray of its own: it never joins the latest cluster another
process started on the machine (plain ``ray.init()`` does, and that cluster's owner may stop it
mid-sweep, failing every trial with "the actor never ran")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from servers import free_port

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import ray
from orchestrator.config import parse_grid
from orchestrator.launch import connect_ray
grid = parse_grid({"experiment": "x", "datasets": [{"name": "digits"}], "annotators": [{"kind": "synthetic"}],
                   "grid": {"q": [0.3], "eta": [0.1]}, "methods": [{"name": "cc"}], "ray": {"num_cpus": 1}})
connect_ray(grid)
print("GCS", ray.get_runtime_context().gcs_address)
ray.shutdown()
"""


def test_a_local_sweep_does_not_join_another_cluster_on_the_machine(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ray_cli = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        latest = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # what plain ray.init() joins
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (latest.exists() and latest.read_text().strip().endswith(f":{port}")):
            time.sleep(0.5)
        assert latest.read_text().strip().endswith(f":{port}"), "the other cluster did not start"
        done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        gcs = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("GCS"))
        assert not gcs.endswith(f":{port}"), f"joined the other cluster at {gcs}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
