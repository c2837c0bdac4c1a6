"""R without weight gradients: the Taylor terms of Conv, Linear and norm members from their activations.

Where a layer's output channel is affine in that channel's parameters (a Conv/Linear row with its bias, a
norm layer's scale and shift), Euler's identity gives ``sum_w w * dL/dw = sum_positions z_c * dL/dz_c``: the
term follows from the channel's output ``z`` and its gradient, and the backward needs no weight gradients (a
third of a convolutional network's backward). An eval-mode BatchNorm's output is ``scale * x + shift`` of its
input ``x``, so its term is read from the input, which autograd keeps anyway: the output is usually
overwritten by an in-place activation.

Whether the identity holds for a member is not assumed from its type: a probe on two samples computes both
sides for every candidate and keeps the activation path only where they agree (a weight also used outside the
module's own forward, a layer the model never calls, fall back to weight gradients). A tensor that a later
in-place op overwrites is copied when captured.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from .._core.groups import GroupSpec, member_params, per_channel
from .._core.inputs import as_args, logits_of
from .._core.state import keeping_no_saved_tensors
from .._core.layers import CONV_TYPES
from .._errors import FairPrunerError

__all__ = ["ActivationTaps", "tap_kind", "grad_inputs", "float_inputs"]

Key = Tuple[int, int]
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def tap_kind(module: nn.Module) -> Optional[str]:
    """"input" (eval BatchNorm: read from its input), "output", or None where the activation path does not
    apply."""
    if isinstance(module, _BATCH_NORMS) and module.affine:
        return "input" if module.running_mean is not None else "output"
    if isinstance(module, CONV_TYPES + (nn.Linear, nn.GroupNorm)):
        return "output"
    return None


def _channel_dim(module: nn.Module, t: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return t.dim() - 1
    if isinstance(module, CONV_TYPES):
        return t.dim() - len(module.kernel_size) - 1  # unbatched inputs have no batch dimension
    return 1


def _channel_sum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over every dimension but ``dim``: the inner (spatial) ones first, a faster reduction than all at once."""
    inner = tuple(range(dim + 1, t.dim()))
    t = t.sum(inner) if inner else t
    return t.sum(tuple(range(dim))) if dim else t


class ActivationTaps:
    """Forward hooks that turn members' activations and output gradients into Taylor terms.

    Args:
        groups: the scored groups; ``modules``: the scored model's modules by name.
    """

    def __init__(self, groups: Sequence[GroupSpec], modules: Dict[str, nn.Module]) -> None:
        self.modules = modules
        self.by_module: Dict[str, List[Tuple[Key, Any]]] = {}  # module -> [(key, member)]
        for gi, g in enumerate(groups):
            for mi, m in enumerate(g.members):
                mod = modules[m.module]
                if m.side != "out" or m.params is not None or m.owner is not None or tap_kind(mod) is None:
                    continue
                if member_params(m, mod):
                    self.by_module.setdefault(m.module, []).append(((gi, mi), m))
        self.copy: Set[str] = set()  # modules whose captured tensor a later in-place op overwrites
        self.mode: Optional[str] = None  # "probe", "check" (forward only) or "run"; None: hooks do nothing
        self.terms: Dict[Key, torch.Tensor] = {}
        self.called: Set[str] = set()
        self.no_grad: Set[str] = set()
        self._captured: List[Tuple[str, torch.Tensor, int]] = []

    def keys(self) -> List[Key]:
        return [k for entries in self.by_module.values() for k, _ in entries]

    def attach(self) -> List[Any]:
        return [self.modules[n].register_forward_hook(functools.partial(self._forward, n)) for n in self.by_module]

    def drop(self, keys: Set[Key]) -> None:
        """Leaves ``keys`` to weight gradients."""
        for n in list(self.by_module):
            self.by_module[n] = [(k, m) for k, m in self.by_module[n] if k not in keys]
            if not self.by_module[n]:
                del self.by_module[n]

    def _forward(self, name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        if self.mode is None or name not in self.by_module:
            return
        self.called.add(name)
        value = (inputs[0] if inputs else None) if tap_kind(module) == "input" else output
        if not (torch.is_tensor(output) and torch.is_tensor(value) and output.requires_grad):
            if self.mode == "run":  # its weights are frozen: its terms would be lost without a word
                raise FairPrunerError(
                    f"{name} computed its output without a gradient on a calibration batch, though it had one on "
                    "the example inputs (a batch of another dtype, or a data-dependent no_grad?); pass "
                    "example_inputs= shaped and typed like the calibration batches.")
            self.no_grad.add(name)
            return
        if self.mode == "check":
            return
        held = value.detach()
        if self.mode == "probe":
            self._captured.append((name, held, held._version))
        if self.mode == "probe" or name in self.copy:
            held = held.clone()
        # The graph (and this hook) lives until the caller drops its loss, often after the next forward: the
        # box lets the hook release the tensor as soon as it has used it.
        box = [held, held._version]
        output.register_hook(lambda grad, n=name, m=module: self._backward(n, m, box, grad))

    def _backward(self, name: str, module: nn.Module, box: list, grad: torch.Tensor) -> None:
        value, version = box
        box.clear()
        if value._version != version:
            raise FairPrunerError(f"The output of {name} was overwritten in place, which the probe on the example "
                                  "inputs did not show (a forward that depends on the data?); pass "
                                  "example_inputs= that take the same path as the calibration batches.")
        with torch.no_grad():
            dim = _channel_dim(module, value)
            g = grad.float()
            if tap_kind(module) == "input":  # y = scale * x + shift, per channel
                scale = module.weight.float() / torch.sqrt(module.running_var.float() + module.eps)
                shape = [-1 if d == dim else 1 for d in range(g.dim())]
                centred = value.float() - module.running_mean.float().view(shape)  # exact where |mean| >> std
                sums = scale * _channel_sum(centred.mul_(g), dim) + module.bias.float() * _channel_sum(g, dim)
            else:
                sums = _channel_sum(value.float() * g, dim)
            for key, m in self.by_module.get(name, ()):
                t = per_channel(sums, 0, m).double()
                self.terms[key] = t if key not in self.terms else self.terms[key] + t

    def probe(self, model: nn.Module, trace: tuple, weight_terms: Dict[Key, torch.Tensor]) -> Set[Key]:
        """One forward+backward on ``trace`` with every hook on; returns the keys whose activation terms
        differ from ``weight_terms`` (computed by the same backward), and marks tensors overwritten in place."""
        self.mode, self.terms, self.called, self.no_grad, self._captured = "probe", {}, set(), set(), []
        try:
            out = logits_of(model(*trace)).float()
            g = torch.Generator(device="cpu").manual_seed(0)
            (out * torch.randn(out.shape, generator=g).to(out.device)).sum().backward()
        finally:
            self.mode = None
        self.copy = {n for n, t, ver in self._captured if t._version != ver}
        self._captured = []
        bad = set()
        for key in self.keys():
            a, w = self.terms.get(key), weight_terms.get(key)
            if a is None or w is None:
                bad.add(key)
                continue
            scale = float(torch.maximum(a.abs().max(), w.abs().max()))
            if float((a - w).abs().max()) > 1e-3 * scale + 1e-30:
                bad.add(key)
        self.terms = {}
        return bad

    def without_grad(self, model: nn.Module, trace: tuple) -> Set[Key]:
        """Keys whose output needs no gradient in a forward on ``trace`` as configured (nothing upstream of
        them requires one): the activation path would never see their gradient."""
        self.mode, self.called, self.no_grad = "check", set(), set()
        try:
            with keeping_no_saved_tensors():
                model(*trace)
        finally:
            self.mode = None
        return {k for n in self.no_grad | (set(self.by_module) - self.called) for k, _ in self.by_module.get(n, ())}


def grad_inputs(args: tuple) -> tuple:
    """Floating-point inputs as new leaves that require grad: with the weights of activation-path members
    frozen, the backward starts from them."""
    return tuple(t.detach().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t for t in args)


def float_inputs(args: tuple) -> bool:
    return any(torch.is_tensor(t) and t.is_floating_point() for t in as_args(args))
