"""Throughput of the CLIP annotation stage: Ray Data actor pool vs a plain single-process loop.

Both paths run the same :class:`ClipActor` (same model, preprocessing and batch size) over the same
images. The plain loop calls one actor instance in this process; the Ray path is
:func:`annotate_clip` (``map_batches`` over a pool of ``--actors`` actors). Reported:

- plain: model load time, loop throughput, end-to-end throughput (load + loop);
- ray: end-to-end throughput (actor start-up, model load and text encoding included) and the
  marginal (steady-state) throughput, from two runs of ``n/4`` and ``n`` images:
  (n - n/4) / (t_n - t_n/4), which cancels the fixed start-up cost. (Timing blocks as the driver
  receives them would not do: Ray Data hands finished blocks over in bursts.)

Default: the tiny randomly initialised test model (tests/fixtures/tiny_clip.json) on sklearn's
digits repeated to ``--n`` images. A real model: ``--model ViT-B-32 --pretrained openai`` (needs
the weights: internet access or a local checkpoint path as ``--pretrained``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "tests" / "fixtures" / "tiny_clip.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="open_clip model name (default: the tiny test config)")
    p.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint path (default: random init)")
    p.add_argument(
        "--model-config",
        default=None,
        help="open_clip model config JSON (default: tiny_clip.json if --model is not given)",
    )
    p.add_argument("--n", type=int, default=4000, help="number of images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--actors", type=int, default=2, help="Ray actor pool size")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--templates", default="paper27", choices=["paper27", "openai80"])
    p.add_argument(
        "--images", default="digits", choices=["digits", "rgb32"], help="8x8 grey digits or random 32x32 RGB"
    )
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray started here (default: all)")
    args = p.parse_args(argv)
    if args.model is None and args.model_config is None:
        args.model_config = str(TINY_CONFIG)
    return args


def make_images(kind: str, n: int) -> tuple[np.ndarray, list[str]]:
    if kind == "digits":
        from sklearn.datasets import load_digits

        x = np.rint(load_digits().images * (255 / 16)).astype(np.uint8)[:, None]
        return np.resize(x, (n, *x.shape[1:])), [f"number {d}" for d in range(10)]
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), [f"class {c}" for c in range(10)]


def clip_spec(args: argparse.Namespace):
    from orchestrator.config import ClipAnnotatorSpec

    fields = {
        "kind": "clip",
        "pretrained": args.pretrained,
        "model_config_path": args.model_config,
        "templates": args.templates,
        "batch_size": args.batch_size,
        "num_actors": args.actors,
        "cpus_per_actor": args.cpus_per_actor,
        "gpus_per_actor": args.gpus_per_actor,
        "precision": args.precision,
    }
    if args.model is not None:
        fields["model"] = args.model
    return ClipAnnotatorSpec(**fields)


def plain_loop(kwargs: dict, images: np.ndarray, n: int, batch_size: int, num_classes: int) -> tuple[np.ndarray, float, float]:
    """One actor instance in this process: (probs, load seconds, loop seconds)."""
    from orchestrator.annotation.clip import ClipActor

    start = time.perf_counter()
    actor = ClipActor(**kwargs)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    plain = np.empty((n, len(kwargs["templates"]), num_classes), dtype=np.float16)
    for i in range(0, n, batch_size):
        plain[i : i + batch_size] = actor({"index": np.arange(i, min(i + batch_size, n)), "image": images[i : i + batch_size]})["probs"]
    return plain, load_s, time.perf_counter() - start


def ray_data_runs(args: argparse.Namespace, spec, images: np.ndarray, class_names: list[str]) -> tuple[np.ndarray, float, float, int]:
    """The annotation stage itself on Ray Data: (probs, seconds for all, seconds for a quarter, that quarter)."""
    import ray

    from orchestrator.annotation.clip import annotate_clip
    from trainables.data.datasets import Dataset

    if not ray.is_initialized():
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)

    def ray_run(n: int) -> tuple[np.ndarray, float]:
        part = Dataset(
            name="benchmark", train_x=images[:n], train_y=np.zeros(n, dtype=np.int64), test_x=images[:0],
            test_y=np.zeros(0, dtype=np.int64), class_names=class_names, mean=(0.5,), std=(0.5,), hflip=False,
            default_backbone="small_cnn",
        )  # fmt: skip
        start = time.perf_counter()
        probs, _ = annotate_clip(part, spec, class_names)
        return probs, time.perf_counter() - start

    ray_run(min(args.n, args.batch_size * args.actors))  # warm-up: Ray Data's one-off set-up of a session
    n_small = max(args.n // 4, 1)
    _, small_s = ray_run(n_small)
    probs, ray_s = ray_run(args.n)
    return probs, ray_s, small_s, n_small


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from orchestrator.annotation.clip import actor_kwargs

    spec = clip_spec(args)
    images, class_names = make_images(args.images, args.n)
    kwargs = {**actor_kwargs(spec, class_names), "use_gpu": args.gpus_per_actor > 0}
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(
        f"model={kwargs['model']} pretrained={args.pretrained} n={args.n} images={args.images} "
        f"batch={args.batch_size} templates={args.templates} ({len(kwargs['templates'])}) precision={args.precision} "
        f"torch_threads={torch.get_num_threads()} cpus={os.cpu_count()} cuda={torch.cuda.is_available()}"
    )
    plain, load_s, loop_s = plain_loop(kwargs, images, args.n, args.batch_size, len(class_names))
    probs, ray_s, small_s, n_small = ray_data_runs(args, spec, images, class_names)
    marginal = (args.n - n_small) / (ray_s - small_s) if ray_s > small_s else float("nan")
    overhead_s = ray_s - args.n / marginal

    max_diff = float(np.abs(probs.astype(np.float32) - plain.astype(np.float32)).max())
    plain_rate = args.n / loop_s
    plain_e2e = args.n / (load_s + loop_s)
    ray_e2e = args.n / ray_s
    print(
        f"plain loop : load {load_s:.2f} s, loop {loop_s:.2f} s -> {plain_rate:.1f} img/s "
        f"(end to end {plain_e2e:.1f} img/s)"
    )
    print(
        f"ray data   : {args.actors} actors x {args.cpus_per_actor} CPU, "
        f"{ray_s:.2f} s end to end -> {ray_e2e:.1f} img/s; "
        f"marginal {marginal:.1f} img/s (from {n_small} and {args.n} images), fixed start-up ~{overhead_s:.1f} s"
    )
    print(f"ratio ray/plain: end to end {ray_e2e / plain_e2e:.2f}, marginal vs loop {marginal / plain_rate:.2f}")
    print(f"max |probs_ray - probs_plain| = {max_diff:.2e} (same model, same order)")


if __name__ == "__main__":
    main()
