"""The training loop: one Tune function for every registered algorithm.

``train_trial(config)`` is what Ray Tune runs. It builds the data (data set + cached annotation +
held-out validation split + few-shot reveal + unlabeled-fraction subsample), the backbone and the
algorithm from the registry, then trains epoch by epoch, evaluates, reports and checkpoints.

The logic lives in :func:`run_trial`, which takes plain callables for reporting and checkpoint
loading, so it runs (and is tested) without Ray. Ground-truth training labels stay here: they are
used only to compute reported metrics (pseudo-label accuracy, split precision), never passed to the
algorithm. The only true labels an algorithm sees are the few-shot ones the grid asks to reveal.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from trainables.api import Algorithm, BuildContext, Diagnosed, TrainData, TwoNetwork, Views
from trainables.common.batches import eval_batch_size
from trainables.common.augment import make_views
from trainables.common.backbones import clip_encoder_factory, make_encoder
from trainables.common.clip_model import clip_views, load_source
from trainables.common.diagnostics import PROBE_SIZE, class_entropy, collapse_reason
from trainables.data.annotation import load_cached
from trainables.data.clip_source import LoadedClip, clip_source
from trainables.data.vlm_source import LoadedVlm, vlm_source
from trainables.data.datasets import Dataset, load_dataset
from trainables.registry import ALGORITHMS
from trainables.spec import CHECKPOINT_FILE, TrialSpec

PREDICTIONS_FILE = "predictions.npz"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Split:
    """Which training-pool samples each part uses (indices into the data set's training arrays)."""

    train: np.ndarray
    """Samples the algorithm trains on (trusted ones first)."""
    val: np.ndarray
    """Held-out samples with candidate labels only: the label-free objective is measured on them."""
    trusted: np.ndarray
    """(len(train),) bool: few-shot samples whose true label is revealed."""


def make_split(
    labels: np.ndarray, num_classes: int, *, val_fraction: float, shots: int, fraction: float, seed: int
) -> Split:
    """Seeded split of the training pool into validation, revealed few-shot and kept unlabeled parts.

    ``labels`` are the true labels; they choose which samples are revealed (k per class, as a human
    would label k examples of each class) and nothing else.
    """
    rng = np.random.default_rng([seed, 0x5E1])
    perm = rng.permutation(len(labels))
    n_val = int(round(val_fraction * len(labels)))
    val, pool = np.sort(perm[:n_val]), perm[n_val:]
    revealed = []
    for c in range(num_classes):
        of_class = pool[labels[pool] == c]
        revealed.extend(of_class[:shots].tolist())
    revealed = np.array(sorted(revealed), dtype=np.int64)
    rest = np.setdiff1d(pool, revealed)
    keep = rng.permutation(rest)[: int(round(fraction * len(rest)))]
    train = np.concatenate([revealed, np.sort(keep)]).astype(np.int64)
    trusted = np.zeros(len(train), dtype=bool)
    trusted[: len(revealed)] = True
    return Split(train=train, val=val, trusted=trusted)


@dataclass
class TrialData:
    """Everything a trial needs, on the training device. ``*_y`` are for metrics only."""

    dataset: Dataset
    data: TrainData
    train_y: torch.Tensor
    train_cand: torch.Tensor
    """(N, C) the annotator's candidate sets of the training samples (revealed rows: their label)."""
    val_x: torch.Tensor
    val_cand: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    split: Split
    aug_generator: torch.Generator
    """Draws every augmentation; its state is checkpointed so a resumed run sees the same views."""
    probe: torch.Tensor
    """A fixed batch of plain-view training inputs for the label-free collapse diagnostics."""
    clip: LoadedClip | None = None
    """The annotator's CLIP, when the method or the backbone learns on it (:func:`uses_clip`)."""
    vlm: LoadedVlm | None = None
    """The annotator's image-text-to-text model, when the method fine-tunes it (``needs_vlm``)."""


def start_directory() -> Path:
    """The directory the sweep started in, against which a grid's relative model paths are taken
    (a Tune trial runs in its own directory; Tune records the one it started from)."""
    return Path(os.environ.get("TUNE_ORIG_WORKING_DIR", os.getcwd()))


def uses_clip(trial: TrialSpec) -> bool:
    """The trial learns on its annotator's CLIP: a method that needs it (CoOp) or the ``clip_peft`` backbone."""
    return ALGORITHMS[trial.method].needs_clip or trial.training.uses_clip


def load_trial_clip(trial: TrialSpec, device: torch.device) -> LoadedClip | None:
    """The annotator's CLIP of a trial that :func:`uses_clip` (None otherwise), read from the
    cached annotation's meta and built with the annotator's weights."""
    if not uses_clip(trial):
        return None
    source = clip_source(Path(trial.cache_dir), trial.annotation_key)
    if source is None:
        what = trial.method if ALGORITHMS[trial.method].needs_clip else "the clip_peft backbone"
        raise ValueError(
            f"{what} learns on the annotator's CLIP, and annotator {trial.cell.annotator_name!r} "
            f"({trial.cell.annotator_kind}) has none; use a clip annotator (or an ensemble with a clip member)"
        )
    return load_source(source.resolved(start_directory()), device)


def load_trial_vlm(trial: TrialSpec, device: torch.device) -> LoadedVlm | None:
    """The annotator's image-text-to-text model of a trial whose method ``needs_vlm`` (None
    otherwise), read from the cached annotation's meta and loaded with the annotator's weights."""
    from trainables.common.vlm_model import load_source as load_vlm_source

    if not ALGORITHMS[trial.method].needs_vlm:
        return None
    source = vlm_source(Path(trial.cache_dir), trial.annotation_key)
    if source is None:
        raise ValueError(
            f"{trial.method} fine-tunes the annotator's VLM, and annotator {trial.cell.annotator_name!r} "
            f"({trial.cell.annotator_kind}) has none; use a vlm annotator (or an ensemble with a vlm member)"
        )
    return load_vlm_source(source.resolved(start_directory()), device)


def trial_views(dataset: Any, clip: LoadedClip | None, raw: bool, generator: torch.Generator) -> Views:
    """The data set's views; on the annotator's CLIP, augmented in [0, 1] at the stored size, then
    the CLIP transform; ``raw``: in [0, 1], for a VLM whose own processor normalises (``vlm_lora``)."""
    if clip is None and not raw:
        return make_views(dataset.kind, mean=dataset.mean, std=dataset.std, hflip=dataset.hflip, generator=generator)
    base = make_views(dataset.kind, mean=None, std=None, hflip=dataset.hflip, generator=generator)
    return base if clip is None else clip_views(base, clip.preprocess_cfg)


def prepare_data(trial: TrialSpec, device: torch.device) -> TrialData:
    """Load the data set and the cached annotation, and apply the cell's split options."""
    cell = trial.cell
    dataset = load_dataset(cell.dataset)
    target = ALGORITHMS[trial.method].consumes_for(dict(trial.params))
    annotation = load_cached(Path(trial.cache_dir), trial.annotation_key, with_probs=False)
    num_classes = len(dataset.class_names)
    split = make_split(
        dataset.train_y,
        num_classes,
        val_fraction=trial.training.val_fraction,
        shots=cell.shots,
        fraction=cell.unlabeled_fraction,
        seed=cell.seed,
    )
    sets = annotation.label_sets(target)[split.train]  # (N, C)
    revealed = np.eye(num_classes, dtype=np.float32)[dataset.train_y[split.train[split.trusted]]]
    sets[split.trusted] = revealed
    cand = annotation.cand_train.astype(np.float32)

    def to(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a).to(device)

    aug_generator = torch.Generator().manual_seed(cell.seed + 1)
    clip, vlm = load_trial_clip(trial, device), load_trial_vlm(trial, device)
    views = trial_views(dataset, clip, vlm is not None, aug_generator)
    soft = annotation.soft_targets(target)[split.train] if target.is_soft else None
    data = TrainData(
        x=to(dataset.train_x[split.train]),
        cand=to(sets),
        trusted=to(split.trusted),
        views=views,
        generator=torch.Generator().manual_seed(cell.seed + 2),
        soft=None if soft is None else to(soft),
        target=target,
    )
    train_cand = cand[split.train].copy()
    train_cand[split.trusted] = revealed
    probe_idx = torch.randperm(data.num_samples, generator=torch.Generator().manual_seed(cell.seed + 3))[:PROBE_SIZE]
    return TrialData(
        probe=views.plain(data.x[probe_idx.to(data.x.device)]),
        dataset=dataset,
        data=data,
        train_y=to(dataset.train_y[split.train]),
        train_cand=to(train_cand),
        val_x=to(dataset.train_x[split.val]),
        val_cand=to(cand[split.val]),
        test_x=to(dataset.test_x),
        test_y=to(dataset.test_y),
        split=split,
        aug_generator=aug_generator,
        clip=clip,
        vlm=vlm,
    )


def build_algorithm(trial: TrialSpec, td: TrialData, device: torch.device) -> Algorithm:
    ds = td.dataset
    return build_from_info(
        trial,
        num_classes=len(ds.class_names),
        sample_shape=ds.train_x.shape[1:],
        default_backbone=ds.default_backbone,
        num_samples=td.data.num_samples,
        device=device,
        clip=td.clip,
        vlm=td.vlm,
    )


def build_from_info(
    trial: TrialSpec,
    *,
    num_classes: int,
    sample_shape: tuple[int, ...],
    default_backbone: str,
    num_samples: int,
    device: torch.device,
    clip: LoadedClip | None = None,
    vlm: LoadedVlm | None = None,
) -> Algorithm:
    """Build the trial's algorithm from what is known about the data, without the data: the
    deployable student (``orchestrator/student.py``) rebuilds a trained algorithm this way.
    ``sample_shape`` is one stored sample's shape: (C, H, W) images or (D,) features. ``clip``:
    the annotator's CLIP of a trial that :func:`uses_clip`; ``vlm``: the annotator's VLM of one whose
    method ``needs_vlm``."""
    spec = ALGORITHMS[trial.method]
    settings = trial.training
    backbone = default_backbone if settings.backbone == "auto" else settings.backbone
    in_channels = sample_shape[0] if len(sample_shape) == 3 else 1
    image_size = sample_shape[-1] if len(sample_shape) == 3 else 0
    in_dim = sample_shape[0] if len(sample_shape) == 1 else None

    def make() -> torch.nn.Module:
        encoder = make_encoder(backbone, in_channels=in_channels, image_size=image_size, in_dim=in_dim)
        if len(sample_shape) == 3 and device.type == "cpu":
            # oneDNN's preferred layout: a small-CNN training step 1.6x and its evaluation 2.5x faster,
            # PreAct ResNet-18 1.3x, on this project's 2-core machine (NCHW stays on GPUs)
            encoder = encoder.to(memory_format=torch.channels_last)
        return encoder

    if uses_clip(trial) and clip is None:
        raise ValueError(f"trial {trial.label}: learns on the annotator's CLIP, and none was given")
    if spec.needs_vlm and vlm is None:
        raise ValueError(f"trial {trial.label}: fine-tunes the annotator's VLM, and none was given")
    ctx = BuildContext(
        num_classes=num_classes,
        num_samples=num_samples,
        make_encoder=clip_encoder_factory(clip, settings) if backbone == "clip_peft" else make,
        train=settings,
        device=device,
        seed=trial.seed,
        clip=clip,
        vlm=vlm,
    )
    torch.manual_seed(trial.seed)
    return spec.build(spec.params(**trial.params), ctx)


@torch.no_grad()
def predict(algo: Algorithm, x: torch.Tensor, view: Callable[[torch.Tensor], torch.Tensor], fn: str = "predict") -> Any:
    outs, step = [], eval_batch_size(x.device)
    for start in range(0, len(x), step):
        outs.append(getattr(algo, fn)(view(x[start : start + step])))
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def evaluate(algo: Algorithm, td: TrialData) -> dict[str, float]:
    """Metrics shared by every method. Test and training labels are used here, for reporting only;
    a data set without labels (a flat folder of images) gets the label-free ones alone."""
    plain = td.data.views.plain
    metrics: dict[str, float] = {}
    if len(td.test_x) and isinstance(algo, TwoNetwork):  # one pass through both nets: predict() is their sum
        per_net = predict(algo, td.test_x, plain, "predict_nets")
        for name, net_logits in zip(("a", "b"), per_net):
            metrics[f"test/acc_net_{name}"] = (net_logits.argmax(1) == td.test_y).float().mean().item()
        metrics["test/acc"] = ((per_net[0] + per_net[1]).argmax(1) == td.test_y).float().mean().item()
    elif len(td.test_x):
        metrics["test/acc"] = (predict(algo, td.test_x, plain).argmax(1) == td.test_y).float().mean().item()
    if len(td.val_x):
        val_probs = predict(algo, td.val_x, plain).softmax(1)
        hit = td.val_cand.gather(1, val_probs.argmax(1, keepdim=True)).squeeze(1)
        metrics["val/covering_rate"] = hit.mean().item()
        metrics["val/partial_loss"] = -(val_probs * td.val_cand).sum(1).clamp_min(1e-12).log().mean().item()
    labeled = td.dataset.labeled
    if labeled:
        metrics["pl/acc"] = (algo.pseudo_labels().argmax(1) == td.train_y).float().mean().item()
    clean = algo.clean_mask()
    if clean is not None:
        clean = clean.bool()
        metrics["split/size"] = clean.float().sum().item()
        metrics["split/fraction"] = clean.float().mean().item()
    if clean is not None and labeled:
        in_cand = td.train_cand.gather(1, td.train_y[:, None]).squeeze(1).bool()
        metrics["split/precision"] = in_cand[clean].float().mean().item() if clean.any() else 0.0
        metrics["split/recall"] = clean[in_cand].float().mean().item() if in_cand.any() else 0.0
    return metrics


@torch.no_grad()
def diagnose(algo: Algorithm, td: TrialData) -> dict[str, float]:
    """Label-free collapse signals on the fixed probe batch (``common/diagnostics.py``): the
    predicted-class entropy and the mean top probability for every method, the method's own ``diagnostics`` where it has an
    embedding or a queue, and ``diag/collapsed`` (1 when :func:`collapse_reason` finds one)."""
    probs = algo.predict(td.probe).softmax(1)
    metrics = {
        "diag/prediction_entropy": class_entropy(probs.argmax(1), len(td.dataset.class_names)),
        "diag/prediction_confidence": probs.max(1).values.mean().item(),
    }
    if isinstance(algo, Diagnosed):
        metrics.update({f"diag/{k}": float(v) for k, v in algo.diagnostics(td.probe).items()})
    metrics["diag/collapsed"] = float(collapse_reason(metrics) != "none")
    return metrics


def _rng_state(td: TrialData) -> dict[str, Any]:
    """Every random state of the trial, as tensors and plain types only (the checkpoint is loaded
    with ``weights_only=True``: nothing in it can run code)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "generator": td.data.generator.get_state(),
        "aug_generator": td.aug_generator.get_state(),
        "python_rng": random.getstate(),
        "numpy_rng": {
            "kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian),
        },  # fmt: skip
        "torch_rng": torch.get_rng_state(),
    }


def load_checkpoint(directory: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`_saver`, loaded with ``weights_only=True``: tensors and plain
    types only, so a planted pickle (a checkpoint path is read from an MLflow tag on resume) is
    refused instead of run."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location=device, weights_only=True)


def _restore(
    algo: Algorithm, td: TrialData, directory: Path, device: torch.device
) -> tuple[int, dict[str, Any], dict[str, float]]:
    """Load a checkpoint written by :func:`_saver`: the epoch reached, the best-so-far record and
    the metrics reported with it."""
    state = load_checkpoint(directory, device)
    algo.load_state_dict(state["algorithm"])
    td.data.generator.set_state(state["generator"])
    td.aug_generator.set_state(state["aug_generator"])
    random.setstate(state["python_rng"])
    rng = state["numpy_rng"]
    keys = rng["keys"].numpy().astype(np.uint32)
    np.random.set_state((rng["kind"], keys, rng["pos"], rng["has_gauss"], rng["cached_gaussian"]))
    torch.set_rng_state(state["torch_rng"])
    return state["epoch"], state["best"], dict(state.get("metrics", {}))


def _saver(
    trial: TrialSpec, algo: Algorithm, td: TrialData, epoch: int, best: dict, last: bool, metrics: dict[str, float]
) -> Callable[[Path], None]:
    """``save(directory)`` writes the checkpoint of the epoch just trained with the metrics reported
    with it (and, at the last epoch, the test predictions the driver's confusion matrix needs: the
    labels stay there)."""

    def save(directory: Path) -> None:
        state = {"algorithm": algo.state_dict(), "epoch": epoch + 1, "best": dict(best), **_rng_state(td)}
        state["metrics"] = {k: float(v) for k, v in metrics.items()}
        state.update(config=trial.to_config(), num_samples=td.data.num_samples)  # a rebuild without the data
        if td.clip is not None:  # the student rebuilds the annotator's CLIP architecture
            state["clip"] = td.clip.source.to_config()
        if td.vlm is not None:  # and the annotator's VLM (its architecture and processor)
            state["vlm"] = td.vlm.source.to_config()
        torch.save(state, directory / CHECKPOINT_FILE)
        if last and len(td.test_x):
            test_pred = predict(algo, td.test_x, td.data.views.plain).argmax(1)
            np.savez(directory / PREDICTIONS_FILE, test_pred=test_pred.cpu().numpy())

    return save


def _track_best(best: dict[str, Any], metrics: dict[str, float], trial: TrialSpec, epoch: int) -> dict[str, Any]:
    """The best epoch so far by the label-free objective, and its test accuracy (reported, never used)."""
    value = metrics.get(trial.objective)
    better = value is not None and (
        best["value"] is None or (value > best["value"] if trial.mode == "max" else value < best["value"])
    )
    return {"value": value, "epoch": epoch + 1, "test_acc": metrics.get("test/acc", float("nan"))} if better else best


def run_trial(
    trial: TrialSpec | dict[str, Any],
    report: Callable[[dict[str, float], Callable[[Path], None] | None], None],
    restore_dir: Path | None = None,
    max_epochs: int | None = None,
) -> dict[str, float]:
    """Train one trial. ``report(metrics, save)`` is called once per epoch; when ``save`` is given,
    calling ``save(directory)`` writes a checkpoint there. ``restore_dir`` resumes from one.
    ``max_epochs`` stops early (tests); the schedule still follows ``training.epochs``."""
    if not isinstance(trial, TrialSpec):
        trial = TrialSpec.from_config(trial)
    seed_everything(trial.seed)
    device = torch.device(trial.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    td = prepare_data(trial, device)
    algo = build_algorithm(trial, td, device)
    best: dict[str, Any] = {"value": None, "epoch": 0, "test_acc": 0.0}
    start_epoch, metrics = 0, {}
    if restore_dir is not None:
        start_epoch, best, metrics = _restore(algo, td, restore_dir, device)
    settings = trial.training
    stop = settings.epochs if max_epochs is None else min(settings.epochs, max_epochs)
    if start_epoch >= stop:
        # The last epoch was trained and checkpointed but the trial was not recorded as finished
        # (its driver stopped, the disk filled): its last result is reported again, not retrained.
        metrics = metrics or {**evaluate(algo, td), **diagnose(algo, td), "epoch": start_epoch}
        report(metrics, _saver(trial, algo, td, start_epoch - 1, best, True, metrics))
        return metrics
    for epoch in range(start_epoch, stop):
        tic = time.perf_counter()
        metrics = dict(algo.train_epoch(td.data, epoch))
        metrics["time/epoch_s"] = time.perf_counter() - tic
        tic = time.perf_counter()
        metrics.update(evaluate(algo, td))
        metrics["time/eval_s"] = time.perf_counter() - tic
        metrics.update(diagnose(algo, td))
        best = _track_best(best, metrics, trial, epoch)
        metrics.update({"val/best_epoch": best["epoch"], "epoch": epoch + 1})
        if "test/acc" in metrics:
            metrics["test/acc_selected"] = best["test_acc"]
        last = epoch + 1 == stop
        due = last or (epoch + 1) % settings.checkpoint_every == 0
        report(metrics, _saver(trial, algo, td, epoch, best, last, metrics) if due else None)
    return metrics


def train_trial(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable."""
    from ray import tune

    trial = TrialSpec.from_config(config)
    torch.set_num_threads(max(1, int(trial.cpus)))
    checkpoint = tune.get_checkpoint()

    def report(metrics: dict[str, float], save: Callable[[Path], None] | None) -> None:
        if save is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save(Path(tmp))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    if checkpoint is not None:  # Tune retrying this trial after an error
        with checkpoint.as_directory() as directory:
            run_trial(trial, report, restore_dir=Path(directory))
        return
    resume = trial.resume_checkpoint  # the last checkpoint of an interrupted sweep's trial
    if resume and (Path(resume) / CHECKPOINT_FILE).is_file():
        run_trial(trial, report, restore_dir=Path(resume))
    else:
        run_trial(trial, report)


__all__ = ["train_trial", "run_trial", "make_split", "prepare_data", "evaluate", "seed_everything", "load_checkpoint"]
