"""Co-Reg's epoch and evaluation time against the reference code's, side by side in one process.

Runs this project's Co-Reg (``trainables.loop.run_trial``) and the reference ``train.py``
(github.com/Portugas0807/Co-Reg, a clone given by ``--reference``) on the same data: the loop's
training split of a Fashion-MNIST subset, its flip candidate sets, its test set, the small CNN, the
same epochs, warm-up, batch size and learning rate, one torch thread each. Prints the median time of
a warm-up epoch, a Co-Reg epoch (division + training of both nets) and an evaluation, and the
ratios this project / reference (below 1: faster).

Changes to the reference, none to its training code: ``.cuda()`` is a no-op, ``import clip`` is
stubbed (unused with synthetic candidate sets), the encoder of its ``MyResNet`` is our small CNN,
its Fashion-MNIST loader is built without reading files (its transforms and ``run()`` kept) over
our tensors. Its evaluation is ``test()`` (the ensemble's accuracy on the test set); ours is the
loop's ``evaluate`` (the same, plus each net's accuracy, the held-out validation metrics and the
pseudo-label metrics of the training pool).

    python benchmarks/coreg_vs_reference.py --reference /path/to/Co-Reg --epochs 8 --warmup 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", type=Path, required=True, help="a clone of github.com/Portugas0807/Co-Reg")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--subsample", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--storage", default="./results-benchmark-coreg", help="where the annotation is cached")
    return ap.parse_args(argv)


def our_trial(args: argparse.Namespace):
    """The trial both sides train on (scripts/trial_curve.py builds it the same way)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from trial_curve import parse_args as curve_args
    from trial_curve import trial_spec

    return trial_spec(curve_args([
        "--dataset", "fashion_mnist", "--subsample", str(args.subsample), "--test-subsample", "1000",
        "--method", "coreg", "--params", json.dumps({"warmup_epochs": args.warmup}), "--epochs", str(args.epochs),
        "--lr", str(args.lr), "--batch-size", str(args.batch_size), "--storage", args.storage,
    ]))  # fmt: skip


def time_ours(trial) -> dict[str, list[float]]:
    from trainables.loop import run_trial

    times: dict[str, list[float]] = {"warmup": [], "coreg": [], "eval": []}
    warmup = trial.params["warmup_epochs"]

    def report(metrics: dict[str, float], save) -> None:
        kind = "warmup" if metrics["epoch"] <= warmup else "coreg"
        times[kind].append(metrics["time/epoch_s"])
        times["eval"].append(metrics["time/eval_s"])

    run_trial(trial, report)
    return times


def _reference_loader(ref_fmnist, trial, batch_size: int):
    """The reference's Fashion-MNIST loader over the trial's tensors (its transforms and ``run()``)."""
    import torchvision.transforms as T
    from datasets.cutout import Cutout

    from trainables.loop import prepare_data

    td = prepare_data(trial, torch.device("cpu"))
    loader = ref_fmnist.fmnist_dataloader.__new__(ref_fmnist.fmnist_dataloader)
    normalize = T.Normalize(mean=[0.1307], std=[0.3081])
    weak = [T.RandomCrop(28, padding=4), T.RandomHorizontalFlip(), T.ToTensor()]
    loader.batch_size, loader.num_workers, loader.log = batch_size, 0, open(Path(trial.cache_dir) / "reference.log", "w")
    loader.transform_test = T.Compose([T.ToTensor(), normalize])
    loader.weak_transform = T.Compose([*weak, normalize])
    loader.strong_transform = T.Compose([*weak, Cutout(n_holes=1, length=16), T.ToPILImage(), T.ToTensor(), normalize])
    loader.train_data, loader.test_data = td.data.x[:, 0].contiguous(), td.test_x[:, 0].contiguous()
    loader.train_label, loader.test_label = td.train_y.long(), td.test_y.long()  # its logs only
    loader.num_data, loader.num_class = len(loader.train_data), torch.tensor(td.data.num_classes)
    loader.noise_label, loader.partialY = torch.zeros(loader.num_data), td.data.cand.float()
    loader.prior_dist = torch.ones(td.data.num_classes) / td.data.num_classes
    return loader


def time_reference(args: argparse.Namespace, trial) -> dict[str, list[float]]:
    sys.path.insert(0, str(args.reference))
    sys.modules["clip"] = types.ModuleType("clip")
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    import utils.resnet as ref_resnet

    from trainables.common.backbones import make_encoder

    width = make_encoder("small_cnn", in_channels=1, image_size=28).out_dim
    ref_resnet.model_dict["resnet18"] = (lambda in_channel=1, input_size="32x32": make_encoder("small_cnn", in_channels=in_channel, image_size=28), width)
    out = Path(args.storage) / "reference"
    out.mkdir(parents=True, exist_ok=True)
    sys.argv = ["train.py", "--dataset", "fmnist", "--num_epochs", str(args.epochs - 1), "--warm_up", str(args.warmup),
                "--lr", str(args.lr), "--batch_size", str(args.batch_size), "--noisy_type", "flip", "--output_dir", str(out)]  # fmt: skip
    import datasets.fmnist as ref_fmnist
    import train as ref_train

    loader = _reference_loader(ref_fmnist, trial, args.batch_size)
    ref_train.fmnist_dataloader = lambda **kw: loader
    times: dict[str, list[float]] = {"warmup": [], "coreg": [], "eval": []}
    clock = {"epoch": 0, "start": 0.0}
    adjust, test = ref_train.adjust_learning_rate, ref_train.test

    def timed_adjust(arguments, optimizer, epoch):  # called twice at the start of every epoch
        if clock.get("marked") != epoch:
            clock.update(marked=epoch, start=time.perf_counter())
        return adjust(arguments, optimizer, epoch)

    def timed_test(epoch, *rest):
        trained = time.perf_counter()
        times["warmup" if epoch < args.warmup else "coreg"].append(trained - clock["start"])
        test(epoch, *rest)
        times["eval"].append(time.perf_counter() - trained)

    ref_train.adjust_learning_rate, ref_train.test = timed_adjust, timed_test
    ref_train.main()
    return times


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    trial = our_trial(args)
    ours = time_ours(trial)
    reference = time_reference(args, trial)
    print(f"Co-Reg, Fashion-MNIST {args.subsample}, small CNN, batch {args.batch_size}, {args.epochs} epochs "
          f"({args.warmup} warm-up), 1 torch thread; median seconds (ratio this project / reference):")  # fmt: skip
    for kind in ("warmup", "coreg", "eval"):
        a, b = statistics.median(ours[kind]), statistics.median(reference[kind])
        print(f"  {kind:7s} epoch: {a:7.2f} s vs {b:7.2f} s  ratio {a / b:.2f}" if kind != "eval"
              else f"  evaluation:    {a:7.2f} s vs {b:7.2f} s  ratio {a / b:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
