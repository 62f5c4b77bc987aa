"""Continuous batching on the server: exact tokens, sessions joining and leaving, faults kept alone."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from helpers import chat_ids

from splitllm import codec as codecs
from splitllm import errors
from splitllm.client import SplitClient
from splitllm.model.bundle import DEFAULT_VARIANT, Bundle
from splitllm.model.runtime import RuntimeOptions
from splitllm.model.sampling import SamplingParams
from splitllm.planner.costs import PhaseSLA
from splitllm.planner.profile import Profile
from splitllm.protocol import wire
from splitllm.protocol.plan import PlanRequest
from splitllm_export.validate.splits import reference_run
from splitllm_server.costcurve import BatchCurve
from splitllm_server.pieces import PieceCache

PROMPTS = ["Tell me a story about a robot.", "What is two plus two?", "Name a colour.", "Say hello.",
           "Why is the sky blue?", "Count to five.", "Write a haiku.", "Describe a cat."]


async def _generate(client: SplitClient, ids, n: int, **kw) -> list[int]:
    async for _ in client.generate_ids(ids, max_new_tokens=n, ignore_eos=True, **kw):
        pass
    return client.last_stats.new_ids


def _watch_batches(server) -> list[float]:
    rows: list[float] = []
    server.state.engine.observe(lambda name, value: rows.append(value) if name == "batch_rows" else None)
    return rows


async def _run_clients(path, url, plans, *, stagger_s: float = 0.0):
    """Each plan: (split, prompt ids, tokens, leave_after or None); client i starts i*stagger_s late.

    A client with leave_after disconnects after that many tokens (its tokens so far are returned)."""

    async def one(i, split, ids, n, leave_after):
        await asyncio.sleep(i * stagger_s)
        client = SplitClient(path, url, split=split, codec="fp32", speculate="off")  # one position a step
        await client.connect()
        try:
            out: list[int] = []
            async for piece in client.generate_ids(ids, max_new_tokens=n, ignore_eos=True):
                out.append(piece.token_id)
                if leave_after is not None and len(out) >= leave_after:
                    break
            return client.last_stats.new_ids if leave_after is None else out
        finally:
            await client.close()

    return await asyncio.gather(*(one(i, *plan) for i, plan in enumerate(plans)))


async def test_mixed_splits_joining_and_leaving_get_the_tokens_of_the_serial_engine(tiny_export, start_server):
    path, source = tiny_export("llama", layers=4)
    prompts = [chat_ids(source, p) for p in PROMPTS[:6]]
    # Splits 0..4, one client leaving after 5 tokens, the others joining 20 ms apart.
    plans = [(i % 5, ids, 40, 5 if i == 2 else None) for i, ids in enumerate(prompts)]
    serial = await start_server(path, max_batch=1, chunk_units=2)
    batched = await start_server(path, max_batch=8, chunk_units=2, batch_window_ms=20)
    rows = _watch_batches(batched)
    expected = await _run_clients(path, serial.url, plans)
    got = await _run_clients(path, batched.url, plans, stagger_s=0.02)
    assert got == expected
    refs = [reference_run(source.model, ids, 39).tokens for ids in prompts]
    assert [g for g, plan in zip(got, plans, strict=True) if plan[3] is None] == [
        r for r, plan in zip(refs, plans, strict=True) if plan[3] is None]
    assert max(rows) > 1, "no two sessions' steps ever ran as one batch"
    assert not batched.state.engine.executor.stores  # every slot given back


async def test_long_prompt_runs_in_chunks_between_the_others_steps(tiny_export, start_server):
    path, source = tiny_export("llama", layers=4)
    long_ids = chat_ids(source, " ".join(PROMPTS) * 3)
    short = [chat_ids(source, p) for p in PROMPTS[:3]]
    server = await start_server(path, max_batch=8, prefill_chunk=8, batch_window_ms=5)
    plans = [(1, long_ids, 6, None)] + [(2, ids, 12, None) for ids in short]
    got = await _run_clients(path, server.url, plans)
    refs = [reference_run(source.model, ids, n - 1).tokens for _, ids, n, _ in plans]
    assert got == refs
    assert len(long_ids) > 8 * 4  # the prompt did need several chunks


def test_pieces_are_built_off_the_engine_thread_and_a_failed_build_is_reported(tiny_export):
    """The engine asks ready(): a missing piece builds on the loader thread while the engine
    goes on with the others' steps; its error reaches the engine once, nothing half-loaded."""
    path, _ = tiny_export("llama", layers=4)
    cache = PieceCache(Bundle.open(path), RuntimeOptions(intra_op_threads=1), DEFAULT_VARIANT, max_pieces=8)
    built = threading.Event()
    key = cache.key(1, 3)
    # Starts the build on the loader thread and returns at once: False, or True when the loader
    # was quicker than this thread (a tiny piece on a loaded machine).
    cache.ready(key, on_built=built.set)
    assert cache._loader is not None  # noqa: SLF001 - the build went to the loader thread
    assert built.wait(60)
    assert cache.ready(key) and len(cache) == 1
    assert cache.get(1, 3) is cache.get(1, 3)  # no second build
    bad = (3, 1, False)  # an empty range: ORT cannot build it
    assert not cache.ready(bad)
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the build raised
        cache.ready(bad, wait=True)
    assert len(cache) == 1  # only the good piece
    cache.clear()
    assert len(cache) == 0


async def test_a_faulty_client_fails_alone_and_the_batch_goes_on(tiny_export, start_server):
    path, source = tiny_export("llama", layers=4)
    server = await start_server(path, max_batch=8, batch_window_ms=20)
    prompts = [chat_ids(source, p) for p in PROMPTS[:3]]
    refs = [reference_run(source.model, ids, 15).tokens for ids in prompts]

    async def saboteur() -> None:
        client = SplitClient(path, server.url, split=2, codec="fp32")
        await client.connect()
        remote = client.remote
        for _ in range(5):
            # A step whose hidden state has the wrong width, then one claiming a wrong past length.
            bad = wire.Run(seq=remote.next_seq(), start=3, end=6, past_len=0, n_tokens=1,
                           payload=codecs.encode(np.zeros((1, 1, 7), np.float32), "fp32"),
                           want="token", temperature=0.0, top_p=1.0, top_k=0, seed=0, codec="fp32")
            with pytest.raises(errors.FrameError, match="shape"):
                await remote.request(bad)
            with pytest.raises(errors.SessionStateError):
                await remote.run(3, 6, 9, np.zeros((1, 1, 64), np.float32), "token",
                                 SamplingParams(), "fp32")
            await asyncio.sleep(0.01)
        # Then it vanishes mid-generation without a Close: after its first token, with 49 to go
        # (a fixed sleep raced a fast generation to its end).
        first_token = asyncio.Event()

        async def generate() -> None:
            async for _ in client.generate_ids(prompts[0], max_new_tokens=50, ignore_eos=True):
                first_token.set()

        task = asyncio.create_task(generate())
        await asyncio.wait_for(first_token.wait(), 60)
        await client.remote._broken()  # noqa: SLF001 - drop the socket as a crashed device would
        task.cancel()
        with pytest.raises((asyncio.CancelledError, errors.SplitLLMError)):
            await task
        await client.close()

    results = await asyncio.gather(saboteur(), _run_clients(path, server.url, [(k, ids, 16, None)
                                                                              for k, ids in enumerate(prompts)]))
    assert results[1] == refs


@pytest.mark.smollm
async def test_smollm2_eight_clients_at_eight_splits_match_the_serial_engine(smollm2_bundle, start_server):
    splits = [0, 2, 5, 10, 15, 20, 25, 29]
    text = Bundle.open(smollm2_bundle).text
    prompts = [text.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    plans = [(k, ids, 32, None) for k, ids in zip(splits, prompts, strict=True)]
    serial = await start_server(smollm2_bundle, max_batch=1)
    expected = await _run_clients(smollm2_bundle, serial.url, plans)
    batched = await start_server(smollm2_bundle, max_batch=8, batch_window_ms=20)
    rows = _watch_batches(batched)
    got = await _run_clients(smollm2_bundle, batched.url, plans)
    assert got == expected
    assert max(rows) > 1


def test_batch_curve_interpolates_and_prices_one_more_row():
    curve = BatchCurve("b", "fp32", 2, (1, 2, 4), embed_ms=(1.0, 1.2, 1.6), layer_ms=(2.0, 2.5, 3.5),
                       head_ms=(3.0, 3.0, 3.0))
    assert curve.step_ms(1, 5, 1) == 2.0 and curve.step_ms(1, 5, 3) == 3.0
    assert curve.step_ms(1, 5, 8) == pytest.approx(5.5)  # the last segment's slope, beyond 4 rows
    assert curve.step_ms(0, 5, 2) == 1.2 and curve.step_ms(4, 5, 4) == 3.0  # embeddings, head
    assert curve.marginal_ms(1, 5, 0) == 2.0  # alone, a client pays the whole step
    assert curve.marginal_ms(1, 5, 2) == pytest.approx(0.5)
    assert curve.marginal_ms(4, 5, 1) == 0.0


async def test_plan_of_a_batching_server_prices_its_occupancy(tiny_export, start_server, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path))  # profiles and the curve are measured here
    path, _ = tiny_export("llama", layers=4)
    # Sessions count as active for a minute: on a loaded machine stepping three sessions and
    # measuring the server's profile and batch curve can take longer than the default 2 s.
    batched = await start_server(path, max_batch=8, active_window_s=60.0)
    serial = await start_server(path, max_batch=1)
    profile = Profile("x", 1, 16, 16, (0.5,) * 6, (0.5,) * 6)
    request = PlanRequest(client_profile=profile, sla=PhaseSLA(500.0, 50.0), prompt_tokens=16, codec="fp32")
    clients = [SplitClient(path, batched.url, split=1, codec="fp32") for _ in range(4)]
    try:
        for client in clients:
            await client.connect()
        # Three sessions step at split 1 (embeddings and layer 0 on the device, the server runs units
        # 2-5); the fourth only connects.
        for client in clients[:3]:
            async for _ in client.generate_ids([1, 2, 3], max_new_tokens=2, ignore_eos=True):
                pass
        answer = await clients[0].remote.plan(request)
        # Rows per unit: the two *other* sessions that ran it; the idle one and the asker are not.
        assert answer.extra == {"pricing": "batch-marginal", "occupancy": 2, "unit_rows": [0, 0, 2, 2, 2, 2]}
        assert batched.state.engine.scheduler.active_sessions() == 3
        assert answer.load_factor == 1.0
        assert list(tmp_path.glob("batchcurve-*.json")), "the curve was not cached"
        async with SplitClient(path, serial.url, codec="fp32") as alone:
            assert (await alone.remote.plan(request)).extra == {"pricing": "load-factor"}
    finally:
        for client in clients:
            await client.close()
