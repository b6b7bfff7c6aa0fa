"""The ``engine`` of a ``vlm`` annotator: which engine runs (``auto``), the refusals, what ``--dry-run``
says, and the vLLM path's configuration and plumbing.

vLLM itself is not installed here and needs a GPU: the vLLM engine has NOT run in these tests. What
is checked is everything around it: ``ray.data.llm.vLLMEngineProcessorConfig`` built (for real) from
the grid's settings, and the annotation stage with ``ray.data.llm.build_processor`` replaced by a
stand-in engine whose answers are written here, so that the rows sent (image, question, greedy
sampling) and the answers stored (parsed like the transformers path's) can be checked."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from pydantic import ValidationError

import orchestrator.config as config_mod
from trainables.common.answers import choice_label, fill_question
from orchestrator.annotation.stage import annotate, vlm_outputs_key
from orchestrator.annotation.vlm_check import engine_line
from orchestrator.config import DatasetSpec, VlmAnnotatorSpec
from trainables.data.datasets import load_dataset

TEMPLATES = ("What is it? {classes}", "Which one: {classes}?", "Pick: {options}")


def spec(**kw) -> VlmAnnotatorSpec:
    return VlmAnnotatorSpec(**{"kind": "vlm", "name": "llava", "templates": TEMPLATES, **kw})


@pytest.fixture
def vllm_here(monkeypatch):
    """Pretend vLLM is installed (version 0.0-test)."""
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(config_mod, "vllm_installed", lambda: True)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0-test" if name == "vllm" else real(name))


@pytest.mark.parametrize(
    "installed, gpus, mode, expected",
    [
        (True, 1.0, "generate", "vllm"),
        (True, 0.5, "generate", "vllm"),
        (True, 0.0, "generate", "transformers"),  # no GPU asked for
        (True, 1.0, "score", "transformers"),  # vLLM only generates
        (False, 1.0, "generate", "transformers"),
    ],
)
def test_auto_picks_vllm_only_where_it_can_run(monkeypatch, installed, gpus, mode, expected):
    monkeypatch.setattr(config_mod, "vllm_installed", lambda: installed)
    assert spec(gpus_per_actor=gpus, answer_mode=mode).engine_to_run() == expected
    assert spec(gpus_per_actor=gpus, answer_mode=mode, engine="transformers").engine_to_run() == "transformers"


@pytest.mark.parametrize(
    "installed, fields, message",
    [
        (True, {"answer_mode": "score", "gpus_per_actor": 1}, "engine: vllm only generates answers; answer_mode score needs engine transformers"),
        (True, {"gpus_per_actor": 0}, "engine: vllm runs on GPUs only; set gpus_per_actor > 0"),
        (True, {"gpus_per_actor": 1.5}, "engine: vllm takes a fraction of one GPU or a whole number of GPUs (tensor parallel), not gpus_per_actor 1.5"),
        (False, {"gpus_per_actor": 1}, "engine: vllm is not installed here (pip install vllm); use engine transformers or auto"),
    ],
)
def test_vllm_refusals_name_the_key(monkeypatch, installed, fields, message):
    monkeypatch.setattr(config_mod, "vllm_installed", lambda: installed)
    with pytest.raises(ValidationError, match="engine: vllm") as info:
        spec(engine="vllm", **fields)
    assert message in str(info.value)


def test_vllm_is_accepted_where_it_can_run(vllm_here):
    assert spec(engine="vllm", gpus_per_actor=2).engine_to_run() == "vllm"


def test_dry_run_says_which_engine_and_why(monkeypatch, vllm_here):
    import transformers

    line = engine_line("annotators[0]", spec(gpus_per_actor=1))
    assert line == (
        "annotators[0] (llava): engine vllm 0.0-test through Ray Data's LLM processor (ray.data.llm, engine: auto), "
        "answer_mode generate, 1 actor(s) x 1 GPU, fp32"
    )
    assert engine_line("a", spec(answer_mode="score", gpus_per_actor=1)).endswith("; vLLM is installed but only generates (answer_mode score)")
    assert engine_line("a", spec()).endswith("; vLLM is installed but this annotator asks for no GPU")
    assert engine_line("a", spec(engine="transformers", gpus_per_actor=1)).endswith("; engine: transformers asked for")
    monkeypatch.setattr(config_mod, "vllm_installed", lambda: False)
    assert engine_line("annotators[2]", spec(precision="bf16")) == (
        f"annotators[2] (llava): engine transformers {transformers.__version__} (AutoModelForImageTextToText), "
        "answer_mode generate, 1 actor(s) x CPU, bf16; vLLM not installed"
    )


def test_processor_config_follows_the_grid(vllm_here, tmp_path):
    from ray.data.llm import vLLMEngineProcessorConfig

    from orchestrator.annotation.vlm_vllm import processor_config

    whole = processor_config(spec(engine="vllm", gpus_per_actor=2, num_actors=3, batch_size=32, precision="bf16", revision="abc"))
    assert isinstance(whole, vLLMEngineProcessorConfig)
    assert (whole.model_source, whole.batch_size, whole.concurrency) == ("llava-hf/llava-1.5-7b-hf", 32, 3)
    assert whole.engine_kwargs == {
        "dtype": "bfloat16", "limit_mm_per_prompt": {"image": 1}, "revision": "abc", "tensor_parallel_size": 2, "task_type": "generate",
    }  # fmt: skip
    assert whole.placement_group_config["bundle_per_worker"] == {"GPU": 1.0, "CPU": 1.0}
    assert all(getattr(whole, f"{s}_stage")["enabled"] for s in ("prepare_multimodal", "chat_template", "tokenize", "detokenize"))
    (tmp_path / "llava").mkdir()
    half = processor_config(spec(engine="vllm", gpus_per_actor=0.25, cpus_per_actor=2, model=str(tmp_path / "llava"), precision="fp16"))
    assert half.model_source == str(tmp_path / "llava") and half.concurrency == 1
    assert half.engine_kwargs["gpu_memory_utilization"] == pytest.approx(0.225) and "tensor_parallel_size" not in half.engine_kwargs
    assert half.placement_group_config["bundle_per_worker"] == {"GPU": 0.25, "CPU": 2.0} and half.engine_kwargs["dtype"] == "float16"


def test_the_engine_is_in_the_outputs_key_only_for_vllm(vllm_here, monkeypatch):
    digits = load_dataset(DatasetSpec(name="digits", subsample=8, test_subsample=4))
    gpu = spec(gpus_per_actor=1)
    monkeypatch.setattr(config_mod, "vllm_installed", lambda: False)
    on_transformers = vlm_outputs_key(digits, gpu)
    assert on_transformers == vlm_outputs_key(digits, spec(gpus_per_actor=1, engine="transformers"))
    monkeypatch.setattr(config_mod, "vllm_installed", lambda: True)
    assert vlm_outputs_key(digits, gpu) != on_transformers  # auto now resolves to vLLM


def fake_build_processor(config, preprocess, postprocess, labels, class_names, sent):
    """A stand-in for ``ray.data.llm.build_processor``: answers every request from the image's true
    label, in a different form per template (the parser must map them back)."""
    sent.append(config)

    def reply(row):
        req = preprocess(row)
        label, t = int(labels[req["index"]]), req["template"]
        text = [f"  It is a {class_names[label]}.", f"{class_names[label]} or {class_names[(label + 1) % 10]}", f"{choice_label(label, 10)}."][t]
        return postprocess({**req, "generated_text": text, "generated_tokens": [1, 2]})

    return lambda ds: ds.map(reply)


@pytest.mark.ray
def test_vllm_path_sends_image_and_question_and_stores_parsed_answers(ray_session, vllm_here, monkeypatch, tmp_path):
    import ray.data.llm
    from PIL import Image

    from orchestrator.annotation import vlm as vlm_mod
    from orchestrator.annotation import vlm_vllm

    digits = load_dataset(DatasetSpec(name="digits", subsample=12, test_subsample=4))
    labels = np.concatenate([digits.train_y, digits.test_y])
    sent: list = []
    monkeypatch.setattr(
        ray.data.llm, "build_processor",
        lambda config, preprocess, postprocess: fake_build_processor(config, preprocess, postprocess, labels, digits.class_names, sent),
    )  # fmt: skip
    monkeypatch.setattr(vlm_mod, "annotate_vlm", lambda *a, **k: pytest.fail("the transformers engine ran instead of vLLM"))
    got = annotate(digits, spec(gpus_per_actor=1, batch_size=4, max_new_tokens=7), cache_dir=tmp_path)  # engine auto -> vllm
    assert sent[0].batch_size == 4 and sent[0].engine_kwargs["tensor_parallel_size"] == 1
    answers = np.concatenate([got.answers_train, got.answers_test])
    assert answers[:, 0].tolist() == labels.tolist() and answers[:, 2].tolist() == labels.tolist()
    assert (answers[:, 1] == -1).all()  # two classes named: unparseable, never guessed
    assert got.stats["unparseable_rate_t1"] == 1.0 and got.stats["zs_acc_test"] == 1.0
    assert got.meta["raw_answers"][0]["answer"] == f"It is a {digits.class_names[digits.train_y[0]]}."  # stripped
    req = vlm_vllm.request({"index": 3, "template": 1, "url": vlm_vllm.png_data_url(digits.train_x[3])},
                           questions=[fill_question(t, list(digits.class_names)) for t in TEMPLATES], max_new_tokens=7)  # fmt: skip
    image, text = req["messages"][0]["content"]
    assert text == {"type": "text", "text": fill_question(TEMPLATES[1], list(digits.class_names))}
    png = base64.b64decode(image["image_url"]["url"].removeprefix("data:image/png;base64,"))
    decoded = np.asarray(Image.open(io.BytesIO(png)))
    assert decoded.shape == (8, 8, 3) and (decoded == digits.train_x[3][0][..., None]).all()
    assert req["sampling_params"] == {"temperature": 0.0, "max_tokens": 7, "detokenize": False}


def test_vllm_needs_a_chat_template_in_a_local_model(vllm_here, tmp_path):
    """A model without a chat template (PaliGemma) cannot go through Ray's chat template stage: the
    check before Ray says so, and the transformers engine (which formats its raw prompt) is not refused."""
    from orchestrator.annotation.vlm_check import vlm_problems

    model = tmp_path / "paligemma"
    model.mkdir()
    for name, text in (("config.json", "{}"), ("model.safetensors", ""), ("tokenizer.json", "{}"),
                       ("tokenizer_config.json", '{"chat_template": null}'), ("processor_config.json", "{}")):  # fmt: skip
        (model / name).write_text(text)
    on_vllm = spec(model=str(model), engine="vllm", gpus_per_actor=1)
    assert vlm_problems("annotators[0]", on_vllm, []) == [
        f"annotators[0].model: {model} has no chat template, which the vllm engine needs (Ray's chat template stage); "
        "set engine: transformers (it formats such a model's raw prompt)"
    ]
    assert vlm_problems("annotators[0]", spec(model=str(model), engine="transformers", gpus_per_actor=1), []) == []
    (model / "chat_template.jinja").write_text("{{ messages }}")
    assert vlm_problems("annotators[0]", on_vllm, []) == []
