"""Split generation end to end: real ORT on both sides, the real server on loopback."""

from __future__ import annotations

import asyncio

import pytest
from helpers import chat_ids

from splitllm.client import SplitClient
from splitllm.model.bundle import Bundle
from splitllm.model.sampling import SamplingParams
from splitllm_export.validate.splits import reference_run

NEW_TOKENS = 32


def _ids(source, text: str = "Tell me a story about a robot.") -> list[int]:
    return chat_ids(source, text)



async def _generate(client: SplitClient, ids, n=NEW_TOKENS, **kw) -> list[int]:
    async for _ in client.generate_ids(ids, max_new_tokens=n, ignore_eos=True, **kw):
        pass
    return client.last_stats.new_ids


async def _every_split_matches_transformers(path, source, start_server, **server_config) -> None:
    """Greedy tokens at every split of a 3-layer bundle, through a real server, and local-only."""
    ids = _ids(source)
    ref = reference_run(source.model, ids, NEW_TOKENS - 1).tokens
    server = await start_server(path, **server_config)
    for split in range(4):
        async with SplitClient(path, server.url, split=split, codec="fp32") as client:
            assert await _generate(client, ids) == ref, f"split {split}"
    async with SplitClient(path, local=True) as client:
        assert await _generate(client, ids) == ref, "local"


@pytest.mark.parametrize("chunk_units", [0, 2])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
async def test_tiny_models_through_the_server_match_transformers_at_every_split(
    family, chunk_units, tiny_export, start_server
):
    """chunk_units=2: the server runs each range as a chain of pieces cut at units 2 and 4."""
    path, source = tiny_export(family, layers=3)
    await _every_split_matches_transformers(path, source, start_server, chunk_units=chunk_units)


def test_server_ranges_share_their_aligned_pieces(tiny_export):
    from splitllm.errors import ConfigError
    from splitllm.model.runtime import RuntimeOptions
    from splitllm_server.engine import Engine
    from splitllm_server.scheduler import cut

    path, _ = tiny_export("llama", layers=4)  # 6 units
    bundle = Bundle.open(path)
    engine = Engine(bundle, cache_size=1, options=RuntimeOptions(intra_op_threads=1), chunk_units=2)
    try:
        assert engine.scheduler.pieces(1, 6) == [(1, 2), (2, 4), (4, 6)]
        assert cut(2, 4, 2) == [(2, 4)] and cut(3, 4, 2) == [(3, 4)]
        executor = engine.executor

        async def load(start, end):
            return await engine.call(executor.load_pieces, start, end)  # on the engine's thread

        first, second = asyncio.run(load(1, 6)), asyncio.run(load(3, 6))
        assert [(s.start, s.end) for s in second] == [(3, 4), (4, 6)]
        assert second[1] is first[2]  # one session (one copy of the weights) for units 4-5
        assert executor.piece_cache.max_pieces == 4
        asyncio.run(load(0, 2))  # a fifth piece evicts the least recently used
        assert len(executor.piece_cache) == 4
        assert cut(1, 6, 0) == [(1, 6)]
        with pytest.raises(ConfigError, match="chunk_units must be >= 0"):
            Engine(bundle, cache_size=1, options=RuntimeOptions(), chunk_units=-1)
    finally:
        engine.close()


async def test_llama_layers_exported_from_pytorch_stay_exact_at_every_split(tmp_path, start_server):
    """--layer-graphs exported: the PyTorch-exported Llama layers (the fused ones are the default)."""
    from splitllm_export.export import export_bundle
    from splitllm_export.sources.tiny import load_tiny

    source = load_tiny("llama", num_layers=3)
    path = export_bundle(source, tmp_path / "exported", show_progress=False, fused_layers=False)
    assert Bundle.open(path).manifest["export"]["layer_graphs"] == "exported"
    await _every_split_matches_transformers(path, source, start_server)


@pytest.mark.smollm
async def test_smollm2_through_the_server_matches_transformers(smollm2_bundle, smollm2_reference, start_server):
    """The export ran every split against transformers (greedy tokens and logits, asserted here
    from its manifest); this runs one split end to end through the real server, with 8-unit
    pieces, the fp32 codec and a longer decode than the export's."""
    validation = Bundle.open(smollm2_bundle, verify=False).manifest["validation"]
    checked = {r["split"]: r["tokens_match"] for r in validation["splits"]}
    assert all(checked[split] for split in (0, 1, 10, 20, 29, 30))
    ids, ref = smollm2_reference("Write a short poem about the ocean.", NEW_TOKENS - 1)
    server = await start_server(smollm2_bundle, segment_cache=2)
    async with SplitClient(smollm2_bundle, server.url, split=10, codec="fp32") as client:
        assert await _generate(client, ids) == ref, "split 10"
        assert client.last_stats.server_units == 21


async def test_chat_session_reuses_the_first_turns_kv(tiny_export, start_server):
    path, _ = tiny_export("llama", layers=3)
    server = await start_server(path)
    async with SplitClient(path, server.url, split=1, codec="fp32") as client:
        chat = client.chat(system="Be brief.")
        async for _ in chat.send("Hello there", max_new_tokens=8):
            pass
        first_prompt = client.last_stats.prompt_tokens
        async for _ in chat.send("And then?", max_new_tokens=8):
            pass
        second = client.last_stats
        assert second.prefill_tokens < second.prompt_tokens - first_prompt + 2
        reused_ids = second.new_ids
        conversation = list(chat.messages[:-1])
    # The same conversation from scratch, in a fresh client, gives the same reply.
    async with SplitClient(path, server.url, split=1, codec="fp32") as fresh:
        async for _ in fresh.generate(conversation, max_new_tokens=8):
            pass
        assert fresh.last_stats.prefill_tokens == fresh.last_stats.prompt_tokens
        assert fresh.last_stats.new_ids == reused_ids


async def test_seeded_sampling_is_reproducible_and_side_independent(tiny_export, start_server):
    path, source = tiny_export("llama", layers=3)
    ids = _ids(source)
    server = await start_server(path)
    params = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 1234}
    async with SplitClient(path, server.url, split=2, codec="fp32") as client:
        a = await _generate(client, ids, n=16, **params)
        b = await _generate(client, ids, n=16, **params)
        c = await _generate(client, ids, n=16, **{**params, "seed": 99})
    async with SplitClient(path, local=True) as local:
        d = await _generate(local, ids, n=16, **params)
    assert a == b == d
    assert a != c
    SamplingParams(**params)


async def test_lossy_codecs_generate_and_report_bytes(tiny_export, start_server):
    path, source = tiny_export("llama", layers=3)
    ids = _ids(source)
    server = await start_server(path)
    sent = {}
    for codec in ("fp32", "fp16", "int8-block64", "int8-block64+zstd"):
        async with SplitClient(path, server.url, split=1, codec=codec) as client:
            assert len(await _generate(client, ids, n=8)) == 8
            sent[codec] = client.link.bytes_up
    assert sent["fp16"] < sent["fp32"]
    assert sent["int8-block64"] < sent["fp16"]


async def test_concurrent_clients_each_get_their_own_tokens(tiny_export, start_server):
    path, source = tiny_export("gpt2", layers=3)
    server = await start_server(path)
    prompts = [_ids(source, f"Question number {i}?") for i in range(4)]
    refs = [reference_run(source.model, p, 11).tokens for p in prompts]

    async def one(i):
        # No speculation: a verification's accepted tokens are the client's to count, not the server's.
        async with SplitClient(path, server.url, split=i % 4, codec="fp32", speculate="off") as client:
            return await _generate(client, prompts[i], n=12)

    results = await asyncio.gather(*(one(i) for i in range(4)))
    assert results == refs
    assert server.state.metrics.tokens_out == 4 * 12


async def test_clients_at_one_split_share_their_device_session_and_still_get_their_own_tokens(
    tiny_export, start_server, tmp_path
):
    """Fused Llama layers (KV bound with IOBinding): four clients in this process run the same
    prefix on one ORT session, concurrently, each with its own binding and cache."""
    import gc

    from splitllm.model import runtime

    path, source = tiny_export("llama", layers=3)
    server = await start_server(path)
    prompts = [_ids(source, f"Question number {i}?") for i in range(4)]
    refs = [reference_run(source.model, p, 11).tokens for p in prompts]
    clients = [SplitClient(path, server.url, split=2, codec="fp32") for _ in range(4)]
    try:
        for client in clients:
            await client.connect()
        results = await asyncio.gather(*(_generate(c, p, n=12) for c, p in zip(clients, prompts, strict=True)))
        assert results == refs
        segments = [seg for c in clients for seg in c.device._segments.values()]
        assert len(segments) == 4 and len({id(seg.session) for seg in segments}) == 1
        assert len({id(seg) for seg in segments}) == 4  # one Segment (one IOBinding) per client
    finally:
        for client in clients:
            await client.close()
    bundle = Bundle.open(path)
    profiled = runtime.Segment(bundle, 0, 3, options=runtime.RuntimeOptions(profile_prefix=str(tmp_path / "prof")))
    plain = runtime.Segment(bundle, 0, 3)
    assert profiled.session is not plain.session  # profiling sessions are never shared
    assert runtime.Segment(bundle, 0, 3).session is plain.session
    assert runtime.Segment(bundle, 0, 3, options=runtime.RuntimeOptions(intra_op_threads=1)).session is not plain.session
    del clients, client, segments, profiled, plain
    gc.collect()
    held = [key for key in list(runtime._shared.keys()) if key[0] == str(path.resolve()) and key[2:4] == (0, 3)]
    assert not held  # the device sessions went with their last Segment (the server keeps its own)


def test_only_a_local_client_keeps_its_threads_spinning_between_steps(tiny_export):
    """A split client's ORT threads stop spinning when a run returns (its link, or a server on the
    same machine, needs the cores between steps); a local-only client's keep spinning."""
    from splitllm.model.runtime import RuntimeOptions

    path, _ = tiny_export("llama", layers=2)
    local = SplitClient(path, local=True)
    split = SplitClient(path, "http://127.0.0.1:9", split=1)
    assert local.options.spin_between_runs and not split.options.spin_between_runs
    stop = "session.force_spinning_stop"
    assert split.options.session_options().get_session_config_entry(stop) == "1"
    with pytest.raises(Exception, match="does not have configuration"):
        local.options.session_options().get_session_config_entry(stop)
    quiet = RuntimeOptions(allow_spinning=False, spin_between_runs=True).session_options()
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_placement_runs_and_their_compact_text():
    from splitllm.client import Placement

    c, s = "client", "server"
    placement = Placement((c, s, s, c, c, s))
    assert placement.runs == [(c, 0, 1), (s, 1, 3), (c, 3, 5), (s, 5, 6)]
    assert placement.compact() == "C0-0 S1-2 C3-4 S5-5"
    assert Placement.for_split(10, 32).compact() == "C0-10 S11-31"


@pytest.mark.parametrize("speculate", ["off", "auto"])
@pytest.mark.parametrize("chunk_units", [0, 1])
async def test_placement_changes_mid_generation_keep_tokens_exact(chunk_units, speculate, tiny_export, start_server):
    """Switch placements while generating, including plans that cross the link several times
    (and, with chunk_units=1, server ranges run as chains of one-unit sessions).

    A placement requested mid-generation takes effect before the next step. With speculation off
    a step yields one token, so a switch every 4 tokens uses every placement of the schedule.
    With speculation on a step may yield several tokens, so the test asks for the next placement
    only once the previous one is in use (and while a step is still to come): every placement
    asked for is used, whatever the tokens per step."""
    from splitllm.client import Placement

    path, source = tiny_export("llama", layers=4)
    ids = _ids(source)
    ref = reference_run(source.model, ids, NEW_TOKENS - 1).tokens
    server = await start_server(path, chunk_units=chunk_units)
    c, s = "client", "server"
    schedule = [
        Placement.for_split(1, 6),
        Placement((c, c, s, s, c, c)),  # client: embed, L0, L3, head; server: L1, L2
        Placement.for_split(0, 6),
        Placement((c, s, c, s, s, c)),  # three switches, head on the client
        Placement((c, s, s, s, s, s)),
        Placement.for_split(4, 6),
        Placement((c, s, c, s, c, s)),
    ]
    async with SplitClient(path, server.url, split=2, codec="fp32", speculate=speculate) as client:
        got: list[int] = []
        asked = 0
        async for piece in client.generate_ids(ids, max_new_tokens=NEW_TOKENS, ignore_eos=True):
            got.append(piece.token_id)
            if speculate == "off":
                if len(got) % 4 == 0:
                    asked += 1
                    client.set_placement(schedule[asked % len(schedule)])
            elif client.placements_used == asked and len(got) < NEW_TOKENS:
                asked += 1
                client.set_placement(schedule[asked % len(schedule)])
        assert client.last_stats.new_ids == ref
        if speculate == "off":  # asked at tokens 4, 8, ..., 32; the last one after the final step
            assert asked == NEW_TOKENS // 4 and client.placements_used == asked - 1
        else:  # asked only while a step was still to come, so every one was used
            assert asked >= 2 and client.placements_used == asked
    assert server.state.metrics.errors == {}
