"""CoOp: context optimisation, prompt learning on a frozen CLIP from the revealed few shots.

Paper: K. Zhou, J. Yang, C. C. Loy, Z. Liu, "Learning to Prompt for Vision-Language Models", IJCV
2022. Reference code: github.com/KaiyangZhou/CoOp (``trainers/coop.py``: ``PromptLearner``,
``TextEncoder``, ``CustomCLIP``; ``configs/trainers/CoOp/*.yaml``). It is the prompt-learning row of
the Co-Reg paper's Tables I-II (1, 2, 4, 8, 16 shots on the annotator's CLIP ViT-B/32 and B/16).

The prompt of class c is [SOS] v_1 ... v_M [CLASS c] . [EOS]: M learned context vectors v_m (one
set shared by the classes, or one per class, "CSC") replace the token embeddings of M placeholder
words. The image and text encoders stay frozen; the text features t_c of the prompts and the
image feature r (both L2-normalised) give p(c | x) = softmax_c(s r . t_c), and the context is
trained with cross-entropy on the labelled shots only. Evaluation is zero-shot style with the
learned prompts.

Implementation details / deviations:
1. The labelled data are the cell's revealed few shots (the grid's ``shots`` axis: ``data.trusted``
   with their revealed labels); every other training sample, its candidate set and the annotator's
   labels are ignored. A cell that reveals no label is refused.
2. The CLIP is the annotator's own (``BuildContext.clip``: same model, weights, class descriptions)
   and s is the annotator's ``logit_scale`` (100, CLIP's own learned value for OpenAI's weights).
3. Context initialisation as the reference: N(0, 0.02) (``ctx_init: ""``), or the token embeddings
   of a phrase such as "a photo of a" (M = its token count). The class token sits at the end (the
   reference's default ``CLASS_TOKEN_POSITION: end``; "middle" / "front" are not offered).
4. Optimiser: the project's SGD + per-epoch schedule (``TrainSettings``; the paper: SGD lr 0.002,
   batch 32, cosine, 200 epochs for 8-16 shots, 100 for 2-4, 50 for 1); the paper's constant
   warm-up (1 epoch at lr 1e-5) is ``warmup_epochs`` / ``warmup_lr``. Training uses the weak view
   (``augment``); the reference uses random resized crops and flips.
5. Only open_clip models with the built-in text transformer (class ``CLIP``) are supported; SigLIP
   and other custom text towers are refused when the method is built.
6. ``pseudo_labels()`` is the revealed label on the shots and uniform elsewhere (CoOp has no
   label for the other samples); ``clean_mask()`` marks the shots.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.api import BuildContext, TrainData
from trainables.common.clip_model import check_text_transformer, encode_prompts
from trainables.common.metrics import MeanMeter
from trainables.common.nets import seeded
from trainables.common.shots import RevealedShots
from trainables.common.optim import make_optimizer
from trainables.common.single_net import training_view
from trainables.data.clip_source import LoadedClip
from trainables.params.coop import CoOpParams


class PromptLearner(nn.Module):
    """The learned context and the frozen token embeddings around it: ``forward() -> (C, L, D)``."""

    def __init__(self, clip: LoadedClip, params: CoOpParams):
        super().__init__()
        model, names = clip.model, clip.source.class_names
        words = params.ctx_init.strip()
        n_ctx = len(clip.tokenizer([words])[0].nonzero()) - 2 if words else params.n_ctx  # minus SOS, EOS
        placeholder = words if words else " ".join(["X"] * n_ctx)
        tokens = clip.tokenizer([f"{placeholder} {name}." for name in names])  # (C, L)
        device = model.token_embedding.weight.device
        with torch.no_grad():
            embedded = model.token_embedding(tokens.to(device)).float()  # (C, L, D)
        if words:
            ctx = embedded[0, 1 : 1 + n_ctx].clone()  # the phrase's own embeddings
            ctx = ctx.expand(len(names), -1, -1).clone() if params.class_specific else ctx
        else:
            shape = (len(names), n_ctx, embedded.shape[-1]) if params.class_specific else (n_ctx, embedded.shape[-1])
            ctx = torch.empty(shape, device=device).normal_(0.0, 0.02)
        self.ctx = nn.Parameter(ctx)  # (M, D) or (C, M, D)
        self.register_buffer("prefix", embedded[:, :1].clone())  # SOS (C, 1, D)
        self.register_buffer("suffix", embedded[:, 1 + n_ctx :].clone())  # CLASS . EOS padding (C, *, D)
        self.register_buffer("tokens", tokens.to(device))

    def forward(self) -> Tensor:
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.expand(len(self.prefix), -1, -1)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)  # (C, L, D)


class CoOpNet(nn.Module):
    """Frozen CLIP + learned prompts: ``forward(x) -> (B, C)`` logits s r . t_c."""

    def __init__(self, clip: LoadedClip, params: CoOpParams):
        super().__init__()
        check_text_transformer(clip.model)
        self.clip = clip.model
        self.clip.requires_grad_(False).eval()
        self.prompts = PromptLearner(clip, params)
        self.logit_scale = clip.source.logit_scale

    def text_features(self) -> Tensor:
        return F.normalize(encode_prompts(self.clip, self.prompts(), self.prompts.tokens), dim=-1)  # (C, D)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():  # the image encoder is frozen
            image = F.normalize(self.clip.encode_image(x).float(), dim=-1)  # (B, D)
        return self.logit_scale * image @ self.text_features().t()  # (B, C)


class CoOp:
    def __init__(self, params: CoOpParams, ctx: BuildContext):
        if ctx.clip is None:
            raise ValueError("coop learns prompts for the annotator's CLIP; this cell's annotator has none")
        self.params = params
        with seeded(ctx.seed):  # the context's N(0, 0.02) draw depends on the seed only
            self.net = CoOpNet(ctx.clip, params).to(ctx.device)
        self.optimizer, self.scheduler = make_optimizer([self.net.prompts.ctx], ctx.train, ctx.train.epochs)
        self.batch_size = ctx.train.batch_size
        self.shots = RevealedShots(ctx.num_samples, ctx.num_classes, ctx.device)

    def train_epoch(self, data: TrainData, epoch: int) -> dict[str, float]:
        shots = self.shots.take(data, "coop")
        groups = self.optimizer.param_groups
        scheduled = [group["lr"] for group in groups]
        if epoch < self.params.warmup_epochs:  # the reference's constant warm-up
            for group in groups:
                group["lr"] = self.params.warmup_lr
        meter = MeanMeter()
        for idx in data.batches(self.batch_size, shots):
            meter.add(**self.train_step(data, idx))
        used = groups[0]["lr"]
        for group, lr in zip(groups, scheduled):
            group["lr"] = lr
        self.scheduler.step()
        return {**meter.means("train/"), "train/lr": used}

    def train_step(self, data: TrainData, idx: Tensor) -> dict[str, Tensor]:
        labels = data.cand[idx].argmax(1)  # the revealed labels (singletons)
        logits = self.net(training_view(data, self.params.augment)(data.x[idx]))  # (B, C)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.net(x)

    def pseudo_labels(self) -> Tensor:
        return self.shots.targets.clone()

    def clean_mask(self) -> Tensor | None:
        return self.shots.mask.clone()

    def state_dict(self) -> dict[str, Any]:
        return {
            "ctx": self.net.prompts.ctx.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **self.shots.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.net.prompts.ctx.copy_(state["ctx"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.shots.load_state_dict(state)
