"""CoOp and the clip_peft backbone on the tiny random open_clip model: what each trains, what it
leaves frozen, where it starts from (the annotator's zero-shot classifier) and the merged student."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from helpers import TINY_CLIP, annotated_trial, tiny_clip, tiny_ctx, tiny_data, tiny_images, with_clip_views
from orchestrator.annotation.clip import ClipActor
from trainables.common.clip_model import encode_prompts
from trainables.common.clip_model import text_classifier
from trainables.common.peft import LoRA, apply_peft, merge_lora
from trainables.registry import ALGORITHMS
from trainables.settings import PEFT_CHOICES

N, C = 48, 4

pytestmark = pytest.mark.usefixtures("one_thread")


def _clip_data(seed: int = 0, trusted: int = 12):
    """Random 8x8 images with CLIP views; the first ``trusted`` samples are revealed shots."""
    g = torch.Generator().manual_seed(seed)
    x = tiny_images(N, g)
    y = torch.arange(N) % C
    cand = F.one_hot(y, C).float()
    cand[trusted:] = (cand[trusted:] + F.one_hot((y[trusted:] + 1) % C, C)).clamp(max=1)  # two-label sets
    return with_clip_views(tiny_data(x, cand, torch.arange(N) < trusted), tiny_clip(C)), y


def _build(method: str, **settings):
    spec = ALGORITHMS[method]
    ctx = tiny_ctx(N, C, epochs=4, batch_size=16, lr=0.05, clip=tiny_clip(C), **settings)
    return spec.build(spec.params(), ctx)


def test_encode_prompts_is_encode_text_from_the_token_embeddings():
    model, tokenizer = tiny_clip(C).model, tiny_clip(C).tokenizer
    tokens = tokenizer(["a photo of a number 3.", "X X X X number 1."])
    with torch.no_grad():
        direct = model.encode_text(tokens)
        via = encode_prompts(model, model.token_embedding(tokens), tokens)
    torch.testing.assert_close(via, direct, rtol=0, atol=1e-6)


def test_coop_updates_only_its_context():
    data, _ = _clip_data()
    algo = _build("coop")
    clip_before = copy.deepcopy(tiny_clip(C).model.state_dict())
    buffers_before = {k: v.clone() for k, v in algo.net.prompts.named_buffers()}
    ctx_before = algo.net.prompts.ctx.detach().clone()
    trainable = [name for name, p in algo.net.named_parameters() if p.requires_grad]
    assert trainable == ["prompts.ctx"]
    history = [algo.train_epoch(data, epoch) for epoch in range(3)]
    # the constant warm-up epoch, then the cosine schedule where it would be anyway (the reference's Dassl)
    assert history[0]["train/lr"] == pytest.approx(1e-5)
    assert history[1]["train/lr"] == pytest.approx(0.05 * (1 + np.cos(np.pi * 1 / 4)) / 2)
    assert not torch.equal(algo.net.prompts.ctx, ctx_before)
    for key, value in tiny_clip(C).model.state_dict().items():  # both encoders, bit-identical
        assert torch.equal(value, clip_before[key]), key
    for key, value in algo.net.prompts.named_buffers():  # SOS, class-name tokens, EOS
        assert torch.equal(value, buffers_before[key]), key
    assert torch.equal(algo.clean_mask(), data.trusted)


def test_coop_learns_from_the_shots_alone():
    """Changing the candidate sets of the unrevealed samples changes nothing: CoOp sees only the shots."""
    data, _ = _clip_data()
    other = copy.copy(data)
    other.cand = data.cand.clone()
    other.cand[~data.trusted] = 1.0 - other.cand[~data.trusted]
    outs = []
    for d in (data, other):
        d = with_clip_views(d, tiny_clip(C))  # fresh, identically seeded views
        d.generator.manual_seed(2)
        algo = _build("coop")
        for epoch in range(2):
            algo.train_epoch(d, epoch)
        outs.append(algo.predict(d.views.plain(d.x[:8])))
    assert torch.equal(outs[0], outs[1])


def test_coop_refuses_a_cell_without_shots():
    data, _ = _clip_data(trusted=0)
    with pytest.raises(ValueError, match="reveals none"):
        _build("coop").train_epoch(data, 0)


@pytest.mark.parametrize("peft", [*(c for c in PEFT_CHOICES if c != "vpt"), ["bias", "adapter", "lora"]])
def test_text_initialised_head_equals_the_zero_shot_classifier(peft):
    """Before training, cc on clip_peft predicts the annotator's own zero-shot probabilities (VPT's
    prompts change the encoder's output from the start: its head is checked apart)."""
    data, _ = _clip_data()
    algo = _build("cc", backbone="clip_peft", peft=peft)
    images = data.x[:16]
    probs = algo.predict(data.views.plain(images)).softmax(1)
    actor = ClipActor(
        model="tiny_clip", pretrained=None, model_config_path=str(TINY_CLIP), templates=["a photo of a {}"],
        class_names=[f"number {i}" for i in range(C)],
    )  # fmt: skip
    zero_shot = actor({"index": np.arange(16), "image": images.numpy()})["probs"][:, 0]  # (16, C) float16
    assert len({row.tobytes() for row in zero_shot}) > 8  # distinct rows: the comparison says something
    np.testing.assert_allclose(probs.numpy(), zero_shot.astype(np.float32), atol=1e-3)


@pytest.mark.parametrize(
    "peft, expected",
    [("bias", lambda n: n.endswith("bias")), ("layernorm", lambda n: ".ln_" in n or n.startswith("ln_")),
     ("linear_probe", lambda n: False), ("full", lambda n: True), ("vpt", lambda n: n == "vpt.prompts")],
)  # fmt: skip
def test_each_peft_choice_trains_what_it_names(peft, expected):
    algo = _build("cc", backbone="clip_peft", peft=peft)
    visual = algo.model.net.encoder.visual
    for name, p in visual.named_parameters():
        assert p.requires_grad == expected(name), name
    assert algo.model.net.classifier.weight.requires_grad  # the head always learns


def test_lora_touches_only_its_adapters_and_the_merged_model_predicts_the_same():
    data, _ = _clip_data()
    algo = _build("cc", backbone="clip_peft", peft="lora", lora_rank=4)
    net = algo.model.net
    before = copy.deepcopy(net.state_dict())
    lora_keys = {k for k in before if ".lora_" in k}
    assert lora_keys and all(k.endswith(("lora_a", "lora_b")) for k in lora_keys)
    for epoch in range(2):
        algo.train_epoch(data, epoch)
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= lora_keys | {"classifier.weight", "classifier.bias"}
    assert any(k.endswith("lora_b") for k in changed)  # B left zero: the adapters learned something

    probe = data.views.plain(data.x)
    merged = copy.deepcopy(net)
    assert merge_lora(merged) == len(lora_keys) // 2
    assert not any(parametrize.is_parametrized(m) for m in merged.modules())
    assert not any(isinstance(m, LoRA) for m in merged.modules())
    net.eval(), merged.eval()
    with torch.no_grad():
        adapted, plain = net(probe), merged(probe)
    assert torch.equal(adapted, plain)


def test_adapter_starts_as_the_identity_and_trains_only_itself():
    data, _ = _clip_data()
    algo = _build("cc", backbone="clip_peft", peft="adapter", adapter_dim=8)
    net = algo.model.net
    before = copy.deepcopy(net.state_dict())
    algo.train_epoch(data, 0)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(".down." in k or ".up." in k or k.startswith("classifier.") for k in changed)


def _prompted_visual(deep: bool, tokens: int = 3) -> torch.nn.Module:
    """The tiny CLIP's image tower with VPT, its prompts drawn large (N(0, 1)) so that they matter."""
    visual = apply_peft(copy.deepcopy(tiny_clip(C).model.visual), "vpt", vpt_tokens=tokens, vpt_deep=deep)
    with torch.no_grad():
        visual.vpt.prompts.normal_(generator=torch.Generator().manual_seed(1))
    return visual


def _vpt_by_hand(visual, x: torch.Tensor, deep: bool) -> torch.Tensor:
    """VPT written out from open_clip's own pieces (hooks off): eq. 1, [x_cls, P_1, E] into the first
    block; eq. 2 (deep), P_i in place of the prompt outputs before block i; the pooled class token."""
    prompts = visual.vpt.prompts.detach()  # (depth, P, D)
    n = prompts.shape[1]
    h = visual._embeds(x)  # (B, 1 + N, D), after ln_pre
    h = torch.cat([h[:, :1], prompts[0].expand(len(x), -1, -1), h[:, 1:]], dim=1)
    for i, block in enumerate(visual.transformer.resblocks):
        if deep and i > 0:
            h = torch.cat([h[:, :1], prompts[i].expand(len(x), -1, -1), h[:, 1 + n :]], dim=1)
        h = block.forward(h)  # forward itself: the hooks stay out of the reference
    pooled, _ = visual._pool(torch.cat([h[:, :1], h[:, 1 + n :]], dim=1))
    return pooled @ visual.proj  # (B, embed_dim)


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_computes_eq_1_and_eq_2_of_the_paper(deep):
    """The hooked ViT computes VPT-Shallow / VPT-Deep as written out by hand; the other variant,
    or no prompts, computes something else (so the comparison can fail)."""
    visual = _prompted_visual(deep)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    layers = len(visual.transformer.resblocks)
    assert visual.vpt.prompts.shape == (layers if deep else 1, 3, 64)
    with torch.no_grad():
        out = visual(x)  # (4, 32)
        expected = _vpt_by_hand(visual, x, deep)
        plain = tiny_clip(C).model.visual(x)
    assert out.shape == plain.shape == (4, 32)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert (out - plain).abs().max() > 1e-2
    if deep:  # the later layers' prompts replace the earlier ones' outputs: without them, another result
        visual.vpt.prompts.data[1:] = 0.0
        with torch.no_grad():
            assert (visual(x) - out).abs().max() > 1e-3


def test_vpt_keeps_open_clips_layouts_and_pools_without_the_prompts():
    """Sequence-first blocks (``batch_first`` off) give the batch-first result; the transformer hands
    the pooling [x_cls, E] (prompts dropped), so ``avg`` pooling averages the patches alone; an
    attention mask is refused; a deep copy (a second network) has prompts of its own."""
    visual = _prompted_visual(deep=True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = visual(x)
        seq_first = copy.deepcopy(visual)
        seq_first.transformer.batch_first = False
        for block in seq_first.transformer.resblocks:
            block.attn.batch_first = False
        torch.testing.assert_close(seq_first(x), out, rtol=0, atol=1e-5)
        seq_first.vpt.prompts.normal_(generator=torch.Generator().manual_seed(2))  # a scaling would not do: ln_1 undoes it
        assert (seq_first(x) - out).abs().max() > 1e-3 and torch.equal(visual(x), out)

        tokens = visual.transformer(visual._embeds(x))  # (B, 1 + N, D): the prompts left the sequence
        assert tokens.shape == (4, 1 + 16, 64)
        visual.pool_type = "avg"
        torch.testing.assert_close(visual(x), visual.ln_post(tokens)[:, 1:].mean(dim=1) @ visual.proj, rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="attention mask"):
            visual.transformer(visual._embeds(x), attn_mask=torch.zeros(17, 17))


def test_vpt_trains_only_its_prompts_and_the_text_initialised_head():
    """Gradients reach every layer's prompts (deep) and the head, nothing else changes in training;
    the head starts as the annotator's zero-shot classifier, logit_scale * its text embeddings."""
    data, _ = _clip_data()
    algo = _build("cc", backbone="clip_peft", peft="vpt", vpt_tokens=4)
    net = algo.model.net
    expected = {"encoder.visual.vpt.prompts", "classifier.weight", "classifier.bias"}
    assert {k for k, p in net.named_parameters() if p.requires_grad} == expected
    clip = tiny_clip(C)
    torch.testing.assert_close(net.classifier.weight, clip.source.logit_scale * text_classifier(clip), rtol=0, atol=0)
    assert not net.classifier.bias.any()

    net(data.views.plain(data.x[:8])).logsumexp(dim=1).sum().backward()
    grad = net.encoder.visual.vpt.prompts.grad  # (layers, 4, D)
    assert grad.shape[0] == len(net.encoder.visual.transformer.resblocks) and (grad.abs().sum(dim=(1, 2)) > 0).all()
    net.zero_grad(set_to_none=True)
    before = copy.deepcopy(net.state_dict())
    algo.train_epoch(data, 0)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == expected


def test_vpt_refuses_a_resnet_image_encoder():
    from open_clip.modified_resnet import ModifiedResNet

    resnet = ModifiedResNet(layers=[1, 1, 1, 1], output_dim=32, heads=2, image_size=32, width=8)
    with pytest.raises(ValueError, match="peft vpt: the image encoder is a ModifiedResNet, not a vision transformer"):
        apply_peft(resnet, "vpt")


def test_a_combination_trains_exactly_the_union_of_its_modules():
    def trainable(peft) -> set[str]:
        net = _build("cc", backbone="clip_peft", peft=peft, lora_rank=2, vpt_tokens=2).model.net
        return {k for k, p in net.named_parameters() if p.requires_grad}

    lora, bias, vpt = trainable("lora"), trainable("bias"), trainable("vpt")
    assert lora - bias and bias - lora and vpt - lora - bias  # each module adds parameters of its own
    assert trainable(["bias", "lora"]) == lora | bias
    assert trainable(["vpt", "bias", "lora"]) == lora | bias | vpt


def test_a_bad_combination_is_refused_when_the_grid_is_read():
    from orchestrator.config import GridError, parse_grid

    raw = {"experiment": "x", "datasets": [{"name": "digits"}], "annotators": [{"kind": "clip"}], "methods": [{"name": "cc"}]}
    raw["training"] = {"backbone": "clip_peft", "peft": ["vpt", "lora", "bias"]}
    assert parse_grid(raw).training.peft == "lora+vpt+bias"  # canonical order
    for peft, message in ((["lora", "full"], "training.peft: full cannot be combined with other modules"),
                          (["linear_probe", "vpt"], "training.peft: linear_probe cannot be combined with other modules"),
                          (["lora", "lora"], "training.peft: lora listed twice"),
                          (["lora", "vpt_deep"], "training.peft: 'vpt_deep' is not a PEFT module")):  # fmt: skip
        raw["training"]["peft"] = peft
        with pytest.raises(GridError, match=message):
            parse_grid(raw)


@pytest.fixture(scope="module", params=["lora", ["vpt", "lora"]], ids=["lora", "lora+vpt"])
def clip_trial(request, tmp_path_factory, one_thread):
    """A finished 2-epoch trial of cc on clip_peft (LoRA; LoRA and VPT-Deep together) on digits
    annotated by the tiny CLIP (its probabilities stood in for, the model is real): (spec, reported
    metrics, checkpoint dir, data set)."""
    from orchestrator.annotation import clip as clip_mod

    grid = {
        "datasets": [{"name": "digits", "subsample": 120, "test_subsample": 60}],
        "annotators": [{"kind": "clip", "pretrained": None, "model_config_path": str(TINY_CLIP), "templates": ["a photo of a {}"]}],
        "training": {"epochs": 2, "batch_size": 32, "backbone": "clip_peft", "peft": request.param, "lora_rank": 4, "vpt_tokens": 2, "lr": 0.01},
        "methods": [{"name": "cc"}],
    }  # fmt: skip

    def fake_probs(ds, spec, names, progress=None):  # (n, 1, 10) one template, seeded
        rng = np.random.default_rng(0)
        return tuple(rng.dirichlet(np.ones(10), (len(x), 1)).astype(np.float16) for x in (ds.train_x, ds.test_x))

    return annotated_trial(tmp_path_factory.mktemp("clip_student"), grid, clip_mod, "annotate_clip", fake_probs)


def test_the_clip_peft_student_is_the_merged_model_and_predicts_as_the_trial(clip_trial, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from orchestrator.student import STUDENT_PATH, log_student
    from trainables.loop import CHECKPOINT_FILE, PREDICTIONS_FILE

    config, reported, checkpoint, dataset = clip_trial
    state = torch.load(checkpoint / CHECKPOINT_FILE, weights_only=True)
    assert any(".lora_b" in k for k in state["algorithm"]["net"])  # the trial trained adapters
    assert state["clip"]["model"] == "tiny_clip" and state["clip"]["templates"] == ["a photo of a {}"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("clip-student", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    assert log_student(client, run_id, checkpoint, dataset)

    model = mlflow.pyfunc.load_model(f"{client.get_run(run_id).info.artifact_uri}/{STUDENT_PATH}")
    out = model.predict(dataset.test_x)  # raw (N, 1, 8, 8) uint8 images; the student applies CLIP's transform
    trial_pred = np.load(checkpoint / PREDICTIONS_FILE)["test_pred"]
    assert len(set(trial_pred.tolist())) > 1  # not a constant prediction: the comparison says something
    np.testing.assert_array_equal(out["class_id"].to_numpy(), trial_pred)
    assert (out["class_id"].to_numpy() == dataset.test_y).mean() == pytest.approx(reported[-1]["test/acc"], abs=1e-6)

    weights = Path(client.download_artifacts(run_id, "student/artifacts/networks.pt", str(tmp_path / "w")))
    shipped = torch.load(weights, weights_only=True)
    keys = [k for state in shipped.values() for k in state]
    assert keys and not any("lora" in k or "parametrizations" in k for k in keys)  # LoRA merged
    prompts = [net[k] for net in shipped.values() for k in net if k.endswith("vpt.prompts")]
    if "vpt" in config.training.peft_modules:  # the trained prompts ship as a parameter of the encoder
        assert len(prompts) == 1 and torch.equal(prompts[0], state["algorithm"]["net"]["encoder.visual.vpt.prompts"])
    else:
        assert not prompts
    assert model.metadata.metadata["preprocessing"]["clip"]["size"] == [32, 32]
    assert int(client.get_run(run_id).data.tags["student_kb"]) > 0


@pytest.mark.parametrize("peft", ["lora", ["vpt", "lora"]], ids=["lora", "lora+vpt"])
@pytest.mark.parametrize("method", sorted(name for name, spec in ALGORITHMS.items() if not spec.needs_clip and not spec.needs_vlm))
def test_every_method_trains_on_the_clip_peft_backbone(method, peft):
    """Any registered method takes the clip_peft backbone (two-network methods two copies, MoCo
    methods their key encoders, each with prompts of its own): finite losses, and the predictions
    leave the start."""
    import dataclasses
    import math

    import test_contract

    spec = ALGORITHMS[method]
    fields = {f.name for f in dataclasses.fields(spec.params)}
    params = spec.params(**{k: v for k, v in test_contract.FAST.items() if k in fields})
    n, c = test_contract.N, test_contract.C
    ctx = tiny_ctx(n, c, epochs=3, batch_size=16, clip=tiny_clip(c), backbone="clip_peft", peft=peft, lora_rank=2, vpt_tokens=2)
    algo = spec.build(params, ctx)
    data = with_clip_views(test_contract._cnn_data(), tiny_clip(c))
    probe = data.views.plain(data.x[:8])
    before = algo.predict(probe).clone()
    for epoch in range(2):
        metrics = algo.train_epoch(data, epoch)
        assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert not torch.allclose(algo.predict(probe), before)


def test_a_trial_finds_its_annotators_clip_in_the_annotation_meta(tmp_path):
    """A CLIP annotation names its model, prompts and class names; an ensemble's CLIP is its first
    CLIP member; a synthetic annotation has none. Relative model files are taken from the start directory."""
    from trainables.data.annotation import write_entry
    from trainables.data.clip_source import clip_source

    cand = {"cand_train": np.ones((2, 3), dtype=bool)}
    annotator = {"kind": "clip", "model": "ViT-B-32", "pretrained": None, "model_config_path": "tests/fixtures/tiny_clip.json",
                 "logit_scale": 50.0}  # fmt: skip
    write_entry(tmp_path / "syn", cand, {"kind": "synthetic", "stats": {}})
    write_entry(tmp_path / "clip", cand, {"kind": "clip", "annotator": annotator, "templates": ["a {}"], "class_names": ["a", "b", "c"], "stats": {}})
    write_entry(tmp_path / "ens", cand, {"kind": "ensemble", "members": ["syn", "clip"], "stats": {}})
    assert clip_source(tmp_path, "syn") is None
    source = clip_source(tmp_path, "ens")
    assert source == clip_source(tmp_path, "clip")
    assert (source.model, source.templates, source.class_names, source.logit_scale) == ("tiny_clip", ("a {}",), ("a", "b", "c"), 50.0)
    assert source.resolved(Path("/start")).model_config_path == "/start/tests/fixtures/tiny_clip.json"
    assert source.resolved(Path("/start")).pretrained is None


def test_on_clip_peft_the_search_space_also_sizes_the_peft_module():
    """Any method's space gains each PEFT module's size on clip_peft (LoRA's rank, the adapter's
    bottleneck, VPT's prompt length), and a grid may re-range it there only."""
    from orchestrator.config import GridError, parse_grid
    from search_spaces import parameter_names
    from trainables.settings import TrainSettings

    assert parameter_names("cc") == ["lr"]
    assert parameter_names("cc", training=TrainSettings(backbone="clip_peft")) == ["lr", "lora_rank"]
    assert parameter_names("proden", training=TrainSettings(backbone="clip_peft", peft="adapter")) == ["lr", "adapter_dim"]
    assert parameter_names("cc", training=TrainSettings(backbone="clip_peft", peft="bias")) == ["lr"]
    assert parameter_names("cc", training=TrainSettings(backbone="clip_peft", peft="vpt")) == ["lr", "vpt_tokens"]
    both = TrainSettings(backbone="clip_peft", peft=["bias", "vpt", "lora"])
    assert parameter_names("cc", training=both) == ["lr", "lora_rank", "vpt_tokens"]
    assert parameter_names("cc", training=TrainSettings(backbone="small_cnn", peft="lora")) == ["lr"]
    raw = {
        "experiment": "x", "datasets": [{"name": "digits"}], "annotators": [{"kind": "clip"}],
        "methods": [{"name": "cc", "training": {"backbone": "clip_peft"}, "search": {"space": {"lora_rank": {"low": 4, "high": 16}}}}],
    }  # fmt: skip
    assert parse_grid(raw)
    raw["methods"][0]["training"] = {"backbone": "small_cnn"}
    with pytest.raises(GridError, match="search.space.lora_rank: not a parameter of the cc search space"):
        parse_grid(raw)
