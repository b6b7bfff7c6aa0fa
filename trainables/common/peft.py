"""Parameter-efficient tuning of a CLIP image encoder (the ``clip_peft`` backbone, PartialCLIP).

PartialCLIP (Foundation models for PLL, arXiv 2506.05027, sec. 3.2 and Table 5) tunes a CLIP image
encoder with PEFT modules and a classifier initialised from the class names' text embeddings.
:func:`apply_peft` freezes the encoder and makes the chosen modules trainable, one or several at
once (``lora+vpt+bias``, as PartialCLIP combines its modules):

- ``lora`` (Hu et al. 2022): W -> W + (alpha / r) B A on every attention block's input projection
  (q, k, v stacked) and output projection; A ~ Kaiming-uniform, B = 0 (the encoder starts
  unchanged), alpha = r. Written as a ``torch.nn.utils.parametrize`` parametrization, so that
  :func:`merge_lora` folds it into plain weights and the merged encoder computes exactly what the
  adapted one did: the same weight tensor enters the same op.
- ``adapter`` (AdaptFormer, Chen et al. 2022, eq. 2): beside each block's MLP, on the same
  LayerNorm'ed input, s * up(ReLU(down(h))) with s = 0.1 and ``up`` zero-initialised.
- ``vpt`` (Visual Prompt Tuning, Jia et al. 2022, sec. 3.2): ``vpt_tokens`` learned prompt tokens
  enter the sequence after the class token, [x_cls, P, E] (eq. 1); with ``vpt_deep`` (VPT-Deep,
  eq. 2) every later layer gets its own prompts in place of the previous layer's prompt outputs,
  else (VPT-Shallow) those outputs flow on like any token's. The head reads x_cls only. Initialised
  as VPT's code: uniform(-b, b), b = sqrt(6 / (3 * patch area + width)). :class:`VisualPrompts`
  does it with hooks on open_clip's ViT, not with a copy of its forward; a ResNet CLIP is refused.
- ``bias`` (BitFit, Ben Zaken et al. 2022): every bias; ``layernorm``: every LayerNorm's scale and
  shift; ``linear_probe``: nothing (the head alone learns); ``full``: every parameter. The last
  two stand alone (:func:`trainables.settings.peft_modules` refuses them in a combination).

The student keeps VPT's prompts as parameters of the shipped encoder (hooked in again when it is
rebuilt) and ships LoRA merged (:func:`merge_lora`).

Deviations: PartialCLIP's code (after LIFT's, ``models/peft_vit.py``) inserts the prompts after
``ln_pre``, as here, but appends them after the patch tokens; attention is indifferent to their
place (they carry no position embedding), so VPT's eq. 1 order is kept. Its LoRA updates q and v
only; here the stacked q, k, v and the output projection.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from trainables.settings import peft_modules

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


class VisualPrompts(nn.Module):
    """VPT's prompt tokens in an open_clip ``VisionTransformer`` (Jia et al. 2022, eqs. 1 and 2).

    ``prompts`` (depth, P, D): one set (VPT-Shallow) or one per layer (VPT-Deep). Three hooks, no
    copy of open_clip's forward: a pre-hook of ``visual.transformer`` inserts the first set after
    the class token of ``ln_pre``'s output, [x_cls, E] -> [x_cls, P_1, E] (eq. 1; after ``ln_pre``
    as in PartialCLIP's code); deep, a pre-hook of each later block i puts P_i in place of the
    previous block's prompt outputs (eq. 2); a hook after the transformer drops the prompt outputs,
    so open_clip's pooling (the class token, ``avg`` over the patches, an attentional pooler) and its
    ``tokens`` output see [x_cls, E] as without prompts. open_clip 3's transformer takes and returns
    (B, L, D) and hands its blocks (L, B, D) unless ``batch_first``: the block hooks follow its flag.
    Only ``forward`` is hooked (``forward_intermediates`` would miss the insertion)."""

    def __init__(self, depth: int, tokens: int, width: int, patch_size: tuple[int, int]):
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(depth, tokens, width))
        bound = math.sqrt(6.0 / float(3 * patch_size[0] * patch_size[1] + width))  # VPT's xavier-uniform
        nn.init.uniform_(self.prompts, -bound, bound)
        self.batch_first = True  # the blocks' layout, read from the transformer at each forward

    @classmethod
    def attach(cls, encoder: nn.Module, tokens: int, *, deep: bool) -> "VisualPrompts":
        """Add the prompts to ``encoder`` (as ``encoder.vpt``) and hook them in; refuses a non-ViT."""
        transformer = getattr(encoder, "transformer", None)
        blocks = getattr(transformer, "resblocks", None)
        if blocks is None or not hasattr(encoder, "class_embedding") or not hasattr(encoder, "conv1"):
            raise ValueError(
                f"peft vpt: the image encoder is a {type(encoder).__name__}, not a vision transformer; VPT's prompt "
                "tokens enter a ViT's token sequence (open_clip's VisionTransformer): choose another peft for this CLIP"
            )
        width, patch = encoder.class_embedding.shape[-1], tuple(encoder.conv1.kernel_size)
        vpt = cls(len(blocks) if deep else 1, tokens, width, patch)
        encoder.vpt = vpt
        transformer.register_forward_pre_hook(vpt.insert, with_kwargs=True)
        transformer.register_forward_hook(vpt.strip)
        for i in range(1, vpt.prompts.shape[0]):
            blocks[i].register_forward_pre_hook(functools.partial(vpt.replace, i), with_kwargs=True)
        return vpt

    def _put(self, x: Tensor, layer: int, seq_dim: int, drop: int) -> Tensor:
        """``x`` with ``drop`` tokens after the class token replaced by the prompts of ``layer``."""
        if seq_dim == 0:  # (L, B, D) -> (B, L, D) and back
            return self._put(x.transpose(0, 1), layer, 1, drop).transpose(0, 1)
        prompts = self.prompts[layer].to(x.dtype).expand(x.shape[0], -1, -1)  # (B, P, D)
        return torch.cat([x[:, :1], prompts, x[:, 1 + drop :]], dim=1)  # (B, 1 + P + N, D)

    def insert(self, transformer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
        if mask is not None:
            raise ValueError("peft vpt: an attention mask over the image tokens cannot cover the prompt tokens")
        self.batch_first = getattr(transformer, "batch_first", True)
        return (self._put(args[0], 0, 1, 0), *args[1:]), kwargs  # (B, 1 + N, D) -> (B, 1 + P + N, D)

    def replace(self, layer: int, block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        x = self._put(args[0], layer, 1 if self.batch_first else 0, self.prompts.shape[1])
        return (x, *args[1:]), kwargs

    def strip(self, transformer: nn.Module, args: tuple, output: Tensor) -> Tensor:
        tokens = self.prompts.shape[1]
        return torch.cat([output[:, :1], output[:, 1 + tokens :]], dim=1)  # (B, 1 + N, D): VPT's head reads x_cls


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


def apply_peft(
    encoder: nn.Module, kind: str | list[str], *, lora_rank: int = 8, adapter_dim: int = 64, vpt_tokens: int = 10,
    vpt_deep: bool = True,
) -> nn.Module:  # fmt: skip
    """Freeze ``encoder`` and make the modules of ``kind`` trainable (module docstring); in place.
    ``kind``: a name of ``trainables.settings.PEFT_CHOICES``, a list of them or their ``+``-joined
    names. Each module only switches parameters on: a combination trains the union of theirs."""
    modules = peft_modules(kind)
    encoder.requires_grad_("full" in modules)
    if "bias" in modules:  # on the encoder's own weights, before any module adds its own
        for name, p in encoder.named_parameters():
            p.requires_grad_(p.requires_grad or name.endswith("bias"))
    if "layernorm" in modules:
        for module in encoder.modules():
            if isinstance(module, nn.LayerNorm):
                module.requires_grad_(True)
    if "lora" in modules:
        _add_lora(encoder, lora_rank)  # the new A, B require grad, the originals stay frozen
    if "adapter" in modules:
        _add_adapters(encoder, adapter_dim)
    if "vpt" in modules:
        VisualPrompts.attach(encoder, vpt_tokens, deep=vpt_deep)
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
