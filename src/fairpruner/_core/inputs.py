"""Conventions for model inputs, outputs and batches, shared by every stage (one copy of each)."""
from __future__ import annotations

import itertools
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .._errors import DataError, FairPrunerError

__all__ = ["as_args", "first_sample", "to_device", "logits_of", "output_tensors", "returned_tensors", "length_of",
           "split_batch", "device_of", "forward_logits", "synthetic_inputs", "describe_inputs", "check_device",
           "float_dtype", "model_device"]


def as_args(example_inputs: Any) -> tuple:
    """Normalises inputs (a tensor, or a tuple/list of tensors for a multi-input model) to positional args."""
    if isinstance(example_inputs, dict):  # would reach forward() as one argument, or fail inside the model
        raise DataError(f"Inputs given as a dict ({', '.join(map(str, example_inputs))}): inputs are passed "
                        "positionally; give a tensor, or a tuple of tensors in the order forward() takes them "
                        "(e.g. (input_ids, attention_mask)).")
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def first_sample(example_inputs: Any) -> tuple:
    """The first sample of every batched input, keeping the batch dimension (batch size 1)."""
    return tuple(t[:1] if torch.is_tensor(t) and t.dim() > 0 else t for t in as_args(example_inputs))


def to_device(x: Any, device: torch.device, dtype: Optional[torch.dtype] = None) -> Any:
    """Moves a tensor, or the tensors of a tuple/list, to ``device``; floating ones also to ``dtype`` if given
    (a bfloat16 model fed float32 batches)."""
    if torch.is_tensor(x):
        x = x.to(device, dtype) if dtype is not None and x.is_floating_point() else x.to(device)
        # Tensors made under inference_mode cannot enter autograd; a plain copy can.
        return x.clone() if x.is_inference() else x
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(t, device, dtype) for t in x)
    return x


def float_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The one floating-point dtype of the model's parameters; None if it has none or several (a mixed-precision
    model: which input goes where is its own business)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output: the tensor itself, ``.logits`` (Hugging Face), a dict's ``"logits"``, or a
    tuple's first item; a clear error for anything else."""
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, Mapping):
        if "logits" not in out:
            raise FairPrunerError(f"The model returns a dict without 'logits' (keys: {list(out)[:8]}); return the "
                                  "logits as a tensor, as a tuple's first item, or under the key 'logits'.")
        out = out["logits"]
    elif isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not torch.is_tensor(out):
        raise FairPrunerError(f"The model's output holds no logits tensor where one was expected (got "
                              f"{type(out).__name__}); return the logits as a tensor, or as a tuple's first item.")
    return out


def length_of(loader: Any) -> Optional[int]:
    """The number of batches a loader gives, or None where it cannot say (a generator; a DataLoader over an
    IterableDataset, whose ``len()`` raises)."""
    try:
        return len(loader)
    except TypeError:
        return None


def returned_tensors(output: Any) -> List[torch.Tensor]:
    """What a pruned model must return unchanged: a Hugging Face output's logits (its caches and router logits
    shrink with the units, by design), else every tensor in the output."""
    return [output.logits] if hasattr(output, "logits") else output_tensors(output)


def output_tensors(output: Any) -> List[torch.Tensor]:
    """Every tensor in a model's output (nested tuples, lists and dicts, which includes Hugging Face outputs);
    anything else is left out: a decoder's cache object (``use_cache=True``) is not a tensor and its tensors
    are the key/value projections' outputs, which the logits trace through anyway."""
    if torch.is_tensor(output):
        return [output]
    items = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    return [t for item in items for t in output_tensors(item)]


def split_batch(batch: Any) -> Tuple[Any, torch.Tensor]:
    """``(inputs, targets)`` of a labelled batch, targets as a tensor; a clear error for any other form."""
    if isinstance(batch, dict):
        raise DataError("The loader yields dicts; it must yield (inputs, targets) pairs with integer class labels.")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        raise DataError(f"The loader must yield (inputs, targets) pairs with integer class labels; got {got}. "
                        "Wrap your data in a labelled Dataset (see fairpruner.data).")
    inputs, targets = batch
    return inputs, targets if torch.is_tensor(targets) else torch.as_tensor(targets)


def check_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device`` that this machine has, or a clear error (before any work is done)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise FairPrunerError(f"Unknown device {device!r}; give e.g. 'cpu', 'cuda' or 'cuda:1'.") from None
    if d.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise FairPrunerError(f"Device {device!r} asked for, but torch sees no CUDA GPU here (torch "
                                  f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use 'cpu'.")
        if d.index is not None and d.index >= count:
            raise FairPrunerError(f"Device {device!r} asked for, but this machine has {count} CUDA GPU(s): "
                                  f"cuda:0 ... cuda:{count - 1}.")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise FairPrunerError(f"Device {device!r} asked for, but MPS is not available here; use 'cpu'.")
    return d


def device_of(model: nn.Module, device: Optional[Any] = None) -> torch.device:
    """``device`` if given (checked to exist here), else the device of the model's first parameter (CPU for a
    parameterless model)."""
    if device is not None:
        return check_device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def forward_logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Logits of ``model`` on a batch's inputs (a tuple/list is taken as positional inputs)."""
    return logits_of(model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs))


def describe_inputs(example_inputs: Any) -> List[dict]:
    """Shapes and dtypes of the tensors among the inputs (and the range of integer ones), and the plain values
    between them (what plans record to rebuild inputs later). A ``None`` or a number keeps its place: GPT-2 is
    called as ``(ids, None, mask)``, its second argument being the cache."""
    specs = []
    for t in as_args(example_inputs):
        if torch.is_tensor(t):
            spec = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            if not (t.is_floating_point() or t.is_complex()) and t.numel():
                # Token ids and masks: synthetic ones stay in the range seen (zeros would be a fully masked
                # attention mask, against which a pruned model is hardly checked).
                spec.update(low=int(t.min()), high=int(t.max()))
            specs.append(spec)
        elif t is None or isinstance(t, (bool, int, float, str)):
            specs.append({"value": t})
    return specs


def synthetic_inputs(specs: Sequence[dict], batch: Optional[int] = None) -> tuple:
    """Seeded inputs with recorded shapes and dtypes, integers within their recorded range; the global RNG is
    not touched.

    Args:
        specs: as :func:`describe_inputs` writes them.
        batch: rows of every input; None keeps the recorded batch size, cut to 2 (enough to trace).
    """
    gen = torch.Generator().manual_seed(0)
    out = []
    for spec in specs:
        if "value" in spec:
            out.append(spec["value"])
            continue
        dtype = getattr(torch, spec["dtype"])
        rows = max(1, min(int(spec["shape"][0]), 2)) if batch is None else batch
        shape = [rows, *(int(s) for s in spec["shape"][1:])]
        if dtype.is_floating_point:
            out.append(torch.randn(*shape, generator=gen).to(dtype))
        elif "low" in spec:
            # Integers from the range the recorded inputs held; a two-valued one (a 0/1 mask) at its higher
            # value, fully visible: random masks may hide every position of a short row.
            low, high = int(spec["low"]), int(spec["high"])
            low = high if high - low == 1 else low
            out.append(torch.randint(low, high + 1, shape, generator=gen).to(dtype))
        else:  # files written before ranges were recorded
            out.append(torch.zeros(*shape, dtype=dtype))
    return tuple(out)


def model_device(model: nn.Module, device: Optional[Any]) -> torch.device:
    """The device to run on: the model's own. A ``device`` elsewhere is refused, not followed by moving the
    caller's model behind its back (fine-tuning, which trains the model there, moves it)."""
    here = device_of(model)
    if device is None:
        return here
    want = device_of(model, device)
    held = {t.device for t in itertools.chain(model.parameters(), model.buffers())} or {here}
    # Any device the model holds tensors on will do (an offloaded model computes on one its first weight is not on).
    for d in held:
        if d.type == want.type and (want.index is None or d.index is None or d.index == want.index):
            return d
    raise FairPrunerError(f"The model is on {here}, device={str(device)!r} asked for: move it there first "
                          f"(model.to({str(device)!r})), or leave device out.")
