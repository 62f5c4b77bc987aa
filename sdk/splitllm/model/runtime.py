"""Running a range of units with ONNX Runtime and a KV cache.

The same code runs on the device (the prefix) and on the server (the suffix), so both sides
feed graphs identically: position ids continue from the cache length, and the attention mask
is an additive causal mask of shape (B, 1, T, P+T) built here in numpy.

Ranges of fused layers (GroupQueryAttention: the Llama family's exact blocks and device
variants) take ``seqlens_k`` and ``total_seq_len`` instead, and by default write their keys and
values in place: each layer's
cache is a preallocated (B, KV, capacity, D) buffer bound with IOBinding as both the past input
and the present output, so a step appends T positions instead of copying the whole cache. The
cache still hands out exact-length views, so moving, truncating and sending it work as before.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from splitllm.errors import ConfigError, RuntimeFailure
from splitllm.model.bundle import DEFAULT_VARIANT

if TYPE_CHECKING:
    from splitllm.model.bundle import Bundle, ModelShapes

__all__ = ["KVCache", "RuntimeOptions", "Segment", "causal_mask", "make_session", "resolve_providers"]

log = logging.getLogger("splitllm.runtime")
CPU_PROVIDER = "CPUExecutionProvider"
# Short names accepted for ONNX Runtime's execution providers (the full names work too).
PROVIDER_ALIASES = {
    "cpu": CPU_PROVIDER, "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider", "migraphx": "MIGraphXExecutionProvider", "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider", "directml": "DmlExecutionProvider", "nnapi": "NnapiExecutionProvider",
    "openvino": "OpenVINOExecutionProvider", "qnn": "QNNExecutionProvider", "xnnpack": "XnnpackExecutionProvider",
}
_warned: set[str] = set()


def resolve_providers(requested: tuple[str, ...] | list[str] | None) -> list[str]:
    """The execution providers to create sessions with: ``requested`` in order (short names such
    as ``cuda`` or full ORT names), without the ones this onnxruntime build does not have (a
    warning is logged once for each), and always ending with the CPU provider, which runs any
    node the others do not take. Unknown names raise ConfigError."""
    available = ort.get_available_providers()
    out: list[str] = []
    for name in requested or (CPU_PROVIDER,):
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if not full.endswith("ExecutionProvider"):
            raise ConfigError(f"unknown execution provider {name!r}; use one of {sorted(PROVIDER_ALIASES)} "
                              "or a full ONNX Runtime name such as CUDAExecutionProvider")
        if full not in available:
            if full not in _warned:
                _warned.add(full)
                log.warning("execution provider %s is not available in this onnxruntime build (available: %s); "
                            "falling back to the next one, then CPU", full, ", ".join(available))
            continue
        if full not in out:
            out.append(full)
    if CPU_PROVIDER in out:
        out.remove(CPU_PROVIDER)
    return [*out, CPU_PROVIDER]

_NEG = np.float32(np.finfo(np.float32).min)


@dataclass(frozen=True)
class RuntimeOptions:
    """ONNX Runtime settings for one session.

    ``intra_op_threads=0`` lets ORT pick (one per core). ``allow_spinning`` keeps idle pool
    threads spinning for lower latency; turn it off when several sessions share few cores
    (several sessions spinning their pools on 2 cores starve each other). With spinning, the
    threads stop as soon as a run returns unless ``spin_between_runs``: a split client's cores are
    then free for its link (or a server on the same machine) between steps, while a client that
    runs every unit itself keeps them hot for its next step (``benchmarks/local_step.py``: for
    SmolLM2 int4 on 2 cores, 7-12% more tokens/s in a bare loop and up to 11% through a local
    client, in two runs). ``profile_prefix`` turns on
    ORT's profiler, writing ``<prefix>_<date>.json`` when ``session.end_profiling()`` is called.
    ``providers``: ONNX Runtime execution providers to try in order (see :func:`resolve_providers`:
    unavailable ones are skipped with a warning, CPU always comes last); ``session.get_providers()``
    tells what a session actually got.
    """

    intra_op_threads: int = 0
    allow_spinning: bool = True
    spin_between_runs: bool = False
    optimization: str = "all"
    profile_prefix: str | None = None
    providers: tuple[str, ...] = (CPU_PROVIDER,)

    def session_options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if self.optimization not in levels:
            raise ConfigError(f"optimization must be one of {sorted(levels)}, got {self.optimization!r}")
        so.graph_optimization_level = levels[self.optimization]
        if self.intra_op_threads < 0:
            raise ConfigError(f"intra_op_threads must be >= 0, got {self.intra_op_threads}")
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        if self.allow_spinning and not self.spin_between_runs:
            # Spin while a run is under way, stop as soon as it returns: a device session then
            # does not burn the cores its server (or the next segment) needs between steps.
            so.add_session_config_entry("session.force_spinning_stop", "1")
        so.log_severity_level = 3
        if self.profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = self.profile_prefix
        return so


_shared: weakref.WeakValueDictionary[tuple[Any, ...], ort.InferenceSession] = weakref.WeakValueDictionary()
_shared_lock = threading.Lock()


def make_session(
    bundle: Bundle,
    start: int,
    end: int,
    *,
    last_logits_only: bool = False,
    options: RuntimeOptions | None = None,
    variant: str = DEFAULT_VARIANT,
    shared: bool = False,
) -> ort.InferenceSession:
    """An ORT session for units [start, end) of ``bundle`` with ``variant`` weights (see Bundle.variants).

    ``shared``: one session per process for equal arguments while any user holds it. A session
    holds its weights and their prepacked copies; Segments of several clients in one process (a
    gateway, a load test) that run the same range share it, each with its own IOBinding (ORT's
    Run is thread-safe). Profiling sessions are never shared.
    """
    options = options or RuntimeOptions()
    if shared and not options.profile_prefix:
        key = (str(bundle.path.resolve()), bundle.bundle_id, start, end, last_logits_only, variant, options)
        with _shared_lock:
            session = _shared.get(key)
            if session is None:
                session = _shared[key] = make_session(bundle, start, end, last_logits_only=last_logits_only,
                                                      options=options, variant=variant)
        return session
    graph = bundle.range_graph(start, end, last_logits_only=last_logits_only, variant=variant)
    so = options.session_options()
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(bundle.path))
    providers = resolve_providers(options.providers)
    try:
        return ort.InferenceSession(graph, so, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise RuntimeFailure(f"ONNX Runtime could not load units [{start}, {end}) of {bundle.path}: {exc}") from exc


def causal_mask(batch: int, n_tokens: int, past_len: int) -> np.ndarray:
    """Additive mask (B, 1, T, P+T): query t sees keys 0..P+t."""
    total = past_len + n_tokens
    if n_tokens == 1:
        return np.zeros((batch, 1, 1, total), dtype=np.float32)
    keys = np.arange(total)[None, :]
    queries = np.arange(n_tokens)[:, None] + past_len
    mask = np.where(keys <= queries, np.float32(0), _NEG).astype(np.float32)
    return np.broadcast_to(mask, (batch, 1, n_tokens, total)).copy()


_CAPACITY_STEP = 64  # preallocated KV buffers hold a multiple of this many positions
_GROWTH = 1.5  # and grow by at least this factor: few copies, at most ~1.5x the positions held


class KVCache:
    """Per-unit key/value arrays (B, KV, P, D) for the decoder layers a side has run.

    ``get`` returns exact-length arrays; for units a fused range has run they are views into a
    larger preallocated buffer (see :meth:`buffers`) that the next step extends in place.
    """

    def __init__(self, shapes: ModelShapes, batch: int = 1) -> None:
        self.shapes = shapes
        self.batch = batch
        self._kv: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._buf: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._empty = np.zeros((batch, shapes.num_kv_heads, 0, shapes.head_dim), dtype=np.float32)

    def get(self, unit: int) -> tuple[np.ndarray, np.ndarray]:
        return self._kv.get(unit, (self._empty, self._empty))

    def set(self, unit: int, key: np.ndarray, value: np.ndarray) -> None:
        self._kv[unit] = (key, value)
        self._buf.pop(unit, None)

    def buffers(self, unit: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, KV, capacity, D) key and value buffers of ``unit`` holding its cache, capacity >= ``length``.

        The cached positions are copied in only when the unit has no buffer yet or outgrows it
        (capacity is a multiple of 64 positions and grows at least 1.5x, capped at the model's
        context unless ``length`` is beyond it), so a server holding many short sessions
        reserves little more than they use.
        """
        key, value = self.get(unit)
        held = self._buf.get(unit)
        if held is not None and held[0].shape[2] >= length and key.base is held[0]:
            return held
        past = key.shape[2]
        old = held[0].shape[2] if held is not None else 0
        capacity = max(length, int(_GROWTH * old), _CAPACITY_STEP)
        capacity = -(-capacity // _CAPACITY_STEP) * _CAPACITY_STEP
        capacity = max(min(capacity, self.shapes.max_context), length)
        shape = (key.shape[0] if past else self.batch, self.shapes.num_kv_heads, capacity, self.shapes.head_dim)
        new = (np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32))
        new[0][:, :, :past] = key
        new[1][:, :, :past] = value
        self._buf[unit] = new
        self._kv[unit] = (new[0][:, :, :past], new[1][:, :, :past])
        return new

    def _grown(self, unit: int, length: int) -> None:
        """The unit's buffers now hold ``length`` valid positions (written in place by ORT)."""
        key, value = self._buf[unit]
        self._kv[unit] = (key[:, :, :length], value[:, :, :length])

    def length(self, unit: int) -> int:
        kv = self._kv.get(unit)
        return 0 if kv is None else int(kv[0].shape[2])

    def units(self) -> list[int]:
        return sorted(self._kv)

    def truncate(self, length: int, units: range | None = None) -> None:
        """Keep the first ``length`` positions of the given units (all units by default)."""
        for unit in list(self._kv) if units is None else units:
            if unit in self._kv:
                k, v = self._kv[unit]
                if length == 0:
                    del self._kv[unit]
                    self._buf.pop(unit, None)
                else:
                    self._kv[unit] = (k[:, :, :length], v[:, :, :length])

    def drop(self, units: range) -> None:
        for unit in units:
            self._kv.pop(unit, None)
            self._buf.pop(unit, None)

    def nbytes(self) -> int:
        """Bytes held, preallocated capacity included."""
        return sum(k.nbytes + v.nbytes for unit, (k, v) in self._kv.items() if unit not in self._buf) + sum(
            k.nbytes + v.nbytes for k, v in self._buf.values())


class Segment:
    """Units [start, end) as one ORT session, fed from and into a :class:`KVCache`.

    ``variant`` chooses the weights ("fp32", the exact blocks, or a device variant of the
    bundle such as "int4"); ConfigError names the bundle's variants when it has no such one.
    ``bind_kv`` (default on) makes a range of fused layers write its cache in place (module
    docstring); off, or for exported layer graphs, every step's outputs replace the cache.
    Segments of the same range and options in one process share their ORT session (and so
    their weights; ``make_session(shared=True)``); each keeps its own IOBinding.
    """

    def __init__(
        self,
        bundle: Bundle,
        start: int,
        end: int,
        *,
        last_logits_only: bool = True,
        options: RuntimeOptions | None = None,
        variant: str = DEFAULT_VARIANT,
        bind_kv: bool = True,
    ) -> None:
        self.bundle = bundle
        self.start, self.end = start, end
        self.variant = variant
        self.session = make_session(bundle, start, end, last_logits_only=last_logits_only, options=options,
                                    variant=variant, shared=True)
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        num_layers = bundle.num_layers
        self.layer_units = [u for u in range(start, end) if 1 <= u <= num_layers]
        self.takes_ids = start == 0
        self.emits_logits = end == bundle.num_units
        self.main_output = "logits" if self.emits_logits else f"h{end - 1}"
        self.main_input = "input_ids" if self.takes_ids else f"h{start - 1}"
        # Fused layers (GroupQueryAttention) can share past and present buffers: bind them.
        self.binds_kv = bind_kv and "seqlens_k" in self.input_names and bool(self.layer_units)
        self._io: ort.IOBinding | None = None
        self._bound: dict[str, np.ndarray] = {}  # name -> the buffer bound to it (kept alive here)
        # The main output's last dimension when it is a fixed float32 width: then each run writes
        # it into an array of ours instead of asking ORT for every output afterwards (which wraps
        # all 2L cache outputs too: the largest piece of Python in a profile of the decode loop).
        meta = next(o for o in self.session.get_outputs() if o.name == self.main_output)
        width = meta.shape[-1] if meta.shape else None
        self._out_width = width if isinstance(width, int) and meta.type == "tensor(float)" else None
        self._last_only = last_logits_only and self.emits_logits

    def run(self, x: np.ndarray, cache: KVCache, past_len: int) -> np.ndarray:
        """Run T new positions after ``past_len`` cached ones; returns hidden (B,T,H) or logits.

        ``x`` is int64 token ids (B, T) for a range that starts with the embeddings, else
        float32 hidden states (B, T, H). The cache of every layer in the range must hold exactly
        ``past_len`` positions; it is extended by T on success and untouched on failure.
        """
        for unit in self.layer_units:
            have = cache.length(unit)
            if have != past_len:
                raise ConfigError(f"KV cache of unit {unit} holds {have} positions, expected {past_len}")
        batch, n_tokens = int(x.shape[0]), int(x.shape[1])
        feeds: dict[str, Any] = {self.main_input: x}
        if "position_ids" in self.input_names:
            positions = np.arange(past_len, past_len + n_tokens, dtype=np.int64)
            feeds["position_ids"] = np.broadcast_to(positions, (batch, n_tokens))
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = causal_mask(batch, n_tokens, past_len)
        if "seqlens_k" in self.input_names:  # fused layers (GroupQueryAttention): exact blocks or a variant
            feeds["seqlens_k"] = np.full(batch, past_len + n_tokens - 1, dtype=np.int32)
            feeds["total_seq_len"] = np.array(past_len + n_tokens, dtype=np.int32)
        if self.binds_kv:
            return self._run_bound(feeds, cache, past_len + n_tokens, (batch, 1 if self._last_only else n_tokens))
        for unit in self.layer_units:
            key, value = cache.get(unit)
            feeds[f"past_key.{unit - 1}"] = key
            feeds[f"past_value.{unit - 1}"] = value
        try:
            outputs = self.session.run(None, feeds)
        except Exception as exc:  # onnxruntime's own exception types
            raise RuntimeFailure(f"running units [{self.start}, {self.end}) failed: {exc}") from exc
        named = dict(zip(self.output_names, outputs, strict=True))
        for unit in self.layer_units:
            cache.set(unit, named[f"present_key.{unit - 1}"], named[f"present_value.{unit - 1}"])
        return named[self.main_output]

    def _run_bound(self, feeds: dict[str, Any], cache: KVCache, total: int, rows: tuple[int, int]) -> np.ndarray:
        """One run with every layer's past and present bound to the same preallocated buffer;
        ``rows`` (B, T') are the main output's leading dimensions."""
        if self._io is None:
            self._io = self.session.io_binding()
            self._io.bind_output(self.main_output, "cpu")  # first bound: get_outputs()[0] from now on
        io = self._io
        for unit in self.layer_units:
            for name, buf in zip(("key", "value"), cache.buffers(unit, total), strict=True):
                past, present = f"past_{name}.{unit - 1}", f"present_{name}.{unit - 1}"
                if self._bound.get(past) is not buf:
                    value = ort.OrtValue.ortvalue_from_numpy(buf)
                    io.bind_ortvalue_input(past, value)
                    io.bind_ortvalue_output(present, value)
                    self._bound[past] = buf
        # bind_cpu_input does not copy: ORT reads these arrays during the run, so keep them alive
        # (a non-contiguous feed becomes a temporary copy that nothing else references).
        inputs = {name: np.ascontiguousarray(array) for name, array in feeds.items()}
        for name, array in inputs.items():
            io.bind_cpu_input(name, array)
        out = None
        if self._out_width is not None:
            out = np.empty((*rows, self._out_width), dtype=np.float32)
            io.bind_output(self.main_output, "cpu", element_type=np.float32, shape=list(out.shape),
                           buffer_ptr=out.ctypes.data)
        else:
            io.bind_output(self.main_output, "cpu")  # unallocated again: its shape changes with T
        try:
            self.session.run_with_iobinding(io)
        except Exception as exc:  # onnxruntime's own exception types
            raise RuntimeFailure(f"running units [{self.start}, {self.end}) failed: {exc}") from exc
        for unit in self.layer_units:
            cache._grown(unit, total)  # noqa: SLF001 - the cache's own bookkeeping
        return out if out is not None else io.get_outputs()[0].numpy()
