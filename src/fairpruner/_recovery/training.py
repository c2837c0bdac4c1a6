"""Evaluation and a short fine-tuning loop (SGD, cosine schedule, optional distillation) after pruning."""
from __future__ import annotations

import contextlib
import math
import sys
import warnings
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._core.inputs import (device_of, float_dtype, forward_logits, length_of, model_device, split_batch,
                             to_device)
from .._core.state import eval_mode
from .._errors import DataError, FairPrunerError

__all__ = ["evaluate", "finetune", "native_cpu_autocast"]


def native_cpu_autocast(dtype: torch.dtype) -> bool:
    """Whether this CPU computes ``dtype`` (bfloat16 or float16) natively, as oneDNN reports it.

    Without AVX512-BF16/AMX (bfloat16) or AVX512-FP16/AMX-FP16 (float16) the 16-bit kernels are emulated:
    on 2 cores of an AVX2 CPU a distilled ResNet-56 step (batch 128) took 38.7 s under bfloat16 autocast against
    3.2 s in float32. True where oneDNN cannot be asked, so that nothing is warned about on a guess.

    Example:
        >>> native_cpu_autocast(torch.bfloat16)  # False on an AVX2-only CPU
    """
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return bool(getattr(torch.ops.mkldnn, check)()) if check else True
    except (AttributeError, RuntimeError):
        return True


def evaluate(model: nn.Module, loader: Iterable, device: Optional[Any] = None, progress: Optional[bool] = None,
             desc: str = "evaluating") -> float:
    """Top-1 accuracy of ``model`` over ``loader``.

    The model runs in eval mode without gradients; its train/eval flag is restored afterwards.

    Args:
        model: a classifier returning logits (or an object with ``.logits``, or a tuple whose first item
            is the logits).
        loader: iterable of ``(inputs, targets)`` batches with integer class labels.
        device: where to run: the model's device (the default); another one is refused, the model is not
            moved.
        progress: show a progress bar; by default only when stderr is a terminal.
        desc: the progress bar's label.

    Returns:
        The fraction of correctly classified samples, in [0, 1].

    Raises:
        DataError: if the loader yields no samples, batches of the wrong form, or targets not shaped like the
            predictions.
        FairPrunerError: for a ``device`` the model is not on.

    Example:
        >>> fp.evaluate(fp.recalibrate(fp.prune(model, plan), train_inputs), test_loader)
    """
    device, dtype = model_device(model, device), float_dtype(model)
    correct = total = 0
    show = progress if progress is not None else sys.stderr.isatty()
    total_batches = length_of(loader)
    # A DataLoader draws its base seed from the global RNG; evaluation needs none, so the caller's is kept.
    with eval_mode(model), torch.no_grad(), torch.random.fork_rng(devices=[]):
        for batch in tqdm(loader, total=total_batches, desc=f"fairpruner: {desc}", disable=not show, leave=False):
            inputs, targets = split_batch(batch)
            pred = forward_logits(model, to_device(inputs, device, dtype)).argmax(-1).cpu()
            if pred.shape != targets.shape:  # (B, 1) against (B,) would broadcast to B x B comparisons
                raise DataError(f"Targets of shape {tuple(targets.shape)} for predictions of shape "
                                f"{tuple(pred.shape)}: give one class label per prediction (e.g. targets.view(-1)).")
            correct += int((pred == targets.long()).sum())
            total += targets.numel()
    if total == 0:
        raise DataError("The evaluation loader yielded no samples.")
    return correct / total


def finetune(
    model: nn.Module,
    loader: Iterable,
    epochs: int = 1,
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    device: Optional[Any] = None,
    progress: Optional[bool] = None,
    max_steps: Optional[int] = None,
    autocast: Optional[torch.dtype] = None,
    teacher: Optional[nn.Module] = None,
    distill: float = 0.9,
    temperature: float = 4.0,
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
) -> nn.Module:
    """Trains a (pruned) classifier in place with SGD and a per-step cosine learning-rate schedule.

    The optimizer is built here from the model's current parameters: pruning replaces parameter tensors, so
    an optimizer created before pruning would hold stale tensors and momentum buffers of the wrong shape.
    Parameters with ``requires_grad=False`` stay frozen.

    Args:
        model: the model to train; it is modified in place (and moved to ``device``).
        loader: iterable of ``(inputs, targets)`` batches with integer class labels, re-iterated every epoch
            (shuffle it yourself, e.g. a DataLoader with ``shuffle=True``).
        epochs: passes over ``loader``.
        lr: initial learning rate, annealed to zero along a cosine over all steps (the paper uses 1e-3).
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        device: where to train; defaults to the model's device.
        progress: show a progress bar; by default only when stderr is a terminal.
        max_steps: stop after this many optimizer steps in total (the schedule is fitted to it); needed for a
            loader without a length, which then also stops after ``epochs`` passes.
        autocast: run forward and loss under ``torch.autocast`` with this dtype (mixed precision; weights,
            gradients and the optimizer stay in their own dtype). ``torch.bfloat16`` is faster on CPUs with
            AMX or AVX512-BF16 (1.8x per ResNet-56 CIFAR-10 epoch on 2 cores) and on recent GPUs, and many
            times slower on CPUs without them (a warning says so; see :func:`native_cpu_autocast`);
            ``torch.float16`` is for CUDA (no loss scaling here, so prefer bfloat16).
        teacher: distil from this model (typically the unpruned original): the loss becomes
            ``(1 - distill) * cross-entropy + distill * T^2 * KL(teacher || model)`` on logits softened by
            ``temperature`` T (Hinton et al., 2015). The teacher runs in eval mode without gradients, on the
            device it is on (which must be ``device``); nothing of it changes, its train/eval flags included.
        distill: weight of the distillation term, in [0, 1] (0.9 with T = 4 is the usual CIFAR setting);
            used only with ``teacher``.
        temperature: softening temperature T > 0 of both models' logits in the distillation term.
        loss_fn: ``loss_fn(logits, targets)`` in place of cross-entropy, as :func:`fairpruner.score` takes it
            (a causal LM trained on its last token's class logits); the targets reach it as the loader gives them.

    Returns:
        The same model, trained, in eval mode.

    Example:
        >>> fp.finetune(pruned, train_loader, epochs=3, lr=0.01, autocast=torch.bfloat16)
        >>> fp.finetune(pruned, train_loader, epochs=3, lr=0.01, teacher=model)  # distil from the original

    Raises:
        FairPrunerError: for invalid settings, a loader of unknown length without ``max_steps``, a model
            without trainable parameters, or a non-finite loss.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise FairPrunerError(f"epochs must be a non-negative integer, got {epochs!r}.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise FairPrunerError(f"lr must be a positive number, got {lr!r}.")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 0):
        raise FairPrunerError(f"max_steps must be a non-negative integer or None, got {max_steps!r}.")
    if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
        raise FairPrunerError(f"autocast must be torch.bfloat16, torch.float16 or None, got {autocast!r}.")
    device = device_of(model, device)
    if autocast is not None and device.type == "cpu" and not native_cpu_autocast(autocast):
        warnings.warn(f"autocast={autocast} is emulated on this CPU (no native 16-bit kernels): fine-tuning will "
                      "be many times slower than in float32. Pass autocast=None (on the command line, drop "
                      "--bf16).", stacklevel=2)
    _check_teacher(model, teacher, distill, temperature, device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise FairPrunerError("The model has no trainable parameters (every requires_grad is False).")
    per_epoch = length_of(loader)
    if per_epoch is None and max_steps is None:
        raise FairPrunerError("The loader has no length; pass max_steps= so the schedule knows its end.")
    if epochs == 0 or max_steps == 0:
        return model.eval()
    if per_epoch == 0:
        raise DataError("The training loader yielded no batches.")
    total = epochs * per_epoch if per_epoch is not None else max_steps
    if max_steps is not None:
        total = min(total, max_steps)

    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    show = progress if progress is not None else sys.stderr.isatty()
    bar = tqdm(total=total, desc="fairpruner: fine-tuning", disable=not show, leave=False)
    model.train()
    step = passes = 0
    dtype = float_dtype(model)
    try:
        with eval_mode(teacher) if teacher is not None else contextlib.nullcontext():
            while step < total and passes < epochs:  # a loader without a length stops at either bound
                seen, passes = step, passes + 1
                for batch in loader:
                    inputs, targets = split_batch(batch)
                    inputs = to_device(inputs, device, dtype)
                    if teacher is not None and step == 0:
                        _check_logits(model, teacher, inputs)
                    with torch.autocast(device.type, dtype=autocast or torch.bfloat16,
                                        enabled=autocast is not None):
                        targets = targets.to(device) if loss_fn is not None else targets.long().to(device)
                        loss = _loss(model, teacher, inputs, targets, distill, temperature, loss_fn)
                    if not bool(torch.isfinite(loss)):
                        raise FairPrunerError(f"The loss became {loss.item()} at step {step}; "
                                              "lower the learning rate.")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                    if step >= total:
                        break
                if step == seen:
                    raise DataError("The training loader yielded no batches.")
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)  # no gradients left on the parameters
        model.eval()
    return model


def _as_teacher(teacher: nn.Module, inputs: Any) -> Any:
    """The batch in the teacher's float dtype (a float32 original distilled into a bfloat16 student)."""
    dtype = float_dtype(teacher)
    return inputs if dtype is None else to_device(inputs, device_of(teacher), dtype)


def _check_logits(model: nn.Module, teacher: nn.Module, inputs: Any) -> None:
    """Both models' logits on the first batch, in eval mode without gradients (so that a refused teacher
    leaves the model's BatchNorm statistics as they were), must have one shape."""
    with eval_mode(model), torch.no_grad():
        got, want = forward_logits(model, inputs).shape, forward_logits(teacher, _as_teacher(teacher, inputs)).shape
    if got != want:
        raise FairPrunerError(f"The teacher's logits have shape {tuple(want)}, the model's {tuple(got)}: distil "
                              "from a model with the same outputs.")


def _loss(model: nn.Module, teacher: Optional[nn.Module], inputs: Any, targets: torch.Tensor, distill: float,
          temperature: float, loss_fn: Optional[Callable] = None) -> torch.Tensor:
    """Cross-entropy (or ``loss_fn``), blended with the distillation term when there is a teacher."""
    logits = forward_logits(model, inputs).float()
    if loss_fn is None and tuple(targets.shape) != tuple(logits.shape[:1] + logits.shape[2:]):
        raise DataError(f"Targets of shape {tuple(targets.shape)} for logits of shape {tuple(logits.shape)}: "
                        "the default loss is cross-entropy on (batch, classes) logits. Pass loss_fn=, as to "
                        "fp.score, for other outputs (a causal LM's per-token logits).")
    ce = F.cross_entropy(logits, targets) if loss_fn is None else loss_fn(logits, targets)
    if teacher is None:
        return ce
    with torch.no_grad():
        target_logits = forward_logits(teacher, _as_teacher(teacher, inputs)).float()
    t = temperature
    kd = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(target_logits / t, -1), reduction="batchmean",
                  log_target=True)
    return (1 - distill) * ce + distill * t * t * kd  # T^2 keeps the soft term's gradients on CE's scale


def _check_teacher(model: nn.Module, teacher: Optional[nn.Module], distill: Any, temperature: Any,
                   device: torch.device) -> None:
    if teacher is None:
        return
    if not isinstance(teacher, nn.Module):
        raise FairPrunerError(f"teacher must be an nn.Module, got {type(teacher).__name__}.")
    if teacher is model or {id(t) for t in teacher.parameters()} & {id(t) for t in model.parameters()}:
        raise FairPrunerError("The teacher shares parameters with the model being trained (or is it); pass the "
                              "original (unpruned) model, or a deep copy.")
    if isinstance(distill, bool) or not isinstance(distill, (int, float)) or not 0 <= distill <= 1:
        raise FairPrunerError(f"distill must be a number in [0, 1], got {distill!r}.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not (math.isfinite(temperature) and temperature > 0):
        raise FairPrunerError(f"temperature must be a positive number, got {temperature!r}.")
    at, to = device_of(teacher), device
    if to.type == "cuda" and to.index is None and torch.cuda.is_available():
        to = torch.device("cuda", torch.cuda.current_device())  # where the inputs will go
    if at.type != to.type or (at.index is not None and to.index is not None and at.index != to.index):
        raise FairPrunerError(f"The teacher is on {at}, training runs on {device}: move it there first "
                              f"(teacher.to({str(device)!r})); it is not moved for you, since it is your model.")
