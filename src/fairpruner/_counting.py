"""Parameter, MAC and latency measurements on real modules."""
from __future__ import annotations

import time
from typing import Any, Dict, Tuple

import torch
from torch import nn

__all__ = ["count_params", "count_macs", "module_macs", "measure_latency", "as_args", "first_sample"]


def as_args(example_inputs: Any) -> tuple:
    """Normalises example inputs (a tensor, or a tuple/list of tensors) to positional args."""
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def first_sample(example_inputs: Any) -> tuple:
    """The first sample of every batched input, keeping the batch dimension (batch size 1)."""
    return tuple(t[:1] if torch.is_tensor(t) and t.dim() > 0 else t for t in as_args(example_inputs))


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _flop_counts(model: nn.Module, example_inputs: Any) -> Tuple[int, Dict[str, int]]:
    from torch.utils.flop_counter import FlopCounterMode  # imported lazily: it pulls in torch._dynamo

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*first_sample(example_inputs))
    finally:
        model.train(was_training)
    per_module = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global" or "." not in key:
            continue
        # FlopCounterMode names modules "<RootClass>.<qualified name>".
        per_module[key.split(".", 1)[1]] = sum(ops.values())
    return counter.get_total_flops(), per_module


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass on one sample.

    Counted by torch's dispatcher-level FLOP counter, so functional matmuls (``q @ k.T``) and
    ``scaled_dot_product_attention`` are included, not just nn.Conv/nn.Linear modules. One MAC is two FLOPs.
    """
    total, _ = _flop_counts(model, example_inputs)
    return int(total // 2)


def module_macs(model: nn.Module, example_inputs: Any) -> Tuple[int, Dict[str, int]]:
    """Total MACs and the MACs of every module, by qualified name (parents include their children)."""
    total, per_module = _flop_counts(model, example_inputs)
    return int(total // 2), {k: int(v // 2) for k, v in per_module.items()}


def measure_latency(model: nn.Module, example_inputs: Any, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall-clock seconds of one eval-mode forward pass on ``example_inputs``."""
    was_training = model.training
    model.eval()
    args = as_args(example_inputs)
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                model(*args)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    times.sort()
    return times[len(times) // 2]
