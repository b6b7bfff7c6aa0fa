"""SigLIP-style scoring on a tiny randomly initialised open_clip config with a learned logit bias
(tests/fixtures/tiny_sigmoid.json), and the weights / tokenizer checks of CLIP-family annotators
(MetaCLIP tags, SigLIP tokenizers) offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orchestrator.annotation import clip_check
from orchestrator.annotation.clip import ClipActor, actor_kwargs
from orchestrator.annotation.clip_check import weights_and_tokenizer_problems
from orchestrator.annotation.stage import clip_probs_key
from orchestrator.config import ClipAnnotatorSpec, DatasetSpec
from trainables.data.datasets import load_dataset

FIXTURES = Path(__file__).parent / "fixtures"
SIGMOID = ClipAnnotatorSpec(
    kind="clip", pretrained=None, model_config_path=str(FIXTURES / "tiny_sigmoid.json"), templates=["a photo of a {}", "a {}"]
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DatasetSpec(name="digits", subsample=30, test_subsample=10))


def test_sigmoid_scoring_uses_the_models_own_scale_and_bias(digits, one_thread):
    actor = ClipActor(**actor_kwargs(SIGMOID, digits.class_names))
    scale, bias = actor.model.logit_scale.detach().exp().item(), actor.model.logit_bias.item()
    assert actor.sigmoid and bias == -10.0 and scale == pytest.approx(1 / 0.07)  # the config's init, not 100
    assert (actor.logit_scale, actor.logit_bias) == (pytest.approx(scale), bias)
    out = actor({"index": np.arange(8), "image": digits.train_x[:8]})["probs"].astype(np.float32)
    with torch.inference_mode():
        from orchestrator.annotation.clip import preprocess_images

        x = preprocess_images(torch.from_numpy(digits.train_x[:8]), actor.preprocess_cfg)
        r = F.normalize(actor.model.encode_image(x), dim=-1)
        s = torch.sigmoid(scale * torch.einsum("bd,tcd->btc", r, actor.text_embeddings) + bias)
    expected = (s / s.sum(-1, keepdim=True)).numpy()
    np.testing.assert_allclose(out, expected, atol=2e-3)
    softmax100 = torch.einsum("bd,tcd->btc", r, actor.text_embeddings).mul(100).softmax(-1).numpy()
    assert np.abs(softmax100 - expected).max() > 0.01  # not CLIP's softmax x 100


def test_sigmoid_models_have_their_own_cache_key(digits, tmp_path):
    cfg = json.loads((FIXTURES / "tiny_sigmoid.json").read_text())
    del cfg["init_logit_bias"]
    (tmp_path / "tiny_sigmoid.json").write_text(json.dumps(cfg))
    plain = SIGMOID.model_copy(update={"model_config_path": str(tmp_path / "tiny_sigmoid.json")})
    assert clip_probs_key(digits, plain) != clip_probs_key(digits, SIGMOID)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(clip_check, "reachable", lambda url, timeout=5.0: False)


def test_metaclip_tags_need_quickgelu_and_weights(offline):
    spec = ClipAnnotatorSpec(kind="clip", model="ViT-B-32", pretrained="metaclip_fullcc")
    assert weights_and_tokenizer_problems("annotators[0]", spec) == [
        "annotators[0].pretrained: metaclip_fullcc weights were trained with QuickGELU; use model ViT-B-32-quickgelu"
    ]
    (problem,) = weights_and_tokenizer_problems("annotators[0]", spec.model_copy(update={"model": "ViT-B-32-quickgelu"}))
    assert problem.startswith("annotators[0].pretrained: weights timm/vit_base_patch32_clip_224.metaclip_2pt5b/open_clip_model.safetensors")
    assert "not in the local Hugging Face cache" in problem
    (unknown,) = weights_and_tokenizer_problems("annotators[0]", spec.model_copy(update={"pretrained": "metaclip_2b"}))
    assert "open_clip has no weights 'metaclip_2b' for model ViT-B-32" in unknown and "metaclip_400m" in unknown


def test_siglip_weights_and_tokenizer_are_named_offline(offline, tmp_path):
    spec = ClipAnnotatorSpec(kind="clip", model="ViT-B-16-SigLIP", pretrained="webli")
    weights, tokenizer = weights_and_tokenizer_problems("annotators[2]", spec)
    assert weights.startswith("annotators[2].pretrained: weights timm/ViT-B-16-SigLIP/open_clip_model.safetensors")
    assert tokenizer.startswith("annotators[2].model: tokenizer timm/ViT-B-16-SigLIP/tokenizer.json")
    # a SigLIP-named config without an HF tokenizer: open_clip downloads a sentencepiece vocabulary
    named = shutil.copy(FIXTURES / "tiny_sigmoid.json", tmp_path / "tiny_siglip.json")
    local = SIGMOID.model_copy(update={"model_config_path": str(named)})
    (problem,) = weights_and_tokenizer_problems("annotators[0]", local)
    assert "sentencepiece vocabulary http://storage.googleapis.com/t5-data/vocabs/cc_en.32000/sentencepiece.model" in problem
    assert weights_and_tokenizer_problems("annotators[0]", SIGMOID) == []  # open_clip's bundled tokenizer


def test_cached_weights_and_tokenizer_pass(monkeypatch, tmp_path):
    """The same checks with the files in a (hand-made) Hugging Face cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(clip_check, "reachable", lambda url, timeout=5.0: False)
    for repo, name in (("timm/ViT-B-16-SigLIP", "open_clip_model.safetensors"), ("timm/ViT-B-16-SigLIP", "tokenizer.json")):
        folder = tmp_path / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text("abc")
        (folder / "snapshots" / "abc").mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / "abc" / name).write_text("x")
    spec = ClipAnnotatorSpec(kind="clip", model="ViT-B-16-SigLIP", pretrained="webli")
    assert weights_and_tokenizer_problems("annotators[0]", spec) == []
