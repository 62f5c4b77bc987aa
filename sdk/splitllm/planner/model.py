"""The planner's data model and its exact evaluators (private; import from :mod:`splitllm.planner`).

Why a separate module: the types, their validation and the two evaluators are the single
source of truth every algorithm, test and benchmark agrees on; the algorithms live in
``planner.py``.

Latency model (all times in ms, sizes in bytes, bandwidths in bit/s)::

    step_i   = switch cost at boundary i (0 if the side does not change) + compute of layer i
    latency  = step_0 + step_1 + ... + step_{L-1} + (return cost at boundary L if layer L-1 ran
               on the server, else 0)

    switch client->server at boundary j: bytes_j * 8000 / uplink_bps   + rtt_ms / 2
    switch server->client at boundary j: bytes_j * 8000 / downlink_bps + rtt_ms / 2
    bytes_0 = input_bytes, bytes_j = layers[j-1].out_bytes for j >= 1

The float operations are fixed (``bytes * 8000.0 / bps``, one addition per step, steps summed
in layer order) so that instances whose terms are whole milliseconds evaluate exactly, and so
that the DP's rounded-up terms bound the evaluator's sum (see ``docs/planner.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np

from splitllm.errors import InvalidProblem

CLIENT = "client"
SERVER = "server"
SIDES = (CLIENT, SERVER)

_LAYER_FIELDS = ("client_ms", "server_ms", "server_work", "out_bytes")
_PROBLEM_NUMBERS = ("input_bytes", "uplink_bps", "downlink_bps", "rtt_ms", "sla_ms")
_POSITIVE = frozenset({"uplink_bps", "downlink_bps"})


def _number(value: Any, field: str, *, positive: bool = False) -> float:
    """Return ``value`` as a finite float, or raise :class:`InvalidProblem` naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidProblem(f"{field} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise InvalidProblem(f"{field} must be finite, got {value!r}")
    if positive and value <= 0:
        raise InvalidProblem(f"{field} must be > 0, got {value!r}")
    if value < 0:
        raise InvalidProblem(f"{field} must be >= 0, got {value!r}")
    return float(value)


def _mapping(data: Any, what: str, allowed: Sequence[str], required: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise InvalidProblem(f"{what} must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise InvalidProblem(f"{what} has unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    for key in required:
        if key not in data:
            raise InvalidProblem(f"{_join(what, key)} is missing")
    return data


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix and prefix != "problem" else key


@dataclass(frozen=True)
class Layer:
    """One unit the planner places: an embedding, a transformer block or a head.

    ``client_ms``/``server_ms``: compute time on each side; ``server_work``: what running it on
    the server costs the server (FLOPs, GPU-ms, ... any unit, only sums are compared);
    ``out_bytes``: size of its output as sent over the wire (after the codec).
    """

    client_ms: float
    server_ms: float
    server_work: float
    out_bytes: float
    name: str = ""

    def __post_init__(self) -> None:
        for key in _LAYER_FIELDS:
            object.__setattr__(self, key, _number(getattr(self, key), key))
        if not isinstance(self.name, str):
            raise InvalidProblem(f"name must be a string, got {type(self.name).__name__}")

    @classmethod
    def from_dict(cls, data: Any, where: str = "layer") -> Layer:
        """Build from a JSON object; errors name the field as ``{where}.{key}``."""
        data = _mapping(data, where, (*_LAYER_FIELDS, "name"), _LAYER_FIELDS)
        values = {key: _number(data[key], f"{where}.{key}") for key in _LAYER_FIELDS}
        name = data.get("name", "")
        if not isinstance(name, str):
            raise InvalidProblem(f"{where}.name must be a string, got {type(name).__name__}")
        return cls(name=name, **values)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {key: getattr(self, key) for key in _LAYER_FIELDS}
        if self.name:
            out["name"] = self.name
        return out


class _Costs(NamedTuple):
    """Per-step latency terms (ms), precomputed once per problem; index i is layer i."""

    cc: np.ndarray  # (L,) client -> client: client compute
    cs: np.ndarray  # (L,) client -> server: upload at boundary i + server compute
    ss: np.ndarray  # (L,) server -> server: server compute
    sc: np.ndarray  # (L,) server -> client: download at boundary i + client compute
    ret_ms: float  # download of the last layer's output at boundary L
    work: np.ndarray  # (L,) server work of each layer
    up: np.ndarray  # (L + 1,) client -> server switch cost at each boundary
    down: np.ndarray  # (L + 1,) server -> client switch cost at each boundary
    table: np.ndarray  # (5, L) rows cc, cs, ss, sc, work in one block: what the compiled DP reads


@dataclass(frozen=True)
class Problem:
    """One client's placement problem. Validated on construction (:class:`InvalidProblem`)."""

    layers: tuple[Layer, ...]
    input_bytes: float
    uplink_bps: float
    downlink_bps: float
    rtt_ms: float
    sla_ms: float

    def __post_init__(self) -> None:
        if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Sequence):
            raise InvalidProblem(f"layers must be a list of layers, got {type(self.layers).__name__}")
        layers = tuple(self.layers)
        if not layers:
            raise InvalidProblem("layers must not be empty")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise InvalidProblem(f"layers[{i}] must be a Layer, got {type(layer).__name__}")
        object.__setattr__(self, "layers", layers)
        for key in _PROBLEM_NUMBERS:
            object.__setattr__(self, key, _number(getattr(self, key), key, positive=key in _POSITIVE))

    @classmethod
    def from_dict(cls, data: Any) -> Problem:
        """Build from a JSON object; an error names the offending field, e.g. ``layers[3].server_ms``."""
        names = [f.name for f in fields(cls)]
        data = _mapping(data, "problem", names, names)
        raw_layers = data["layers"]
        if not isinstance(raw_layers, list):
            raise InvalidProblem(f"layers must be a list, got {type(raw_layers).__name__}")
        if not raw_layers:
            raise InvalidProblem("layers must not be empty")
        layers = tuple(Layer.from_dict(item, f"layers[{i}]") for i, item in enumerate(raw_layers))
        values = {key: _number(data[key], key, positive=key in _POSITIVE) for key in _PROBLEM_NUMBERS}
        return cls(layers=layers, **values)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layers": [layer.to_dict() for layer in self.layers]}
        out.update({key: getattr(self, key) for key in _PROBLEM_NUMBERS})
        return out

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def boundary_bytes(self, j: int) -> float:
        """Bytes crossing boundary ``j`` (0..L, before layer j) if the side changes there."""
        return self.input_bytes if j == 0 else self.layers[j - 1].out_bytes

    @cached_property
    def _costs(self) -> _Costs:
        n = len(self.layers)
        client = np.array([layer.client_ms for layer in self.layers], dtype=np.float64)
        server = np.array([layer.server_ms for layer in self.layers], dtype=np.float64)
        sizes = np.array([self.boundary_bytes(j) for j in range(n + 1)], dtype=np.float64)
        with np.errstate(over="ignore"):
            up = sizes * 8000.0 / self.uplink_bps + self.rtt_ms / 2
            down = sizes * 8000.0 / self.downlink_bps + self.rtt_ms / 2
            table = np.stack([client, up[:n] + server, server, down[:n] + client])
            table = np.concatenate([table, [[layer.server_work for layer in self.layers]]])
            costs = _Costs(
                cc=table[0],
                cs=table[1],
                ss=table[2],
                sc=table[3],
                ret_ms=float(down[n]),
                work=table[4],
                up=up,
                down=down,
                table=table,
            )
        for arr in (costs.table, costs.cc, costs.cs, costs.ss, costs.sc, costs.work, costs.up, costs.down):
            arr.flags.writeable = False
        return costs


def _sides(problem: Problem, placement: Sequence[str]) -> list[bool]:
    """``placement`` as a list of on-server flags; raises :class:`InvalidProblem` if malformed."""
    if isinstance(placement, str) or len(placement) != problem.num_layers:
        raise InvalidProblem(f"placement must list {problem.num_layers} sides, got {placement!r}")
    out = []
    for i, side in enumerate(placement):
        if side not in SIDES:
            raise InvalidProblem(f"placement[{i}] must be 'client' or 'server', got {side!r}")
        out.append(side == SERVER)
    return out


def latency_ms(problem: Problem, placement: Sequence[str]) -> float:
    """End-to-end latency (ms) of ``placement``: compute plus every side switch (see module doc)."""
    c = problem._costs
    cc, cs, ss, sc = c.cc.tolist(), c.cs.tolist(), c.ss.tolist(), c.sc.tolist()
    total = 0.0
    prev_server = False
    for i, on_server in enumerate(_sides(problem, placement)):
        if on_server:
            total += ss[i] if prev_server else cs[i]
        else:
            total += sc[i] if prev_server else cc[i]
        prev_server = on_server
    if prev_server:
        total += c.ret_ms
    return total


def server_work(problem: Problem, placement: Sequence[str]) -> float:
    """Total server work of ``placement``: the sum over layers placed on the server, in layer order."""
    work = problem._costs.work.tolist()
    total = 0.0
    for i, on_server in enumerate(_sides(problem, placement)):
        if on_server:
            total += work[i]
    return total


@dataclass(frozen=True)
class Plan:
    """A placement and its exact evaluation.

    ``feasible`` is ``latency_ms <= problem.sla_ms`` by :func:`latency_ms`; an infeasible plan is
    the algorithm's best effort (for the DP and the ILP: the minimum-latency placement).
    """

    placement: tuple[str, ...]
    server_work: float
    latency_ms: float
    feasible: bool
    algorithm: str

    @classmethod
    def evaluate(cls, problem: Problem, placement: Sequence[str], algorithm: str) -> Plan:
        """The one way algorithms build a plan: evaluate ``placement`` exactly on ``problem``."""
        lat = latency_ms(problem, placement)
        return cls(
            placement=tuple(placement),
            server_work=server_work(problem, placement),
            latency_ms=lat,
            feasible=lat <= problem.sla_ms,
            algorithm=algorithm,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "placement": list(self.placement),
            "server_work": self.server_work,
            "latency_ms": self.latency_ms,
            "feasible": self.feasible,
            "algorithm": self.algorithm,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> Plan:
        keys = ("placement", "server_work", "latency_ms", "feasible", "algorithm")
        data = _mapping(data, where, keys, keys)
        placement = data["placement"]
        if not isinstance(placement, list) or not placement or any(s not in SIDES for s in placement):
            raise InvalidProblem(f"{where}.placement must be a non-empty list of 'client'/'server'")
        if not isinstance(data["feasible"], bool):
            raise InvalidProblem(f"{where}.feasible must be a boolean")
        if not isinstance(data["algorithm"], str):
            raise InvalidProblem(f"{where}.algorithm must be a string")
        return cls(
            placement=tuple(placement),
            server_work=_number(data["server_work"], f"{where}.server_work"),
            latency_ms=_number(data["latency_ms"], f"{where}.latency_ms"),
            feasible=data["feasible"],
            algorithm=data["algorithm"],
        )


def min_latency(problem: Problem, algorithm: str = "min-latency") -> Plan:
    """The exact minimum-latency placement (ties: less server work), by a 2-state DP over sides.

    O(L). The DP and the ILP return it, flagged infeasible, when no plan meets the SLA.
    Lexicographic (latency, work) minimisation is exact because both are sums over steps, up to
    float rounding: partial sums are compared layer by layer, so two plans whose latencies differ
    only below the rounding of the total (a 2e-16 ms step next to a 2 ms one) are not a tie here
    and the lower partial sum wins even if it carries more work.
    """
    c = problem._costs
    cc, cs, ss, sc, work = c.cc.tolist(), c.cs.tolist(), c.ss.tolist(), c.sc.tolist(), c.work.tolist()
    n = problem.num_layers
    # (latency_ms, work) of the best partial plan ending on each side; the data starts on the
    # client, so "ended on the server" is impossible before layer 0.
    on_c, on_s = (0.0, 0.0), (math.inf, math.inf)
    c_from_s = [False] * n  # layer i on the client is best reached from the server
    s_from_s = [False] * n
    for i in range(n):
        stay, move = (on_c[0] + cc[i], on_c[1]), (on_s[0] + sc[i], on_s[1])
        new_c = move if move < stay else stay
        c_from_s[i] = move < stay
        stay, move = (on_s[0] + ss[i], on_s[1] + work[i]), (on_c[0] + cs[i], on_c[1] + work[i])
        on_s = stay if stay < move else move
        s_from_s[i] = stay < move
        on_c = new_c
    on_server = (on_s[0] + c.ret_ms, on_s[1]) < on_c
    placement = [CLIENT] * n
    for i in range(n - 1, -1, -1):
        if on_server:
            placement[i] = SERVER
        on_server = (s_from_s if on_server else c_from_s)[i]
    return Plan.evaluate(problem, placement, algorithm)


def better_plan(a: Plan, b: Plan) -> Plan:
    """The better of two plans: feasible first, then less work, then lower latency."""
    if a.feasible != b.feasible:
        return a if a.feasible else b
    if not a.feasible:
        return a if (a.latency_ms, a.server_work) <= (b.latency_ms, b.server_work) else b
    return a if (a.server_work, a.latency_ms) <= (b.server_work, b.latency_ms) else b
