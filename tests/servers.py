"""Local server processes for the tests: a free port, then a command started in its own process
group, waited for until it answers over HTTP, and stopped with its children at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def env_with_venv_bin(**extra: str) -> dict[str, str]:
    """This environment with the interpreter's bin directory first on PATH, as in an activated
    environment (``mlflow models serve`` starts ``uvicorn``, a Ray job runs ``python``)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), **extra}


@contextlib.contextmanager
def serving(
    argv: list[str], probe_url: str, log_path: Path, *, env: dict[str, str] | None = None, timeout_s: float = 240,
    ready=lambda body: True,
) -> Iterator[subprocess.Popen]:
    """Run ``argv`` until the block ends; enter the block once ``probe_url`` answers (any HTTP
    status counts as an answer unless ``ready(body)`` of a 200 says otherwise). SIGTERM goes to the
    whole process group (servers with workers, ``ray start --block`` with its Ray processes)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    with urllib.request.urlopen(probe_url, timeout=5) as response:
                        if ready(response.read()):
                            break
                except urllib.error.HTTPError:  # answering: an authentication error is still an answer
                    break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{' '.join(argv[:4])} did not come up:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield proc
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
