"""One trial's epoch-by-epoch metrics, without Ray or MLflow: a quick look at a method's dynamics.

Builds the trial from the same grid schema the sweep uses (one data set, a synthetic annotator, one
method), annotates through the real annotation stage (cached under ``--storage``) and trains it
with ``trainables.loop.run_trial``, printing one JSON line per epoch (``--keys`` picks the metrics).

    python scripts/trial_curve.py --dataset fashion_mnist --subsample 1000 --method coreg \\
        --params '{"warmup_epochs": 10}' --lr 0.01 --epochs 30
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DEFAULT_KEYS = "epoch,test/acc,pl/acc,split/fraction,split/precision,diag/prediction_entropy,train/loss_cont,time/epoch_s"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="coreg")
    ap.add_argument("--params", default="{}", help="the method's params as JSON, e.g. '{\"warmup_epochs\": 10}'")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--subsample", type=int, default=None, help="class-stratified training subset (default: all)")
    ap.add_argument("--test-subsample", type=int, default=None)
    ap.add_argument("--generator", default="flip")
    ap.add_argument("--q", type=float, default=0.3)
    ap.add_argument("--eta", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--backbone", default="small_cnn")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--keys", default=DEFAULT_KEYS, help="comma-separated metric names to print ('all': every one)")
    ap.add_argument("--storage", default="./results-trial-curve", help="where the annotation is cached")
    return ap.parse_args(argv)


def trial_spec(args: argparse.Namespace):
    """The resolved trial of a one-cell, one-method grid, and its annotation made (or read from the cache)."""
    from orchestrator.annotation.stage import annotate
    from orchestrator.config import parse_grid
    from orchestrator.plan import expand
    from trainables.data.datasets import load_dataset

    dataset = {"name": args.dataset, "subsample": args.subsample, "test_subsample": args.test_subsample}
    grid = parse_grid({
        "experiment": "trial-curve", "storage": args.storage,
        "datasets": [{k: v for k, v in dataset.items() if v is not None}],
        "annotators": [{"kind": "synthetic", "generator": args.generator}],
        "grid": {"q": [args.q], "eta": [args.eta], "seeds": [args.seed]},
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "backbone": args.backbone},
        "methods": [{"name": args.method, "params": json.loads(args.params)}],
    })  # fmt: skip
    study = expand(grid)[0]
    cell, cache = study.cell, Path(args.storage) / "annotations"
    ann = annotate(load_dataset(cell.dataset), cell.annotator, q=cell.q, eta=cell.eta, seed=cell.seed, cache_dir=cache)
    return study.trial_config({}, annotation_key=ann.key, cache_dir=str(cache), cpus=args.threads, device="cpu")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from trainables.loop import run_trial

    keys = None if args.keys == "all" else set(args.keys.split(","))

    def report(metrics: dict[str, float], save) -> None:
        print(json.dumps({k: round(v, 4) for k, v in metrics.items() if keys is None or k in keys}), flush=True)

    tic = time.perf_counter()
    run_trial(trial_spec(args), report)
    print(json.dumps({"total_s": round(time.perf_counter() - tic, 1)}), flush=True)


if __name__ == "__main__":
    main()
