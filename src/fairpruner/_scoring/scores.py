"""Score containers: per-group U, R and L1 vectors, with a weights-only-safe file format."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union
import os

import torch

from .._core.files import read_torch_file
from .._errors import FairPrunerError
from .._measure.costmodel import CostModel

__all__ = ["GroupScores", "Scores"]

FORMAT_VERSION = 2  # 2: groups record max_removed


@dataclass
class GroupScores:
    """Scores of one coupled group.

    Attributes:
        name: qualified name of the group's root module.
        u: U-Score per unit (max class-pair W1; low = separates nothing).
        r: R-Score per unit (|first-order Taylor loss change|; high = critical).
        l1: L1 norm of the unit's producing weights (an alternative removal signal).
        channels: channels in the root's output.
        unit_channels: (units, unit_size) root channels of each unit.
        writers: Conv/Linear layers writing the group's channels: more than one where they are added (a
            residual stream, which every block reads), 1 otherwise (unit families count as 1).
        feeds_output: the model's output layer reads the group's channels (they are the head's features).
        max_removed: the most units one plan may remove where the model needs more than 1 % of them to remain
            (an MoE block keeps ``top_k`` experts); None: 99 %, ToD's own limit.
    """

    name: str
    u: torch.Tensor
    r: torch.Tensor
    l1: torch.Tensor
    channels: int
    unit_channels: torch.Tensor
    writers: int = 1
    feeds_output: bool = False
    max_removed: Optional[int] = None

    @property
    def is_stream(self) -> bool:
        """True for a residual stream: several layers write (add into) the same channels."""
        return self.writers > 1

    @property
    def n_units(self) -> int:
        return int(self.u.numel())


@dataclass
class Scores:
    """What :func:`fairpruner.score` measured: per-group scores, the cost model, and the settings used."""

    groups: List[GroupScores]
    cost: CostModel
    meta: Dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> GroupScores:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    @property
    def names(self) -> List[str]:
        return [g.name for g in self.groups]

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes the scores to ``path`` (a plain dict of tensors and a JSON string)."""
        torch.save({
            "format": "fairpruner.scores", "version": FORMAT_VERSION, "meta": json.dumps(self.meta),
            "groups": [{"name": g.name, "u": g.u, "r": g.r, "l1": g.l1, "channels": g.channels,
                        "unit_channels": g.unit_channels, "writers": g.writers,
                        "feeds_output": g.feeds_output, "max_removed": g.max_removed} for g in self.groups],
            "cost": self.cost.to_dict(),
        }, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Scores":
        """Reads scores written by :meth:`save` with ``torch.load(weights_only=True)``."""
        d = read_torch_file(path, "fairpruner.scores", "write one with Scores.save")
        if d["version"] > FORMAT_VERSION:
            raise FairPrunerError(f"{path} was written by a newer fairpruner (format {d['version']}); upgrade.")
        groups = [GroupScores(g["name"], g["u"], g["r"], g["l1"], int(g["channels"]), g["unit_channels"],
                              int(g.get("writers", 1)), bool(g.get("feeds_output", False)),
                              None if g.get("max_removed") is None else int(g["max_removed"]))
                  for g in d["groups"]]
        return cls(groups, CostModel.from_dict(d["cost"]), json.loads(d["meta"]))
