"""Parameter, MAC and latency measurements on real modules."""
from __future__ import annotations

import numbers
import time
from typing import Any, Dict, Iterable, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .._core.inputs import as_args, first_sample
from .._core.layers import WEIGHT_TYPES
from .._core.state import eval_mode
from .._errors import FairPrunerError

__all__ = ["count_params", "count_macs", "module_macs", "measure_latency", "attention_macs", "FunctionalMatmuls",
           "mha_macs", "LAYER_MACS"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once).

    Args:
        model: any module.

    Example:
        >>> fp.count_params(fp.prune(model, plan)) / fp.count_params(model)
    """
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm,
            torch.Tensor.bmm, torch.baddbmm, torch.addmm, torch.addbmm, F.linear}
# Grouped matmuls (transformers 5 runs stacked mixture-of-experts with them): (tokens, K) x (groups, K, N).
_MATMULS |= {f for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)) if f is not None}


class FunctionalMatmuls(TorchFunctionMode):
    """Counts MACs of matrix products called outside Conv/Linear modules (hand-written attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0
        self.depth = 0  # > 0 while inside a Conv/Linear forward, whose MACs the hooks count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.depth == 0 and torch.is_tensor(out):
            if func in _MATMULS:
                a = args[1] if func in (torch.baddbmm, torch.addmm, torch.addbmm) else args[0]
                self.macs += out.numel() * (a.shape[-1] if torch.is_tensor(a) and a.dim() else 1)
            elif func in (F.conv1d, F.conv2d, F.conv3d):
                w = args[1] if len(args) > 1 else kwargs["weight"]
                self.macs += out.numel() * w[0].numel()
            elif func is F.scaled_dot_product_attention:
                q, k = args[0], args[1]
                self.macs += 2 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]
        return out


def mha_macs(mod: nn.MultiheadAttention, inp: tuple, kwargs: dict) -> int:
    q, k, v = (list(inp) + [kwargs.get(n) for n in ("query", "key", "value")[len(inp):]])[:3]
    seq = 1 if mod.batch_first and q.dim() == 3 else 0
    L, S, E = q.shape[seq], k.shape[seq], mod.embed_dim
    proj = L * E * E + S * k.shape[-1] * E + S * v.shape[-1] * E
    return q.numel() // (L * q.shape[-1]) * (proj + 2 * L * S * E + L * E * E)


def _rnn_macs(mod: nn.RNNBase, inp: tuple, kwargs: dict) -> int:
    x = inp[0] if inp else kwargs["input"]
    if isinstance(x, nn.utils.rnn.PackedSequence):
        steps = x.data.shape[0]  # every packed step of every sequence
    else:
        steps = x.shape[:-1].numel()
    weights = sum(p.numel() for n, p in mod.named_parameters() if n.startswith("weight_"))
    return steps * weights


# Layers with matrix products of their own that module hooks must count (their kernels run outside F.linear).
LAYER_MACS = {nn.MultiheadAttention: mha_macs, nn.RNNBase: _rnn_macs}


def module_macs(model: nn.Module, example_inputs: Any) -> Tuple[int, Dict[str, int]]:
    """MACs of one sample: the total, and those of every Conv/Linear layer by qualified name.

    Layer MACs are exact (output elements x input channels per group x kernel size); matrix products called
    outside those layers are added to the total. Unlike :func:`count_macs` this needs no dispatcher-level
    counter, so it is cheap enough to run inside every scoring call.
    """
    counter = FunctionalMatmuls()
    per_module: Dict[str, int] = {}
    hooks = []

    def enter(mod, inp):
        counter.depth += 1

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            def leave(mod, inp, out, name=name):
                counter.depth -= 1
                per_in = mod.in_features if isinstance(mod, nn.Linear) else \
                    mod.in_channels // mod.groups * int(torch.tensor(mod.kernel_size).prod())
                per_module[name] = per_module.get(name, 0) + out.numel() * per_in
            hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
        for cls, fn in LAYER_MACS.items():
            if isinstance(m, cls):
                def leave_layer(mod, inp, kwargs, out, name=name, fn=fn):
                    counter.depth -= 1
                    per_module[name] = per_module.get(name, 0) + fn(mod, inp, kwargs)
                hooks += [m.register_forward_pre_hook(enter),
                          m.register_forward_hook(leave_layer, with_kwargs=True)]
    try:
        with eval_mode(model), torch.no_grad(), counter:
            model(*first_sample(example_inputs))
    finally:
        for h in hooks:
            h.remove()
    return sum(per_module.values()) + counter.macs, per_module


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass on one sample.

    Counts every Conv/Linear layer exactly, and matrix products, convolutions and
    ``scaled_dot_product_attention`` called as functions (hand-written attention's ``q @ k.T``), which
    module-hook counters miss. (torch's own dispatcher-level counter reports 0 for CPU attention kernels.)

    Args:
        model: the model (run once, in its current mode, without gradients).
        example_inputs: a batch (tensor, or tuple of tensors for a multi-input model); only the first sample
            is used, so the batch dimension must come first.

    Returns:
        MACs of one sample.

    Example:
        >>> fp.count_macs(model, x[:1])
    """
    return module_macs(model, example_inputs)[0]


def measure_latency(model: nn.Module, example_inputs: Any, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall-clock seconds of one eval-mode forward pass on ``example_inputs``.

    On a GPU each pass is timed to its end, not to the launch of its kernels. The model's train/eval flag is
    restored.

    Args:
        model: the model, on the device of ``example_inputs``.
        example_inputs: the batch to time (tensor, or tuple of tensors).
        repeats: timed passes (at least 1); the median is returned.
        warmup: untimed passes first.

    Example:
        >>> fp.measure_latency(model, x, repeats=20) / fp.measure_latency(fp.prune(model, plan), x, repeats=20)
    """
    if isinstance(repeats, bool) or not isinstance(repeats, numbers.Integral) or repeats < 1:
        raise FairPrunerError(f"repeats must be a positive integer, got {repeats!r}.")
    args = as_args(example_inputs)
    devices = {t.device for t in args if torch.is_tensor(t) and t.device.type == "cuda"}
    times = []
    with eval_mode(model), torch.inference_mode():
        for i in range(warmup + repeats):
            for d in devices:
                torch.cuda.synchronize(d)
            t0 = time.perf_counter()
            model(*args)
            for d in devices:
                torch.cuda.synchronize(d)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def attention_macs(model: nn.Module, example_inputs: Any, whole: Iterable[str] = (),
                   functional: Iterable[str] = ()) -> Dict[str, int]:
    """MACs of one sample that :func:`count_macs` attributes to attention modules, by module name.

    Args:
        model: the model.
        example_inputs: inputs it runs on (only the first sample is used).
        whole: ``nn.MultiheadAttention`` modules, every MAC of which (projections too) runs outside Linear
            modules and is counted by their layer rule.
        functional: other attention modules: the matrix products they call outside Conv/Linear layers (the
            attention products ``q k^T`` and ``attn v``, or one SDPA call).
    """
    whole, functional = set(whole), set(functional)
    counter = FunctionalMatmuls()
    out: Dict[str, int] = {}
    start: Dict[str, int] = {}
    hooks = []

    def enter(mod, inp):
        counter.depth += 1

    def leave(mod, inp, res):
        counter.depth -= 1

    def add(name: str, n: int) -> None:
        out[name] = out.get(name, 0) + n

    try:
        for name, m in model.named_modules():
            # The regime of count_macs: products inside Conv/Linear (and MHA/RNN) layers are theirs.
            if isinstance(m, WEIGHT_TYPES + tuple(LAYER_MACS)):
                hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
            if name in whole:
                hooks.append(m.register_forward_hook(
                    lambda mod, args, kwargs, res, n=name: add(n, mha_macs(mod, args, kwargs)), with_kwargs=True))
            elif name in functional:
                hooks.append(m.register_forward_pre_hook(lambda mod, inp, n=name: start.__setitem__(n, counter.macs)))
                hooks.append(m.register_forward_hook(lambda mod, inp, res, n=name: add(n, counter.macs - start[n])))
        fastpath = torch.backends.mha.get_fastpath_enabled()
        # Fused inference paths would hand nested tensors to the hooks; the count is the dense one anyway.
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with eval_mode(model), torch.no_grad(), counter:
                model(*first_sample(example_inputs))
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    finally:
        for h in hooks:
            h.remove()
    return out
