"""Feature extractors (no classification head). Each has ``out_dim``, the width of its output.

``clip_peft`` is the annotator's CLIP image encoder (:class:`ClipImageEncoder`, built by
:func:`clip_encoder_factory`); it also carries ``head_init``, the weights its classifier starts from.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from trainables.api import TrainSettings
from trainables.common.clip_model import text_classifier
from trainables.common.peft import apply_peft
from trainables.data.clip_source import LoadedClip

BACKBONES = ("preact_resnet18", "small_cnn", "mlp", "clip_peft")


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """BN-ReLU-conv, BN-ReLU-conv with an identity (or 1x1 projection) shortcut (He et al. 2016, Fig. 1b)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct ResNet-18, CIFAR variant (3x3 stem, no max-pool), as used by DivideMix and Co-Reg.

    Inputs of 64x64 or more get a stride-2 stem (the 64x64 variant); adaptive average pooling lets
    any size from 8x8 up run. Ends with the final BN-ReLU of He et al. (2016).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        self.stem = _conv3x3(in_channels, 64, stride=2 if image_size >= 64 else 1)
        layers, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes)]
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.out_dim = 512

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.layers(self.stem(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)  # (B, 512)


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers with two max-pools: trains in seconds on CPU on 8x8 to 28x28 images."""

    def __init__(self, in_channels: int = 1, width: int = 32):
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [_conv3x3(c_in, c_out), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.out_dim = 4 * width

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)  # (B, 4 * width)


class MLP(nn.Module):
    """Two hidden Linear-BN-ELU layers (512, 256) for (B, D) feature inputs.

    The "medium" model of DNPL (Seo and Huh, ICASSP 2021; github.com/mikigom/DNPL-PyTorch,
    ``models/models.py``), whose real-world PLL results (Lost, MSRCv2) are the usual MLP reference.
    BatchNorm and ELU matter there: without them (plain ReLU layers) CC loses 10-15 points on Lost.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, int] = (512, 256)):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden[0]), nn.BatchNorm1d(hidden[0]), nn.ELU(inplace=True),
            nn.Linear(hidden[0], hidden[1]), nn.BatchNorm1d(hidden[1]), nn.ELU(inplace=True),
        )  # fmt: skip
        self.out_dim = hidden[1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, hidden[1])


def make_encoder(name: str, *, in_channels: int, image_size: int, in_dim: int | None = None) -> nn.Module:
    """A fresh feature extractor by name (one of :data:`BACKBONES`)."""
    if name == "preact_resnet18":
        return PreActResNet18(in_channels, image_size)
    if name == "small_cnn":
        return SmallCNN(in_channels)
    if name == "clip_peft":
        raise ValueError("backbone 'clip_peft' is the annotator's CLIP: build it with clip_encoder_factory")
    if name == "mlp":
        if in_dim is None:
            raise ValueError("backbone 'mlp' needs in_dim (the feature dimension)")
        return MLP(in_dim)
    raise KeyError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}")


class ClipImageEncoder(nn.Module):
    """A CLIP image tower (with its PEFT modules) -> L2-normalised image embedding (B, D).

    ``head_init`` = (logit_scale * T, 0) with T (C, D) the normalised text classifier: a linear head
    started from it computes logit_scale * r . T^T, the annotator's zero-shot logits (PartialCLIP's
    text-initialised classifier). ``nets.Net`` copies it into its classifier."""

    def __init__(self, visual: nn.Module, out_dim: int, head_init: tuple[Tensor, Tensor]):
        super().__init__()
        self.visual = visual
        self.out_dim = out_dim
        self.head_init = head_init

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.visual(x), dim=-1)  # (B, D)


def clip_encoder_factory(clip: LoadedClip, settings: TrainSettings) -> Callable[[], nn.Module]:
    """``make()`` for the ``clip_peft`` backbone: encodes the annotator's class prompts once; each
    call returns a fresh copy of the image tower with ``settings.peft``'s modules applied
    (two-network methods get two independent copies)."""
    classes = text_classifier(clip)  # (C, D)
    head = (clip.source.logit_scale * classes, torch.zeros(len(classes), device=classes.device))
    visual = clip.model.visual

    def make() -> nn.Module:
        tower = apply_peft(
            copy.deepcopy(visual), settings.peft, lora_rank=settings.lora_rank, adapter_dim=settings.adapter_dim,
            vpt_tokens=settings.vpt_tokens, vpt_deep=settings.vpt_deep,
        )  # fmt: skip
        return ClipImageEncoder(tower, classes.shape[1], head)

    return make
