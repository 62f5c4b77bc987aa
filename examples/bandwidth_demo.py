"""Watch the placement follow the bandwidth: one adaptive client behind a link that steps down and up.

Run: ``python examples/bandwidth_demo.py [--steps 100,10,1,0.3,10,100] [--device-factor 4]
[--token-ms 80] [--ttft-ms 600] [--rtt-ms 10] [--tokens 24] [--per-step 2] [--plot out.png]
[--server URL] [--bundle DIR]``

Starts a local ``splitllm-server`` (unless ``--server``), puts a
:class:`~splitllm.testing.netem.ShapedLink` in front of it and runs one client that follows the server's
DP policy (``client.plan(...)``). At each step the link's rate (both directions) is set, and the
client generates ``--per-step`` replies of ``--tokens`` tokens; each reply prints the set and
measured uplink, the placement it ran with, the time to the first token, the decode speed after
it and the share of decoder layers kept off the server. ``--plot out.png`` draws bandwidth,
layers on the device and decode tokens/s over time (needs matplotlib).

The device assumption is explicit: the client is an emulated device ``--device-factor`` times
slower than one core of this machine (:class:`~splitllm.testing.netem.SlowDevice`: it plans with this
machine's 1-thread profile scaled by the factor, and sleeps until each local run has taken
that long). On this machine itself (factor 1) the whole model fits a relaxed SLA locally and
the bandwidth would not matter.

Two SDK behaviours the printout shows: the client measures its uplink only from frames of
8 KB or more, which an all-local or decode-only client never sends, so the demo probes the link
(``client.remote.probe()``) before each reply (``--no-probe`` to watch without); and KV moves
with the layers whenever the prefill and decode placements differ, which on a slow link costs
seconds (the "link MB" column counts all bytes of the reply, KV included; the time is in its decode
tokens/s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from splitllm import Bundle, Placement, SplitLLMError, errors, load_or_measure
from splitllm.testing import ShapedLink, SlowDevice, scaled_profile, spawn_server, stop_server

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Explain in two sentences why the sky is blue.", "Write a haiku about a quiet harbour.",
           "List three uses of a paperclip.", "What makes bread rise?", "Name a famous bridge and its city.",
           "Give one tip for learning a language."]
CLIENT_THREADS = 1


@dataclass
class Row:
    """One reply: when it ran, under which link, where the layers were, how fast it went."""

    started_s: float
    ended_s: float
    set_bps: float
    measured_bps: float | None  # the client's uplink estimate when the reply started
    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    decode_tokens_per_s: float  # after the first token (KV moves included)
    ttft_ms: float
    link_bytes: int

    @property
    def layers_here(self) -> int:
        return sum(side == "client" for side in self.decode[1:-1])

    @property
    def off_server_share(self) -> float:
        return self.layers_here / max(len(self.decode) - 2, 1)


def describe(sides: tuple[str, ...]) -> str:
    """Runs of units, e.g. ``C0-11 S12-31`` (C here, S server; 0 = embeddings, last = head)."""
    return Placement(sides).compact()


async def run(args: argparse.Namespace, url: str) -> list[Row]:
    bundle = Bundle.open(args.bundle)
    base = load_or_measure(bundle, threads=CLIENT_THREADS)
    target = urlsplit(url)
    if target.hostname is None or target.port is None:
        raise errors.ConfigError(f"--server must look like http://HOST:PORT, got {url!r}")
    steps = args.steps
    rows: list[Row] = []
    async with ShapedLink(target.hostname, target.port, uplink_bps=steps[0], downlink_bps=steps[0],
                          rtt_ms=args.rtt_ms) as link:
        async with SlowDevice(bundle, link.url, codec=args.codec, threads=CLIENT_THREADS,
                              device_factor=args.device_factor, base_profile=base) as client:
            prompt_tokens = len(client.text.encode_chat([{"role": "user", "content": PROMPTS[0]}]))
            await client.plan(ttft_ms=args.ttft_ms, token_ms=args.token_ms, prompt_tokens=prompt_tokens,
                              profile=scaled_profile(base, args.device_factor))
            print(f"device x{args.device_factor:g} (decode all-local planned {args.device_factor * sum(base.decode_ms):.0f}"
                  f" ms/token), SLA {args.token_ms:g} ms/token and {args.ttft_ms:g} ms to the first token, "
                  f"RTT {args.rtt_ms:g} ms; {bundle.num_layers} decoder layers\n")
            print(f"{'t s':>6} {'set Mbit/s':>10} {'measured':>9} {'TTFT ms':>8} {'decode tok/s':>12} {'link MB':>7} "
                  f"{'layers here':>11} {'off server':>10}  placement prefill | decode")
            started = time.perf_counter()
            n = 0
            for bps in steps:
                link.set(uplink_bps=bps, downlink_bps=bps)
                for _ in range(args.per_step):
                    if args.probe:
                        await client.remote.probe()
                    estimate = client.link.uplink_bps_ewma  # what this reply's placement is chosen from
                    t0 = time.perf_counter() - started
                    kv_before = link.counters.bytes_up + link.counters.bytes_down
                    prefill: tuple[str, ...] = ()
                    async for _piece in client.generate(PROMPTS[n % len(PROMPTS)], max_new_tokens=args.tokens,
                                                        ignore_eos=True):
                        prefill = prefill or client.placement.sides
                    n += 1
                    stats = client.last_stats
                    row = Row(t0, time.perf_counter() - started, bps, estimate, prefill,
                              client.placement.sides, stats.decode_tokens_per_s, stats.ttft_ms,
                              link.counters.bytes_up + link.counters.bytes_down - kv_before)
                    rows.append(row)
                    measured = "-" if row.measured_bps is None else f"{row.measured_bps / 1e6:.3g}"
                    print(f"{row.ended_s:>6.1f} {bps / 1e6:>10g} {measured:>9} {row.ttft_ms:>8.0f} "
                          f"{row.decode_tokens_per_s:>12.1f} {row.link_bytes / 1e6:>7.2f} {row.layers_here:>5}/{bundle.num_layers:<5} "
                          f"{100 * row.off_server_share:>9.0f}%  {describe(row.prefill)} | {describe(row.decode)}",
                          flush=True)
    return rows


def plot(rows: list[Row], path: Path, num_layers: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install matplotlib (or pip install 'splitllm[dev]')", file=sys.stderr)
        return
    fig, (ax_bw, ax_layers, ax_tps) = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    xs = [x for r in rows for x in (r.started_s, r.ended_s)]
    ax_bw.plot(xs, [r.set_bps / 1e6 for r in rows for _ in (0, 1)], color="black", label="set (both directions)")
    ax_bw.plot([r.started_s for r in rows], [(r.measured_bps or float("nan")) / 1e6 for r in rows], "o",
               color="tab:orange", label="client's uplink estimate")
    ax_bw.set_yscale("log")
    ax_bw.set_ylabel("Mbit/s")
    ax_bw.legend(loc="lower left", fontsize=8)
    ax_layers.plot(xs, [r.layers_here for r in rows for _ in (0, 1)], color="tab:blue", label="decode")
    ax_layers.plot(xs, [sum(s == "client" for s in r.prefill[1:-1]) for r in rows for _ in (0, 1)],
                   color="tab:green", linestyle="--", label="prefill")
    ax_layers.set_ylim(-1, num_layers + 1)
    ax_layers.set_ylabel(f"layers on device\n(of {num_layers})")
    ax_layers.legend(loc="lower left", fontsize=8)
    ax_tps.plot(xs, [r.decode_tokens_per_s for r in rows for _ in (0, 1)], color="tab:red")
    ax_tps.set_ylabel("decode tokens/s\n(incl. KV moves)")
    ax_tps.set_xlabel("seconds")
    fig.suptitle("SplitLLM: placement following the measured bandwidth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(REPO / "bundles" / "smollm2"))
    parser.add_argument("--server", default=None, help="use this server instead of starting one")
    parser.add_argument("--steps", default="100,10,1,0.3,10,100", help="link rates in Mbit/s, comma-separated")
    parser.add_argument("--device-factor", type=float, default=4.0, help="device slowness vs one core here")
    parser.add_argument("--token-ms", type=float, default=80.0, help="SLA per decode step")
    parser.add_argument("--ttft-ms", type=float, default=600.0, help="SLA to the first token")
    parser.add_argument("--rtt-ms", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=24, help="tokens per reply")
    parser.add_argument("--per-step", type=int, default=2, help="replies per bandwidth step")
    parser.add_argument("--codec", default="int8-block64")
    parser.add_argument("--no-probe", dest="probe", action="store_false", help="do not probe before each reply")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of the run")
    args = parser.parse_args()
    try:
        args.steps = [float(x) * 1e6 for x in args.steps.split(",") if x.strip()]
    except ValueError:
        parser.error("--steps must be comma-separated numbers of Mbit/s")
    if not args.steps or min(args.steps) <= 0 or args.tokens < 1 or args.per_step < 1 or args.device_factor < 1:
        parser.error("--steps must be > 0, --tokens and --per-step >= 1, --device-factor >= 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = None
    try:
        if args.server is None:
            proc, url = spawn_server(Path(args.bundle), ["--segment-cache", "16"])
        else:
            url = args.server
        rows = asyncio.run(run(args, url))
    except SplitLLMError as exc:
        print(f"bandwidth demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            stop_server(proc)
    if args.plot is not None:
        plot(rows, args.plot, Bundle.open(args.bundle).num_layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
