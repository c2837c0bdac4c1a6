"""BatchNorm recalibration: running statistics re-estimated from unlabelled data after pruning."""
from __future__ import annotations

import itertools
import sys
import warnings
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .._core.inputs import float_dtype, forward_logits, length_of, model_device, to_device
from .._core.state import eval_mode
from .._errors import DataError, FairPrunerError

__all__ = ["recalibrate", "tracked_norms"]


_NORMS = (nn.modules.batchnorm._BatchNorm,)  # BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm


def tracked_norms(model: nn.Module) -> list:
    """The BatchNorm layers of ``model`` that keep running statistics (what recalibration re-estimates)."""
    return [m for m in model.modules() if isinstance(m, _NORMS) and m.track_running_stats]


class _OneValue(Exception):
    """A BatchNorm got one value per channel during recalibration."""


class _Average:
    """Makes ``norm``'s running statistics the average over every value it sees during recalibration, each call
    weighted by the values per channel it normalises (batch x positions), not per batch: a short last batch, a
    sequence-first input or a norm called twice per forward counts for what it holds.

    Float32/64 statistics are averaged by BatchNorm itself, its momentum set to this call's share before each
    call. Lower-precision ones (a bfloat16 or float16 model) would lose most later batches to rounding that way,
    so their average is kept here in float32 (BatchNorm, at momentum 0, leaves them) and written by ``finish``.
    """

    def __init__(self, norm: nn.Module):
        self.norm, self.seen = norm, 0
        # A SyncBatchNorm in a process group averages across ranks itself (and takes one sample per rank).
        self.synced = isinstance(norm, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized() \
            and dist.get_world_size() > 1
        self.own = norm.running_mean is not None and not self.synced and \
            norm.running_mean.dtype not in (torch.float32, torch.float64)
        self.mean: Optional[torch.Tensor] = None
        self.var: Optional[torch.Tensor] = None
        self.momentum, self.original = norm.momentum, self.state()  # given back by finish
        self.handle = norm.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        k = x.numel() // x.shape[1] if x.dim() > 1 and x.shape[1] else 0
        if not k:  # an empty batch is left to BatchNorm's own error
            return
        if k == 1 and not self.synced:  # BatchNorm would refuse it (no variance of one value)
            raise _OneValue
        self.seen += k
        share = k / self.seen
        module.momentum = 0.0 if self.own else share  # running = (1 - m) * running + m * this call's statistics
        if self.own:
            dims = [d for d in range(x.dim()) if d != 1]
            xf = x.detach().float()
            mean, var = xf.mean(dims), xf.var(dims, correction=1 if k > 1 else 0)
            self.mean = mean if self.mean is None else self.mean + share * (mean - self.mean)
            self.var = var if self.var is None else self.var + share * (var - self.var)

    def state(self) -> tuple:
        """What a batch changes (the norm's statistics and this average), to undo a batch that cannot run."""
        return ({k: b.clone() for k, b in self.norm.named_buffers(recurse=False) if b is not None}, self.seen,
                self.mean, self.var)

    def restore(self, state: tuple) -> None:
        buffers, self.seen, self.mean, self.var = state
        for k, b in buffers.items():
            getattr(self.norm, k).copy_(b)

    def finish(self, done: bool) -> None:
        """Writes the average after a pass that completed; after a failed one, the statistics it was given."""
        self.handle.remove()
        self.norm.momentum = self.momentum
        if not done:
            self.restore(self.original)
        elif self.own and self.mean is not None:
            self.norm.running_mean.copy_(self.mean)
            self.norm.running_var.copy_(self.var)


def recalibrate(model: nn.Module, loader: Iterable, *, max_batches: Optional[int] = None,
                progress: Optional[bool] = None, device: Optional[Any] = None) -> nn.Module:
    """Re-estimates the running mean and variance of every BatchNorm layer from unlabelled data, in place.

    Pruning changes what each BatchNorm sees, so statistics measured on the unpruned model no longer fit; a
    forward pass over about a thousand training images restores most of the accuracy one-shot pruning loses.
    Statistics are reset and re-estimated as a cumulative average over all batches, each weighted by the
    values it gives each channel (samples x positions): the running mean is the mean over everything seen,
    the running variance the so-weighted average of the per-batch unbiased variances; a short last batch, or
    a BatchNorm called twice per forward pass, counts for what it holds. Only the BatchNorm layers
    run in train mode (dropout and everything else stay in eval), without gradients, on the model's device.
    Every module's train/eval flag and every BatchNorm's momentum are restored, and so are the original
    statistics if the forward pass fails. A bfloat16 or float16 model's statistics are averaged in float32 (and
    float inputs cast to its dtype); a batch that gives a BatchNorm one value per channel (a last batch of one
    sample) is undone and skipped, with a warning.

    Give it batches drawn from every class: a loader over a dataset sorted by class (as
    :func:`fairpruner.data.cifar10` is) must shuffle, or the statistics describe one class only.

    It changes the model it is given (meant for the pruned model :func:`fairpruner.prune` just returned);
    copy it first to keep the original statistics.

    Args:
        model: the model to recalibrate (modified in place).
        loader: iterable of input batches, or of ``(inputs, targets)`` pairs (targets are ignored; a
            2-tuple is always read as such a pair, so pass a two-input model's inputs as a list of lists).
        max_batches: use at most this many batches.
        progress: show a progress bar; by default only when stderr is a terminal.
        device: where to run: the model's device (the default); another one is refused, the model is not
            moved.

    Returns:
        ``model``, recalibrated.

    Raises:
        DataError: if the loader yields no batch, or every batch was skipped.
        FairPrunerError: for a ``device`` the model is not on, a bad ``max_batches``, or a lazy BatchNorm not
            yet initialised.

    Example:
        >>> pruned = fp.prune(model, plan)
        >>> shuffled = DataLoader(train_images, batch_size=100, shuffle=True,
        ...                       generator=torch.Generator().manual_seed(0))
        >>> fp.recalibrate(pruned, shuffled, max_batches=10)
    """
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise FairPrunerError(f"max_batches must be a positive integer or None, got {max_batches!r}.")
    norms = tracked_norms(model)
    if any(nn.parameter.is_lazy(b) for m in norms for b in m.buffers(recurse=False)):
        raise FairPrunerError("A lazy BatchNorm has not been initialised yet; run one forward pass through the "
                              "model first, so that its statistics exist to be re-estimated.")
    if not norms:
        warnings.warn("The model has no BatchNorm layer with running statistics; recalibrate() left it unchanged.",
                      stacklevel=2)
        return model
    batches = iter(loader)
    first = next(batches, None)
    if first is None:  # refused before any statistic is reset
        raise DataError("The recalibration loader yielded no batches; give it unlabelled training inputs.")
    device, dtype = model_device(model, device), float_dtype(model)
    show = progress if progress is not None else sys.stderr.isatty()
    total = length_of(loader)
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    done, ran, skipped = False, 0, 0
    with eval_mode(model), torch.no_grad():
        averages = [_Average(m) for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.train()
        try:
            for batch in tqdm(itertools.islice(itertools.chain([first], batches), max_batches), total=total,
                              desc="fairpruner: recalibrating", disable=not show, leave=False):
                inputs = batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else batch
                # A BatchNorm that gets one value per channel (a last batch of one sample, over (batch, channels))
                # cannot train on it: that batch is undone and skipped, not the whole pass failed after it.
                undo = [a.state() for a in averages]  # a few vectors per norm
                try:
                    forward_logits(model, to_device(inputs, device, dtype))
                    ran += 1
                except _OneValue:
                    for a, st in zip(averages, undo):
                        a.restore(st)
                    skipped += 1
            if not ran:
                raise DataError("Every recalibration batch gave a BatchNorm one value per channel; give "
                                "batches of at least 2 samples.")
            done = True
        finally:
            for a in averages:  # momentum restored; a failed pass leaves the statistics it was given
                a.finish(done)
    if skipped:
        warnings.warn(f"recalibrate() skipped {skipped} batch(es) of one sample, which gave a BatchNorm one value "
                      "per channel; use batches of at least 2 (e.g. drop_last=True).", stacklevel=2)
    return model

