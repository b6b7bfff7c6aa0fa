"""A corpus of malformed grid files (tests/malformed_grids/), each with exactly one thing wrong.

Every file starts with ``# expect: <substring>``: the refusal must be a :class:`GridError` (never a
traceback) whose message contains it, naming the key. Files with a ``# via: sweep --dry-run`` line
go through ``python -m orchestrator.sweep <file> --dry-run``, which must exit 2 with the expectation
on stderr (the checks of data sets, model files and storage happen only there).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import GridError, load_grid
from orchestrator.sweep import main

CORPUS = Path(__file__).with_name("malformed_grids")
FILES = sorted(CORPUS.glob("*.yaml"))
ROOT = Path(__file__).resolve().parents[1]


def header(path: Path) -> tuple[str, bool]:
    """The ``# expect:`` substring and whether the file goes through ``--dry-run`` (headers are ASCII)."""
    lines = path.read_bytes().split(b"\n")
    first = lines[0].decode("ascii")
    assert first.startswith("# expect: "), f"{path.name}: the first line must be '# expect: <substring>'"
    via = any(line.decode("ascii", "replace").strip() == "# via: sweep --dry-run" for line in lines[1:3])
    return first.removeprefix("# expect: ").strip(), via


def test_corpus_is_large_and_well_formed():
    assert len(FILES) >= 60
    names = [p.name for p in FILES]
    assert len({n.split("_", 1)[0] for n in names}) == len(names), "file numbers must be distinct"
    for path in FILES:
        expect, _ = header(path)
        assert expect, f"{path.name}: empty expectation"


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_malformed_grid_is_refused(path: Path, capsys, monkeypatch):
    expect, via_sweep = header(path)
    if via_sweep:
        monkeypatch.chdir(ROOT)  # files name fixtures relative to the repository root
        assert load_grid(path)  # valid as a grid: only the dry run's input checks refuse it
        assert main([str(path), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert expect in err, err
        return
    with pytest.raises(GridError) as info:
        load_grid(path)
    assert expect in str(info.value), str(info.value)


HEAVY = ("ray", "mlflow", "torch", "torchvision", "sklearn", "scipy", "pandas", "open_clip", "transformers")


@pytest.mark.parametrize("grid", [FILES[0], ROOT / "tests" / "fixtures" / "grid_two_rounds_of_errors.yaml"], ids=["schema", "two_rounds"])
def test_help_and_a_bad_grid_answer_fast_without_the_heavy_libraries(grid):
    """``--help`` is answered before the heavy imports; a bad grid is refused without importing Ray,
    MLflow, torch, scikit-learn or the model libraries (the methods' declarations in
    ``trainables/params/`` are torch-free). Times are printed (``pytest -s``); the bounds are generous
    for a busy machine: idle, both answer in about 0.4 s."""
    import subprocess
    import sys
    import time

    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator.sweep", "--help"], cwd=ROOT, capture_output=True, text=True)
    help_s = time.perf_counter() - tic
    assert done.returncode == 0 and "--dry-run" in done.stdout
    probe = (
        "import sys; from orchestrator.sweep import main; rc = main([sys.argv[1]]); "
        f"print(rc, *sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    tic = time.perf_counter()
    bad = subprocess.run([sys.executable, "-c", probe, str(grid)], cwd=ROOT, capture_output=True, text=True)
    bad_s = time.perf_counter() - tic
    print(f"sweep --help: {help_s:.2f} s; bad grid refused: {bad_s:.2f} s")
    assert bad.stdout.split() == ["2"], bad.stdout + bad.stderr  # exit code 2, none of them imported
    assert help_s < 4.0
    assert bad_s < 10.0


def test_a_schema_error_and_a_missing_data_set_are_reported_in_one_round(capsys):
    """The parameter error and the data set that is not there, both in the one refusal."""
    path = ROOT / "tests" / "fixtures" / "grid_two_rounds_of_errors.yaml"
    assert main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "methods[0].params.nope: unknown parameter of cc" in err
    assert "datasets[0] (fashion_mnist): fashion_mnist: data set files not found" in err


def test_a_schema_error_does_not_hide_the_methods_problems(capsys):
    """The schema refuses the data set's name; the methods' unknown parameter and inverted search
    bounds come in the same refusal."""
    path = ROOT / "tests" / "fixtures" / "grid_schema_and_method_errors.yaml"
    assert main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "datasets[0].name: unknown dataset 'digitz' (did you mean 'digits'?)" in err
    assert "methods[0].params.foo: unknown parameter of cc" in err
    assert "methods[1].search.space.lr: low 0.1 > high 0.01" in err
