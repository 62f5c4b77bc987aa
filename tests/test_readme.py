"""Every snippet in the README runs: the shell quickstart and the Python example."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

REPO = Path(__file__).resolve().parents[1]


def _blocks(language: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)



def _quickstart() -> list[str]:
    blocks = [b for b in _blocks("bash") if "splitllm-server" in b]
    assert len(blocks) == 1, "the README has one quickstart block"
    return [line.split("#")[0].strip() for line in blocks[0].splitlines() if line.split("#")[0].strip()]


def _substitute(line: str, bundle: Path, port: int) -> str:
    return line.replace("bundles/smollm2", str(bundle)).replace("8765", str(port))


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.mark.smollm
def test_readme_quickstart_and_python_snippet_run(tmp_path, smollm2_bundle):
    port = free_port()
    exported = tmp_path / "smollm2"
    server = None
    try:
        for line in _quickstart():
            if line.startswith("pip install"):
                continue  # the test environment is that install
            argv = shlex.split(_substitute(line.rstrip("&").strip(), exported, port))
            argv[0] = _bin(argv[0])
            if line.endswith("&"):
                server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
                assert server.stdout.readline().startswith("listening on ")
                continue
            r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, f"{line}\n{r.stderr}"
            assert r.stdout.strip(), line
        assert (exported / "manifest.json").is_file()
        (python_snippet,) = _blocks("python")
        code = _substitute(python_snippet, exported, port)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "Paris" in r.stdout and "tok/s at split 10" in r.stdout
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    text = (REPO / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    assert "make test" in (REPO / ".ci" / "run").read_text()
