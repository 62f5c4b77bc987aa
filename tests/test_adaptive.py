"""The planner in the loop: profiles, POST /v1/plan, and a client that follows the policy."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from helpers import chat_ids

from splitllm.client import SplitClient
from splitllm.model.bundle import Bundle
from splitllm.planner import Policy
from splitllm.planner.profile import Profile, load_or_measure, measure
from splitllm_export.validate.splits import reference_run


def _ids(source, text: str = "Explain the tides.") -> list[int]:
    return chat_ids(source, text)



def _slow_device(bundle: Bundle) -> Profile:
    """A fixed, slow device (5 ms a layer per decode step): far slower than this machine's server,
    and deterministic, so the planner's choice does not depend on a noisy measurement."""
    layers = bundle.num_layers
    decode = (0.1,) + (5.0,) * layers + (3.0,)
    prefill = tuple(ms * 8 for ms in decode)  # for 64 positions
    return Profile(bundle.bundle_id, 0, 64, 128, prefill, decode)


def test_profile_covers_every_unit_and_is_cached(tiny_export, tmp_path):
    path, _ = tiny_export("llama", layers=3)
    bundle = Bundle.open(path)
    first = load_or_measure(bundle, cache_dir=tmp_path, repeats=2)
    assert len(first.prefill_ms) == len(first.decode_ms) == bundle.num_units
    assert all(ms > 0 for ms in first.decode_ms)
    again = load_or_measure(bundle, cache_dir=tmp_path, repeats=2)
    assert again == first  # read back from the cache, not measured again
    assert Profile.from_dict(first.to_dict(), bundle.num_units) == first


async def test_plan_endpoint_returns_policies_and_names_bad_fields(tiny_export, start_server):
    path, _ = tiny_export("llama", layers=3)
    bundle = Bundle.open(path)
    server = await start_server(path)
    profile = measure(bundle, repeats=2).to_dict()
    body = {"client_profile": profile, "sla": {"ttft_ms": 1000, "token_ms": 100}, "codec": "fp16",
            "uplink_bps": 10e6, "rtt_ms": 5}
    async with aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/plan", json=body) as r:
            assert r.status == 200
            data = await r.json()
        for phase in ("prefill", "decode"):
            policy = Policy.from_dict(data["policy"][phase])
            plan = policy.plan_for(10e6)
            assert plan is not None and len(plan.placement) == bundle.num_units
        assert data["load_factor"] >= 1.0
        for bad, field in (({**body, "sla": {"ttft_ms": -1, "token_ms": 1}}, "ttft_ms"),
                           ({**body, "codec": "nope"}, "nope"),
                           ({**body, "uplink_bps": 0}, "uplink_bps"),
                           ({**body, "client_profile": {**profile, "decode_ms": [1.0]}}, "decode_ms")):
            async with http.post(server.url + "/v1/plan", json=bad) as r:
                assert r.status == 400
                assert field in (await r.json())["error"]["message"]
        async with http.post(server.url + "/v1/plan", data=b"{nope") as r:
            assert r.status == 400


async def test_a_slow_device_offloads_and_tokens_stay_exact(tiny_export, start_server):
    path, source = tiny_export("llama", layers=4)
    bundle = Bundle.open(path)
    ids = _ids(source)
    ref = reference_run(source.model, ids, 15).tokens
    server = await start_server(path)
    slow = _slow_device(bundle)
    async with SplitClient(path, server.url, codec="fp32") as client:
        # Budget: about half of what the slow device needs for the whole model.
        token_ms = sum(slow.decode_ms) * 0.5
        ttft_ms = sum(slow.scaled_prefill_ms(len(ids))) * 0.5
        policies = await client.plan(ttft_ms=ttft_ms, token_ms=token_ms, prompt_tokens=len(ids), profile=slow)
        async for _ in client.generate_ids(ids, max_new_tokens=16, ignore_eos=True):
            pass
        assert client.last_stats.new_ids == ref
        assert 0 < client.last_stats.server_units < bundle.num_units
        decode = client.policies["decode"].plan_for(client.link.uplink_bps_ewma)
        assert decode is not None and decode.feasible
        assert set(policies) == {"prefill", "decode"}
    # A generous SLA keeps everything on the device: no server work at all.
    async with SplitClient(path, server.url, codec="fp32") as client:
        await client.plan(ttft_ms=1e7, token_ms=1e6, prompt_tokens=len(ids), profile=slow)
        async for _ in client.generate_ids(ids, max_new_tokens=4, ignore_eos=True):
            pass
        assert client.last_stats.server_units == 0


@contextlib.asynccontextmanager
async def _planned_slow_client(tiny_export, start_server) -> AsyncIterator[tuple[SplitClient, list[int]]]:
    """A client of a 4-layer tiny Llama on a real server, planned for the fixed slow device with
    SLAs at 60% of its all-local times: offloading pays whenever the link allows it."""
    path, source = tiny_export("llama", layers=4)
    bundle = Bundle.open(path)
    server = await start_server(path)
    slow = _slow_device(bundle)
    ids = _ids(source)
    async with SplitClient(path, server.url, codec="fp32") as client:
        await client.plan(ttft_ms=sum(slow.scaled_prefill_ms(len(ids))) * 0.6, token_ms=sum(slow.decode_ms) * 0.6,
                          prompt_tokens=len(ids), profile=slow)
        yield client, ids


async def test_the_placement_follows_the_measured_bandwidth(tiny_export, start_server):
    async with _planned_slow_client(tiny_export, start_server) as (client, _):
        placements = {}
        for bps in (1e9, 2e3 * 8):  # a fast link, then one so slow that sending hidden states costs too much
            client.remote.stats.uplink_bps_ewma = bps
            await client.adapt("decode", 1)
            placements[bps] = client.placement.sides
        assert placements[1e9] != placements[2e3 * 8]
        assert all(side == "client" for side in placements[2e3 * 8])


@pytest.mark.smollm
async def test_smollm2_plan_against_a_real_server(smollm2_bundle, start_server):
    server = await start_server(smollm2_bundle)
    async with SplitClient(smollm2_bundle, server.url, codec="int8-block64") as client:
        policies = await client.plan(ttft_ms=400, token_ms=25)
        async for _ in client.generate("Say hello.", max_new_tokens=8):
            pass
        assert client.last_stats.new_tokens >= 1
        assert set(policies) == {"prefill", "decode"}


# -- the KV move in the prefill policy ----------------------------------------------------------


def _move_scenario(*, client_prefill_ms=(1, 50, 50, 1), ttft_ms=500.0, grid=(10e6, 1e9, 1e10), **extra):
    """4 units (embed, 2 layers, head). Decode: the device is too slow for the token SLA, so both
    layers go to the server. Prefill: the device alone meets the TTFT SLA (no server work). Moving
    the prompt's KV of both layers up after the prefill takes 2 x 256 x 512 B / uplink + one RTT."""
    from splitllm.planner.costs import PhaseSLA, build_policies

    return build_policies(
        client_prefill_ms=list(client_prefill_ms), client_decode_ms=[0.1, 20, 20, 0.1],
        server_prefill_ms=[0.1, 5, 5, 0.5], server_decode_ms=[0.05, 0.5, 0.5, 0.1],
        load_factor=1.0, hidden_size=64, prompt_tokens=256, codec="fp32", uplink_bps=10e6,
        downlink_bps=10e6, rtt_ms=2.0, sla=PhaseSLA(ttft_ms=ttft_ms, token_ms=15), grid=list(grid), **extra,
    )


def test_prefill_policy_keeps_the_decode_placement_when_the_kv_move_would_break_the_token_sla():
    from splitllm.planner.costs import kv_move_ms

    separate = _move_scenario()
    aware = _move_scenario(kv_bytes_per_position=512.0)
    c, s = "client", "server"
    for policies in (separate, aware):
        assert policies["decode"].plan_for(10e6).placement == (c, s, s, c)
        assert policies["decode"].plan_for(1e9).placement == (c, s, s, c)
    assert separate["prefill"].plan_for(10e6).placement == (c, c, c, c)
    # At 10 Mbit/s the move takes 2 x 105 + 2 ms, far over the 15 ms token SLA: the prefill
    # runs the decode placement instead (it meets the 500 ms TTFT SLA), so nothing moves.
    move = kv_move_ms((c, c, c, c), (c, s, s, c), positions=256, kv_bytes_per_position=512.0,
                      uplink_bps=10e6, downlink_bps=10e6, rtt_ms=2.0)
    assert move == pytest.approx(2 * (256 * 512 + 160) * 8000 / 10e6 + 2)
    assert kv_move_ms((c, s, s, c), (c, s, s, c), positions=256, kv_bytes_per_position=512.0,
                      uplink_bps=10e6, downlink_bps=10e6, rtt_ms=2.0) == 0.0
    slow = aware["prefill"].plan_for(10e6)
    assert slow.placement == (c, s, s, c) and slow.feasible and slow.latency_ms <= 500
    assert slow.server_work > separate["prefill"].plan_for(10e6).server_work  # the price of not moving
    # At 1 Gbit/s the move (~4 ms) and the step (~3 ms) fit in 15 ms: the prefill keeps its own plan.
    assert aware["prefill"].plan_for(1e9).placement == (c, c, c, c)


def test_a_move_the_prefill_cannot_avoid_leaves_its_plan_alone():
    from splitllm.errors import ConfigError

    # TTFT SLA 100 ms: the decode placement's prefill (~127 ms at 10 Mbit/s) is too slow for it.
    kw = dict(client_prefill_ms=(1, 40, 40, 1), ttft_ms=100.0, grid=(10e6, 1e9))
    aware = _move_scenario(**kw, kv_bytes_per_position=512.0)
    assert aware == _move_scenario(**kw)
    assert aware["prefill"].plan_for(10e6).placement != aware["decode"].plan_for(10e6).placement  # it moves
    with pytest.raises(ConfigError, match="kv_bytes_per_position"):
        _move_scenario(**kw, kv_bytes_per_position=-1.0)


def test_identical_layers_are_pooled_so_noise_cannot_buy_a_second_server_range():
    from splitllm.planner import dp
    from splitllm.planner.costs import PhaseSLA, build_policies, build_problem, pool_identical

    # Four identical layers measured 5, 3, 5, 3 ms on the device; two must go to the server.
    client = [0.1, 5.0, 3.0, 5.0, 3.0, 0.5]
    server = [0.01, 0.5, 0.5, 0.5, 0.5, 0.3]
    work = [1.0, 10.0, 10.0, 10.0, 10.0, 50.0]
    assert pool_identical(client, work) == [0.1, 4.0, 4.0, 4.0, 4.0, 0.5]
    link = dict(hidden_size=64, tokens=1, codec="fp32", uplink_bps=100e6, downlink_bps=100e6, rtt_ms=1.0,
                sla_ms=12.0)
    raw = dp(build_problem(client_ms=client, server_ms=server, server_work=work, **link))
    c, s = "client", "server"
    assert raw.placement == (c, s, c, s, c, c)  # the two "slow" layers: two server runs per token
    policies = build_policies(
        client_prefill_ms=client, client_decode_ms=client, server_prefill_ms=server, server_decode_ms=server,
        load_factor=1.0, hidden_size=64, prompt_tokens=1, codec="fp32", uplink_bps=100e6, downlink_bps=100e6,
        rtt_ms=1.0, sla=PhaseSLA(ttft_ms=12.0, token_ms=12.0), grid=[100e6, 200e6], work_per_token=work,
    )
    plan = policies["decode"].plan_for(100e6)
    assert plan.feasible and plan.server_work == raw.server_work
    assert plan.placement in ((c, s, s, c, c, c), (c, c, c, s, s, c), (c, c, s, s, c, c))  # one server range


async def test_pipelined_requests_come_back_in_order_and_an_error_waits_for_the_batch(tiny_export, start_server):
    """Remote.request_many (what a KV move uses): every frame goes out before the first reply."""
    from splitllm.errors import ServerUnavailable, SplitLLMError
    from splitllm.protocol import wire
    from splitllm.transport import Remote

    path, _ = tiny_export("llama", layers=3)
    bundle = Bundle.open(path)
    server = await start_server(path)
    remote = Remote(server.url, None, 30.0, "pipeline-test")
    try:
        await remote.connect(bundle.bundle_id, "fp32")

        def ping(pad: int = 0) -> wire.Ping:
            return wire.Ping(seq=remote.next_seq(), sent_ms=0.0, pad=b"\0" * pad)

        batch = [ping(), ping(20000), ping(), ping(5)]
        before = remote.stats.requests
        replies = await remote.request_many(batch)
        assert [type(r) for r in replies] == [wire.Pong] * 4
        assert [r.seq for r in replies] == [m.seq for m in batch]
        assert [r.pad_len for r in replies] == [0, 20000, 0, 5]
        assert remote.stats.requests == before + 1  # one link sample for the batch
        assert await remote.request_many([]) == []
        # A bad request in the middle: the batch's replies all arrive, then its error is raised,
        # and the session goes on.
        with pytest.raises(SplitLLMError, match="unit") as failed:
            await remote.request_many([ping(), wire.KVGet(seq=remote.next_seq(), unit=99), ping()])
        assert not isinstance(failed.value, ServerUnavailable)
        assert remote.connected
        assert isinstance(await remote.request(ping()), wire.Pong)
    finally:
        await remote.close()


async def test_the_placement_moves_up_a_range_only_past_a_margin_and_down_at_once(tiny_export, start_server):
    from splitllm.adaptive import UP_MARGIN

    async with _planned_slow_client(tiny_export, start_server) as (client, ids):
        # Loopback measures Gbit/s; a table around 300 kbit/s (3 kbit/s .. 30 Mbit/s) holds the
        # bandwidth where sending hidden states starts to pay for this slow device.
        client.remote.stats.uplink_bps_ewma = 3e5
        await client.follower.refresh(client.remote, client.codec, len(ids))
        ranges = client.policies["decode"].ranges
        edges = [i for i in range(len(ranges) - 1) if ranges[i].plan.placement != ranges[i + 1].plan.placement]
        assert edges, [r.plan.placement for r in ranges]
        low, high = ranges[edges[0]], ranges[edges[0] + 1]

        async def placement_at(bps: float) -> tuple[str, ...]:
            client.remote.stats.uplink_bps_ewma = bps
            await client.adapt("decode", 1)
            return client.placement.sides

        assert await placement_at(low.lo_bps) == low.plan.placement
        just_above = high.lo_bps * (1 + UP_MARGIN / 2)
        assert await placement_at(just_above) == low.plan.placement  # held: it still meets its SLA
        assert await placement_at(high.lo_bps * (1 + 1.5 * UP_MARGIN)) == high.plan.placement
        assert await placement_at(just_above) == high.plan.placement  # in its range: no reason to move
        assert await placement_at(high.lo_bps * 0.99) == low.plan.placement  # below its edge: at once


def test_follower_learns_its_model_error_and_replans_for_the_sla_less_it():
    """Decode steps slower than their plan predicted: the follower averages the difference,
    asks for plans against the token SLA less it, and flags a re-plan when the plan in use
    misses the SLA once corrected (never below half the SLA)."""
    from splitllm.adaptive import PolicyFollower
    from splitllm.planner.costs import PhaseSLA
    from splitllm.planner.model import Plan
    from splitllm.planner.solve import PolicyRange

    profile = Profile(bundle_id="x", threads=1, prefill_tokens=8, context=16, prefill_ms=[1.0], decode_ms=[1.0])
    follower = PolicyFollower(PhaseSLA(ttft_ms=500, token_ms=60), profile)
    held = PolicyRange(0.0, float("inf"), Plan(("server",), 1.0, 55.0, True, "dp"))
    follower.observe_decode(70.0)  # no plan in use yet: nothing learned
    assert follower.model_error_ms == 0.0
    follower._in_use["decode"] = held  # noqa: SLF001 - what placement_for records
    for _ in range(3):  # the first step under a placement is not a sample (it may move KV)
        follower.observe_decode(65.0)
    assert follower.model_error_ms == pytest.approx(10.0)
    assert follower.planned_sla.token_ms == pytest.approx(50.0)
    assert not follower._stale  # noqa: SLF001 - two samples: too few to act on
    follower.observe_decode(65.0)
    assert follower._stale  # noqa: SLF001 - 55 + 10 > 60: ask again
    follower.observe_decode(75.0)  # a slower step: the mean moves and the spread grows
    assert follower.model_error_ms == pytest.approx(12.5)
    assert follower.model_error_sd_ms == pytest.approx(18.75 ** 0.5)
    assert follower.planned_sla.token_ms == pytest.approx(60 - 12.5 - 18.75 ** 0.5)
    follower.model_error_ms = 45.0
    assert follower.planned_sla.token_ms == 30.0  # half the SLA at least
