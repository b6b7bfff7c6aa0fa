"""Wall time of the embedded default grid end to end, against the 10-minute budget on 2 cores.

    python benchmarks/default_grid.py

Runs ``python -m orchestrator.sweep`` exactly as a user does (fresh storage in a temporary working
directory, so nothing is cached), and prints the wall time and its ratio to the 600 s budget.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

BUDGET_S = 600.0


def main() -> None:
    workdir = tempfile.mkdtemp(prefix="bench-default-grid-")
    tic = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.sweep"], cwd=workdir, capture_output=True, text=True
    )
    wall = time.perf_counter() - tic
    sys.stdout.write(proc.stdout[-4000:])
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"sweep exited with {proc.returncode}")
    print(f"\ndefault grid end to end on {os.cpu_count()} cores: {wall:.1f} s "
          f"(ratio to the {BUDGET_S:.0f} s budget: {wall / BUDGET_S:.2f}); results in {workdir}")


if __name__ == "__main__":
    main()
