"""Mixture-of-experts blocks: whole routed experts, or the hidden units inside each expert, as units.

**Which modules are MoE blocks (duck typing).** A module with

- ``experts``: an ``nn.ModuleList`` of at least two experts,
- ``router`` or ``gate``: an ``nn.Linear`` with ``out_features == len(experts)`` (one logit per expert),
- ``top_k``: an ``int``, the experts each token goes to,

whose forward (1) applies the router to the token rows of its batch-first input (``(B, T, D)`` or ``(B, D)``,
tokens numbered in batch order), (2) sends every token to the ``top_k`` experts with the highest logits, weighted
by a softmax over those ``top_k`` logits (Mixtral: identical to softmax over all experts, top-k, renormalise;
a block with ``norm_topk_prob = False`` uses the softmax over all experts without renormalising), (3) calls each
expert at most once per forward on the rows of its tokens, unchanged, in ascending token order or grouped by
top-k slot (Mixtral's ``torch.where`` order), and (4) returns the sum of gate x expert output. Step (3) is
checked on every scoring forward (the rows an expert receives must be the tokens routed to it); (2) is trusted.
:class:`fairpruner.zoo.MoE` and Hugging Face's ``MixtralSparseMoeBlock`` (ModuleList experts) follow it.

**Two kinds of units; ``ignore=`` chooses per block.**

- By default every block's units are its **whole experts** (group ``"<block>:experts"``): members are the
  router's row (and bias) of the expert and every parameter of the expert (:class:`Member` with ``owner``). U is
  measured on each expert's gated contribution per sample, ``(B, experts, T * D)`` with zeros where a token did
  not go to the expert; R sums the Taylor terms of the expert's parameters and its router row. Removing experts
  saves parameters, not per-token compute: each token still runs ``top_k`` experts, so the experts' MACs are
  constant and only the router's MACs shrink. Both are predicted exactly (experts of a block must be alike in
  size; otherwise discovery raises). A plan must leave at least ``top_k`` experts in a block: the group's
  ``max_removed`` keeps the planner within that, and prune/mask refuse a plan edited past it (:class:`PlanError`).
  Where every block keeps the same number, the model's and config's expert count are written back
  (:func:`record_expert_counts`), so transformers' router auxiliary loss runs on the pruned model.
- With the block's router in ``ignore=`` (all experts kept; :func:`moe_routers` lists the routers), its units are
  the **hidden units of each expert** (group ``"<expert's first layer>:hidden"``, e.g. fc1 rows with fc2
  columns, or w1/w3 rows with w2 columns), found on torch-pruning's graph within the expert. U is measured at the
  hidden layer's consumer input per sample, ``(B, hidden, T)`` with zeros where a token did not go to the
  expert. An expert's MACs depend on how many tokens it gets; the cost model uses the routing of the example
  input's first sample, so predictions are exact while that routing is unchanged (a single MoE block, or
  blocks after which nothing is pruned) and otherwise off by at most ``T * top_k * (max - min)`` per-token MACs
  of the block's experts.
  Mixing both kinds in one block is not offered: removing an expert of unequal size makes parameters
  depend on which expert goes, not how many.

Ignoring a block or its ``experts`` list protects it entirely; ignoring one expert (or its first layer) protects
that expert's hidden units. Masking equals pruning: a masked expert's router row is zeroed and its logit set
to -inf (router bias, or a forward hook on a router without bias), so it is never routed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._core.groups import GroupSpec, Member, member_kind, zero_members_
from .._core.layers import kept, qualname, slice_linear_
from .._errors import PlanError, UnsupportedModelError
from .._graph import group_slots
from .base import Family, USource, register
from .experts_fused import record_expert_counts, stacked_moe_blocks

__all__ = ["Experts", "MoEBlock", "moe_blocks", "moe_routers"]

_EXPERTS, _HIDDEN = ":experts", ":hidden"


@dataclass
class MoEBlock:
    """One mixture-of-experts block found in a model (qualified names)."""

    name: str
    module: nn.Module
    router: str
    experts: str
    top_k: int


def moe_blocks(model: nn.Module) -> List[MoEBlock]:
    """The modules of ``model`` that follow the MoE convention of this module's docstring."""
    out = []
    for name, m in model.named_modules():
        experts = getattr(m, "experts", None)
        if not isinstance(experts, nn.ModuleList) or len(experts) < 2:
            continue
        attr = next((a for a in ("router", "gate") if isinstance(getattr(m, a, None), nn.Linear)
                     and getattr(m, a).out_features == len(experts)), None)
        top_k = getattr(m, "top_k", None)
        if attr is None or isinstance(top_k, bool) or not isinstance(top_k, int):
            continue
        out.append(MoEBlock(name, m, qualname(name, attr), qualname(name, "experts"), top_k))
    return out


def moe_routers(model: nn.Module) -> List[str]:
    """Router names of every MoE block (ModuleList or stacked experts).

    Pass them in ``ignore=`` to keep all experts and prune the hidden units inside them instead of whole experts.

    Args:
        model: a model with mixture-of-experts blocks (none: an empty list).

    Example:
        >>> scores = fp.score(model, loader, ignore=fp.moe_routers(model))
    """
    return [b.router for b in moe_blocks(model)] + [b.router for b in stacked_moe_blocks(model)]


def _covered(name: str, ignore: Sequence[str]) -> bool:
    return any(i == "" or name == i or name.startswith(i + ".") for i in ignore)


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return next(t for t in list(args) + list(kwargs.values()) if torch.is_tensor(t))


class _Routing:
    """Where one forward of a block sent its tokens, read by hooks on the block and its router (no extra pass)."""

    def __init__(self, block: MoEBlock) -> None:
        self.block = block
        self.batch = 1
        self.tokens: Optional[torch.Tensor] = None
        self.chosen: Optional[torch.Tensor] = None
        self.gates: Optional[torch.Tensor] = None

    def attach(self, modules: Dict[str, nn.Module], on_start: Callable[[], None]) -> List[Any]:
        def start(mod, args, kwargs):
            x = _first_tensor(args, kwargs)
            self.batch = int(x.shape[0]) if x.dim() > 1 else 1
            on_start()

        def routed(mod, inp, out):
            with torch.no_grad():
                self.tokens = inp[0].detach().reshape(-1, inp[0].shape[-1])
                logits = out.detach().reshape(-1, out.shape[-1]).float()
                top, self.chosen = logits.topk(self.block.top_k, dim=-1)
                if getattr(self.block.module, "norm_topk_prob", True):
                    self.gates = top.softmax(-1)
                else:
                    self.gates = logits.softmax(-1).gather(-1, self.chosen)
        return [modules[self.block.name].register_forward_pre_hook(start, with_kwargs=True),
                modules[self.block.router].register_forward_hook(routed)]

    @property
    def steps(self) -> int:
        n = self.tokens.shape[0]
        if n % self.batch:
            raise UnsupportedModelError(f"MoE block '{self.block.name}' routes {n} tokens for a batch of "
                                        f"{self.batch}; its input must be batch-first.")
        return n // self.batch

    def rows(self, e: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token positions of the rows expert ``e`` received (``x``), and their gates."""
        if self.chosen is None:
            raise UnsupportedModelError(f"Expert {e} of '{self.block.name}' ran before its router; the router "
                                        "must score the tokens first.")
        hit = self.chosen == e
        x = x.detach().reshape(-1, x.shape[-1])
        for rows in (hit.any(-1).nonzero().flatten(), hit.t().nonzero()[:, 1]):  # token order, slot order
            if rows.numel() == x.shape[0] and torch.equal(x, self.tokens.index_select(0, rows)):
                return rows, (self.gates * hit).sum(-1).index_select(0, rows)
        raise UnsupportedModelError(
            f"Expert {e} of '{self.block.name}' did not receive the rows of the tokens its router sent it (in "
            "token or top-k slot order); fairpruner's MoE convention (top-k of the router logits, each expert "
            "called once on its tokens) does not fit this block. Add it to `ignore=`.")


def _expert_source(block: MoEBlock, n_experts: int) -> USource:
    """Each expert's gated contribution per sample: (B, experts, T * D), zero where a token went elsewhere."""
    def attach(modules: Dict[str, nn.Module], emit: Callable[[torch.Tensor], None]) -> List[Any]:
        routing, state = _Routing(block), {}

        def start():
            state["out"] = None

        def contribute(e):
            def hook(mod, inp, out):
                rows, gate = routing.rows(e, inp[0])
                with torch.no_grad():
                    y = out.detach().reshape(-1, out.shape[-1]).float()
                    if state["out"] is None:
                        state["out"] = y.new_zeros(routing.tokens.shape[0], n_experts, y.shape[-1])
                    state["out"][rows, e] = y * gate.unsqueeze(-1)
            return hook

        def finish(mod, inp, out):
            buf = state["out"]
            if buf is None:  # no expert ran
                buf = routing.tokens.new_zeros(routing.tokens.shape[0], n_experts, routing.tokens.shape[-1]).float()
            b, t = routing.batch, routing.steps
            emit(buf.view(b, t, n_experts, -1).transpose(1, 2).reshape(b, n_experts, -1))

        handles = routing.attach(modules, start)
        for e in range(n_experts):
            handles.append(modules[f"{block.experts}.{e}"].register_forward_hook(contribute(e)))
        return handles + [modules[block.name].register_forward_hook(finish)]
    return USource(f"{block.name}{_EXPERTS}", attach)


def _hidden_source(block: MoEBlock, e: int, group: GroupSpec) -> USource:
    """One expert's hidden units as its consumer layer reads them, per sample: (B, hidden, T), zero where a
    token went to other experts."""
    consumer = next(m for m in group.members if m.side == "in")
    index = consumer.index[:, 0]

    def attach(modules: Dict[str, nn.Module], emit: Callable[[torch.Tensor], None]) -> List[Any]:
        routing, state = _Routing(block), {}

        def start():
            state["rows"], state["h"] = None, None

        def enter(mod, inp):
            state["rows"] = routing.rows(e, inp[0])[0]

        def read(mod, inp):
            with torch.no_grad():
                h = inp[0].detach()
                state["h"] = h.reshape(-1, h.shape[-1]).index_select(1, index.to(h.device)).float()

        def finish(mod, inp, out):
            buf = routing.tokens.new_zeros(routing.tokens.shape[0], index.numel()).float()
            if state["h"] is not None:
                buf[state["rows"]] = state["h"]
            emit(buf.view(routing.batch, routing.steps, -1).transpose(1, 2))

        return routing.attach(modules, start) + [
            modules[f"{block.experts}.{e}"].register_forward_pre_hook(enter),
            modules[consumer.module].register_forward_pre_hook(read),
            modules[block.name].register_forward_hook(finish)]
    return USource(group.name, attach)


class _BlockedLogits:
    """Forward hook of a masked router without bias: the masked experts' logits become -inf."""

    def __init__(self, channels: List[int]) -> None:
        self.channels = torch.tensor(channels, dtype=torch.long)

    def __call__(self, module: nn.Module, inp: tuple, out: torch.Tensor) -> torch.Tensor:
        return out.index_fill(-1, self.channels.to(out.device), float("-inf"))


@register
class Experts(Family):
    """Unit family of mixture-of-experts blocks (see the module docstring for the convention and the options)."""

    name = "experts"

    def owned(self, model: nn.Module) -> List[str]:
        names = []
        for b in moe_blocks(model):
            names.append(b.router)
            for e, expert in enumerate(b.module.experts):
                names += [qualname(f"{b.experts}.{e}", n) for n, m in expert.named_modules()
                          if any(True for _ in m.parameters(recurse=False))]
        return names

    def discover(self, model: nn.Module, graph: Any, example_inputs: tuple,
                 ignore: Sequence[str]) -> List[GroupSpec]:
        groups: List[GroupSpec] = []
        for b in moe_blocks(model):
            if _covered(b.name, ignore) or _covered(b.experts, ignore):
                continue
            if not _covered(b.router, ignore):
                g = self._expert_group(b)
                groups += [g] if g is not None else []
            else:
                groups += self._hidden_groups(b, model, graph, ignore)
        return groups

    def _expert_group(self, b: MoEBlock) -> Optional[GroupSpec]:
        experts = b.module.experts
        n = len(experts)
        if n <= b.top_k:
            return None  # every expert is needed: top_k experts must remain
        shapes = {tuple((k, tuple(p.shape)) for k, p in x.named_parameters()) for x in experts}
        if len(shapes) > 1:
            raise UnsupportedModelError(
                f"The experts of '{b.name}' differ in size (an earlier round pruned inside them); removing whole "
                "experts is predicted exactly only for experts alike in size. Keep pruning inside them with "
                f"ignore=['{b.router}'] (fairpruner.moe_routers(model) lists every router).")
        members = [Member(b.router, "out", torch.arange(n).unsqueeze(1), "weight")]
        empty = torch.zeros(n, 0, dtype=torch.long)
        for e, expert in enumerate(experts):
            members += [Member(qualname(f"{b.experts}.{e}", sub), "out", empty, member_kind(m), owner=e)
                        for sub, m in expert.named_modules() if any(True for _ in m.parameters(recurse=False))]
        return GroupSpec(f"{b.name}{_EXPERTS}", n, torch.arange(n).unsqueeze(1), members, family=self,
                         max_removed=n - b.top_k)

    def _hidden_groups(self, b: MoEBlock, model: nn.Module, graph: Any, ignore: Sequence[str]) -> List[GroupSpec]:
        modules = dict(model.named_modules())
        names = {id(m): n for n, m in modules.items()}
        groups = []
        for e, expert in enumerate(b.module.experts):
            prefix = f"{b.experts}.{e}"
            if _covered(prefix, ignore):
                continue
            done: set = set()
            for sub, lin in expert.named_modules():
                qn = qualname(prefix, sub)
                if not isinstance(lin, nn.Linear) or qn in done or _covered(qn, ignore):
                    continue
                if lin not in graph.module2node:
                    raise UnsupportedModelError(
                        f"Layer '{qn}' did not run on the example inputs (its expert got no tokens and was "
                        "skipped), so its hidden units cannot be traced. Call every expert, also on zero rows.")
                pruner = graph.get_pruner_of_module(lin)
                group = graph.get_pruning_group(lin, pruner.prune_out_channels, idxs=list(range(lin.out_features)))
                members = self._members(graph, group, names, modules, lin.out_features, prefix)
                if members is None:
                    continue
                done.update(m.module for m in members if m.side == "out")
                groups.append(GroupSpec(f"{qn}{_HIDDEN}", lin.out_features,
                                        torch.arange(lin.out_features).unsqueeze(1), members, family=self))
        return groups

    @staticmethod
    def _members(graph: Any, group: Any, names: Dict[int, str], modules: Dict[str, nn.Module], channels: int,
                 prefix: str) -> Optional[List[Member]]:
        """The group's Linear members if it stays inside one expert and maps channels one to one; else None."""
        merged = group_slots(graph, group, lambda m: names.get(id(m)))
        members = []
        for (name, side), mapping in sorted(merged.items(), key=lambda kv: (kv[0][1] != "out", kv[0][0])):
            if not _covered(name, [prefix]) or not isinstance(modules[name], nn.Linear):
                return None  # reaches beyond the expert (its output layer feeds the block's sum)
            if sorted(mapping) != list(range(channels)) or any(len(v) != 1 for v in mapping.values()):
                return None
            index = torch.tensor([sorted(mapping[c]) for c in range(channels)], dtype=torch.long)
            members.append(Member(name, side, index, "weight"))
        return members if any(m.side == "in" for m in members) else None

    def _locate(self, model: nn.Module, group: GroupSpec) -> Tuple[MoEBlock, Optional[int]]:
        """The block of ``group``, and the expert for a hidden-unit group (None for an experts group)."""
        for b in moe_blocks(model):
            if group.name == f"{b.name}{_EXPERTS}":
                return b, None
            head = f"{b.experts}."
            if group.name.startswith(head) and group.name.endswith(_HIDDEN):
                return b, int(group.name[len(head):].split(".")[0])
        raise PlanError(f"No mixture-of-experts block of this model holds group '{group.name}'.")

    def u_sources(self, model: nn.Module, group: GroupSpec) -> List[USource]:
        b, e = self._locate(model, group)
        return [_expert_source(b, group.channels) if e is None else _hidden_source(b, e, group)]

    @staticmethod
    def _check_top_k(b: MoEBlock, group: GroupSpec, channels: List[int]) -> None:
        left = group.channels - len(channels)
        if left < b.top_k:
            raise PlanError(
                f"The plan removes {len(channels)} of the {group.channels} experts of '{b.name}', leaving {left}; "
                f"each token is routed to top_k={b.top_k} experts, so at least {b.top_k} must remain. Plan with a "
                f"smaller alpha or target, or keep this block's experts with ignore=['{b.router}'].")

    def prune_(self, model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
        b, e = self._locate(model, group)
        modules = dict(model.named_modules())
        gone = torch.tensor(sorted(channels), dtype=torch.long)
        if e is not None:
            for mem in group.members:
                lin = modules[mem.module]
                size = lin.out_features if mem.side == "out" else lin.in_features
                slice_linear_(lin, 0 if mem.side == "out" else 1, kept(size, mem.index.index_select(0, gone).flatten()))
            return
        self._check_top_k(b, group, channels)
        keep = kept(group.channels, gone)
        slice_linear_(modules[b.router], 0, keep)
        for c in sorted(channels, reverse=True):
            del b.module.experts[c]
        if isinstance(getattr(b.module, "num_experts", None), int):
            b.module.num_experts = len(b.module.experts)

    def finish_(self, model: nn.Module) -> None:
        record_expert_counts(model, [len(b.module.experts) for b in moe_blocks(model)])

    def mask_(self, model: nn.Module, group: GroupSpec, channels: List[int]) -> None:
        b, e = self._locate(model, group)
        if e is not None:
            zero_members_(model, group, channels)
            return
        self._check_top_k(b, group, channels)
        zero_members_(model, group, channels)
        router = dict(model.named_modules())[b.router]
        # A zero logit would still be routed; -inf never is, exactly as a removed expert.
        if router.bias is not None:
            with torch.no_grad():
                router.bias.index_fill_(0, torch.tensor(sorted(channels), device=router.bias.device), float("-inf"))
        else:
            router.register_forward_hook(_BlockedLogits(sorted(channels)))

