"""A device install (``pip install splitllm``, no extras) runs the device path: checked through the
import graph rather than by building a venv.

A subprocess installs a ``sys.meta_path`` finder that makes the export and server stacks
unimportable (torch, transformers, optimum, onnx, numba, scipy, our server and exporter) and
records every attempt, with the module that made it. It then imports every SDK module and runs a
local generation, a split generation against a real server (this test's process, which is not
restricted), the planner's DP and the ``splitllm`` command. Importing must ask for none of those
packages; at run time only the planner may *try* numba (its compiled kernel, falling back to
numpy) or scipy (the ILP reference), and nothing may ever ask for the rest.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from helpers import chat_ids

from splitllm_export.validate.splits import reference_run

REPO = Path(__file__).resolve().parents[1]
NEVER = ("torch", "transformers", "optimum", "onnx", "splitllm_server", "splitllm_export")
OPTIONAL = {"numba": "splitllm.planner.kernel", "scipy": "splitllm.planner.milp"}  # who may try them
NEW_TOKENS = 12
PROMPT = "Tell me about the sea."

DEVICE_SCRIPT = r'''
import asyncio, importlib, json, pkgutil, sys

BLOCKED = set(json.loads(sys.argv[1]))
bundle, url, ids, n, prompt = sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
already = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
requests = []


def _requester():
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "?")
        if not name.startswith(("importlib", "_frozen_importlib")):
            return name
        frame = frame.f_back
    return "?"


class DeviceInstall:
    """Finds nothing for the packages a device install does not have; remembers who asked."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            requests.append([name, _requester()])
            raise ModuleNotFoundError(f"No module named {name!r} (not in a device install)", name=name)
        return None


sys.meta_path.insert(0, DeviceInstall())

import splitllm

modules = []
for info in pkgutil.walk_packages(splitllm.__path__, "splitllm."):
    if info.name.rpartition(".")[2] != "__main__":  # runs a command when imported
        importlib.import_module(info.name)
        modules.append(info.name)
import_requests = list(requests)

from splitllm import SplitClient
from splitllm.planner import dp, kernel_status, load_kernel
from splitllm.planner.costs import build_problem


async def generate(client):
    async with client:
        async for _ in client.generate_ids(ids, max_new_tokens=n, ignore_eos=True):
            pass
        return client.last_stats.new_ids, client.last_stats.server_units


local, _ = asyncio.run(generate(SplitClient(bundle, local=True)))
split, server_units = asyncio.run(generate(SplitClient(bundle, url, split=1, codec="fp32")))
kernel = load_kernel()
plan = dp(build_problem(client_ms=[0.1, 5.0, 5.0, 0.5], server_ms=[0.05, 0.5, 0.5, 0.1],
                        server_work=[1.0, 10.0, 10.0, 5.0], hidden_size=64, tokens=1, codec="fp32",
                        uplink_bps=100e6, downlink_bps=100e6, rtt_ms=1.0, sla_ms=8.0))

import splitllm.cli

code = splitllm.cli.main(["generate", "--bundle", bundle, "--server", url, "--split", "2", "--codec", "fp32",
                          "--max-new-tokens", str(n), "--json", prompt])
print(json.dumps({
    "already": already, "modules": modules, "import_requests": import_requests, "requests": requests,
    "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED),
    "local": local, "split": split, "server_units": server_units, "kernel": kernel,
    "kernel_status": kernel_status(), "plan": list(plan.placement), "plan_feasible": plan.feasible,
    "cli_code": code,
}))
'''


async def test_the_device_path_imports_and_runs_without_the_export_and_server_stacks(
    tiny_export, start_server, tmp_path
):
    path, source = tiny_export("llama", layers=3)
    ids = chat_ids(source, PROMPT)
    ref = reference_run(source.model, ids, NEW_TOKENS - 1).tokens
    server = await start_server(path)
    blocked = [*NEVER, *OPTIONAL]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("sdk", "exporter", "server_stub")),
           "HOME": str(tmp_path)}  # profiles and caches, if anything writes one, stay in tmp_path
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DEVICE_SCRIPT, json.dumps(blocked), str(path), server.url, json.dumps(ids),
        str(NEW_TOKENS), PROMPT, cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=300)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().strip().splitlines()
    got = json.loads(lines[-1])
    cli = json.loads(lines[-2])

    assert got["already"] == [], "loaded before the blocker was installed"
    assert {"splitllm.client", "splitllm.cli", "splitllm.cli.chat_ui", "splitllm.planner.kernel",
            "splitllm.planner.milp", "splitllm.codec.registry", "splitllm.protocol.wire",
            "splitllm.transport", "splitllm.model.runtime", "splitllm.model.text"} <= set(got["modules"])
    assert got["import_requests"] == [], "importing the SDK asked for packages a device does not have"
    never = [r for r in got["requests"] if r[0].partition(".")[0] in NEVER]
    assert never == []
    tried = [r for r in got["requests"] if OPTIONAL.get(r[0].partition(".")[0]) != r[1]]
    assert tried == [], "an optional package was tried outside its lazy import"
    assert got["loaded"] == []

    assert got["local"] == ref
    assert got["split"] == ref and got["server_units"] > 0
    assert (got["kernel"], got["kernel_status"]) == ("numpy", "numpy")  # numba missing: the numpy DP
    assert got["plan_feasible"] and len(got["plan"]) == 4
    assert got["cli_code"] == 0
    assert cli["split"] == 2 and 1 <= len(cli["new_ids"]) <= NEW_TOKENS
    assert cli["new_ids"] == ref[: len(cli["new_ids"])]
