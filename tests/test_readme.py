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


def _substitute(line: str, port: int) -> str:
    return line.replace("8765", str(port))


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _check_export_line(argv: list[str], bundle: Path) -> None:
    """The README's export command, read by the exporter's own parser, asks for what the
    ``smollm2_bundle`` fixture holds: the built-in model, validated at every split, written to
    ``bundles/smollm2``. Running it again would repeat the fixture's minute of export and validation."""
    from splitllm import Bundle
    from splitllm_export.cli import build_parser
    from splitllm_export.sources.catalogue import BUILTINS

    assert Path(_bin(argv[0])).is_file(), f"{argv[0]} is not installed"
    args = build_parser().parse_args(argv[1:])
    assert (args.builtin, args.gguf, args.hf, args.tiny) == (None, None, None, None)  # the built-in model
    assert (args.skip_validate, args.validate_splits, args.client_weights) == (False, None, [])
    assert (args.layer_graphs, args.block_size, args.output) == ("fused", 32, "bundles/smollm2")
    m = Bundle.open(bundle, verify=False).manifest
    assert m["validation"]["skipped"] is False and all(r["tokens_match"] for r in m["validation"]["splits"])
    assert Bundle.open(bundle, verify=False).model_id == BUILTINS["smollm2"].model_id


@pytest.mark.smollm
def test_readme_quickstart_and_python_snippet_run(tmp_path, smollm2_bundle):
    """Every quickstart command and the Python snippet run verbatim (only the port changes) in a
    directory whose ``bundles/smollm2`` is the fixture's bundle."""
    (tmp_path / "bundles").mkdir()
    (tmp_path / "bundles" / "smollm2").symlink_to(smollm2_bundle, target_is_directory=True)
    port = free_port()
    server = None
    ran = []
    try:
        for line in _quickstart():
            if line.startswith("pip install"):
                continue  # the test environment is that install
            argv = shlex.split(_substitute(line.rstrip("&").strip(), port))
            if argv[0] == "splitllm-export":
                _check_export_line(argv, smollm2_bundle)
                ran.append(argv[0])
                continue
            argv[0] = _bin(argv[0])
            if line.endswith("&"):
                server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=tmp_path)
                assert server.stdout.readline().startswith("listening on ")
                ran.append(Path(argv[0]).name)
                continue
            r = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path)
            assert r.returncode == 0, f"{line}\n{r.stderr}"
            assert r.stdout.strip(), line
            ran.append(Path(argv[0]).name)
        assert ran == ["splitllm-export", "splitllm-server", "splitllm", "splitllm"]
        assert (tmp_path / "bundles" / "smollm2" / "manifest.json").is_file()
        (python_snippet,) = _blocks("python")
        code = _substitute(python_snippet, port)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
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
