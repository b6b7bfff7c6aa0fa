"""cluster.yaml passes Ray's own cluster-config validator, offline, and installs the project."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_is_valid_for_ray_up():
    validate_config(prepare_config(load()))


def test_validator_rejects_a_broken_config():
    broken = load()
    broken["available_node_types"]["head"]["not_a_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_every_node_runs_the_projects_ray_and_installs_the_project():
    config = load()
    setup = "\n".join(config["setup_commands"])  # run on head and workers alike
    assert f"ray[default,tune,data]=={ray.__version__}" in setup
    assert "pip install -q -e /home/ubuntu/coreg" in setup
    assert config["file_mounts"]["/home/ubuntu/coreg"] == "."
    assert "/mnt/shared" in setup  # the shared storage every example grid points at
    assert any("mlflow server" in c for c in config["head_setup_commands"])
    gpu = config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"]
    assert gpu.startswith(("g4dn", "g5", "g6", "p3", "p4", "p5"))


def test_example_cluster_grids_point_at_the_cluster():
    examples = Path(__file__).resolve().parents[1] / "examples"
    for name in ("clip_table1.yaml", "synthetic_table3.yaml"):
        grid = yaml.safe_load((examples / name).read_text())
        assert grid["ray"]["address"] == "auto"
        assert grid["storage"].startswith("/mnt/shared")
        assert grid["tracking_uri"].startswith("http://")
