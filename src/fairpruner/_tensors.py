"""Small conventions for model inputs and outputs, shared by scoring, surgery, counting and fine-tuning."""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["as_args", "first_sample", "to_device", "logits_of"]


def as_args(example_inputs: Any) -> tuple:
    """Normalises inputs (a tensor, or a tuple/list of tensors for a multi-input model) to positional args."""
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def first_sample(example_inputs: Any) -> tuple:
    """The first sample of every batched input, keeping the batch dimension (batch size 1)."""
    return tuple(t[:1] if torch.is_tensor(t) and t.dim() > 0 else t for t in as_args(example_inputs))


def to_device(x: Any, device: torch.device) -> Any:
    """Moves a tensor, or the tensors of a tuple/list, to ``device``."""
    if torch.is_tensor(x):
        # Tensors made under inference_mode cannot enter autograd; a plain copy can.
        return x.to(device).clone() if x.is_inference() else x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(t, device) for t in x)
    return x


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output: the tensor itself, ``.logits`` (Hugging Face), or a tuple's first item."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out
