"""Layer kinds the library knows, and the few in-place edits every surgery needs (one copy of each)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["CONV_TYPES", "WEIGHT_TYPES", "NORM_TYPES", "FROZEN_TYPES", "freezes", "SUPPORTED_TYPES",
           "UNSUPPORTED_HINTS", "qualname", "kept", "slice_param_", "slice_linear_", "replace_module"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
WEIGHT_TYPES = CONV_TYPES + (nn.Linear,)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm,
              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
# Parameter-carrying layers whose channel surgery is known to be exact.
SUPPORTED_TYPES = WEIGHT_TYPES + NORM_TYPES + (nn.PReLU,)
UNSUPPORTED_HINTS = {
    nn.RNNBase: "recurrent layers of this kind (LSTM with proj_size, subclasses of nn.LSTM/GRU/RNN)",
    nn.modules.conv._ConvTransposeNd: "transposed convolutions",
}
# Modules allowed in a model whose channels are never pruned: a group that reaches them is dropped, because
# removing a channel they normalise over (or look up) changes the result for every other channel.
FROZEN_TYPES = (nn.LayerNorm, nn.Embedding)


def freezes(module: nn.Module) -> bool:
    """True for a layer whose channels are never pruned: a FROZEN_TYPES layer, an RMSNorm (torch's or a model
    library's ``*RMSNorm``: it normalises over every channel, like a LayerNorm), or a GroupNorm with one group
    (a LayerNorm over channels and space, as PoolFormer uses)."""
    return isinstance(module, FROZEN_TYPES) or type(module).__name__.endswith("RMSNorm") or \
        (isinstance(module, nn.GroupNorm) and module.num_groups == 1)


def qualname(prefix: str, name: str) -> str:
    """``prefix.name``, or whichever of the two is not empty."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def kept(n: int, removed: torch.Tensor) -> torch.Tensor:
    """Sorted positions of ``0..n-1`` not in ``removed``."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    return keep.nonzero().flatten()


def slice_param_(module: nn.Module, name: str, dim: Any, keep: torch.Tensor) -> None:
    """Keeps positions ``keep`` of ``module``'s parameter ``name`` along ``dim``, in place; the new parameter keeps
    ``requires_grad``. ``dim`` may be a pair ``(d0, d1)`` whose positions are numbered row-major (see
    :class:`~fairpruner._core.groups.Member`); every index of ``d0`` must then keep the same number of ``d1``."""
    p = getattr(module, name)
    keep = keep.to(p.device)
    with torch.no_grad():
        if isinstance(dim, tuple):
            per = torch.bincount(torch.div(keep, p.shape[dim[1]], rounding_mode="floor"), minlength=p.shape[dim[0]])
            if not bool((per == per[0]).all()):
                raise ValueError(f"Every index of dim {dim[0]} of '{name}' must keep as many positions of dim "
                                 f"{dim[1]}; got {per.tolist()}.")
            flat = p.movedim(dim, (0, 1)).flatten(0, 1).index_select(0, keep)
            new = flat.unflatten(0, (p.shape[dim[0]], -1)).movedim((0, 1), dim).contiguous()
        else:
            new = p.index_select(dim, keep).clone()
        setattr(module, name, nn.Parameter(new, requires_grad=p.requires_grad))


def slice_linear_(linear: nn.Linear, dim: int, keep: torch.Tensor) -> None:
    """Keeps rows (``dim`` 0: output features, with the bias) or columns (``dim`` 1) ``keep`` of a Linear layer,
    in place; the new parameters keep ``requires_grad``."""
    slice_param_(linear, "weight", dim, keep)
    if dim == 0 and linear.bias is not None:
        slice_param_(linear, "bias", 0, keep)
    if dim == 0:
        linear.out_features = int(keep.numel())
    else:
        linear.in_features = int(keep.numel())


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` where the submodule ``name`` of ``model`` was."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
