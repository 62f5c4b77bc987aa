"""Speculative decoding across the split: the greedy tokens, whatever the drafts, placements and faults."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import pytest
from helpers import chat_ids, free_port

from splitllm import errors
from splitllm.client import SplitClient
from splitllm.model.bundle import Bundle
from splitllm.speculate import GammaController, NgramDrafter, parse_speculate
from splitllm_export.validate.splits import reference_run

TOKENS = 20


async def _generate(client: SplitClient, ids, n: int = TOKENS, **kw) -> list[int]:
    async for _ in client.generate_ids(ids, max_new_tokens=n, **{"ignore_eos": True, **kw}):
        pass
    return client.last_stats.new_ids


def _corrupt_drafts(client: SplitClient, wrong_at: int) -> None:
    """Make every draft number ``wrong_at`` (and so everything after it) wrong."""
    exact = client._draft

    def drafts(context, gamma):
        out = exact(context, gamma)
        if wrong_at < len(out):
            out[wrong_at] = (out[wrong_at] + 1) % client.bundle.shapes.vocab_size
        return out

    client._draft = drafts  # type: ignore[method-assign]


async def test_greedy_tokens_are_those_of_plain_decoding_at_every_split_and_rejection_point(tiny_export,
                                                                                            start_server):
    path, source = tiny_export("llama", layers=3)
    ids = chat_ids(source, "Tell me a story about a robot.")
    ref = reference_run(source.model, ids, TOKENS - 1).tokens
    server = await start_server(path)
    for split in range(4):
        for wrong_at in (0, 1, 2, 3, 99):  # 99: every draft right
            async with SplitClient(path, server.url, split=split, codec="fp32", speculate=4) as client:
                _corrupt_drafts(client, wrong_at)
                assert await _generate(client, ids) == ref, (split, wrong_at)
                stats = client.last_stats
                assert stats.drafted > 0
                if wrong_at == 99:
                    assert stats.accepted == stats.drafted and stats.steps < TOKENS // 2
                else:
                    assert stats.accepted <= wrong_at * (stats.steps - 1)  # none past a wrong draft
    # The next turn reuses the conversation's KV: it must hold exactly the accepted positions.
    async with SplitClient(path, server.url, split=1, codec="fp32", speculate=3) as client:
        _corrupt_drafts(client, 1)
        first = await _generate(client, ids, n=8)
        follow = [*ids, *first, *chat_ids(source, "And then?")[1:]]
        assert await _generate(client, follow, n=8) == reference_run(source.model, follow, 7).tokens


async def test_several_side_switches_and_the_head_on_either_side(tiny_export, start_server):
    path, source = tiny_export("llama", layers=4)  # units: embeddings, 4 layers, head
    ids = chat_ids(source, "Name three colours.")
    ref = reference_run(source.model, ids, TOKENS - 1).tokens
    server = await start_server(path)
    for sides in (("client", "server", "client", "server", "server", "client"),
                  ("client", "client", "server", "client", "server", "server")):
        async with SplitClient(path, server.url, codec="fp32", speculate=3) as client:
            client.set_placement(sides)
            _corrupt_drafts(client, 1)
            assert await _generate(client, ids) == ref, sides


async def test_ngram_drafts_and_adaptive_gamma_keep_the_tokens(tiny_export, start_server):
    path, source = tiny_export("llama", layers=3)
    text = "one two three four one two three four one two three four one two"
    ids = chat_ids(source, text)
    ref = reference_run(source.model, ids, TOKENS - 1).tokens
    server = await start_server(path)
    async with SplitClient(path, server.url, split=2, codec="fp32", drafter="ngram", speculate=4) as client:
        assert await _generate(client, ids) == ref
    async with SplitClient(path, server.url, split=2, codec="fp32") as client:  # auto: measured, adaptive
        assert await _generate(client, ids) == ref


async def test_drafts_stop_at_eos_and_at_the_context_limit(tiny_export, start_server, monkeypatch):
    path, source = tiny_export("llama", layers=3)
    ids = chat_ids(source, "Count to ten.")
    ref = reference_run(source.model, ids, TOKENS - 1).tokens
    eos = ref[6]
    expected = ref[:ref.index(eos) + 1]
    server = await start_server(path, max_context=len(ids) + 9)
    for speculate in ("off", 5):
        async with SplitClient(path, server.url, split=1, codec="fp32", speculate=speculate) as client:
            monkeypatch.setattr(client.text, "eos_ids", frozenset({eos}))
            assert await _generate(client, ids, n=9, ignore_eos=False) == expected
            assert client.last_stats.stop_reason == "eos"
            # Up to the last position the server allows: drafts are cut to fit, nothing is refused.
            assert await _generate(client, ids, n=9) == ref[:9]
            with pytest.raises(errors.ContextTooLong):
                await _generate(client, ids, n=10)


async def test_sampling_is_not_speculated(tiny_export, start_server):
    path, source = tiny_export("llama", layers=3)
    ids = chat_ids(source, "Say something.")
    server = await start_server(path)
    async with SplitClient(path, server.url, split=1, codec="fp32", speculate=4) as client:
        await _generate(client, ids, n=10, temperature=0.8, seed=3)
        assert client.last_stats.drafted == 0 and client.last_stats.steps == 10


async def test_a_server_killed_mid_verification_is_replaced_and_the_tokens_stay(tiny_export):
    path, source = tiny_export("llama", layers=3)
    ids = chat_ids(source, "Tell me about rivers.")
    ref = reference_run(source.model, ids, 31).tokens
    port = free_port()

    def spawn() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "splitllm_server.cli", "--bundle", str(path), "--port",
                                 str(port), "--no-spinning"], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().startswith("listening on ")
        return proc

    procs = [spawn()]
    try:
        async with SplitClient(path, f"http://127.0.0.1:{port}", split=1, codec="fp32", speculate=3,
                               failover_timeout_s=60, fallback_local=False) as client:
            exact = client._draft
            rounds = 0

            def drafts(context, gamma):
                nonlocal rounds
                rounds += 1
                if rounds == 3:  # the drafts are made; the verification will find the server gone
                    procs[0].kill()
                    procs[0].wait(timeout=30)
                    threading.Thread(target=lambda: procs.append(spawn()), daemon=True).start()
                return exact(context, gamma)

            client._draft = drafts  # type: ignore[method-assign]
            assert await _generate(client, ids, n=32) == ref
            assert client.failovers == 1 and rounds > 3
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)


def test_speculate_settings_and_the_gamma_model():
    assert parse_speculate("auto") is None and parse_speculate("off") == 0 and parse_speculate(3) == 3
    for bad in ("sometimes", -1, 99):
        with pytest.raises(errors.ConfigError):
            parse_speculate(bad)
    assert NgramDrafter().propose([1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]
    assert NgramDrafter(min_n=3).propose([5, 6, 7, 8], 2) == []
    controller = GammaController()
    assert controller.gamma(1.0) == 0 and controller.gamma(40.0) == 4  # before any measurement
    for _ in range(20):  # drafts nearly always right, cheap next to a 40 ms round trip
        controller.observe(4, 4, draft_ms=8.0, verify_ms=10.0)
    assert controller.gamma(40.0) >= 4
    for _ in range(30):  # drafts nearly always wrong: not worth making
        controller.observe(4, 0, draft_ms=8.0, verify_ms=10.0)
    assert controller.gamma(40.0) == 0
    slow = GammaController()
    for _ in range(20):  # right, but each draft costs twice a whole verification
        slow.observe(4, 4, draft_ms=80.0, verify_ms=10.0)
    assert slow.gamma(0.5) == 0 and slow.gamma(100.0) > 0  # pays only where the round trip is long


@pytest.mark.smollm
async def test_smollm2_speculation_keeps_the_greedy_tokens(smollm2_bundle, start_server):
    text = Bundle.open(smollm2_bundle).text
    ids = text.encode_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    server = await start_server(smollm2_bundle)
    for split in (0, 10, 29):
        async with SplitClient(smollm2_bundle, server.url, split=split, codec="fp32", speculate="off") as plain:
            ref = await _generate(plain, ids, n=24)
        async with SplitClient(smollm2_bundle, server.url, split=split, codec="fp32", speculate=4) as client:
            _corrupt_drafts(client, 2)
            assert await _generate(client, ids, n=24) == ref, split
        await asyncio.sleep(0)
