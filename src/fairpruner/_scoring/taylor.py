"""The R-Score's raw material: per group and output-side member, the signed first-order Taylor terms
``sum_b dL_b/dw * w`` of every root channel, accumulated while the backward pass runs.

Each parameter's gradient is reduced to those per-channel terms the moment autograd has accumulated it, and then
freed (a post-accumulate-grad hook), so the scoring pass never holds a model-sized set of gradients (3.9 GB for
a 1 B-parameter model). The terms are linear in the gradient, so summing them batch by batch equals reducing the
accumulated gradient, up to float rounding. Conv, Linear and norm members take their terms from activations
instead (:mod:`.taps`), and their weights get no gradient at all.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from .._core.groups import GroupSpec, Member, member_params, per_channel
from .taps import ActivationTaps, float_inputs, grad_inputs

__all__ = ["TaylorTerms"]

Key = Tuple[int, int]  # (group index, member index)


class TaylorTerms:
    """Accumulates the Taylor terms of every output-side member with parameters, freeing gradients as they come.

    Args:
        groups: the scored groups; ``modules``: the scored model's modules by name.
    """

    def __init__(self, groups: Sequence[GroupSpec], modules: Dict[str, nn.Module]) -> None:
        self.readers: Dict[int, List[Tuple[Key, int, Member]]] = {}
        self.channels: Dict[Key, int] = {}
        for gi, g in enumerate(groups):
            for mi, m in enumerate(g.members):
                params = member_params(m, modules[m.module]) if m.side == "out" else []
                if params:
                    self.channels[(gi, mi)] = int(m.index.shape[0])
                for p, dim in params:
                    self.readers.setdefault(id(p), []).append(((gi, mi), dim, m))
        self.terms: Dict[Key, torch.Tensor] = {}
        self.taps = ActivationTaps(groups, modules)
        self.frozen = False  # some weights need no gradient: the inputs carry the backward
        self.tapped: set = set()  # keys whose terms come from activations

    def configure(self, model: nn.Module, trace: tuple) -> None:
        """Moves every member the probe confirms to the activation path (see :mod:`.taps`) and turns off the
        gradient of each weight only such members read (and, where the inputs can carry the backward, of
        weights no member reads)."""
        if not self.taps.keys():
            return
        params = [p for p in model.parameters() if p.requires_grad]
        hooks = self.attach(model)
        try:
            self._confirm(model, trace)
        except Exception:  # noqa: BLE001 - e.g. an op without a derivative on the input path: weight gradients
            for p in params:
                p.requires_grad_(True)
            self.taps.drop(set(self.taps.keys()))
            self.taps.terms, self.frozen = {}, False
        finally:
            for h in hooks:
                h.remove()
            self.terms = {}
        # A member's terms come from one path only, even where a weight it reads keeps its gradient.
        self.tapped = set(self.taps.keys())

    def _confirm(self, model: nn.Module, trace: tuple) -> None:
        self.taps.drop(self.taps.probe(model, grad_inputs(trace), self.terms))
        self.terms = {}
        tapped = set(self.taps.keys())
        by_param = {id(p): p for p in model.parameters()}
        frozen = [p for i, p in by_param.items() if p.requires_grad and (
            all(key in tapped for key, _, _ in self.readers[i]) if i in self.readers else float_inputs(trace))]
        for p in frozen:
            p.requires_grad_(False)
        self.frozen = bool(frozen)
        lost = self.taps.without_grad(model, grad_inputs(trace))
        if lost:  # nothing upstream needs a gradient: their weights carry it
            self.taps.drop(lost)
            for i, readers in self.readers.items():
                if any(key in lost for key, _, _ in readers):
                    by_param[i].requires_grad_(True)

    def inputs(self, args: tuple) -> tuple:
        """The model's inputs for a scoring forward: leaves that require grad where weights were frozen."""
        return grad_inputs(args) if self.frozen else args

    def attach(self, model: nn.Module) -> List[Any]:
        """Hooks on every parameter of ``model`` that needs a gradient (a parameter no member reads only has its
        gradient freed), and on the activation-path members."""
        return [p.register_post_accumulate_grad_hook(self._arrived) for p in model.parameters()
                if p.requires_grad] + self.taps.attach()

    def running(self, on: bool) -> None:
        """The activation path records only in the forward+backward passes (later U passes have no backward)."""
        self.taps.mode = "run" if on else None

    def _arrived(self, p: torch.Tensor) -> None:
        with torch.no_grad():
            for key, dim, m in self.readers.get(id(p), ()):
                if key in self.tapped:
                    continue
                t = per_channel(p.grad * p, dim, m).double()
                self.terms[key] = t if key not in self.terms else self.terms[key] + t
        p.grad = None

    def keys(self) -> List[Key]:
        return sorted(self.channels)

    def term(self, key: Key) -> torch.Tensor:
        """The accumulated terms of one member (zeros where none of its parameters got a gradient)."""
        got = [t for t in (self.terms.get(key), self.taps.terms.get(key)) if t is not None]
        return sum(t.cpu() for t in got) if got else torch.zeros(self.channels[key], dtype=torch.float64)

    def set_term(self, key: Key, value: torch.Tensor) -> None:
        """Replaces a member's terms (after they were summed across processes)."""
        self.taps.terms.pop(key, None)
        self.terms[key] = value
