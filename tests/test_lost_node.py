"""Lost nodes on Ray's multi-node simulator (``ray.cluster_utils.Cluster``: a head and two 1-CPU
worker nodes on this machine), in a process of their own (``tests/fixtures/cluster_faults.py``; the
test session's shared local Ray cannot host a cluster). One cluster serves every test here:

- a grid asking 2 CPUs per trial, which the cluster has in all but no node has, is refused;
- a sweep's CLIP annotation loses its actor's node half-way: the actor is restarted on another node
  and every image is annotated exactly once, as the model run directly annotates it;
- the same sweep then loses the node of a half-trained trial: the trial resumes from its checkpoint
  on the other node, in its own MLflow run, and the sweep ends with no duplicate or RUNNING run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

SCRIPT = Path(__file__).parent / "fixtures" / "cluster_faults.py"
EPOCHS = 8  # as in the script


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[2]), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out / "out")], env=env, capture_output=True, text=True, timeout=420
    )
    result_file = out / "out" / "result.json"
    assert result_file.exists(), (done.returncode, done.stdout[-3000:], done.stderr[-5000:])
    result = json.loads(result_file.read_text())
    assert "error" not in result, result["error"]
    print(f"cluster start {result['startup_s']:.1f} s, whole run {result['total_s']:.1f} s")
    return result


def test_a_request_no_single_node_can_hold_is_refused_with_the_numbers(cluster_run):
    refused = cluster_run["resources"]["refused"]
    assert refused is not None, "2 CPUs per trial on 1-CPU nodes was accepted"
    assert "resources.cpus_per_trial: 2 CPUs asked for one trial, which runs on a single node" in refused
    found = re.search(r"its 3 nodes have ([\d, ]+) CPUs, 2 in all", refused)
    assert found and sorted(found.group(1).split(", ")) == ["0", "1", "1"], refused  # the head has none


def test_an_annotation_actor_whose_node_is_lost_finishes_on_another_node(cluster_run):
    sweep = cluster_run["sweep"]
    assert sweep["annotation_node"] is not None, "no CLIP actor was found on a worker node"
    done, total = sweep["annotation_done_at_kill"]
    assert 0 < done < total  # killed half-way
    assert sweep["annotation_node"] in sweep["killed_nodes"]
    (annotation,) = [r for r in sweep["runs"] if r["kind"] == "annotation"]  # one annotation run
    assert annotation["status"] == "FINISHED"
    # Every image annotated once (the stage refuses missing or duplicated samples), with the
    # probabilities the model gives when run directly.
    assert sweep["annotation_max_abs_diff"] < 2e-3


def test_a_trial_whose_node_is_lost_resumes_from_its_checkpoint_on_another_node(cluster_run):
    sweep = cluster_run["sweep"]
    assert "trial_run" in sweep, "no trial was caught half-trained"
    assert sweep["trial_node"] in sweep["killed_nodes"]
    assert 2 <= sweep["trial_epoch_at_kill"] <= EPOCHS - 3
    assert sweep["failed"] == 0 and not sweep["interrupted"]
    trials = [r for r in sweep["runs"] if r["kind"] == "trial"]
    assert len(trials) == 2  # num_samples 2: no duplicate run for the retried trial
    assert all(r["status"] == "FINISHED" for r in sweep["runs"]), [(r["kind"], r["status"]) for r in sweep["runs"]]
    # Every epoch logged exactly once. A retried trial logs every epoch it trains: had the victim
    # restarted from its first epoch instead of its checkpoint, its early epochs would be here twice.
    for r in trials:
        assert r["epochs"] == list(range(1, EPOCHS + 1)), r
    (victim,) = [r for r in trials if r["id"] == sweep["trial_run"]]
    assert victim["tags"]["retries"] == "1"
    # Ray names the loss as the node's death, or as the actor unreachable, by who notices first.
    assert re.search(r"its node has died|The actor \w+ is unavailable", victim["tags"]["last_error"]), victim["tags"]["last_error"]
    assert sweep["states"] == ["COMPLETE", "COMPLETE"]  # Optuna agrees with MLflow
    assert sweep["alive_nodes"] == 2  # head + the replacement: both killed worker nodes are gone
