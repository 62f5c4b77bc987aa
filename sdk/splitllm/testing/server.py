"""Start a splitllm-server subprocess on a free loopback port (for examples, benchmarks, demos)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from splitllm.errors import ServerUnavailable


def spawn(
    bundle: Path | str,
    extra_args: Sequence[str] = (),
    timeout_s: float = 180.0,
    *,
    stderr: Any = None,
    preexec_fn: Callable[[], Any] | None = None,
) -> tuple[subprocess.Popen[str], str]:
    """Run ``splitllm-server --bundle BUNDLE --port 0 --no-spinning EXTRA`` and wait for its URL.

    Returns the process and the URL from its ``listening on`` line; the caller terminates it.
    ``stderr`` and ``preexec_fn`` go to ``subprocess.Popen`` (e.g. a log file, or a hook that
    ties the server's life to the caller's). Raises ServerUnavailable if it exits or stays
    silent for ``timeout_s``.
    """
    cmd = [sys.executable, "-m", "splitllm_server.cli", "--bundle", str(bundle), "--port", "0", "--no-spinning",
           *extra_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, preexec_fn=preexec_fn)
    deadline = time.monotonic() + timeout_s
    while proc.stdout is not None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("listening on "):
            return proc, line.split()[-1]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    proc.wait(timeout=30)
    raise ServerUnavailable(f"splitllm-server for {bundle} did not start (exit code {proc.returncode})")


def stop(proc: subprocess.Popen[str], timeout_s: float = 30.0) -> int:
    """Terminate a server started by :func:`spawn`, killing it if it has not exited after ``timeout_s``.

    Returns its exit code. Does nothing to a process that has already exited.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
