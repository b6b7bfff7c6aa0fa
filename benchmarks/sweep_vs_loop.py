"""Wall time of N small trials through the orchestrator vs the same trials one after another.

    python benchmarks/sweep_vs_loop.py [--trials 8] [--epochs 10] [--method proden]

The orchestrated side is the real entry point (``orchestrator.sweep.run``: Ray start, annotation
stage, Tune + Optuna, MLflow logging, checkpoints) with one CPU per trial and as many concurrent
trials as the machine has cores. The baseline runs the very same resolved trial configs in a plain
Python loop in one process (``trainables.loop.run_trial``, no Ray, no MLflow, no checkpoints) with
torch using every core. Printed ratio = baseline / orchestrated (above 1: the orchestrator is faster).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from orchestrator.config import parse_grid
from orchestrator.sweep import run
from trainables.loop import run_trial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--method", default="proden")
    parser.add_argument("--checkpoint-every", type=int, default=1, help="epochs between Tune checkpoints")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    grid = parse_grid(
        {
            "experiment": "bench-sweep",
            "storage": str(tmp / "results"),
            "datasets": [{"name": "digits"}],
            "annotators": [{"kind": "synthetic"}],
            "grid": {"q": [0.3], "eta": [0.3], "seeds": list(range(args.trials))},
            "training": {
                "epochs": args.epochs,
                "batch_size": 128,
                "backbone": "small_cnn",
                "checkpoint_every": args.checkpoint_every,
            },
            "methods": [{"name": args.method}],
            "resources": {"cpus_per_trial": 1, "max_concurrent_trials": cores},
            "ray": {"num_cpus": cores},
        }
    )
    tic = time.perf_counter()
    summary = run(grid)
    orchestrated = time.perf_counter() - tic
    configs = [config for config, metrics in summary["results"] if metrics]
    assert len(configs) == args.trials, f"expected {args.trials} finished trials, got {len(configs)}"
    inside = sum(metrics.get("time_total_s", 0.0) for _, metrics in summary["results"])

    import ray

    ray.shutdown()
    torch.set_num_threads(cores)
    tic = time.perf_counter()
    for config in configs:
        run_trial(dict(config, device="cpu"), lambda metrics, save: None)
    plain = time.perf_counter() - tic

    print(
        f"\n{args.trials} {args.method} trials x {args.epochs} epochs on digits, {cores} cores, "
        f"checkpoint every {args.checkpoint_every} epochs"
    )
    print(f"  orchestrator (Ray start + annotation + Tune/Optuna + MLflow + checkpoints): {orchestrated:8.1f} s")
    print(f"    of which summed inside-trial time:                                         {inside:8.1f} s")
    print(f"  plain sequential loop, same configs, torch on {cores} threads:                 {plain:8.1f} s")
    print(f"  ratio plain / orchestrator = {plain / orchestrated:.2f}")


if __name__ == "__main__":
    main()
