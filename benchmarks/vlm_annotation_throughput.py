"""Throughput of the VLM annotation stage: Ray Data actor pool vs plain single-process transformers loops.

The same images, model, templates, batch size, answer mode and precision go through:

- ``naive``: the plain transformers loop a user would write: per batch and template, the processor
  on the question and the images (the chat-templated prompt built once), then ``generate`` (or, in
  score mode, the same two-pass scoring as the actor);
- ``plain``: one :class:`VlmActor` called in this process (the stage's code without Ray);
- ``ray xN``: :func:`annotate_vlm` (``map_batches`` over a pool of N actors) for N = 1 and 2, end to
  end and at steady state, from two runs of ``n/4`` and ``n`` images: (n - n/4) / (t_n - t_n/4),
  which cancels the actors' start-up (as in ``annotation_throughput.py``).

Default: the tiny randomly initialised LLaVA of the tests (tests/fixtures/tiny_vlm.py, built in a
temporary directory) on sklearn's digits repeated to ``--n`` images. A real model: ``--model
llava-hf/llava-1.5-7b-hf --gpus-per-actor 1 --precision fp16`` on a GPU machine with the weights.
``--dry-run`` prints which engine would run and exits.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="hub id or local directory (default: the tiny test LLaVA)")
    p.add_argument("--answer-mode", default="generate", choices=["generate", "score"])
    p.add_argument("--templates", default="paper_choices", choices=["paper_choices", "lettered", "single"])
    p.add_argument("--n", type=int, default=768, help="number of images")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray started here (default: all)")
    p.add_argument("--dry-run", action="store_true", help="say which engine would run, run nothing")
    return p.parse_args(argv)


def engine(args: argparse.Namespace) -> str:
    import torch
    import transformers

    vllm = importlib.util.find_spec("vllm") is not None
    return (
        f"engine: transformers {transformers.__version__} (AutoModelForImageTextToText) on "
        f"{'CUDA' if args.gpus_per_actor > 0 and torch.cuda.is_available() else 'CPU'}; "
        f"vLLM {'installed, not used' if vllm else 'not installed'}"
    )


def vlm_spec(args: argparse.Namespace, model: str, actors: int):
    from orchestrator.config import VlmAnnotatorSpec

    return VlmAnnotatorSpec(
        kind="vlm", model=model, templates=args.templates, answer_mode=args.answer_mode, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, num_actors=actors, cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor, precision=args.precision,
    )  # fmt: skip


def naive_loop(actor, images: np.ndarray, batch_size: int) -> float:
    """The processor on text and images for every batch and template, then generate / score."""
    from trainables.common.vlm_model import to_pil

    first = to_pil(images[:1])
    image_keys = set(actor.processor.image_processor(first, return_tensors="pt").keys())
    actor.prompt_inputs(first[0])  # the class-name token tables score needs
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        pil = to_pil(images[i : i + batch_size])
        for t, prompt in enumerate(actor.prompts):
            inputs = actor.processor(text=[prompt] * len(pil), images=pil, return_tensors="pt").to(actor.device)
            pixels = {k: v for k, v in inputs.items() if k in image_keys}
            text = {k: v for k, v in inputs.items() if k not in image_keys and k != "labels"}
            if actor.answer_mode == "generate":
                actor.generate(text, pixels)
            else:
                actor.score(text, pixels, t)
    return time.perf_counter() - start


def plain_loop(actor, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, float]:
    key = "answers" if actor.answer_mode == "generate" else "probs"
    start = time.perf_counter()
    out = [actor({"index": np.arange(i, min(i + batch_size, len(images))), "image": images[i : i + batch_size]})[key]
           for i in range(0, len(images), batch_size)]  # fmt: skip
    return np.concatenate(out), time.perf_counter() - start


def ray_runs(args: argparse.Namespace, model: str, images: np.ndarray, names: list[str], actors: int) -> tuple[np.ndarray, float, float, int]:
    """(outputs, seconds for all, seconds for a quarter, that quarter) of the stage on Ray Data."""
    from orchestrator.annotation.vlm import annotate_vlm
    from trainables.data.datasets import Dataset

    spec = vlm_spec(args, model, actors)

    def run(n: int) -> tuple[np.ndarray, float]:
        part = Dataset(
            name="benchmark", train_x=images[:n], train_y=np.zeros(n, dtype=np.int64), test_x=images[:0],
            test_y=np.zeros(0, dtype=np.int64), class_names=names, mean=(0.5,), std=(0.5,), hflip=False,
            default_backbone="small_cnn",
        )  # fmt: skip
        start = time.perf_counter()
        out = annotate_vlm(part, spec, names)
        return out["answers_train" if args.answer_mode == "generate" else "probs_train"], time.perf_counter() - start

    run(min(args.n, args.batch_size * actors))  # warm-up: Ray Data's one-off set-up of a session
    n_small = max(args.n // 4, 1)
    _, small_s = run(n_small)
    out, all_s = run(args.n)
    return out, all_s, small_s, n_small


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(engine(args))
    if args.dry_run:
        return
    import ray
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from benchmarks.annotation_throughput import make_images
    from orchestrator.annotation.vlm import VlmActor, actor_kwargs

    model = args.model or str(__import__("fixtures.tiny_vlm", fromlist=["x"]).build_tiny_llava(Path(tempfile.mkdtemp()) / "tiny_vlm"))
    images, names = make_images("digits", args.n)
    start = time.perf_counter()
    actor = VlmActor(**actor_kwargs(vlm_spec(args, model, 1), names))
    load_s = time.perf_counter() - start
    print(f"model={args.model or 'tiny LLaVA'} mode={args.answer_mode} n={args.n} batch={args.batch_size} "
          f"templates={args.templates} ({len(actor.templates)}) max_new_tokens={args.max_new_tokens} precision={args.precision} torch_threads={torch.get_num_threads()} load={load_s:.2f}s")  # fmt: skip
    naive_s = naive_loop(actor, images, args.batch_size)
    plain, plain_s = plain_loop(actor, images, args.batch_size)
    print(f"naive transformers loop: {args.n / naive_s:.1f} img/s; plain actor loop: {args.n / plain_s:.1f} img/s "
          f"(end to end with the load {args.n / (plain_s + load_s):.1f} img/s)")  # fmt: skip
    if not ray.is_initialized():
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    steady = {}
    for actors in (1, 2):
        out, all_s, small_s, n_small = ray_runs(args, model, images, names, actors)
        steady[actors] = (args.n - n_small) / (all_s - small_s) if all_s > small_s else float("nan")
        same = np.array_equal(out, plain) if args.answer_mode == "generate" else bool(np.abs(out.astype(np.float32) - plain.astype(np.float32)).max() < 2e-3)
        print(f"ray data x{actors}: end to end {args.n / all_s:.1f} img/s, steady state {steady[actors]:.1f} img/s; "
              f"same outputs as the plain loop: {same}")  # fmt: skip
    print(f"ratio ray x1 / plain loop (steady state): {steady[1] / (args.n / plain_s):.2f}; "
          f"ray x1 / naive loop: {steady[1] / (args.n / naive_s):.2f}; scaling x2 / x1: {steady[2] / steady[1]:.2f}")


if __name__ == "__main__":
    main()
