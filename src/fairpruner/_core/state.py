"""Leaving a model as it was found: train/eval flags of every submodule, grad mode, and its identity."""
from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["preserved_modes", "eval_mode", "preserved_state", "keeping_no_saved_tensors", "model_signature"]


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restores every submodule's own train/eval flag, whatever the body does.

    ``model.train(was_training)`` would set every submodule to the root's mode, turning a BatchNorm the user
    froze (eval inside a model in train mode) back to train mode; this restores each flag as it was.
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the body; every submodule's flag restored afterwards."""
    with preserved_modes(model):
        model.eval()
        yield


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Eval mode with gradients enabled for the body (tracing forwards: BatchNorm running statistics never
    move); every submodule's flag and the grad mode are restored afterwards."""
    with eval_mode(model), torch.enable_grad():
        yield


def keeping_no_saved_tensors() -> contextlib.AbstractContextManager:
    """Forwards in the body build their autograd graph (its structure, its grad_fn nodes), but keep none of the
    tensors a backward would need: for graphs that are walked, never differentiated. Without it a traced graph
    holds the batch's activations, and the very weight tensors a pruning step replaces (so the old ones stay
    alive beside the new)."""
    return torch.autograd.graph.saved_tensors_hooks(_drop, _drop)


def _drop(_: object) -> None:
    return None


def model_signature(model: nn.Module) -> str:
    """A short digest of the parameter names and shapes: plans and saved models refuse other architectures."""
    text = ";".join(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters())
    return hashlib.sha256(text.encode()).hexdigest()[:16]
