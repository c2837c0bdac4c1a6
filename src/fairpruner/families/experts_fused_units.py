"""Hidden units inside stacked experts (transformers 5's Mixtral, Qwen2-MoE, ...), for blocks whose router is in
``ignore=`` (every expert kept; :func:`fairpruner.moe_routers` lists the routers).

**Which blocks.** Those of :mod:`.experts_fused` whose experts module also has ``act_fn`` and stacks
``gate_up_proj (E, 2I, H)`` (gate rows, then up rows) and ``down_proj (E, H, I)``: expert ``e`` computes
``down_proj[e] @ (act_fn(gate) * up)`` on its tokens, times its gate. Hidden unit ``j`` of expert ``e`` (root
channel ``e * I + j``) owns rows ``j`` and ``I + j`` of ``gate_up_proj[e]`` and column ``j`` of ``down_proj[e]``.

**Every expert keeps the same width.** The tensors are stacked, so the experts must lose the same number of hidden
units, not the same units: hidden unit ``j`` of one expert has nothing to do with unit ``j`` of another. A unit of
the group ``"<experts>:hidden"`` is therefore one hidden unit of every expert, matched by rank once the scores are
known (:meth:`StackedExpertUnits.units_from_scores`): unit ``k`` holds the ``k``-th lowest-U hidden unit of each
expert, its U the mean and its R the sum of theirs. ToD decides how many ranks go, so every expert loses its own
lowest-U hidden units. transformers runs stacked experts with ``torch._grouped_mm`` by default, which needs
16-byte strides: where ``I`` is a multiple of ``16 / element size`` (4 in float32, 8 in bfloat16) a unit holds that
many consecutive ranks, so the pruned width stays a multiple of it. (The ``l1``, ``taylor`` and ``random``
signals choose among the same rank-matched units; a unit's L1 is that of its gate and up rows.)

U is measured on every expert's hidden activations per sample, ``(B, E * I, T)``, zero where a token went to other
experts: after the block's own expert call they are recomputed from the stacked weights (one more expert pass while
scoring; memory per batch: tokens x E x I floats). On the first call the recomputed output is compared with the
module's own, and a block whose experts compute something else is refused.

Removing a rank saves ``3 * H`` parameters per expert and ``3 * H`` MACs per routed token and expert; each token
runs ``top_k`` experts of equal width whatever the routing, so both are predicted exactly. Masking zeroes the
unit's rows and column (its output is then ``act_fn(0) * 0 = 0``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._core.groups import GroupSpec, Member
from .._core.layers import slice_param_
from .._errors import PlanError, UnsupportedModelError
from .base import Family, MacsTerm, PerModel, USource, rank_units, register, units_by_rank
from .experts import _covered
from .experts_fused import _RECOMPUTING, StackedBlock, _routed_tokens, _routing_args, stacked_moe_blocks

__all__ = ["StackedExpertUnits"]

_SUFFIX = ":hidden"
_GATE_UP, _DOWN = ("gate_up_proj", (0, 1)), ("down_proj", (0, 2))


def _width(experts: nn.Module) -> Optional[int]:
    """Hidden width I of a stacked-experts module laid out as this module expects, else None."""
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.dim() == down.dim() == 3
            and callable(getattr(experts, "act_fn", None))):
        return None
    e, two_i, h = gu.shape
    ok = down.shape[0] == e and two_i == 2 * down.shape[2] and down.shape[1] == h
    return int(down.shape[2]) if ok else None


def _ranks_per_unit(experts: nn.Module) -> int:
    """Ranks per unit: what keeps the width a multiple of 16 bytes where it is one (grouped matmuls need it)."""
    align = max(1, 16 // experts.gate_up_proj.element_size())
    return align if _width(experts) % align == 0 else 1


def _blocks(model: nn.Module, ignore: Sequence[str]) -> List[StackedBlock]:
    """Blocks whose router is ignored (all experts kept) and whose experts are not."""
    return [b for b in stacked_moe_blocks(model) if _covered(b.router, ignore) and not _covered(b.name, ignore)
            and not _covered(b.experts, ignore) and _width(b.module.experts)
            and _width(b.module.experts) >= 2 * _ranks_per_unit(b.module.experts)]


def _hidden(mod: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, mod.gate_up_proj[e]).chunk(2, dim=-1)
    return mod.act_fn(gate) * up


def _hidden_source(block: StackedBlock, width: int) -> USource:
    """Every expert's hidden activations per sample: (B, experts * I, T), zero where a token went elsewhere."""
    def attach(modules: Dict[str, nn.Module], emit: Callable[[torch.Tensor], None]) -> List[Any]:
        state = {"batch": 1, "checked": False}

        def start(mod, args, kwargs):
            x = next(t for t in list(args) + list(kwargs.values()) if torch.is_tensor(t))
            state["batch"] = int(x.shape[0]) if x.dim() > 2 else 1

        def record(mod, args, kwargs, out):
            if id(mod) in _RECOMPUTING:
                return
            tokens, index, weights = _routing_args(args, kwargs)
            n_tok = tokens.shape[0]
            buf = torch.zeros(n_tok, block.n, width, dtype=torch.float32, device=tokens.device)
            total = None if state["checked"] else torch.zeros(out.shape, dtype=torch.float32, device=out.device)
            with torch.no_grad():
                for e in range(block.n):  # one pass per expert, as the block's own forward does
                    hit = index == e
                    rows = hit.any(-1).nonzero().flatten()
                    if rows.numel() == 0:
                        continue
                    h = _hidden(mod, e, tokens.detach().index_select(0, rows))
                    buf[rows, e] = h.float()
                    if total is not None:
                        gate = (weights * hit).sum(-1).index_select(0, rows).unsqueeze(-1)
                        total.index_add_(0, rows, (F.linear(h, mod.down_proj[e]) * gate).float())
            if total is not None:
                _check(block, total, out.detach())
                state["checked"] = True
            b = state["batch"]
            emit(buf.view(b, n_tok // b, block.n * width).transpose(1, 2))

        return [modules[block.name].register_forward_pre_hook(start, with_kwargs=True),
                modules[block.experts].register_forward_hook(record, with_kwargs=True)]
    return USource(f"{block.experts}{_SUFFIX}", attach)


def _check(block: StackedBlock, mine: torch.Tensor, theirs: torch.Tensor) -> None:
    """The experts recomputed from the stacked weights must give the module's own output (bf16 rounds more)."""
    tol = (1e-4 if theirs.dtype == torch.float32 else 2e-2) * float(theirs.abs().max()) + 1e-6
    if mine.shape != theirs.shape or float((mine - theirs.float()).abs().max()) > tol:
        raise UnsupportedModelError(
            f"The experts of '{block.name}' do not compute down_proj[e] @ (act_fn(gate) * up) from their stacked "
            f"weights, so their hidden units cannot be pruned. Prune whole experts instead (remove '{block.router}' "
            f"from ignore=), or keep the block with ignore=['{block.name}'].")


@register
class StackedExpertUnits(Family):
    """Hidden units of stacked experts, one rank of every expert per unit (see the module docstring)."""

    name = "stacked_expert_units"

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._routed = PerModel(_routed_tokens)
        self._layout: Dict[str, tuple] = {}  # group name -> (experts, ranks per unit), set by discover

    def owned(self, model: nn.Module) -> List[str]:
        return [b.experts for b in stacked_moe_blocks(model)]

    def discover(self, model: nn.Module, graph: Any, example_inputs: tuple,
                 ignore: Sequence[str]) -> List[GroupSpec]:
        groups = []
        for b in _blocks(model, ignore):
            width = _width(b.module.experts)
            c = torch.arange(b.n * width)
            e, j = c // width, c % width
            # The gate and up rows produce the unit ("weight": their L1 is the unit's); down_proj reads it.
            members = [Member(b.experts, "out", torch.stack([2 * width * e + j, 2 * width * e + width + j], 1),
                              "weight", (_GATE_UP,)),
                       Member(b.experts, "out", c.view(-1, 1), "other", (_DOWN,))]
            ranks = _ranks_per_unit(b.module.experts)
            self._layout[f"{b.experts}{_SUFFIX}"] = (b.n, ranks)
            # Placeholder units (positions j of every expert) until the scores match units by rank.
            groups.append(GroupSpec(f"{b.experts}{_SUFFIX}", b.n * width, rank_units(c.view(b.n, width), ranks),
                                    members, family=self))
        return groups

    def _block(self, model: nn.Module, group: GroupSpec) -> StackedBlock:
        for b in stacked_moe_blocks(model):
            if group.name == f"{b.experts}{_SUFFIX}":
                if b.n * (_width(b.module.experts) or 0) != group.channels:
                    raise PlanError(f"'{b.experts}' holds {b.n} x {_width(b.module.experts)} hidden units, the plan "
                                    f"expects {group.channels}. Apply a plan to an unpruned instance of the "
                                    "architecture it was made for.")
                return b
        raise PlanError(f"No stacked-experts block of this model holds group '{group.name}'.")

    def u_sources(self, model: nn.Module, group: GroupSpec) -> List[USource]:
        b = self._block(model, group)
        return [_hidden_source(b, group.channels // b.n)]

    def units_from_scores(self, group: GroupSpec, u: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        experts, ranks = self._layout[group.name]
        return units_by_rank(u, experts, ranks)

    def macs_terms(self, model: nn.Module, example_inputs: tuple, group: GroupSpec) -> List[MacsTerm]:
        b = self._block(model, group)
        gu = b.module.experts.gate_up_proj
        per_pair = 3 * gu.shape[2] * (gu.shape[1] // 2)  # gate, up and down MACs of one token in one expert
        pairs = self._routed(model, example_inputs).get(b.router, 0) * b.top_k
        return [(float(pairs * per_pair), (b.experts,) + _GATE_UP, None)]

    def prune_(self, model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
        b = self._block(model, group)
        width = group.channels // b.n
        gone = torch.zeros(group.channels, dtype=torch.bool)
        gone[torch.tensor(channels, dtype=torch.long)] = True
        per = gone.view(b.n, width).sum(1)
        if not bool((per == per[0]).all()) or int(per[0]) >= width:
            raise PlanError(f"Every expert of '{b.experts}' must lose the same number of hidden units and keep "
                            f"one; the plan removes {per.tolist()} of {width}. Use a plan made for this group.")
        keep = (~gone).view(b.n, width).nonzero()  # (experts * kept, 2), row-major
        e, j = keep[:, 0], keep[:, 1]
        gate_up = torch.stack([2 * width * e + j, 2 * width * e + width + j], 1).view(b.n, -1, 2)
        experts = b.module.experts
        slice_param_(experts, _GATE_UP[0], _GATE_UP[1], gate_up.transpose(1, 2).flatten())  # gate rows, then up
        slice_param_(experts, _DOWN[0], _DOWN[1], e * width + j)
        if isinstance(getattr(experts, "intermediate_dim", None), int):
            experts.intermediate_dim = width - int(per[0])
