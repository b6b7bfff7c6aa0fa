"""Size of a trial's checkpoint against the deployable student made from it.

    python benchmarks/student_size.py [--method coreg] [--epochs 3]

Trains one tiny trial (digits, 300 training images, the small CNN, q = eta = 0.3) in a plain loop
(``trainables.loop.run_trial``), logs its student to a throw-away sqlite MLflow store
(``orchestrator.student.log_student``) and prints the checkpoint's size, the student's network
weights (``networks.pt``) and the whole student directory (``student_kb`` tag: weights, shipped
``trainables/`` code, environment files).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="coreg")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from orchestrator.annotation.stage import annotate
    from orchestrator.config import parse_grid
    from orchestrator.plan import expand
    from orchestrator.student import driver_dataset, log_student
    from trainables.data.datasets import load_dataset
    from trainables.loop import CHECKPOINT_FILE, run_trial

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="student-size-"))
    grid = parse_grid({
        "experiment": "student-size", "storage": str(tmp),
        "datasets": [{"name": "digits", "subsample": 300, "test_subsample": 150}],
        "annotators": [{"kind": "synthetic"}], "grid": {"q": [0.3], "eta": [0.3], "seeds": [0]},
        "training": {"epochs": args.epochs, "batch_size": 32, "backbone": "small_cnn"}, "methods": [{"name": args.method}],
    })  # fmt: skip
    study = expand(grid)[0]
    ann = annotate(load_dataset(study.cell.dataset), study.cell.annotator, q=0.3, eta=0.3, seed=0, cache_dir=tmp / "annotations")
    config = study.trial_config({}, annotation_key=ann.key, cache_dir=str(tmp / "annotations"), cpus=1, device="cpu")
    checkpoint = tmp / "checkpoint"
    checkpoint.mkdir()
    run_trial(config, lambda metrics, save: save(checkpoint) if save is not None else None)
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("s", artifact_location=(tmp / "artifacts").as_uri())).info.run_id
    log_student(client, run_id, checkpoint, driver_dataset(config))
    weights = Path(client.download_artifacts(run_id, "student/artifacts/networks.pt", str(tmp / "weights")))
    print(
        f"{args.method}: checkpoint {(checkpoint / CHECKPOINT_FILE).stat().st_size / 1024:.0f} KB, student weights "
        f"{weights.stat().st_size / 1024:.0f} KB, student directory {client.get_run(run_id).data.tags['student_kb']} KB"
    )


if __name__ == "__main__":
    main()
