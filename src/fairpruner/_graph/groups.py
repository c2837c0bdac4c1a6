"""Groups: the coupled channel groups read out of torch-pruning's graph, each partitioned into units, and the
rules that leave a group whole where no cut of it is exact (tied weights, a depthwise channel multiplier, a
split's halves concatenated again) or refuse it (channels mapped past a layer's parameters)."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch_pruning as tp
from torch import nn

from .._core.groups import GroupSpec, Member, dim_size, member_kind, member_params
from .._core.inputs import as_args
from .._core.layers import CONV_TYPES, WEIGHT_TYPES, freezes
from .._errors import UnsupportedModelError
from .tracing import Families, family_layout, torch_pruning_step

__all__ = ["discover_groups", "group_slots"]


def _partial_writer(root: nn.Module, merged: Dict[Tuple[str, str], Dict[int, set]],
                    modules: Dict[str, nn.Module]) -> bool:
    """True where another Conv/Linear layer writes only part of its outputs into the group's channels.
    torch-pruning maps a concatenation of a split's halves onto the wrong offsets (a branch's channels coupled
    to the first half of the split layer's outputs and of the concatenation); such a group is left whole. A
    split layer whose half is genuinely added to the root's output is left whole too, which is merely safe."""
    for (name, side), mapping in merged.items():
        m = modules[name]
        if side == "out" and m is not root and isinstance(m, WEIGHT_TYPES):
            width = m.out_channels if isinstance(m, CONV_TYPES) else m.out_features
            if len(set().union(*mapping.values())) != width:
                return True
    return False


def _tied_modules(model: nn.Module) -> set:
    """Names of the layers holding a parameter that another layer holds too (tied weights); a layer merely
    registered twice is one module, which the surgery cuts once, and is not among them."""
    holders: Dict[int, set] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            holders.setdefault(id(p), set()).add(id(m))
    shared = {k for k, v in holders.items() if len(v) > 1}
    return {n for n, m in model.named_modules(remove_duplicate=False)
            if any(id(p) in shared for p in m.parameters(recurse=False))}


def _depth_multiplier(m: nn.Module) -> bool:
    """A depthwise convolution with a channel multiplier (groups = in_channels < out_channels)."""
    return isinstance(m, CONV_TYPES) and 1 < m.groups == m.in_channels != m.out_channels


def _check_indices(name: str, members: List[Member], modules: Dict[str, nn.Module]) -> None:
    """Refuses a group whose channel mapping points past a member's parameters (an op between the layers that
    moves channels to other dimensions, such as PixelShuffle): its units could be neither scored nor cut."""
    for m in members:
        if m.side == "in" and isinstance(modules[m.module], CONV_TYPES) and modules[m.module].groups > 1:
            continue  # a grouped convolution's weight holds each group's inputs only: indexed per group
        for p, dim in member_params(m, modules[m.module]):
            if m.owner is None and m.index.numel() and int(m.index.max()) >= dim_size(p, dim):
                raise UnsupportedModelError(
                    f"Group '{name}': its channels map into '{m.module}' ({type(modules[m.module]).__name__}) past "
                    "its parameters, through an operation that moves channels elsewhere (e.g. PixelShuffle); add "
                    f"'{name}' to `ignore=`.")


def _unit_blocks(name: str, channels: int, members: List[Member], modules: Dict[str, nn.Module]) -> torch.Tensor:
    """Partition of root channels into units: whole GroupNorm groups where GroupNorm couples them; where a
    grouped convolution reads or writes them, one channel of every convolution group (the same position in each),
    so that every group keeps the same width."""
    label, kind = torch.arange(channels), None
    for mem in members:
        m = modules[mem.module]
        if isinstance(m, nn.GroupNorm) and m.num_groups != m.num_channels:
            lab, what = mem.index[:, 0] // (m.num_channels // m.num_groups), "groupnorm"
        elif isinstance(m, CONV_TYPES) and 1 < m.groups != m.in_channels:
            width = (m.out_channels if mem.side == "out" else m.in_channels) // m.groups
            lab, what = mem.index[:, 0] % width, "grouped"
        else:
            continue
        if kind is None:
            label, kind = lab, what
        elif not torch.equal(label, lab):
            raise UnsupportedModelError(
                f"Group '{name}' is coupled to GroupNorm layers or grouped convolutions with different channel "
                f"groupings (at '{mem.module}'); add one of them to `ignore=`.")
    order = torch.argsort(label * channels + torch.arange(channels))
    sizes = torch.bincount(label)
    sizes = sizes[sizes > 0]
    if not bool((sizes == sizes[0]).all()):
        raise UnsupportedModelError(f"Group '{name}': channel groups of unequal size cannot be pruned.")
    return order.view(-1, int(sizes[0]))


def group_slots(graph: tp.DependencyGraph, group: Any, name_of: Any) -> Dict[Tuple[str, str], Dict[int, set]]:
    """A torch-pruning group as ``{(module name, "out" | "in"): {root channel: positions}}``.

    ``name_of(module)`` gives a module's qualified name, or None for torch-pruning's placeholder nodes of
    functional ops, which are skipped.
    """
    merged: Dict[Tuple[str, str], Dict[int, set]] = {}
    for item in group:
        name = name_of(item.dep.target.module)
        if name is None:
            continue
        if graph.is_out_channel_pruning_fn(item.dep.handler):
            side = "out"
        elif graph.is_in_channel_pruning_fn(item.dep.handler):
            side = "in"
        else:
            continue
        slot = merged.setdefault((name, side), {})
        for idx, ridx in zip(item.idxs, item.root_idxs):
            slot.setdefault(int(ridx), set()).add(int(idx))
    return merged


def discover_groups(graph: tp.DependencyGraph, model: nn.Module, families: Families = (),
                    ignore: Sequence[str] = (), example_inputs: Any = None) -> List[GroupSpec]:
    """All prunable groups: torch-pruning groups rooted at Conv/Linear layers not in ``ignore``, then the
    groups of the unit ``families`` (attention heads, recurrent units, experts).

    Groups whose channels would reach an ignored layer's output (the output layer, above all) are dropped
    by torch-pruning itself; groups that reach a LayerNorm or an embedding (a transformer's residual
    stream) are dropped here, since removing such a channel changes every other channel's result.
    """
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    owned = [n for fam in families for n in fam.owned(model)]
    ignored = [modules[n] for n in list(ignore) + owned]
    tied = _tied_modules(model)
    with torch_pruning_step("Finding the coupled groups", model):
        found = list(graph.get_all_groups(ignored_layers=ignored, root_module_types=list(WEIGHT_TYPES)))
    groups = []
    for group in found:
        root = group[0].dep.target.module
        channels = graph.get_out_channels(root)
        if channels is None or channels < 2:
            continue
        merged = group_slots(graph, group, names.get)
        if any(freezes(modules[mname]) for mname, _ in merged) or _partial_writer(root, merged, modules):
            continue
        members = []
        for (mname, side), mapping in merged.items():
            if sorted(mapping) != list(range(channels)):
                raise UnsupportedModelError(
                    f"Group '{names[root]}': layer '{mname}' is coupled to only part of the channels; "
                    f"add '{mname}' to `ignore=`.")
            width = {len(v) for v in mapping.values()}
            if len(width) != 1:
                raise UnsupportedModelError(f"Group '{names[root]}': irregular channel mapping into '{mname}'.")
            index = torch.tensor([sorted(mapping[c]) for c in range(channels)], dtype=torch.long)
            members.append(Member(mname, side, index, member_kind(modules[mname]),
                                  family_layout(families, modules[mname], side)))
        if any(_depth_multiplier(modules[m.module]) for m in members):
            continue  # each input channel feeds several outputs: no cut keeps the convolution's groups aligned
        if any(m.module in tied for m in members):
            continue  # cutting one layer of a tied weight would untie it (surgery gives each layer its own copy)
        _check_indices(names[root], members, modules)
        members.sort(key=lambda m: (m.side != "out", m.module))
        units = _unit_blocks(names[root], channels, members, modules)
        if units.shape[0] < 2:
            continue
        groups.append(GroupSpec(names[root], channels, units, members))
    for fam in families:
        groups.extend(fam.discover(model, graph, as_args(example_inputs) if example_inputs is not None else (),
                                   tuple(ignore)))
    return groups
