"""The deployable student: a finished trial's final model as an MLflow pyfunc model.

A trial's checkpoint holds the whole algorithm state. The student rebuilds the algorithm from the
trial's resolved config through the registry (:func:`trainables.loop.build_from_info`, no data
needed), loads that state and predicts with the algorithm's own ``predict`` after the trial's
evaluation view (the same normalisation), so its predictions are the trial's. Usage::

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/student")
    model.predict(images)  # (N, C, H, W) uint8 -> DataFrame: class_id, class_name, probability
    mlflow models serve -m runs:/<run_id>/student --env-manager local

Details:

1. The model ships the project's ``trainables`` package (``code_paths``) and is saved "from code"
   (MLflow 3's way, no pickle): this file is copied into the model and MLflow runs it at load time,
   where the guard at its end registers :class:`StudentModel`. So the model loads in an environment
   with torch, numpy, pandas, scikit-learn and MLflow but without this project installed.
   (The driver-side functions import ``orchestrator`` modules inside their bodies for that reason.)
2. Its MLmodel metadata holds the class names and the preprocessing (data kind, mean / std, input
   shape, dtype); the signature pins the input tensor's shape and dtype (``(-1, C, H, W)`` uint8
   images or ``(-1, D)`` float32 features). Called unwrapped (``unwrap_python_model().predict``),
   grey images may also come as ``(N, H, W)``.
3. It is written with ``mlflow.pyfunc.save_model`` and logged twice through the driver's client
   (MLflow 3's ``log_model`` needs the process-global fluent tracking URI): as run artifacts
   ``student/`` (``runs:/<run_id>/student``, what ``mlflow models serve`` takes) and as an MLflow
   LoggedModel named ``<method>-student`` whose source run is the trial (the run list's Models column; it
   registers with ``mlflow.register_model(f"models:/{model_id}", name)``). Its size is the trial
   run's ``student_kb`` tag.
4. Only what inference needs is shipped (:func:`inference_state`): the state dicts of the
   networks the algorithm's ``predict`` runs, found by running it once on an example with forward
   hooks; optimisers, schedulers, MoCo queues, key networks, prototypes and per-sample state stay
   in the checkpoint. The student rebuilds the algorithm and loads those networks
   (:func:`load_inference_state`), the same for every registered method.
5. Every registered method trains a network; the annotator's own zero-shot accuracy is a
   statistic of the annotation run (:mod:`orchestrator.report`), not a model.
6. A model on the annotator's CLIP (CoOp, the ``clip_peft`` backbone) names that CLIP in its
   checkpoint; the student records its architecture (``clip``, rebuilt with random weights that the
   shipped state replaces) and its image transform (``preprocessing.clip``), and requires open_clip.
   LoRA adapters are merged into plain weights before the state is taken (:func:`merge_adapters`):
   the deployed ``clip_peft`` model is the tuned image encoder and its head, nothing else (VPT's
   prompts are parameters of that encoder, hooked in again when the student rebuilds it). CoOp's
   student is the whole frozen CLIP with the learned prompts (its text features are recomputed).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema, TensorSpec
from torch import nn

import trainables
from trainables.data.spec import DatasetSpec
from trainables.spec import TrialSpec

STUDENT_PATH = "student"
PLOTS_PATH = "plots"
TRAINABLES_DIR = Path(trainables.__file__).parent
REQUIREMENTS = ("torch", "numpy", "pandas", "scikit-learn")


class StudentModel(PythonModel):
    """pyfunc wrapper: raw samples in, class ids / names / probabilities out."""

    def load_context(self, context) -> None:
        info = context.model_config
        pre = info["preprocessing"]
        self.class_names = list(info["class_names"])
        self.input_shape = tuple(pre["input_shape"])
        self.dtype = np.dtype(pre["dtype"])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.algo = rebuild(info, self.device)
        state = torch.load(context.artifacts["networks"], map_location=self.device, weights_only=True)
        load_inference_state(self.algo, state)
        self.view = plain_view(pre)

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from trainables.loop import predict

        x = np.asarray(model_input, dtype=self.dtype)
        if len(self.input_shape) == 3 and self.input_shape[0] == 1 and x.ndim == 3:
            x = x[:, None]  # grey images given as (N, H, W)
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"expected samples of shape {self.input_shape}, got {x.shape[1:]}")
        probs = predict(self.algo, torch.as_tensor(x).to(self.device), self.view).softmax(1)
        confidence, ids = (t.cpu().numpy() for t in probs.max(1))
        names = [self.class_names[i] for i in ids]
        return pd.DataFrame({"class_id": ids.astype(np.int64), "class_name": names, "probability": confidence})


def rebuild(info: dict[str, Any], device: torch.device) -> Any:
    """The algorithm of a student's ``info`` (:func:`model_info`), freshly built, its LoRA merged:
    an annotator's CLIP is rebuilt with random weights (the student's own state replaces them)."""
    from trainables.common.clip_model import load_source
    from trainables.data.clip_source import ClipSource
    from trainables.loop import build_from_info
    from trainables.spec import TrialSpec

    clip = load_source(ClipSource.from_config(info["clip"]).without_weights(), device) if info.get("clip") else None
    algo = build_from_info(
        TrialSpec.from_config(info["config"]),
        num_classes=len(info["class_names"]),
        sample_shape=tuple(info["preprocessing"]["input_shape"]),
        default_backbone=info["default_backbone"],
        num_samples=info["num_samples"],
        device=device,
        clip=clip,
        vlm=annotator_vlm(info.get("vlm"), device),
    )
    merge_adapters(algo)
    return algo


def annotator_vlm(config: dict[str, Any] | None, device: torch.device | str = "cpu") -> Any:
    """The annotator's VLM named by a checkpoint or a student (``vlm``), loaded; None without one."""
    from trainables.common.vlm_model import load_source as load_vlm_source
    from trainables.data.vlm_source import VlmSource

    return None if not config else load_vlm_source(VlmSource.from_config(config), device)


def merge_adapters(algo: Any) -> int:
    """Fold the LoRA adapters of every network the algorithm holds into plain weights (the
    ``clip_peft`` backbone's, and peft's of ``vlm_lora``; a no-op elsewhere). Returns the number
    of networks whose adapters were merged."""
    from trainables.common.peft import merge_lora

    merged, seen = 0, set()
    for _, module in _modules(algo):
        if id(module) in seen:
            continue
        seen.add(id(module))
        if callable(getattr(module, "merge_adapter", None)):  # a peft model
            module.merge_adapter()
            merged += 1
        else:
            merged += merge_lora(module)
    return merged


def plain_view(pre: dict[str, Any]) -> Any:
    """The trial's evaluation view from the student's preprocessing: the CLIP transform of a model
    on the annotator's CLIP, else the data set's normalisation."""
    from trainables.common.augment import make_views
    from trainables.common.clip_model import preprocess_images

    if pre.get("clip") is not None:
        return lambda x: preprocess_images(x, pre["clip"])
    generator = torch.Generator().manual_seed(0)  # unused by the plain view
    return make_views(pre["kind"], mean=pre["mean"], std=pre["std"], hflip=False, generator=generator).plain


def has_parameters(algo: Any) -> bool:
    """Whether the algorithm holds a network with trainable parameters, directly or in a member
    object / tuple (``SingleNet.net``, Co-Reg's ``nets``)."""

    def modules(obj: Any, depth: int):
        if isinstance(obj, nn.Module):
            yield obj
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                yield from modules(item, depth)
        elif depth > 0 and hasattr(obj, "__dict__") and not isinstance(obj, type):
            for value in vars(obj).values():
                yield from modules(value, depth - 1)

    return any(p.requires_grad for m in modules(algo, 2) for p in m.parameters())


def _modules(obj: Any, path: str = "", depth: int = 2) -> Iterator[tuple[str, nn.Module]]:
    """(attribute path, network) of every ``nn.Module`` the algorithm holds, directly or in a member
    object / list (``net``, ``nets.0``, ``pico.encoder_k``)."""
    if isinstance(obj, nn.Module):
        yield path, obj
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _modules(item, f"{path}.{i}" if path else str(i), depth)
    elif depth > 0 and hasattr(obj, "__dict__") and not isinstance(obj, type):
        for name, value in vars(obj).items():
            yield from _modules(value, f"{path}.{name}" if path else name, depth - 1)


def _resolve(obj: Any, path: str) -> nn.Module:
    for part in path.split("."):
        obj = obj[int(part)] if isinstance(obj, (list, tuple)) else getattr(obj, part)
    return obj


@torch.no_grad()
def inference_state(algo: Any, example: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """The state dicts of the networks ``algo.predict`` runs on ``example`` (preprocessed
    samples), by attribute path: what the student needs, without the training-only state."""
    used: set[str] = set()
    found = {}
    for path, module in _modules(algo):
        if all(module is not other for other in found.values()):  # an alias (a key net shared) counts once
            found[path] = module
    hooks = [
        sub.register_forward_hook(lambda *_, path=path: used.add(path))
        for path, module in found.items()
        for sub in module.modules()
    ]
    try:
        algo.predict(example)
    finally:
        for hook in hooks:
            hook.remove()
    return {path: {k: v.detach().cpu().clone() for k, v in found[path].state_dict().items()} for path in sorted(used)}


def load_inference_state(algo: Any, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load :func:`inference_state` into a freshly built algorithm (its other state stays initial)."""
    for path, module_state in state.items():
        _resolve(algo, path).load_state_dict(module_state)


def model_info(spec: TrialSpec, dataset: Any, num_samples: int, clip: Any = None, vlm: Any = None) -> dict[str, Any]:
    """What the student needs besides the algorithm state (its pyfunc ``model_config``). ``clip``:
    the annotator's CLIP (a ``LoadedClip``) of a model on it: its architecture (rebuilt without the
    annotator's weights) and its image transform. ``vlm``: the annotator's VLM (a ``LoadedVlm``)
    that the model fine-tuned: its name and questions; its processor normalises ([0, 1] inputs)."""
    kind = getattr(dataset, "kind", "image")
    raw = vlm is not None
    clip_pre = None if clip is None else {k: list(v) if isinstance(v, tuple) else v for k, v in clip.preprocess_cfg.items()}
    return {
        "config": spec.to_config(),
        "clip": None if clip is None else clip.source.without_weights().to_config(),
        "vlm": None if vlm is None else vlm.source.to_config(),
        "class_names": list(dataset.class_names),
        "default_backbone": dataset.default_backbone,
        "num_samples": int(num_samples),
        "preprocessing": {
            "kind": kind,
            "input_shape": list(dataset.train_x.shape[1:]),
            "dtype": str(dataset.train_x.dtype),
            "mean": None if dataset.mean is None or raw else [float(v) for v in dataset.mean],
            "std": None if dataset.std is None or raw else [float(v) for v in dataset.std],
            "scaling": ("uint8 / 255 (the VLM's processor normalises)" if raw else "uint8 / 255, then (x - mean) / std per channel")
            if kind == "image"
            else "(x - mean) / std per dimension",
            **({"clip": clip_pre, "scaling": "the annotator's CLIP transform (clip)"} if clip is not None else {}),
        },
    }


def signature(info: dict[str, Any]) -> ModelSignature:
    pre = info["preprocessing"]
    inputs = Schema([TensorSpec(np.dtype(pre["dtype"]), (-1, *pre["input_shape"]))])
    outputs = Schema([ColSpec("long", "class_id"), ColSpec("string", "class_name"), ColSpec("float", "probability")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def requirements(clip: bool = False, vlm: bool = False) -> list[str]:
    """Pinned requirements; ``clip``: a model on the annotator's CLIP also needs open_clip;
    ``vlm``: a fine-tuned annotator VLM needs transformers and peft."""
    pins = [f"mlflow=={mlflow.__version__}"]
    names = (*REQUIREMENTS, *(("open_clip_torch",) if clip else ()), *(("transformers", "peft") if vlm else ()))
    return pins + [f"{name}=={version(name).split('+')[0]}" for name in names]


def save_student(
    path: Path, networks: dict[str, dict[str, torch.Tensor]], info: dict[str, Any], example: np.ndarray | None = None
) -> None:
    """Write the student as an MLflow model directory at ``path`` (which must not exist yet).
    ``networks``: :func:`inference_state`. ``example``: a few raw samples, saved as the model's
    input example (and serving example)."""
    with tempfile.TemporaryDirectory() as tmp:
        state_file = Path(tmp) / "networks.pt"
        torch.save(networks, state_file)
        trial = TrialSpec.from_config(info["config"])
        metadata = {  # copies: shared objects would become YAML aliases in the MLmodel file
            "class_names": list(info["class_names"]),
            "preprocessing": dict(info["preprocessing"]),
            "method": trial.method,
            "trial_signature": trial.signature,
            "study": trial.study,
            **({"vlm": dict(info["vlm"])} if info.get("vlm") else {}),  # the base model it needs
        }
        # No progress bar and no "validating input example" line per trial in the sweep's console.
        with _env(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"), _quiet("mlflow.pyfunc", "mlflow.models"):
            mlflow.pyfunc.save_model(
                str(path),
                python_model=__file__,  # "models from code": this file is the model's code, see the end of it
                artifacts={"networks": str(state_file)},
                model_config=info,
                code_paths=[str(TRAINABLES_DIR)],
                signature=signature(info),
                input_example=example,
                metadata=metadata,
                pip_requirements=requirements(clip=info.get("clip") is not None, vlm=info.get("vlm") is not None),
            )


def load_trained(checkpoint_dir: Path, dataset: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(algorithm rebuilt from the checkpoint's config and loaded with its state on the CPU, that
    state, the student's model info). A model on the annotator's CLIP is rebuilt on it (the
    checkpoint names it) and its LoRA adapters are then merged: the deployable model is plain."""
    from trainables.common.clip_model import load_source
    from trainables.data.clip_source import ClipSource
    from trainables.loop import build_from_info, load_checkpoint

    state = load_checkpoint(Path(checkpoint_dir))
    spec = TrialSpec.from_config(state["config"])
    clip = load_source(ClipSource.from_config(state["clip"]).without_weights()) if state.get("clip") else None
    vlm = annotator_vlm(state.get("vlm"))
    info = model_info(spec, dataset, state["num_samples"], clip, vlm)
    algo = build_from_info(
        spec,
        num_classes=len(info["class_names"]),
        sample_shape=tuple(info["preprocessing"]["input_shape"]),
        default_backbone=info["default_backbone"],
        num_samples=info["num_samples"],
        device=torch.device("cpu"),
        clip=clip,
        vlm=vlm,
    )
    algo.load_state_dict(state["algorithm"])
    merge_adapters(algo)
    return algo, state["algorithm"], info


def log_student(client: Any, run_id: str, checkpoint_dir: Path, dataset: Any) -> bool:
    """Log the checkpoint's model as ``student/`` of ``run_id`` and as a LoggedModel
    ``<method>-student`` of the run, with its size as the run's ``student_kb`` tag. Every registered method trains a
    network: one without trainable parameters is refused (ValueError)."""
    algo, _, info = load_trained(checkpoint_dir, dataset)
    if not has_parameters(algo):
        raise ValueError(f"{info['config']['method']} has no trainable parameters: nothing to deploy")
    view = plain_view(info["preprocessing"])
    example = dataset.test_x[:2] if len(dataset.test_x) else dataset.train_x[:2]  # unlabeled images: no test set
    networks = inference_state(algo, view(torch.as_tensor(example)))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / STUDENT_PATH
        save_student(local, networks, info, example=example)
        client.log_artifacts(run_id, str(local), STUDENT_PATH)
        _log_model(client, run_id, local, info)
        size = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    client.set_tag(run_id, STUDENT_SIZE_TAG, f"{size / 1024:.0f}")
    return True


STUDENT_SIZE_TAG = "student_kb"
"""The student model directory's size in KiB (its networks, code and environment files)."""


def _log_model(client: Any, run_id: str, local: Path, info: dict[str, Any]) -> str:
    """``local`` as a LoggedModel ``<method>-student`` whose source and output run is ``run_id``."""
    from mlflow.entities import LoggedModelOutput

    trial = TrialSpec.from_config(info["config"])
    experiment_id = client.get_run(run_id).info.experiment_id
    tags = {"method": trial.method, "signature": trial.signature}
    # Not named like the run's ``student/`` folder: MLflow would list a run artifact path that
    # starts with a logged model's name through that model (and the process-global tracking URI).
    name = f"{trial.method}-student"
    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, tags=tags, model_type="pyfunc")
    client.log_model_artifacts(model.model_id, str(local))
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model.model_id


@functools.lru_cache(maxsize=2)
def driver_dataset_of(dataset: DatasetSpec) -> Any:
    """A data set loaded on the driver (cached): class names, preprocessing, test labels."""
    from trainables.data.datasets import load_dataset

    return load_dataset(dataset)


def driver_dataset(spec: TrialSpec) -> Any:
    """The trial's data set, loaded on the driver (cached)."""
    return driver_dataset_of(spec.cell.dataset)


def log_trial_artifacts(
    client: Any, run_id: str, spec: TrialSpec, history: Sequence[dict[str, float]], checkpoint: Any
) -> list[str]:
    """Everything logged for a finished trial besides its metrics: ``plots/*.png`` and ``student/``.

    ``checkpoint`` is Tune's latest checkpoint of the trial (or None); the last epoch's holds the
    test predictions the confusion matrix needs. Returns the artifact paths logged."""
    from orchestrator import plots, runs
    from trainables.loop import CHECKPOINT_FILE, PREDICTIONS_FILE

    dataset = driver_dataset(spec)
    history = _with_logged_epochs(client, run_id, history)
    title = f"{spec.method}  {runs.cell_label(spec.cell, every_axis=True)}"
    logged = []
    with tempfile.TemporaryDirectory() as tmp, _as_directory(checkpoint) as ckpt:
        predictions = ckpt / PREDICTIONS_FILE if ckpt is not None else None
        test_pred = np.load(predictions)["test_pred"] if predictions is not None and predictions.exists() else None
        figures = plots.trial_figures(
            history, test_pred=test_pred, test_y=dataset.test_y, class_names=dataset.class_names, title=title
        )
        for path in plots.save_figures(figures, Path(tmp) / PLOTS_PATH):
            logged.append(f"{PLOTS_PATH}/{path.name}")
        if figures:
            client.log_artifacts(run_id, str(Path(tmp) / PLOTS_PATH), PLOTS_PATH)
        if ckpt is not None and (ckpt / CHECKPOINT_FILE).exists() and log_student(client, run_id, ckpt, dataset):
            logged.append(f"{STUDENT_PATH}/MLmodel")
    return logged


def _with_logged_epochs(client: Any, run_id: str, history: Sequence[dict[str, float]]) -> list[dict[str, float]]:
    """A trial resumed by a later sweep reports only the epochs after its checkpoint: the earlier
    ones come from the run's metric history in MLflow."""
    first = min((int(r["epoch"]) for r in history if "epoch" in r), default=1)
    if first <= 1:
        return list(history)
    earlier: dict[int, dict[str, float]] = defaultdict(dict)
    for key in {k for r in history for k in r if k != "epoch"}:
        for m in client.get_metric_history(run_id, key):
            if m.step < first:
                earlier[m.step][key] = m.value
    return [{"epoch": step, **earlier[step]} for step in sorted(earlier)] + list(history)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Environment variables set for the duration of the block."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """INFO lines of these loggers dropped for the duration of the block."""
    import logging

    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _as_directory(checkpoint: Any) -> Iterator[Path | None]:
    """``checkpoint.as_directory()`` as a Path, or None for no checkpoint."""
    if checkpoint is None:
        yield None
    else:
        with checkpoint.as_directory() as directory:
            yield Path(directory)


if __name__.startswith("code_model_"):  # MLflow runs this file as the student's model code
    mlflow.models.set_model(StudentModel())
