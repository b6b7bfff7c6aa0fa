"""Every data set and synthetic generator, measured: sizes, classes and the annotation statistics.

Prints two markdown tables:

1. data sets: training / test sizes, classes, sample shape, and the statistics of the shipped
   candidate sets where a data set has them (``given``), for every data set whose files are here:
   digits (always), Fashion-MNIST (Debian's package), Lost / MSRCv2 by name and Lost again as a
   ``pll_mat`` file (``--pll-root``), a long-tailed digits / Fashion-MNIST pool; EuroSAT, GTSRB,
   FER2013 and image folders when ``--root`` holds them (``--images`` for a folder);
2. generators: realised eta and mean |S| of each synthetic generator at the given (q, eta) on the
   training pools, with the closed-form expectation next to it, and the time to draw them.

Everything goes through the same code a sweep runs (``load_dataset``, ``synthetic_candidates``).

    python benchmarks/data_table.py [--pll-root /work/shared/data/pll] [--root DIR] [--images DIR]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.annotation.stage import dataset_candidate_stats, synthetic_candidates  # noqa: E402
from orchestrator.annotation.synthetic import USES_Q  # noqa: E402
from trainables.data.datasets import DatasetNotFoundError, load_dataset  # noqa: E402
from trainables.data.spec import DatasetSpec  # noqa: E402

SETTINGS = [("flip", 0.3, 0.2), ("pico_plus", 0.3, 0.2), ("uniform", None, 0.2), ("instance_dependent", 0.1, 0.2)]


def expected(generator: str, q: float | None, eta: float, c: int) -> tuple[str, str]:
    """Closed-form (realised eta, mean |S|) where one exists."""
    if generator == "flip":
        return f"{eta * (1 - q ** (c - 1)):.4f}", f"{1 + q * (c - 1):.4f}"
    if generator == "pico_plus":
        a = (1 - q) ** (c - 1)
        return f"{eta * (1 - a) / (1 - eta * a):.4f}", f"{((1 - eta) + q * (c - 1)) / (1 - eta * a):.4f}"
    if generator == "uniform":
        return f"{eta:.4f}", f"{c / 2:.4f}"
    return f"{eta:.4f} (full sets aside)", f"1 + qC = {1 + q * c:.4f} unclipped (clipping lowers it)"


def specs(args: argparse.Namespace) -> list[DatasetSpec]:
    out = [DatasetSpec(name="digits"), DatasetSpec(name="digits", label="digits-LT10", imbalance_ratio=10.0)]
    out += [DatasetSpec(name="fashion_mnist"), DatasetSpec(name="fashion_mnist", label="fashion_mnist-LT100", imbalance_ratio=100.0)]
    if args.pll_root:
        out += [DatasetSpec(name="lost", root=args.pll_root), DatasetSpec(name="msrcv2", root=args.pll_root)]
        out += [DatasetSpec(name="pll_mat", label="lost.mat as pll_mat", path=str(Path(args.pll_root) / "lost.mat"))]
    if args.root:
        out += [DatasetSpec(name=n, root=args.root) for n in ("eurosat", "gtsrb", "fer2013")]
    if args.images:
        out += [DatasetSpec(name="image_folder", path=args.images, image_size=args.image_size)]
    return out


def dataset_rows(args: argparse.Namespace) -> list[tuple[DatasetSpec, object]]:
    print("| data set | train | test | classes | sample | per-class train counts (min-max) | shipped sets: partial acc, mean \\|S\\| | load s |")
    print("|---|---|---|---|---|---|---|---|")
    loaded = []
    for spec in specs(args):
        tic = time.perf_counter()
        try:
            ds = load_dataset(spec)
        except (DatasetNotFoundError, OSError, ValueError) as err:
            print(f"| {spec.display} | not here: {str(err).split('.')[0]} | | | | | | |")
            continue
        counts = np.bincount(ds.train_y, minlength=ds.num_classes) if ds.labeled else np.array([0])
        shipped = "-"
        if ds.train_cand is not None:
            s = dataset_candidate_stats(ds, ds.train_cand)
            shipped = f"{s['partial_acc']:.4f}, {s['mean_set_size']:.3f}"
        print(
            f"| {spec.display} | {len(ds.train_y)} | {len(ds.test_y)} | {ds.num_classes} | {ds.train_x.dtype} {ds.train_x.shape[1:]} "
            f"| {counts.min()}-{counts.max()} | {shipped} | {time.perf_counter() - tic:.1f} |"
        )
        loaded.append((spec, ds))
    return loaded


def generator_rows(loaded: list[tuple[DatasetSpec, object]]) -> None:
    print()
    print("| data set | generator | q | eta | realised eta | expected | mean \\|S\\| | expected | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec, ds in loaded:
        if not ds.labeled:
            continue
        for generator, q, eta in SETTINGS:
            q = q if generator in USES_Q else None
            tic = time.perf_counter()
            cand = synthetic_candidates(ds, generator, q, eta, seed=0)
            took = time.perf_counter() - tic
            stats = dataset_candidate_stats(ds, cand)
            exp_eta, exp_size = expected(generator, q, eta, ds.num_classes)
            print(
                f"| {spec.display} | {generator} | {'' if q is None else q} | {eta} | {stats['eta_realised']:.4f} | {exp_eta} "
                f"| {stats['mean_set_size']:.4f} | {exp_size} | {took:.1f} |"
            )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pll-root", default=None, help="directory holding lost.mat and MSRCv2.mat")
    p.add_argument("--root", default=None, help="torchvision root holding eurosat/, gtsrb/, fer2013/")
    p.add_argument("--images", default=None, help="an image folder (one subfolder per class)")
    p.add_argument("--image-size", type=int, default=32)
    args = p.parse_args(argv)
    print(f"$ python benchmarks/data_table.py {shlex.join(argv if argv is not None else sys.argv[1:])}\n")
    generator_rows(dataset_rows(args))


if __name__ == "__main__":
    main()
