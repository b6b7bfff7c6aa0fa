"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray session (2 CPUs) for the whole test session; started on first use."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and OpenMP threads stall when the CPUs are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_vlm_dir():
    """A tiny random LLaVA saved as a local model directory (tests/fixtures/tiny_vlm.py), the one
    the algorithm tests use (``helpers.tiny_vlm_dir``: built once per process)."""
    from helpers import tiny_vlm_dir as built_once

    return built_once()


@pytest.fixture(scope="session")
def tiny_paligemma_dir(tmp_path_factory):
    """A tiny random PaliGemma (SigLIP + Gemma; no chat template) saved as a local model directory."""
    from fixtures.tiny_vlm_families import build_tiny_paligemma

    return build_tiny_paligemma(tmp_path_factory.mktemp("tiny_paligemma") / "model")


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(tmp_path_factory):
    """A tiny random Qwen2-VL (image grid, ``<|image_pad|>`` tokens, ChatML template) saved as a local model directory."""
    from fixtures.tiny_vlm_families import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl") / "model")


@pytest.fixture(scope="session")
def tiny_idefics3_dir(tmp_path_factory):
    """A tiny random Idefics3 (SmolVLM-Instruct's architecture: image tiles, row/column tags) saved as a local model directory."""
    from fixtures.tiny_vlm_families import build_tiny_idefics3

    return build_tiny_idefics3(tmp_path_factory.mktemp("tiny_idefics3") / "model")
