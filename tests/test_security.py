"""Nothing gets in through a checkpoint: planted pickles are refused, tag paths are checked."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from orchestrator.sweep import checked_checkpoint
from trainables.loop import CHECKPOINT_FILE, load_checkpoint


class _Payload:
    """Unpickling this creates ``marker``: what a planted checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_pickle_in_a_checkpoint_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"algorithm": {}, "epoch": 1, "payload": _Payload(marker)}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_a_checkpoint_tag_is_used_only_inside_the_sweeps_results(tmp_path, capsys):
    storage = tmp_path / "results"
    inside = storage / "ray_results" / "exp" / "trial_1" / "checkpoint_000003"
    assert checked_checkpoint(str(inside), storage) == str(inside.resolve())
    assert checked_checkpoint(None, storage) is None and checked_checkpoint("", storage) is None
    for outside in (str(tmp_path / "elsewhere"), str(storage / "ray_results" / ".." / ".." / "x"), "/etc"):
        assert checked_checkpoint(outside, storage) is None
    assert "outside" in capsys.readouterr().out
