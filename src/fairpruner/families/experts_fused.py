"""Mixture-of-experts blocks whose experts are stored as stacked tensors (transformers 5's Mixtral, Qwen2-MoE,
Qwen3-MoE ...): whole experts as units.

**Which modules are such blocks (duck typing).** A module with

- ``gate``: a router module holding ``weight`` of shape ``(experts, hidden)`` (and optionally ``bias``) and an
  ``int`` ``top_k``, whose forward computes the logits with ``F.linear`` on that weight;
- ``experts``: a module with ``num_experts`` whose every parameter stacks the experts on dimension 0
  (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``), called as ``experts(tokens, top_k_index,
  top_k_weights)`` on the flattened tokens.

A unit is one expert: its router row and its slice of every stacked parameter. U is measured on each expert's
gated contribution per sample, ``(B, experts, T * H)``, zero where a token went elsewhere: after the block's own
expert call, the experts module is called once more per expert on that expert's tokens alone (with their gates),
so the contribution is computed by the model's own code, whatever its expert layout (one extra expert pass while
scoring). R sums the Taylor terms of the expert's slices and its router row.

Removing experts saves parameters, not per-token compute: each token still runs ``top_k`` experts; only the
router's MACs shrink (a MACs term). A plan must leave at least ``top_k`` experts. The surgery slices the router
and every stacked parameter and writes back ``num_experts`` (router, experts, block). Masking equals pruning: the
masked expert's slices are zeroed and its router logit is set to -inf while the router runs (a function mode on
the router's ``F.linear``), so it is never routed and the softmax over the others is the pruned model's.
The hidden units inside stacked experts (all experts share one width) are not units of this family.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .._core.groups import GroupSpec, Member, zero_members_
from .._core.layers import kept, qualname, slice_param_
from .._errors import PlanError
from .base import Family, MacsTerm, PerModel, USource, register

__all__ = ["StackedExperts", "stacked_moe_blocks", "record_expert_counts"]

_SUFFIX = ":experts"
_RECOMPUTING: set = set()  # experts modules whose per-expert contributions are being computed


def _is_router(m: nn.Module) -> bool:
    w, k = getattr(m, "weight", None), getattr(m, "top_k", None)
    return not isinstance(m, nn.Linear) and isinstance(w, nn.Parameter) and w.dim() == 2 and \
        isinstance(k, int) and not isinstance(k, bool)


def _is_stacked(m: nn.Module) -> bool:
    n, params = getattr(m, "num_experts", None), list(m.parameters(recurse=False))
    return not isinstance(m, nn.ModuleList) and isinstance(n, int) and bool(params) and \
        all(p.dim() > 1 and p.shape[0] == n for p in params)


@dataclass
class StackedBlock:
    name: str
    module: nn.Module
    router: str
    experts: str
    n: int
    top_k: int


def stacked_moe_blocks(model: nn.Module) -> List[StackedBlock]:
    """The blocks of ``model`` that follow this module's convention."""
    out = []
    for name, m in model.named_modules():
        router, experts = getattr(m, "gate", None), getattr(m, "experts", None)
        if not (isinstance(router, nn.Module) and _is_router(router) and isinstance(experts, nn.Module)
                and _is_stacked(experts) and router.weight.shape[0] == experts.num_experts):
            continue
        out.append(StackedBlock(name, m, qualname(name, "gate"), qualname(name, "experts"), experts.num_experts,
                                router.top_k))
    return out


def _routing_args(args: tuple, kwargs: dict) -> tuple:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
    if len(vals) < 3:
        raise PlanError("A stacked-experts module was called without (tokens, top_k_index, top_k_weights).")
    return vals[0], vals[1], vals[2]


def _contribution_source(block: StackedBlock) -> USource:
    """Each expert's gated contribution per sample: (B, experts, T * H), zero where a token went elsewhere."""
    def attach(modules: Dict[str, nn.Module], emit: Callable[[torch.Tensor], None]) -> List[Any]:
        state = {"batch": 1}
        experts = modules[block.experts]

        def start(mod, args, kwargs):
            x = next(t for t in list(args) + list(kwargs.values()) if torch.is_tensor(t))
            state["batch"] = int(x.shape[0]) if x.dim() > 2 else 1

        def contribute(mod, args, kwargs, out):
            if id(mod) in _RECOMPUTING:  # the per-expert calls below, seen by this or another source's hook
                return
            tokens, index, weights = _routing_args(args, kwargs)
            n_tok, h = tokens.shape[0], tokens.shape[-1]
            buf = torch.zeros(n_tok, block.n, h, dtype=torch.float32, device=tokens.device)
            _RECOMPUTING.add(id(mod))
            try:
                with torch.no_grad():
                    for e in range(block.n):
                        hit = index == e
                        rows = hit.any(-1).nonzero().flatten()
                        if rows.numel() == 0:
                            continue
                        gate = (weights * hit).sum(-1).index_select(0, rows).unsqueeze(-1)
                        only = torch.full((rows.numel(), 1), e, dtype=index.dtype, device=index.device)
                        buf[rows, e] = mod(tokens.detach().index_select(0, rows), only, gate.to(weights.dtype)).float()
            finally:
                _RECOMPUTING.discard(id(mod))
            b = state["batch"]
            emit(buf.view(b, n_tok // b, block.n, h).transpose(1, 2).reshape(b, block.n, -1))

        return [modules[block.name].register_forward_pre_hook(start, with_kwargs=True),
                experts.register_forward_hook(contribute, with_kwargs=True)]
    return USource(f"{block.name}{_SUFFIX}", attach)


class _BlockLogits(TorchFunctionMode):
    """While a router runs: its ``F.linear`` logits of the masked experts become -inf."""

    def __init__(self, weight: torch.Tensor, channels: List[int]) -> None:
        super().__init__()
        self.weight, self.channels = weight, torch.tensor(channels, dtype=torch.long)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and args[1] is self.weight:
            out = out.index_fill(-1, self.channels.to(out.device), float("-inf"))
        return out


class _MaskedRouter:
    """Forward pre/post hooks that run a router under :class:`_BlockLogits`."""

    def __init__(self, channels: List[int]) -> None:
        self.channels, self.mode = channels, None

    def enter(self, module: nn.Module, args: tuple) -> None:
        self.mode = _BlockLogits(module.weight, self.channels)
        self.mode.__enter__()

    def leave(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None


@register
class StackedExperts(Family):
    """Whole experts of MoE blocks with stacked expert tensors (see the module docstring)."""

    name = "stacked_experts"

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._routed = PerModel(_routed_tokens)  # one forward pass serves every block's router term

    def claims(self, module: nn.Module) -> bool:
        return _is_router(module) or _is_stacked(module)

    def owned(self, model: nn.Module) -> List[str]:
        return [n for b in stacked_moe_blocks(model) for n in (b.router, b.experts)]

    def discover(self, model: nn.Module, graph: Any, example_inputs: tuple,
                 ignore: Sequence[str]) -> List[GroupSpec]:
        groups = []
        for b in stacked_moe_blocks(model):
            if b.n <= b.top_k or any(n in ignore for n in (b.name, b.router, b.experts)):
                continue
            rows = torch.arange(b.n).unsqueeze(1)
            router = [n for n, _ in b.module.gate.named_parameters(recurse=False)]
            stacked = [n for n, _ in b.module.experts.named_parameters(recurse=False)]
            # The experts' slices are "weight": an expert's L1 is that of its own stacked weights.
            members = [Member(b.router, "out", rows, "other", tuple((n, 0) for n in router)),
                       Member(b.experts, "out", rows, "weight", tuple((n, 0) for n in stacked))]
            groups.append(GroupSpec(f"{b.name}{_SUFFIX}", b.n, rows.clone(), members, family=self,
                                    max_removed=b.n - b.top_k))
        return groups

    def _block(self, model: nn.Module, group: GroupSpec) -> StackedBlock:
        for b in stacked_moe_blocks(model):
            if group.name == f"{b.name}{_SUFFIX}":
                if b.n != group.channels:
                    raise PlanError(f"'{b.name}' has {b.n} experts, the plan expects {group.channels}. Apply a plan "
                                    "to an unpruned instance of the architecture it was made for.")
                return b
        raise PlanError(f"No stacked-experts block of this model holds group '{group.name}'.")

    def u_sources(self, model: nn.Module, group: GroupSpec) -> List[USource]:
        return [_contribution_source(self._block(model, group))]

    def macs_terms(self, model: nn.Module, example_inputs: tuple, group: GroupSpec) -> List[MacsTerm]:
        b = self._block(model, group)
        w = b.module.gate.weight
        return [(float(self._routed(model, example_inputs).get(b.router, 0) * w.shape[0] * w.shape[1]),
                 (b.router, "weight", 0), None)]

    @staticmethod
    def _check_top_k(b: StackedBlock, channels: List[int]) -> None:
        if b.n - len(set(channels)) < b.top_k:
            raise PlanError(
                f"The plan removes {len(set(channels))} of the {b.n} experts of '{b.name}'; each token is routed to "
                f"top_k={b.top_k} experts, so at least {b.top_k} must remain. Plan with a smaller alpha or target, "
                f"or keep the block with ignore=['{b.router}'].")

    def prune_(self, model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
        b = self._block(model, group)
        self._check_top_k(b, channels)
        keep = kept(b.n, torch.tensor(channels, dtype=torch.long))
        for module in (b.module.gate, b.module.experts):
            for name, _ in list(module.named_parameters(recurse=False)):
                slice_param_(module, name, 0, keep)
        for owner in (b.module.gate, b.module.experts, b.module):
            if isinstance(getattr(owner, "num_experts", None), int):
                owner.num_experts = len(keep)

    def finish_(self, model: nn.Module) -> None:
        record_expert_counts(model, [b.n for b in stacked_moe_blocks(model)])

    def mask_(self, model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
        b = self._block(model, group)
        self._check_top_k(b, channels)
        zero_members_(model, group, channels)
        masked = _MaskedRouter(sorted(set(int(c) for c in channels)))
        b.module.gate.register_forward_pre_hook(masked.enter)
        b.module.gate.register_forward_hook(masked.leave)


def record_expert_counts(model: nn.Module, counts: List[int]) -> None:
    """Writes the experts every block now keeps to the model's own count and its config (Mixtral's
    ``num_local_experts``, Qwen-MoE's ``num_experts``), which transformers' router auxiliary loss reads
    (``output_router_logits=True``): only where every block keeps the same number, the one count they can
    express. Otherwise they keep the original count, and a config asking for that loss has it turned off, with
    a warning: transformers computes it in every forward and would fail on blocks of different sizes."""
    config = getattr(model, "config", None)
    if len(set(counts)) == 1:
        for owner, attr in ((model, "num_experts"), (config, "num_local_experts"), (config, "num_experts")):
            if isinstance(getattr(owner, attr, None), int):
                setattr(owner, attr, counts[0])
    elif getattr(config, "output_router_logits", False):
        config.output_router_logits = False
        warnings.warn(f"The pruned blocks keep different numbers of experts ({counts}), which the model's config "
                      "cannot express, and on which transformers' router auxiliary loss cannot run: the pruned "
                      "model's config.output_router_logits is now False. To keep that loss, prune inside the "
                      "experts instead (ignore=fp.moe_routers(model)).", stacklevel=2)


def _routed_tokens(model: nn.Module, x: tuple) -> Dict[str, int]:
    """Tokens each stacked-experts router scores for one sample, by router name."""
    rows: Dict[str, int] = {}
    hooks = [model.get_submodule(b.router).register_forward_hook(
        lambda mod, inp, out, n=b.router: rows.__setitem__(n, rows.get(n, 0) + inp[0].numel() // inp[0].shape[-1]))
        for b in stacked_moe_blocks(model)]
    try:
        with torch.no_grad():
            model(*x)
    finally:
        for h in hooks:
            h.remove()
    return rows
