"""The example chatbot, driven in a real pseudo-terminal as a person would use it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from splitllm import GenerationStats
from splitllm.cli.chat_ui import speed_summary

pexpect = pytest.importorskip("pexpect")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server_url(tiny_export):
    path, _ = tiny_export("llama", layers=3)
    proc = subprocess.Popen([sys.executable, "-m", "splitllm_server.cli", "--bundle", str(path), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    yield path, line.split()[-1]
    proc.terminate()
    proc.wait(timeout=30)


def test_interactive_chat_in_a_terminal(server_url):
    path, url = server_url
    child = pexpect.spawn(sys.executable, [str(REPO / "examples" / "chatbot.py"), "--bundle", str(path),
                                           "--server", url, "--split", "2", "--max-new-tokens", "8"],
                          encoding="utf-8", timeout=60, dimensions=(40, 200))
    try:
        child.expect("commands: /split K")
        child.expect("you> ")
        child.sendline("Hello there")
        child.expect("bot> ")
        child.expect(r"\[\d+ tokens?, first in \d+ ms(, then [\d.]+ tok/s)?, layers 0-1 here, the rest on the server")
        child.expect(r"of the work kept off the server, codec int8-block64, (\d[^\]]* kept\), )?rtt [\d.]+ ms")  # speculation adds its figures when it pays
        child.expect("you> ")
        child.sendline("/split 1")
        child.expect(r"\(split 1: layers 0-0 run here\)")
        child.sendline("/codec fp16")
        child.expect(r"\(codec fp16\)")
        child.sendline("/codec nope")
        child.expect("unknown codec")
        child.sendline("And then?")
        child.expect(r"layers 0 here, the rest on the server")
        child.expect("codec fp16")
        child.sendline("/reset")
        child.expect(r"\(conversation cleared\)")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_scripted_turns_and_the_cli_chat(server_url):
    path, url = server_url
    r = subprocess.run([sys.executable, str(REPO / "examples" / "chatbot.py"), "--bundle", str(path), "--server", url,
                        "--max-new-tokens", "6", "--once", "Hi", "--once", "Again"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("bot> ") == 2
    summaries = re.findall(r"\[(\d+) tokens?, first in \d+ ms(, then [\d.]+ tok/s)?, ", r.stdout)
    assert len(summaries) == 2 and all(bool(then) == (int(n) > 1) for n, then in summaries), r.stdout
    r = subprocess.run([sys.executable, "-m", "splitllm.cli", "chat", "--bundle", str(path), "--server", url,
                        "--split", "1", "--max-new-tokens", "4", "--once", "Hi"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "bot> " in r.stdout and "layers 0 here" in r.stdout
    r = subprocess.run([sys.executable, "-m", "splitllm.cli", "generate", "--bundle", str(path), "--server", url,
                        "--max-new-tokens", "5", "--speculate", "2", "--drafter", "model", "--json", "Hi"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["ttft_ms"] == pytest.approx(got["first_token_s"] * 1e3, abs=0.1)
    assert (got["decode_tokens_per_s"] > 0) == (got["new_tokens"] > 1)
    assert (got["draft_load_s"] > 0) == (got["drafted"] > 0)  # a fresh client's first draft loads the model
    assert got["new_tokens"] == 1 or got["drafted"] > 0


def test_speed_is_shown_as_the_first_token_wait_and_the_decode_rate_after_it():
    """A first reply that waits 3 s (prompt, loading, warm-up) for its first token, then decodes 7
    more in 0.7 s: 10 tok/s decoding, not the 2 tok/s that all tokens over all the time would say."""
    stats = GenerationStats(new_tokens=8, seconds=3.7, first_token_s=3.0)
    assert stats.ttft_ms == pytest.approx(3000.0)
    assert stats.decode_tokens_per_s == pytest.approx(10.0)
    assert stats.tokens_per_s == pytest.approx(8 / 3.7)
    assert speed_summary(stats) == "8 tokens, first in 3000 ms, then 10.0 tok/s"
    one = GenerationStats(new_tokens=1, seconds=0.5, first_token_s=0.5)
    assert one.decode_tokens_per_s == 0.0 and speed_summary(one) == "1 token, first in 500 ms"
    loading = GenerationStats(new_tokens=8, seconds=8.2, first_token_s=3.0, draft_load_s=4.5)
    assert loading.decode_tokens_per_s == pytest.approx(10.0)
    assert speed_summary(loading) == "8 tokens, first in 3000 ms, then 10.0 tok/s (and 4.5 s loading the draft model, once)"
