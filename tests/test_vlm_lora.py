"""``vlm_lora``: LoRA few-shot fine-tuning of the annotator's image-text-to-text model (tiny random
LLaVA of tests/fixtures/tiny_vlm.py), read the way the annotator reads it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import VLM_TEMPLATES, annotated_trial, tiny_ctx, tiny_pll_data, tiny_vlm, tiny_vlm_dir, with_raw_views
from orchestrator.annotation.vlm import VlmActor
from trainables.params.vlm_lora import VlmLoraParams
from trainables.registry import ALGORITHMS
from trainables.vlm_lora import as_images, lora_targets

N, C = 32, 4
FAST = VlmLoraParams(rank=8, alpha=16.0, dropout=0.0, lora_lr=1e-2)

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(shots: int = 16, q: float = 0.5, legible: bool = False):
    """Tiny images and candidate sets; ``legible``: class k lights quadrant k of its 8x8 image (one
    patch of the tiny LLaVA's vision tower each), the rest is faint noise."""
    data, y = tiny_pll_data(N, C, q=q, trusted=shots)
    if legible:
        x = torch.randint(0, 32, data.x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
        for i, k in enumerate(y.tolist()):
            x[i, :, 4 * (k // 2) : 4 * (k // 2) + 4, 4 * (k % 2) : 4 * (k % 2) + 4] = 255
        data = dataclasses.replace(data, x=x)
    return with_raw_views(data), y


def _build(params: VlmLoraParams = FAST, answer_mode: str = "score", seed: int = 0, epochs: int = 20, head_scale: float = 1.0):
    """``vlm_lora`` on a fresh tiny LLaVA. ``head_scale``: its output layer scaled up. A random
    head (std 0.02) caps the logits near 0.6 whatever the hidden state, so no adapter on the layers
    below could make it confident; a trained model's head has the range a scale of 30 gives."""
    vlm = tiny_vlm(C, answer_mode)
    with torch.no_grad():
        vlm.model.lm_head.weight.mul_(head_scale)
    ctx = tiny_ctx(N, C, epochs=epochs, batch_size=8, seed=seed, vlm=vlm)
    return ALGORITHMS["vlm_lora"].build(params, ctx)


def _frozen(algo) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in algo.model.named_parameters() if "lora_" not in n}


def test_adapters_sit_on_the_language_model_only():
    vlm = tiny_vlm(C)
    every = lora_targets(vlm.model, "language_model")
    assert every and all(".language_model." in n for n in every)  # not the vision tower, not the projector
    assert {n.rsplit(".", 1)[-1] for n in every} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    attention = lora_targets(vlm.model, "attention")
    assert set(attention) < set(every) and {n.rsplit(".", 1)[-1] for n in attention} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_lora_trains_only_its_adapters_and_fits_the_shots():
    data, y = _data(legible=True)
    algo = _build(head_scale=30.0, epochs=40)
    frozen = _frozen(algo)
    shots = data.trusted.nonzero().flatten()
    x = data.views.plain(data.x[shots])
    before = (algo.predict(x).argmax(1) == y[shots]).float().mean()
    losses = [algo.train_epoch(data, epoch)["train/loss"] for epoch in range(40)]
    after = (algo.predict(x).argmax(1) == y[shots]).float().mean()
    trainable = {n for n, p in algo.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    for name, value in _frozen(algo).items():
        assert torch.equal(value, frozen[name]), name
    assert losses[-1] < 0.1 * losses[0], losses
    assert before < 0.5 and after == 1.0, (before, after)  # the random model guesses; the tuned one knows its shots


def test_it_learns_from_the_revealed_shots_alone():
    """The candidate sets of the other samples (and the annotator's labels) never enter training."""
    data, _ = _data(shots=8)
    same, _ = _data(shots=8)  # its own shuffling generator, seeded alike
    other = dataclasses.replace(same, cand=torch.where(same.trusted[:, None], same.cand, 1.0 - same.cand))
    first, second = _build(), _build()
    first.train_epoch(data, 0)
    second.train_epoch(other, 0)
    a, b = first.adapter_state(), second.adapter_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(first.clean_mask(), data.trusted)
    labels = first.pseudo_labels()
    assert torch.equal(labels[data.trusted], data.cand[data.trusted])
    torch.testing.assert_close(labels[~data.trusted], torch.full_like(labels[~data.trusted], 1.0 / C))


def test_a_cell_without_shots_is_refused():
    data, _ = _data(shots=0)
    with pytest.raises(ValueError, match="revealed few shots"):
        _build().train_epoch(data, 0)


@pytest.mark.parametrize("answer_mode", ["score", "generate"])
def test_untrained_it_predicts_what_the_annotator_answered(answer_mode):
    """Before training (B = 0) the adapted model is the annotator: its predictions are the
    annotator's own reading of the same images (mean template probabilities, or vote shares)."""
    data, _ = _data()
    x = data.views.plain(data.x[:8])
    algo = _build(answer_mode=answer_mode)
    names = [f"number {i}" for i in range(C)]
    actor = VlmActor(model=str(tiny_vlm_dir()), templates=VLM_TEMPLATES, class_names=names, answer_mode=answer_mode)
    uint8 = (x * 255).round().to(torch.uint8).numpy()
    out = actor({"index": np.arange(8), "image": uint8})
    if answer_mode == "score":
        expected = torch.from_numpy(out["probs"].astype(np.float32)).mean(1)  # stored as float16
        torch.testing.assert_close(algo.predict(x).exp(), expected, atol=2e-3, rtol=0)
    else:
        answers = out["answers"]
        votes = np.stack([(answers == c).sum(1) for c in range(C)], 1).astype(np.float32)
        shares = np.where(votes.sum(1, keepdims=True) > 0, votes / np.maximum(votes.sum(1, keepdims=True), 1), 1.0 / C)
        torch.testing.assert_close(algo.predict(x).exp(), torch.from_numpy(shares).clamp_min(1e-6), atol=1e-6, rtol=0)


def test_the_merged_model_predicts_as_the_adapted_one():
    data, _ = _data()
    algo = _build()
    for epoch in range(3):
        algo.train_epoch(data, epoch)
    x = data.views.plain(data.x)
    adapted = algo.predict(x)
    base = {n: p.detach().clone() for n, p in algo.model.named_parameters() if "base_layer.weight" in n}
    algo.model.merge_adapter()
    merged = {n: p for n, p in algo.model.named_parameters() if "base_layer.weight" in n}
    assert any(not torch.equal(base[n], merged[n]) for n in base)  # the adapters were folded into the weights
    torch.testing.assert_close(algo.predict(x), adapted, atol=1e-5, rtol=1e-5)


def test_the_answer_loss_is_the_answers_next_token_cross_entropy():
    """``answer_loss`` against a plain forward pass over prompt + name + EOS, one image at a time."""
    from trainables.common.vlm_model import VlmQuestioner

    vlm = tiny_vlm(C)
    q = VlmQuestioner(vlm.processor, vlm.model, templates=VLM_TEMPLATES, class_names=[f"number {i}" for i in range(C)])
    data, y = _data()
    images = as_images(data.views.plain(data.x[:3]))
    labels = torch.tensor([0, 3, 1])
    got = q.answer_loss(images, labels, 1)
    nll, count = 0.0, 0
    for image, c in zip(images, labels):
        answer = q.class_answer_ids(image)[1][int(c)] + [q.tokenizer.eos_token_id]
        prompt = q.prompt_inputs(image)[1]["input_ids"]
        ids = torch.cat([prompt, torch.tensor([answer])], dim=1)
        logits = vlm.model(input_ids=ids, **q.pixels([image])).logits[0, prompt.shape[1] - 1 : -1]
        nll += F.cross_entropy(logits, torch.tensor(answer), reduction="sum")
        count += len(answer)
    torch.testing.assert_close(got, nll / count, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Through the real loop, the grid and the student


@pytest.fixture(scope="module")
def vlm_trial(tmp_path_factory):
    """A finished 3-epoch vlm_lora trial on digits annotated by the tiny LLaVA in score mode (its
    probabilities stood in for, the model is real), 2 shots per class."""
    from orchestrator.annotation import vlm as vlm_mod

    grid = {
        "datasets": [{"name": "digits", "subsample": 120, "test_subsample": 40}],
        "annotators": [{"kind": "vlm", "model": str(tiny_vlm_dir()), "templates": list(VLM_TEMPLATES), "answer_mode": "score"}],
        "grid": {"shots": [2]}, "training": {"epochs": 3, "batch_size": 32},
        "methods": [{"name": "vlm_lora", "params": {"rank": 8, "alpha": 16.0, "lora_lr": 0.01}}],
    }  # fmt: skip

    def fake_probs(ds, spec, names, progress=None):  # (n, 2, 10) two templates, seeded
        rng = np.random.default_rng(0)
        return {f"probs_{s}": rng.dirichlet(np.ones(10), (len(x), 2)).astype(np.float16) for s, x in (("train", ds.train_x), ("test", ds.test_x))}

    return annotated_trial(tmp_path_factory.mktemp("vlm_student"), grid, vlm_mod, "annotate_vlm", fake_probs)


def test_a_trial_fine_tunes_the_annotators_vlm_and_checkpoints_only_the_adapters(vlm_trial):
    from trainables.loop import CHECKPOINT_FILE

    _, reported, checkpoint, _ = vlm_trial
    assert len(reported) == 3 and all(np.isfinite(m["train/loss"]) for m in reported)
    assert reported[-1]["train/loss"] < reported[0]["train/loss"]
    state = torch.load(checkpoint / CHECKPOINT_FILE, weights_only=True)
    assert state["vlm"]["model"] == str(tiny_vlm_dir()) and state["vlm"]["templates"] == list(VLM_TEMPLATES)
    adapters = state["algorithm"]["adapters"]
    assert adapters and all("lora_" in k for k in adapters)  # the base model is the annotator's, not copied


def test_the_vlm_lora_student_is_the_merged_model_and_predicts_as_the_trial(vlm_trial, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from orchestrator.student import STUDENT_PATH, log_student
    from trainables.loop import PREDICTIONS_FILE

    _, reported, checkpoint, dataset = vlm_trial
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("vlm-student", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    assert log_student(client, run_id, checkpoint, dataset)

    model = mlflow.pyfunc.load_model(f"{client.get_run(run_id).info.artifact_uri}/{STUDENT_PATH}")
    out = model.predict(dataset.test_x)  # raw (N, 1, 8, 8) uint8 images; the VLM's processor normalises
    trial_pred = np.load(checkpoint / PREDICTIONS_FILE)["test_pred"]
    np.testing.assert_array_equal(out["class_id"].to_numpy(), trial_pred)
    assert (out["class_id"].to_numpy() == dataset.test_y).mean() == pytest.approx(reported[-1]["test/acc"], abs=1e-6)

    weights = Path(client.download_artifacts(run_id, "student/artifacts/networks.pt", str(tmp_path / "w")))
    shipped = torch.load(weights, weights_only=True)["model"]
    base = tiny_vlm(10).model.state_dict()
    merged = [k for k in shipped if k.endswith("base_layer.weight")]
    original = {k: k.replace("base_model.model.", "", 1).replace(".base_layer", "") for k in merged}
    assert merged and any(not torch.equal(shipped[k], base[original[k]]) for k in merged)  # adapters folded in
    assert model.metadata.metadata["vlm"]["model"] == str(tiny_vlm_dir())
    requirements = Path(client.download_artifacts(run_id, "student/requirements.txt", str(tmp_path / "r"))).read_text()
    assert {"transformers", "peft"} <= {line.split("==")[0] for line in requirements.split()}


@pytest.mark.parametrize(
    ("annotator", "shots", "message"),
    [
        ({"kind": "synthetic"}, [2], "fine-tunes the annotator's VLM, and the synthetic annotator"),
        ({"kind": "clip", "pretrained": None}, [2], "fine-tunes the annotator's VLM, and the clip annotator"),
        ({"kind": "vlm", "model": "/nonexistent-but-named"}, [0, 2], "grid.shots holds 0"),
    ],
)
def test_grids_it_cannot_run_are_refused_before_anything_starts(annotator, shots, message):
    from orchestrator.config import GridError, parse_grid

    axes = {"shots": shots, **({"q": [0.3], "eta": [0.3]} if annotator["kind"] == "synthetic" else {})}
    with pytest.raises(GridError, match=message):
        parse_grid({
            "experiment": "x", "datasets": [{"name": "digits"}], "annotators": [annotator], "grid": axes,
            "methods": [{"name": "vlm_lora"}],
        })  # fmt: skip


def test_gradient_checkpointing_changes_no_number():
    """Recomputing the activations in the backward pass (LLaVA-1.5's memory saver, on by default)
    gives the adapters the same updates, LoRA dropout included."""
    data, _ = _data(shots=8)
    twin, _ = _data(shots=8)
    on = _build(dataclasses.replace(FAST, dropout=0.1))
    off = _build(dataclasses.replace(FAST, dropout=0.1, gradient_checkpointing=False))
    assert on.model.is_gradient_checkpointing and not off.model.is_gradient_checkpointing
    assert on.train_epoch(data, 0) == pytest.approx(off.train_epoch(twin, 0), rel=1e-6)
    a, b = on.adapter_state(), off.adapter_state()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_trial_finds_its_annotators_vlm_in_the_annotation_meta(tmp_path):
    """A VLM annotation names its model, revision, precision, questions, class names and answer
    mode; an ensemble's VLM is its first VLM member; other annotations have none. A relative model
    directory is taken from the start directory, a hub id is kept."""
    from trainables.data.annotation import write_entry
    from trainables.data.vlm_source import vlm_source

    cand = {"cand_train": np.ones((2, 3), dtype=bool)}
    annotator = {"kind": "vlm", "model": "./models/llava", "revision": "abc", "precision": "bf16", "answer_mode": "generate",
                 "max_new_tokens": 8}  # fmt: skip
    meta = {"kind": "vlm", "annotator": annotator, "templates": ["Which: {classes}?"], "class_names": ["a", "b", "c"], "stats": {}}
    write_entry(tmp_path / "syn", cand, {"kind": "synthetic", "stats": {}})
    write_entry(tmp_path / "clip", cand, {"kind": "clip", "annotator": {"kind": "clip"}, "stats": {}})
    write_entry(tmp_path / "vlm", cand, meta)
    write_entry(tmp_path / "ens", cand, {"kind": "ensemble", "members": ["syn", "clip", "vlm"], "stats": {}})
    assert vlm_source(tmp_path, "syn") is None and vlm_source(tmp_path, "clip") is None
    source = vlm_source(tmp_path, "ens")
    assert source == vlm_source(tmp_path, "vlm")
    assert (source.revision, source.precision, source.answer_mode, source.max_new_tokens) == ("abc", "bf16", "generate", 8)
    assert (source.templates, source.class_names) == (("Which: {classes}?",), ("a", "b", "c"))
    assert source.resolved(Path("/start")).model == "/start/models/llava"
    hub = dataclasses.replace(source, model="llava-hf/llava-1.5-7b-hf")
    assert hub.resolved(Path("/start")).model == "llava-hf/llava-1.5-7b-hf"
    assert type(source).from_config(source.to_config()) == source
