"""Saving a pruned model and rebuilding it: weights plus every round's plan, read back weights-only."""
from __future__ import annotations

import os
from typing import Any, Union

import torch
from torch import nn

from .._core.files import read_torch_file
from .._errors import PlanError
from .._measure.counting import count_params
from .._planning.plans import Plan
from .surgery import prune

__all__ = ["save", "load", "check_made_by"]


def save(path: Union[str, os.PathLike], pruned: nn.Module, plan: Plan) -> None:
    """Writes the pruned weights and the plans that rebuild the architecture.

    A model pruned in several rounds (prune, fine-tune, re-score, prune again) carries every round's plan; all
    are stored and replayed in order by :func:`load`. The file holds only tensors and strings, so it reads back
    with ``torch.load(weights_only=True)``.

    Args:
        path: the file to write.
        pruned: the model :func:`fairpruner.prune` returned for ``plan`` (recalibrated or fine-tuned since).
        plan: the plan it was pruned with (the last one, after several rounds).

    Raises:
        PlanError: if ``pruned`` was not made by ``plan`` (the unpruned model, or another plan's).

    Example:
        >>> fp.save("pruned.pt", fp.finetune(fp.prune(model, plan), train_loader), plan)
        >>> small = fp.load("pruned.pt", build_model())  # a fresh, unpruned instance
    """
    check_made_by(pruned, plan, "save")
    history = list(getattr(pruned, "_fairpruner_history", []))
    if not history or history[-1] != plan.to_json():
        history = [plan.to_json()]
    torch.save({"format": "fairpruner.model", "version": 1, "plan": history[-1], "plans": history,
                "state_dict": pruned.state_dict()}, path)


def load(path: Union[str, os.PathLike], model: nn.Module, example_inputs: Any = None) -> nn.Module:
    """Rebuilds a pruned model: replays the saved plan(s) on a fresh, unpruned ``model``, then loads the weights.

    Args:
        path: a file written by :func:`save`.
        model: a freshly constructed instance of the original (unpruned) architecture; not modified.
        example_inputs: inputs to trace with; defaults to the shape recorded in the plan.

    Returns:
        The pruned model with the saved weights.

    Raises:
        FairPrunerError: if the file was not written by :func:`save`; PlanError if ``model`` is not the
            architecture it was pruned from.

    Example:
        >>> small = fp.load("pruned.pt", zoo.resnet20())
    """
    d = read_torch_file(path, "fairpruner.model", "write one with fairpruner.save")
    pruned = model
    for text in d.get("plans", [d["plan"]]):
        pruned = prune(pruned, Plan.from_json(text), example_inputs, verify=False)
    try:
        pruned.load_state_dict(d["state_dict"])
    except RuntimeError as e:
        raise PlanError(f"The saved weights do not fit the rebuilt model ({e}). Pass a fresh instance of the "
                        "original, unpruned architecture.") from e
    return pruned


def check_made_by(pruned: nn.Module, plan: Plan, call: str) -> None:
    """Refuses a model that ``plan`` did not make (another plan's, the unpruned one, arguments swapped): its
    file would not load, its report would describe another model."""
    history = getattr(pruned, "_fairpruner_history", None)
    if history:  # a model fp.prune made (or fp.load rebuilt) names its plans
        if plan.to_json() not in history:
            raise PlanError(f"{call}: this model was pruned by another plan; pass the plan that fp.prune was "
                            "given.")
        return
    # Otherwise (the unpruned model, arguments swapped, a copy that lost the record) its size must be the plan's.
    after = plan.predicted.get("params_after")
    if after is not None and count_params(pruned) != int(round(after)):
        raise PlanError(f"{call}: the model has {count_params(pruned):,} parameters, the plan leaves "
                        f"{int(round(after)):,}; pass the model fp.prune(model, plan) returned, with that plan.")
