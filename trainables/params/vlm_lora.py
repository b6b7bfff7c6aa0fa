"""LoRA few-shot fine-tuning of the annotator's VLM: hyperparameters and registry entry (the
algorithm, its papers and its deviations: ``trainables/vlm_lora.py``). Torch-free, so a grid is
validated without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from trainables.data.annotation import Target
from trainables.settings import AlgorithmSpec


@dataclass(frozen=True)
class VlmLoraParams:
    rank: Annotated[int, Field(ge=1, le=1024)] = 128
    """LoRA rank r (LLaVA-1.5's ``finetune_lora.sh``: 128)."""
    alpha: Annotated[float, Field(gt=0.0)] = 256.0
    """LoRA scale numerator: updates are (alpha / r) B A (LLaVA-1.5: 256)."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    """Dropout on the LoRA branch's input (LLaVA-1.5: 0.05)."""
    lora_lr: Annotated[float, Field(gt=0.0)] = 2e-4
    """AdamW learning rate of the adapters (LLaVA-1.5: 2e-4); the grid's ``training.lr`` is SGD's
    for networks trained from scratch and is not used."""
    targets: Literal["language_model", "attention"] = "language_model"
    """Which linear layers get adapters: every one of the language model (LLaVA-1.5's
    ``find_all_linear_names``: not the vision tower, not the projector) or only its attention
    projections (q, k, v, o: Hu et al.'s original choice)."""
    gradient_checkpointing: bool = True
    """Recompute the language model's activations in the backward pass instead of keeping them
    (LLaVA-1.5's script does): the same numbers, a fraction of the memory, about a third more time."""
    eval_batch_size: Annotated[int, Field(ge=1)] = 16
    """Images per forward pass when predicting (every template's question is asked of each)."""


SPEC = AlgorithmSpec(
    name="vlm_lora",
    params=VlmLoraParams,
    builder="trainables.vlm_lora:VlmLora",
    consumes=Target.CAND,
    needs_vlm=True,
    description="LoRA (Hu et al. 2022) on the annotator's image-text-to-text model, from the revealed shots; "
    "read like the annotator (answers parsed, or class names scored).",
)
