"""The annotator's open_clip model on the learning side: loading, preprocessing, zero-shot classifier.

The CLIP annotator (``orchestrator/annotation/clip.py``) and the methods that learn on top of its
CLIP (CoOp, the ``clip_peft`` backbone) build the model, preprocess images and encode prompts with
the functions here, so a trial sees exactly what the annotator saw: :func:`load_clip_model` (same
weights, random ones seeded alike), :func:`preprocess_images` (the model's own eval transform on
uint8 batches), :func:`text_classifier` (the L2-normalised class embeddings of the prompts).
:func:`clip_views` puts the CLIP transform after the project's augmentations, so that the weak and
strong views of the candidate-set methods reach CLIP at its resolution and normalisation.
open_clip is imported inside the functions (the grid check and ``--help`` stay fast).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from trainables.api import Views
    from trainables.data.clip_source import ClipSource, LoadedClip

TEXT_CHUNK = 1024
"""Prompts encoded per forward pass of the text tower."""


class ClipLoadError(RuntimeError):
    """The open_clip model or its weights could not be built."""


def read_model_config(path: str | Path) -> dict[str, Any]:
    """Load and check an open_clip model config JSON (open_clip itself skips invalid files silently)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model_config_path {path}: no such file")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"model_config_path {path}: not valid JSON: {err}") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ValueError(f"model_config_path {path}: an open_clip model config needs {missing}")
    return cfg


def looks_like_path(pretrained: str) -> bool:
    if pretrained.startswith("hf-hub:"):
        return False
    return "/" in pretrained or "\\" in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors"))


def load_clip_model(
    model: str,
    pretrained: str | None,
    model_config_path: str | None = None,
    precision: str = "fp32",
    device: str = "cpu",
    init_seed: int = 0,
) -> tuple[torch.nn.Module, Callable[[list[str]], torch.Tensor], dict[str, Any]]:
    """Build an open_clip model in eval mode, its tokenizer and its preprocess config."""
    import open_clip
    import torch

    if model_config_path is not None:
        read_model_config(model_config_path)
        if Path(model_config_path).stem != model:
            raise ValueError(f"model {model!r} must be the file name of model_config_path {model_config_path}")
        open_clip.add_model_config(Path(model_config_path).expanduser())
    if pretrained is not None and looks_like_path(pretrained):
        pretrained = str(Path(pretrained).expanduser())
        if not Path(pretrained).is_file():
            raise FileNotFoundError(
                f"CLIP checkpoint {pretrained}: no such file (pretrained: is a tag or a checkpoint path)"
            )
    try:
        # Random init draws from torch's global generator: seed it locally so that every actor of
        # a pool (and a later re-run) holds identical weights, without disturbing the caller.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            net = open_clip.create_model(model, pretrained=pretrained, precision=precision, device=device)
    except Exception as err:
        raise ClipLoadError(
            f"could not build open_clip model {model!r} with pretrained={pretrained!r}: {err}. "
            "A pretrained tag needs internet access (or a populated Hugging Face cache, HF_HUB_CACHE); "
            "offline, fetch the checkpoint elsewhere and set pretrained: /path/to/checkpoint"
        ) from err
    net.eval()
    return net, open_clip.get_tokenizer(model), dict(open_clip.get_model_preprocess_cfg(net))


def preprocess_images(images: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    """uint8 (B, C, H, W) on any device -> normalised float32 (B, 3, S, S), as open_clip's eval transform.

    ``cfg`` is ``open_clip.get_model_preprocess_cfg(model)``: size, mean, std, interpolation
    (bicubic / bilinear), resize_mode (shortest: resize the short side then centre crop; longest:
    resize the long side then centre pad with ``fill_color``; squash: resize to the size).
    Resizing stays in uint8 so that torchvision's antialiased kernels round and clamp like PIL's
    (on CPU they agree with PIL within about two grey levels per pixel; a float resize differs by
    up to ~18 levels).
    """
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images (B, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
    size = cfg.get("size", 224)
    th, tw = (size, size) if isinstance(size, int) else tuple(size)
    mode = cfg.get("resize_mode", "shortest")
    interpolation = InterpolationMode.BILINEAR if cfg.get("interpolation") == "bilinear" else InterpolationMode.BICUBIC
    h, w = images.shape[-2:]
    x = images
    if mode == "squash":
        x = TF.resize(x, [th, tw], interpolation=interpolation, antialias=True)
    elif mode == "shortest":
        if th == tw:
            x = TF.resize(x, [th], interpolation=interpolation, antialias=True)  # torchvision's short-side rule
        else:
            # open_clip's ResizeKeepRatio: bicubic whatever the configured interpolation.
            scale = min(h / th, w / tw)
            x = TF.resize(
                x, [round(h / scale), round(w / scale)], interpolation=InterpolationMode.BICUBIC, antialias=True
            )
        x = TF.center_crop(x, [th, tw])
    elif mode == "longest":
        scale = max(h / th, w / tw)
        x = TF.resize(x, [round(h / scale), round(w / scale)], interpolation=interpolation, antialias=True)
        ph, pw = max(th - x.shape[-2], 0), max(tw - x.shape[-1], 0)
        x = TF.pad(x, [pw // 2, ph // 2, (pw + 1) // 2, (ph + 1) // 2], fill=int(cfg.get("fill_color", 0)))
        x = TF.center_crop(x, [th, tw])
    else:
        raise ValueError(f"unknown open_clip resize_mode {mode!r}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grey -> RGB after resizing, like open_clip's convert("RGB")
    mean = torch.tensor(cfg["mean"], device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - mean) / std


def load_source(source: ClipSource, device: str | torch.device = "cpu") -> LoadedClip:
    """The model of ``source`` in float32 and eval mode, its tokenizer and preprocess config. Trials
    train in float32 whatever precision the annotator ran in (fp16 weights take SGD steps badly)."""
    from trainables.data.clip_source import LoadedClip

    model, tokenizer, cfg = load_clip_model(
        source.model, source.pretrained, source.model_config_path, "fp32", str(device), source.init_seed
    )
    return LoadedClip(source, model, tokenizer, cfg)


def text_classifier(clip: LoadedClip) -> torch.Tensor:
    """(C, D) class embeddings of the annotator's prompts: per template L2-normalised, averaged over
    the templates and normalised again (CLIP's prompt ensembling, Radford et al. 2021, sec. 3.1.4).
    With one template this is exactly the annotator's classifier for that template."""
    import torch
    import torch.nn.functional as F

    model, source = clip.model, clip.source
    prompts = [t.format(c) for t in source.templates for c in source.class_names]
    device = next(model.parameters()).device
    with torch.no_grad():
        tokens = clip.tokenizer(prompts)
        feats = torch.cat([model.encode_text(tokens[i : i + TEXT_CHUNK].to(device)).float() for i in range(0, len(prompts), TEXT_CHUNK)])
    feats = F.normalize(feats, dim=-1).view(len(source.templates), len(source.class_names), -1)  # (T, C, D)
    return F.normalize(feats.mean(0), dim=-1)  # (C, D)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float images back to uint8 (the augmentations work in [0, 1])."""
    import torch

    return (x * 255.0).round().clamp(0, 255).to(torch.uint8)


def clip_views(base: Views, cfg: dict[str, Any]) -> Views:
    """Views whose outputs are CLIP inputs: ``plain`` is the annotator's own transform of the stored
    uint8 images; ``weak`` / ``strong`` augment at the stored resolution (``base`` must be built
    without normalisation, values in [0, 1]), round back to uint8, then apply the same transform."""
    from trainables.api import Views

    return Views(
        plain=lambda x: preprocess_images(x, cfg),
        weak=lambda x: preprocess_images(to_uint8(base.weak(x)), cfg),
        strong=lambda x: preprocess_images(to_uint8(base.strong(x)), cfg),
    )


def check_text_transformer(model: Any) -> None:
    """Prompt learning needs open_clip's built-in text transformer (class ``CLIP``): SigLIP and the
    other ``CustomTextCLIP`` models keep their text tower behind another interface."""
    if type(model).__name__ != "CLIP" or not hasattr(model, "token_embedding"):
        raise ValueError(
            f"prompt learning needs an open_clip CLIP with its built-in text transformer; "
            f"{type(model).__name__} (SigLIP or a custom text tower) is not supported"
        )


def encode_prompts(model: Any, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip ``CLIP.encode_text`` from token *embeddings*: (P, L, D_text) prompts whose token ids
    are ``tokens`` (P, L) (only their end-of-text positions are read) -> (P, D) unnormalised text
    features. CoOp's ``TextEncoder`` does the same on OpenAI's CLIP."""
    import torch
    from open_clip.transformer import text_global_pool

    x = prompts + model.positional_embedding.to(prompts.dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)  # (P, L, D_text)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is None:
        return x
    return model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
