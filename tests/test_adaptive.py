"""The planner in the loop: profiles, POST /v1/plan, and a client that follows the policy."""

from __future__ import annotations

import aiohttp
import pytest
from helpers import chat_ids

from splitllm.bundle import Bundle
from splitllm.client import SplitClient
from splitllm.planner import Policy
from splitllm.profile import Profile, load_or_measure, measure
from splitllm_export.validate import reference_run


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


async def test_the_placement_follows_the_measured_bandwidth(tiny_export, start_server):
    path, source = tiny_export("llama", layers=4)
    bundle = Bundle.open(path)
    server = await start_server(path)
    slow = _slow_device(bundle)
    ids = _ids(source)
    async with SplitClient(path, server.url, codec="fp32") as client:
        token_ms = sum(slow.decode_ms) * 0.6
        await client.plan(ttft_ms=sum(slow.scaled_prefill_ms(len(ids))) * 0.6, token_ms=token_ms,
                          prompt_tokens=len(ids), profile=slow)
        placements = {}
        for bps in (1e9, 2e3 * 8):  # a fast link, then one so slow that sending hidden states costs too much
            client.remote.stats.uplink_bps_ewma = bps
            await client._adapt("decode", 1)
            await client._apply_pending()
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
