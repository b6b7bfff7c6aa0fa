"""Put a sweep's own results tables into the README, with the machine and date they were measured on.

    python scripts/readme_tables.py README.md default-grid --tracking-uri sqlite:///results/mlflow.db \
        --experiment coreg-digits-default

The README marks where each block goes::

    <!-- results:default-grid -->
    ... (replaced) ...
    <!-- /results:default-grid -->

The block becomes one line naming the sweep run, its machine (the parent run's ``machine`` tag)
and its start date, then the run's ``tables/results.md`` as the sweep logged it (headings one level
deeper), so the README's numbers are the sweep's and cannot drift from them. The sweep is the latest
run tagged ``kind=sweep`` of ``--experiment``, or ``--run-id``. Exit status 2 when the README has no
such block or the sweep has no tables.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stdout: the script's own lines only

MACHINE_TAG = "machine"
"""``orchestrator.runs.MACHINE``."""
RESULTS_MD = "tables/results.md"


def block(client, run_id: str, command: str) -> str:
    """The README block of sweep run ``run_id``: provenance line and its results tables."""
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        tables = Path(client.download_artifacts(run_id, RESULTS_MD, tmp)).read_text()
    experiment = client.get_experiment(run.info.experiment_id).name
    when = time.strftime("%Y-%m-%d", time.gmtime(run.info.start_time / 1000))
    machine = run.data.tags.get(MACHINE_TAG, "an unrecorded machine")
    head = (
        f"Measured on {machine}, {when} (sweep run `{run_id}` of experiment `{experiment}`, "
        f"status {run.info.status}); written by `{command}`."
    )
    return head + "\n\n" + re.sub(r"^(#+) ", r"\1# ", tables.strip(), flags=re.M) + "\n"


def replace_block(text: str, name: str, content: str) -> str:
    """``text`` with the block ``name`` replaced by ``content`` (ValueError: no such block)."""
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), flags=re.S)
    if not pattern.search(text):
        raise ValueError(f"no block {start} ... {end} in the file")
    return pattern.sub(lambda _: f"{start}\n{content}{end}", text, count=1)


def latest_sweep(client, experiment: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    found = [] if exp is None else client.search_runs(
        [exp.experiment_id], "tags.kind = 'sweep'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not found:
        raise ValueError(f"no sweep run in experiment {experiment!r}")
    return found[0].info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("readme", type=Path)
    parser.add_argument("name", help="the block's name (<!-- results:NAME -->)")
    parser.add_argument("--tracking-uri", required=True)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="take the experiment's latest sweep")
    which.add_argument("--run-id", help="the sweep's parent run")
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.tracking_uri)
    command = f"python scripts/readme_tables.py {args.readme.name} {args.name} --tracking-uri <uri> " + (
        f"--experiment {args.experiment}" if args.experiment else f"--run-id {args.run_id}"
    )
    try:
        run_id = args.run_id or latest_sweep(client, args.experiment)
        text = replace_block(args.readme.read_text(), args.name, block(client, run_id, command))
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # an MLflow error: no such run, no tables artifact
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    args.readme.write_text(text)
    print(f"{args.readme}: block {args.name!r} now holds the tables of sweep run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
