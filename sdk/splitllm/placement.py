"""Placements: which side runs each unit, and the runs of same-side units a step walks."""

from __future__ import annotations

from dataclasses import dataclass

from splitllm.errors import ConfigError
from splitllm.planner.model import CLIENT, SERVER  # one spelling of the two sides, the planner's

__all__ = ["CLIENT", "SERVER", "Placement"]


@dataclass(frozen=True)
class Placement:
    """Side of every unit. ``runs`` groups consecutive units on the same side."""

    sides: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.sides) < 3 or any(s not in (CLIENT, SERVER) for s in self.sides):
            raise ConfigError(f"a placement is a sequence of 'client'/'server' per unit, got {self.sides!r}")

    @classmethod
    def for_split(cls, split: int, num_units: int, local: bool = False) -> Placement:
        num_layers = num_units - 2
        if not 0 <= split <= num_layers:
            raise ConfigError(f"split must be in 0..{num_layers}, got {split}")
        if local:
            return cls((CLIENT,) * num_units)
        return cls((CLIENT,) * (split + 1) + (SERVER,) * (num_units - split - 1))

    @property
    def runs(self) -> list[tuple[str, int, int]]:
        out: list[tuple[str, int, int]] = []
        start = 0
        for unit in range(1, len(self.sides) + 1):
            if unit == len(self.sides) or self.sides[unit] != self.sides[start]:
                out.append((self.sides[start], start, unit))
                start = unit
        return out

    def compact(self) -> str:
        """The runs as text, e.g. ``C0-11 S12-31`` (C client, S server; 0 = embeddings, last = head)."""
        return " ".join(f"{'C' if side == CLIENT else 'S'}{start}-{end - 1}" for side, start, end in self.runs)

    @property
    def is_local(self) -> bool:
        return all(s == CLIENT for s in self.sides)

    @property
    def split(self) -> int | None:
        """k when this is the placement of split k (or all-local: the layer count), else None."""
        runs = self.runs
        if len(runs) == 1 and runs[0][0] == CLIENT:
            return len(self.sides) - 2
        if len(runs) == 2 and runs[0][0] == CLIENT:
            return runs[0][2] - 1
        return None
