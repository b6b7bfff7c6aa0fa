"""Parameter-efficient tuning of a CLIP image encoder (the ``clip_peft`` backbone, PartialCLIP).

PartialCLIP (Foundation models for PLL, arXiv 2506.05027, sec. 3.2 and Table 5) tunes a CLIP image
encoder with one PEFT module and a classifier initialised from the class names' text embeddings.
:func:`apply_peft` freezes the encoder and makes one choice trainable:

- ``lora`` (Hu et al. 2022): W -> W + (alpha / r) B A on every attention block's input projection
  (q, k, v stacked) and output projection; A ~ Kaiming-uniform, B = 0 (the encoder starts
  unchanged), alpha = r. Written as a ``torch.nn.utils.parametrize`` parametrization, so that
  :func:`merge_lora` folds it into plain weights and the merged encoder computes exactly what the
  adapted one did: the same weight tensor enters the same op.
- ``adapter`` (AdaptFormer, Chen et al. 2022, eq. 2): beside each block's MLP, on the same
  LayerNorm'ed input, s * up(ReLU(down(h))) with s = 0.1 and ``up`` zero-initialised.
- ``bias`` (BitFit, Ben Zaken et al. 2022): every bias; ``layernorm``: every LayerNorm's scale and
  shift; ``linear_probe``: nothing (the head alone learns); ``full``: every parameter.

Deviations: no VPT (its prompt tokens need a change of open_clip's ViT forward); PartialCLIP
combines several modules at once, here one choice per trial.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

PEFT_CHOICES = ("lora", "adapter", "bias", "layernorm", "linear_probe", "full")
ADAPTER_SCALE = 0.1


class LoRA(nn.Module):
    """A parametrization W -> W + (alpha / r) B A of an (out, in) weight; alpha = r."""

    def __init__(self, out_features: int, in_features: int, rank: int):
        super().__init__()
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear's weights (LoRA's reference)

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.lora_b @ self.lora_a  # (out, in)


class ParallelAdapter(nn.Module):
    """AdaptFormer's AdaptMLP: ``mlp(h) + s * up(relu(down(h)))`` on the MLP's own input ``h``."""

    def __init__(self, mlp: nn.Module, width: int, bottleneck: int, scale: float = ADAPTER_SCALE):
        super().__init__()
        self.mlp = mlp
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, h: Tensor) -> Tensor:
        return self.mlp(h) + self.scale * self.up(torch.relu(self.down(h)))


def _attention_weights(encoder: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, weight name) of every attention projection: ``in_proj_weight`` (q, k, v stacked,
    nn.MultiheadAttention and open_clip's Attention) and the output projection's ``weight``."""
    found = []
    for module in encoder.modules():
        if isinstance(getattr(module, "in_proj_weight", None), nn.Parameter):
            found.append((module, "in_proj_weight"))
            out = getattr(module, "out_proj", None)
            if isinstance(out, nn.Linear):
                found.append((out, "weight"))
    return found


def _add_lora(encoder: nn.Module, rank: int) -> None:
    targets = _attention_weights(encoder)
    if not targets:
        raise ValueError("peft lora: no attention projection (in_proj_weight) found in the image encoder")
    for module, name in targets:
        out_features, in_features = getattr(module, name).shape
        parametrize.register_parametrization(module, name, LoRA(out_features, in_features, rank))


def _add_adapters(encoder: nn.Module, bottleneck: int) -> None:
    blocks = [m for m in encoder.modules() if isinstance(getattr(m, "mlp", None), nn.Module) and hasattr(m, "ln_2")]
    if not blocks:
        raise ValueError("peft adapter: no transformer block with an MLP (mlp, ln_2) found in the image encoder")
    for block in blocks:
        width = block.ln_2.normalized_shape[0]
        block.mlp = ParallelAdapter(block.mlp, width, bottleneck)


def apply_peft(encoder: nn.Module, kind: str, *, lora_rank: int = 8, adapter_dim: int = 64) -> nn.Module:
    """Freeze ``encoder`` and make the ``kind`` choice trainable (module docstring); in place."""
    if kind not in PEFT_CHOICES:
        raise KeyError(f"unknown peft {kind!r}; allowed: {', '.join(PEFT_CHOICES)}")
    encoder.requires_grad_(kind == "full")
    if kind == "lora":
        _add_lora(encoder, lora_rank)  # the new A, B require grad, the originals stay frozen
    elif kind == "adapter":
        _add_adapters(encoder, adapter_dim)
    elif kind == "bias":
        for name, p in encoder.named_parameters():
            p.requires_grad_(name.endswith("bias"))
    elif kind == "layernorm":
        for module in encoder.modules():
            if isinstance(module, nn.LayerNorm):
                module.requires_grad_(True)
    return encoder


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA parametrization under ``module`` into its weight (in place); returns how many.
    What remains is a plain network of the original classes: the deployable student holds no adapter.

    ``parametrize.remove_parametrizations`` is not used: it deletes the weight's property from the
    injected class, which deep copies share (a momentum encoder, a second copy of the model)."""
    merged = 0
    for sub in list(module.modules()):
        if not parametrize.is_parametrized(sub):
            continue
        lists = dict(sub.parametrizations.items())
        if not all(isinstance(p, LoRA) for plist in lists.values() for p in plist):
            continue  # not ours: left as it is
        with torch.no_grad():
            weights = {name: getattr(sub, name).detach().clone() for name in lists}  # W + B A
        del sub._modules["parametrizations"]
        sub.__class__ = type(sub).__bases__[0]  # the class before parametrize injected its properties
        for name, weight in weights.items():
            sub.register_parameter(name, nn.Parameter(weight, requires_grad=False))
        merged += len(weights)
    return merged
