"""LoRA few-shot fine-tuning of the annotator's image-text-to-text model (LLaVA-style).

Paper: E. J. Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022; the
recipe of LLaVA-1.5 (H. Liu et al., "Improved Baselines with Visual Instruction Tuning", CVPR
2024; reference code github.com/haotian-liu/LLaVA, ``scripts/v1_5/finetune_lora.sh`` and
``llava/train/train.py``: ``find_all_linear_names``). It is the "LoRA k-shot" row of the Co-Reg
paper's Table II (1-16 shots per class on LLaVA-1.5's annotations), the few-shot baseline of the
image-text-to-text annotator as CoOp is of CLIP.

Each frozen linear weight W of the chosen layers becomes W + (alpha / r) B A, A and B trained (peft's
``LoraConfig``); everything else stays the annotator's. The model is trained by next-token
prediction on the answer only: for a labelled shot (x, y) and every question template t, the loss
is the cross-entropy of the tokens of class y's name (then end-of-sequence) after the image and
question t, in the model's conversation format, exactly the prompt the annotator asked. It is read
the way the annotator was (:class:`trainables.common.vlm_model.VlmQuestioner`, the same code):
``score`` annotators give p(c | x) = mean_t p_t(c) (each class name's probability as the answer,
normalised over the classes); ``generate`` annotators answer greedily, each answer is parsed back to
a class and p(c | x) is class c's share of the templates' votes (parsed answers only).

Implementation details / deviations:
1. The labelled data are the cell's revealed few shots (``data.trusted`` with their revealed
   labels); every other training sample, its candidate set and the annotator's labels are ignored.
   A cell that reveals no label is refused (as CoOp).
2. The VLM is the annotator's own (``BuildContext.vlm``: the same weights, precision, templates,
   class names and answer mode, read from the cached annotation); peft adapts it in place (the
   loop loads one per trial). Adapters: every linear layer of the language model
   (``targets: language_model``, LLaVA-1.5's choice: not the vision tower, not the projector) or
   its attention projections only (``attention``); r 128, alpha 256, dropout 0.05, AdamW at
   2e-4 without weight decay, gradient checkpointing, as LLaVA-1.5's script. Its 3% linear warm-up is not done; the
   grid's epochs and schedule (``training.scheduler``, per epoch) apply, the grid's SGD ``lr``
   does not (``lora_lr``).
3. One step takes a batch of shots through every template (the loss is their mean); LLaVA's
   instruction tuning has one question per image and no augmentation; the plain view is used.
4. The answer is the class name as the annotator's ``score`` mode reads it (the tokens it adds
   after the prompt), for lettered templates too (the parser takes a named class before a letter).
5. ``pseudo_labels()`` is the revealed label on the shots and uniform elsewhere; ``clean_mask()``
   marks the shots. The deployable student is the annotator's model with the adapters merged
   (``merge_adapter``): its size is the VLM's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trainables.api import BuildContext, TrainData
from trainables.common.metrics import MeanMeter
from trainables.common.nets import seeded
from trainables.common.shots import RevealedShots
from trainables.common.schedules import make_scheduler
from trainables.common.vlm_model import VlmQuestioner, to_pil
from trainables.params.vlm_lora import VlmLoraParams

ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj")


def lora_targets(model: nn.Module, which: str) -> list[str]:
    """Names of the linear layers that get adapters: every one inside the language model
    (``model.get_decoder()``), or only its attention projections."""
    decoder = {id(m) for m in model.get_decoder().modules()}
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in decoder]
    if which == "attention":
        names = [n for n in names if n.rsplit(".", 1)[-1] in ATTENTION_NAMES]
    if not names:
        raise ValueError(f"vlm_lora: no {which} linear layer found in the language model of {type(model).__name__}")
    return names


def as_images(x: Tensor) -> list[Any]:
    """(B, C, H, W) images in [0, 1] (the raw view) -> RGB PIL images for the VLM's processor."""
    return to_pil((x.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy())


class VlmLora:
    def __init__(self, params: VlmLoraParams, ctx: BuildContext):
        from peft import LoraConfig, get_peft_model

        if ctx.vlm is None:
            raise ValueError("vlm_lora fine-tunes the annotator's VLM; this cell's annotator has none")
        self.params, source = params, ctx.vlm.source
        config = LoraConfig(
            r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout, bias="none",
            target_modules=lora_targets(ctx.vlm.model, params.targets),
        )  # fmt: skip
        with seeded(ctx.seed):  # A's Kaiming draw depends on the seed only (B starts at 0)
            self.model = get_peft_model(ctx.vlm.model, config)
        if params.gradient_checkpointing:  # non-reentrant: frozen inputs need no requires_grad trick
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.questioner = VlmQuestioner(
            ctx.vlm.processor, self.model, templates=source.templates, class_names=source.class_names,
            answer_mode=source.answer_mode, max_new_tokens=source.max_new_tokens,
        )  # fmt: skip
        adapters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(adapters, lr=params.lora_lr, weight_decay=0.0)
        self.scheduler = make_scheduler(self.optimizer, ctx.train.scheduler, ctx.train.epochs)
        self.batch_size, self.num_classes = ctx.train.batch_size, ctx.num_classes
        self.shots = RevealedShots(ctx.num_samples, ctx.num_classes, ctx.device)

    def train_epoch(self, data: TrainData, epoch: int) -> dict[str, float]:
        shots = self.shots.take(data, "vlm_lora")
        self.model.train()
        meter = MeanMeter()
        for idx in data.batches(self.batch_size, shots):
            meter.add(**self.train_step(data, idx))
        self.model.eval()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return {**meter.means("train/"), "train/lr": lr}

    def train_step(self, data: TrainData, idx: Tensor) -> dict[str, Tensor]:
        labels = data.cand[idx].argmax(1)  # the revealed labels (singletons)
        images = as_images(data.views.plain(data.x[idx]))
        # LoRA's dropout draws from an RNG seeded by the data's generator (checkpointed): a resumed run repeats them
        seed = int(torch.randint(2**62, (1,), generator=data.generator))
        device = self.questioner.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            losses = [self.questioner.answer_loss(images, labels, t) for t in range(len(self.questioner.templates))]
            loss = torch.stack(losses).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """(B, C) log-probabilities: the templates' mean class probabilities (``score``) or vote shares (``generate``)."""
        self.model.eval()
        step = self.params.eval_batch_size
        return torch.cat([self._log_probs(as_images(x[i : i + step])) for i in range(0, len(x), step)]).to(x.device)

    def _log_probs(self, images: list[Any]) -> Tensor:
        found = self.questioner.answer(images)
        if "probs" in found:
            probs = found["probs"].float().mean(1)  # (B, C)
        else:
            answers = found["answers"]  # (B, T), -1: unparsed
            votes = np.zeros((len(images), self.num_classes), dtype=np.float32)
            rows, cols = np.nonzero(answers >= 0)
            np.add.at(votes, (rows, answers[rows, cols]), 1.0)
            total = votes.sum(1, keepdims=True)
            shares = np.where(total > 0, votes / np.maximum(total, 1.0), 1.0 / self.num_classes)  # no parsed answer: uniform
            probs = torch.from_numpy(shares.astype(np.float32))
        return torch.log(probs.clamp_min(1e-6))

    def pseudo_labels(self) -> Tensor:
        return self.shots.targets.clone()

    def clean_mask(self) -> Tensor | None:
        return self.shots.mask.clone()

    def adapter_state(self) -> dict[str, Tensor]:
        """The adapters' weights (peft's ``get_peft_model_state_dict``): all that training changed."""
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "adapters": self.adapter_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **self.shots.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state["adapters"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.shots.load_state_dict(state)
