"""Teacher-forced quality of an activation codec: KL divergence, top-1 agreement, perplexity change.

Why teacher-forced: free-running greedy agreement on a few prompts is noisy (one early flip
changes every later token). Here every position sees the true text, so each of the N - 1
next-token predictions is compared on its own with the uncompressed run.

Why KL divergence first: top-1 agreement flips on near-ties (two tokens within a hair of each
other swap places without the model's behaviour changing in any way a user would notice), and
perplexity only looks at the true token. The KL divergence KL(P_fp32 || P_codec) of the whole
next-token distribution, per position, measures how much the model's choices move: its mean is
the headline, its 99th percentile shows the rare positions a codec hurts badly (as llama.cpp's
``perplexity --kl-divergence`` reports for its quantisations).

How one (split k, codec) is measured, exactly as a split session would run it:

- the prefix (units [0, k+1)) runs over the text in chunks of ``chunk_tokens`` positions with
  its KV cache, positions continuing; its hidden states (1, T, H) do not depend on the codec,
  so one prefix pass per split is shared by every codec;
- each chunk's hidden states go through ``codec.encode(hidden, name)`` then ``codec.decode``,
  as the client and the server do;
- the suffix (units [k+1, L+2)) runs on the decoded chunks with its own KV cache and emits
  logits for every position; per position we keep the argmax, the log-probability of the
  true next token and the KL divergence from the reference distribution.

The reference is the same pipeline with the lossless fp32 codec (the unsplit model's numbers);
its log-probabilities over the whole vocabulary are kept per split (N x V float32: 200 MB for
1,024 tokens of a 49,152-token vocabulary). Bytes are reported for the chunk payloads and for
decode-step payloads (1, 1, H), header included, because a decode step is what a split session
sends per generated token. The texts are in ``_texts.py``.
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from _texts import Text, add_texts_arguments, chosen_texts, text_tokens

from splitllm import Bundle
from splitllm import codec as codecs
from splitllm.errors import ConfigError
from splitllm.model.runtime import KVCache, RuntimeOptions, Segment

__all__ = [
    "CodecQuality",
    "Evaluator",
    "Reference",
    "Scores",
    "kl_stats",
    "machine_line",
    "score_logits",
]

# A hidden-state chunk (1, T, H) -> (what the server decodes (1, T, H), payload bytes sent)
RoundTrip = Callable[[np.ndarray], tuple[np.ndarray, int]]


def machine_line() -> str:
    """`nproc` and the CPU model, for the top of every benchmark's output."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        nproc = "?"
    return f"machine: nproc={nproc}, cpu={cpu}, python {sys.version.split()[0]}"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (T, V) logits, float32 (the normaliser summed in float64)."""
    peak = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return (logits - peak - lse).astype(np.float32)


def _log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) per row of logits (T, V), in float64 for a stable mean."""
    peak = logits.max(axis=-1, keepdims=True)  # (T, 1)
    lse = np.log(np.exp(logits - peak).sum(axis=-1, dtype=np.float64)) + peak[:, 0]  # (T,)
    return logits[np.arange(len(targets)), targets].astype(np.float64) - lse


def kl_rows(ref_logprobs: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    """KL(P_ref || P) per row (T,) float64 from two (T, V) log-probability arrays; >= 0."""
    diff = (ref_logprobs - logprobs).astype(np.float64)
    return np.maximum((np.exp(ref_logprobs.astype(np.float64)) * diff).sum(axis=-1), 0.0)


@dataclass(frozen=True)
class Scores:
    """Per scored position: the argmax, log p(true next token), KL to the reference (or None)."""

    argmax: np.ndarray  # (M,) int64
    logprob: np.ndarray  # (M,) float64
    kld: np.ndarray  # (M,) float64; zeros for the reference itself


def score_logits(logits: np.ndarray, targets: np.ndarray, ref_logprobs: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """(argmax, log p(target), KL to ``ref_logprobs`` (zeros if None), log-probs) of (T, V) logits."""
    lp = log_softmax(logits)
    kld = np.zeros(len(targets)) if ref_logprobs is None else kl_rows(ref_logprobs, lp)
    return logits.argmax(axis=-1), lp[np.arange(len(targets)), targets].astype(np.float64), kld, lp


def kl_stats(kld: np.ndarray) -> tuple[float, float]:
    """(mean, 99th percentile) of per-position KL divergences."""
    return float(kld.mean()), float(np.percentile(kld, 99))


@dataclass(frozen=True)
class Reference:
    """The uncompressed run at one split: prefix outputs and the fp32 suffix's predictions."""

    split: int
    hidden: list[np.ndarray]  # per chunk (1, T, H) float32, the prefix's outputs
    argmax: np.ndarray  # (N - 1,) int64: the reference's top-1 for every next position
    logprob: np.ndarray  # (N - 1,) float64: log p(true next token)
    logprobs: np.ndarray = field(repr=False)  # (N - 1, V) float32: the whole next-token distribution

    @property
    def perplexity(self) -> float:
        return math.exp(-float(self.logprob.mean()))


@dataclass(frozen=True)
class CodecQuality:
    """One (split, codec) measurement; ``to_dict`` is what benchmarks print as JSON."""

    split: int
    codec: str
    positions: int
    agreement: float  # fraction of positions whose argmax equals the fp32 run's
    ppl: float
    ppl_ref: float
    chunk_bits_per_value: float  # bytes of the chunk payloads * 8 / values, headers included
    decode_bytes: float  # mean bytes of one (1, 1, H) payload, header included
    decode_bytes_max: int
    hidden_size: int
    matches: np.ndarray = field(repr=False, compare=False, default_factory=lambda: np.zeros(0, bool))  # (N-1,)
    kld: np.ndarray = field(repr=False, compare=False, default_factory=lambda: np.zeros(1))  # (N-1,) KL to fp32
    text: str = ""

    @property
    def ppl_change_pct(self) -> float:
        return (self.ppl / self.ppl_ref - 1.0) * 100.0

    @property
    def kld_mean(self) -> float:
        return kl_stats(self.kld)[0]

    @property
    def kld_p99(self) -> float:
        return kl_stats(self.kld)[1]

    @property
    def decode_bits_per_value(self) -> float:
        return self.decode_bytes * 8 / self.hidden_size

    @property
    def ratio_vs_fp32(self) -> float:
        """Decode-step payload of fp32 over this codec's (mean), headers included on both."""
        return codecs.get_codec("fp32").encoded_size((1, 1, self.hidden_size)) / self.decode_bytes

    def to_dict(self) -> dict[str, object]:
        return {
            "text": self.text,
            "split": self.split,
            "codec": self.codec,
            "positions": self.positions,
            "kld_mean": float(f"{self.kld_mean:.4g}"),
            "kld_p99": float(f"{self.kld_p99:.4g}"),
            "top1_agreement": round(self.agreement, 5),
            "ppl": round(self.ppl, 5),
            "ppl_change_pct": round(self.ppl_change_pct, 4),
            "decode_bytes": round(self.decode_bytes, 2),
            "decode_bytes_max": self.decode_bytes_max,
            "decode_bits_per_value": round(self.decode_bits_per_value, 3),
            "chunk_bits_per_value": round(self.chunk_bits_per_value, 3),
            "ratio_vs_fp32": round(self.ratio_vs_fp32, 3),
        }


class Evaluator:
    """Teacher-forced evaluation of codecs at splits of one bundle, caching per-split references.

    ``tokens`` (N,) are the text; positions 0..N-2 are scored against tokens 1..N-1. Sessions
    run with spinning off (the machine is shared) and ``threads`` intra-op threads. ``text``
    names the text in the results.
    """

    def __init__(
        self,
        bundle: Bundle,
        tokens: np.ndarray,
        *,
        chunk_tokens: int = 256,
        threads: int = 0,
        decode_samples: int = 512,
        text: str = "",
    ) -> None:
        if tokens.ndim != 1 or len(tokens) < 2:
            raise ConfigError(f"tokens must be a 1-d array of at least 2 ids, got shape {tokens.shape}")
        if chunk_tokens < 1:
            raise ConfigError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.bundle = bundle
        self.tokens = tokens
        self.text = text
        self.chunk_tokens = chunk_tokens
        self.decode_samples = decode_samples
        self.options = RuntimeOptions(intra_op_threads=threads, allow_spinning=False)
        self._refs: dict[int, Reference] = {}
        self._suffix: dict[int, Segment] = {}

    def _chunks(self) -> list[tuple[int, int]]:
        n = len(self.tokens)
        return [(a, min(a + self.chunk_tokens, n)) for a in range(0, n, self.chunk_tokens)]

    def _suffix_segment(self, split: int) -> Segment:
        if split not in self._suffix:
            self._suffix.clear()  # one split at a time: keep at most one suffix session alive
            start, end = self.bundle.split_range(split, "server")
            self._suffix[split] = Segment(self.bundle, start, end, last_logits_only=False, options=self.options)
        return self._suffix[split]

    def _prefix_hidden(self, split: int) -> list[np.ndarray]:
        start, end = self.bundle.split_range(split, "client")
        prefix = Segment(self.bundle, start, end, last_logits_only=False, options=self.options)
        cache = KVCache(self.bundle.shapes)
        hidden = []
        for a, b in self._chunks():
            hidden.append(prefix.run(self.tokens[None, a:b], cache, a))  # (1, T, H)
        return hidden

    def _suffix_scores(self, split: int, chunks: list[np.ndarray],
                       ref: np.ndarray | None) -> tuple[Scores, np.ndarray | None]:
        """Scores of every position, running the suffix on decoded chunks; with ``ref`` None
        (the reference run) also the (N - 1, V) log-probabilities."""
        suffix = self._suffix_segment(split)
        cache = KVCache(self.bundle.shapes)
        parts: list[tuple[np.ndarray, ...]] = []
        for (a, b), x in zip(self._chunks(), chunks, strict=True):
            logits = suffix.run(x, cache, a)[0]  # (T, V)
            scored = min(b, len(self.tokens) - 1) - a  # the last token has no next token
            row = score_logits(logits[:scored], self.tokens[a + 1 : a + 1 + scored],
                               None if ref is None else ref[a : a + scored])
            parts.append(row if ref is None else row[:3])
        scores = Scores(*(np.concatenate([p[i] for p in parts]) for i in range(3)))
        return scores, (np.concatenate([p[3] for p in parts]) if ref is None else None)

    def reference(self, split: int) -> Reference:
        """The fp32 run at ``split`` (computed once per evaluator)."""
        if split not in self._refs:
            hidden = self._prefix_hidden(split)
            fp32 = codecs.get_codec("fp32")
            scores, logprobs = self._suffix_scores(split, [fp32.decode(fp32.encode(h)) for h in hidden], None)
            if logprobs is None:
                raise ConfigError("the reference run returned no log-probabilities")
            self._refs[split] = Reference(split, hidden, scores.argmax, scores.logprob, logprobs)
        return self._refs[split]

    def decode_rows(self, split: int) -> np.ndarray:
        """Up to ``decode_samples`` evenly spaced prefix outputs as decode steps (S, 1, 1, H)."""
        rows = np.concatenate([h[0] for h in self.reference(split).hidden])  # (N, H)
        pick = np.unique(np.linspace(0, len(rows) - 1, min(self.decode_samples, len(rows))).astype(int))
        return rows[pick][:, None, None, :]

    def evaluate(self, split: int, codec_name: str) -> CodecQuality:
        """Quality and size of ``codec_name`` at ``split`` (encode/decode as the client does)."""
        codec = codecs.get_codec(codec_name)

        def round_trip(x: np.ndarray) -> tuple[np.ndarray, int]:
            payload = codecs.encode(x, codec_name)
            return codecs.decode(payload), len(payload)

        sizes = [len(codec.encode(row)) for row in self.decode_rows(split)]
        return self.evaluate_round_trip(split, codec.name, round_trip, sizes)

    def evaluate_twin(self, base: CodecQuality, codec_name: str) -> CodecQuality:
        """A codec whose decoded tensors equal ``base``'s (e.g. its +zstd twin): sizes only.

        The suffix is not rerun; ConfigError if a decoded chunk differs from the base codec's.
        """
        ref = self.reference(base.split)
        chunk_bytes, values = 0, 0
        for h in ref.hidden:
            payload = codecs.encode(h, codec_name)
            if codecs.decode(payload).tobytes() != codecs.decode(codecs.encode(h, base.codec)).tobytes():
                raise ConfigError(f"{codec_name} does not decode like {base.codec}: evaluate it on its own")
            chunk_bytes += len(payload)
            values += h.size
        sizes = [len(codecs.encode(row, codec_name)) for row in self.decode_rows(base.split)]
        return replace(
            base,
            codec=codec_name,
            chunk_bits_per_value=chunk_bytes * 8 / values,
            decode_bytes=float(np.mean(sizes)),
            decode_bytes_max=int(max(sizes)),
        )

    def evaluate_round_trip(
        self, split: int, name: str, round_trip: RoundTrip, decode_sizes: list[int]
    ) -> CodecQuality:
        """Like :meth:`evaluate` for any chunk transform (used to explore codecs before registering)."""
        ref = self.reference(split)
        decoded, chunk_bytes, values = [], 0, 0
        for h in ref.hidden:
            y, n_bytes = round_trip(h)
            if y.shape != h.shape or y.dtype != np.float32:
                raise ConfigError(f"{name}: round trip returned {y.dtype}{y.shape} for {h.dtype}{h.shape}")
            decoded.append(y)
            chunk_bytes += n_bytes
            values += h.size
        scores, _ = self._suffix_scores(split, decoded, ref.logprobs)
        return CodecQuality(
            split=split,
            codec=name,
            positions=len(scores.argmax),
            agreement=float((scores.argmax == ref.argmax).mean()),
            ppl=math.exp(-float(scores.logprob.mean())),
            ppl_ref=ref.perplexity,
            chunk_bits_per_value=chunk_bytes * 8 / values,
            decode_bytes=float(np.mean(decode_sizes)),
            decode_bytes_max=int(max(decode_sizes)),
            hidden_size=int(ref.hidden[0].shape[-1]),
            matches=scores.argmax == ref.argmax,
            kld=scores.kld,
            text=self.text,
        )

    def release(self, split: int) -> None:
        """Forget the cached reference and session of ``split`` (bounded memory over many splits)."""
        self._refs.pop(split, None)
        self._suffix.pop(split, None)


def paired_delta(a: CodecQuality, b: CodecQuality) -> tuple[float, float]:
    """(agreement of a - agreement of b, its standard error), paired over the same positions.

    Only positions where exactly one of the two matches the reference carry information
    (McNemar): SE = sqrt(n10 + n01) / N. On 2,000 positions agreements of codecs with equal
    error differ by a few tenths of a percent, so a difference within 2 SE is a tie.
    """
    if a.split != b.split or a.matches.shape != b.matches.shape or not a.matches.size:
        raise ConfigError("paired_delta needs two measurements of the same split and positions")
    only_a = int((a.matches & ~b.matches).sum())
    only_b = int((~a.matches & b.matches).sum())
    return (only_a - only_b) / a.matches.size, math.sqrt(only_a + only_b) / a.matches.size


def preamble(argv: list[str]) -> None:
    """The first lines of every codec benchmark: how it was run and on what."""
    print("command: " + " ".join([Path(sys.executable).name, *argv]))
    print(machine_line())


REPO = Path(__file__).resolve().parents[1]
EXPORT_HINT = "export the model with: splitllm-export -q -o bundles/smollm2"


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """The options the codec benchmarks share: bundle, texts, splits, prefill chunk, threads."""
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "smollm2")
    add_texts_arguments(parser)
    parser.add_argument("--splits", default="1,5,10,20,29")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per prefill chunk")
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: one per core)")


def open_texts(args: argparse.Namespace) -> tuple[Bundle, list[int], list[tuple[Text, np.ndarray]]]:
    """The bundle, splits and (text, tokens) that ``args`` name; SplitLLMError or ValueError if unusable."""
    bundle = Bundle.open(args.bundle, verify=False)
    texts = [(t, text_tokens(bundle, t, args.tokens)) for t in chosen_texts(args)]
    return bundle, [int(s) for s in args.splits.split(",")], texts
