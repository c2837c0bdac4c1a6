"""What the commands read and write: models from a spec and weights, pruned-model files, datasets, paths."""
from __future__ import annotations

import sys
import importlib
import inspect
import os
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
from torch import nn

import fairpruner as fp

from .. import data, zoo
from .._core.inputs import device_of, synthetic_inputs
from .._core.state import eval_mode
from .._errors import CliError

__all__ = ["build_model", "torch_load", "load_model", "load_pruned", "check_runs", "open_dataset", "count_classes",
           "out_path", "check_out", "example_batch", "say"]


def build_model(spec: str, num_classes: Optional[int]) -> nn.Module:
    """Instantiates a model from ``zoo:NAME`` or ``package.module:factory``."""
    if ":" not in spec:
        raise CliError(f"model spec {spec!r} needs a colon: zoo:NAME or package.module:factory")
    where, name = spec.split(":", 1)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if where == "zoo":
        return zoo.create(name, **kwargs)
    if where == "hf":
        return _hugging_face(name, num_classes)
    # A console script does not put the working directory on sys.path; users expect their local module.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(where)
    except ImportError as exc:
        raise CliError(f"cannot import module {where!r} of model spec {spec!r}: {exc}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise CliError(f"module {where!r} has no callable {name!r} (model spec {spec!r})")
    if kwargs:
        try:
            params = inspect.signature(factory).parameters
            accepts = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        except (TypeError, ValueError):
            accepts = False
        if not accepts:
            kwargs = {}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise CliError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _hugging_face(directory: str, num_classes: Optional[int]) -> nn.Module:
    """A model written by transformers' ``save_pretrained``, built offline from its own directory: the class
    its config names (``architectures``), with its weights."""
    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        raise CliError(f"hf:{directory} needs a directory written by save_pretrained (no {config_file} there)")
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        raise CliError("hf: models need the transformers package: pip install 'fairpruner[hf]'") from None
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise CliError(f"the config in {directory} names no model class transformers knows ({names or 'none'})")
    if num_classes is not None and getattr(config, "num_labels", num_classes) != num_classes:
        raise CliError(f"hf:{directory} has {config.num_labels} labels, not {num_classes} (drop --num-classes, or "
                       "give data with as many classes)")
    try:
        return cls.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers fails in many ways on a directory it cannot load
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        sizes = "mismatch" in str(exc).lower()
        hint = (" A model pruned by fairpruner does not round-trip through save_pretrained (its config keeps the "
                "original sizes): give the unpruned directory as --model and the pruned file written by fp.save or "
                "--out as --pruned." if sizes else "")
        raise CliError(f"transformers could not build hf:{directory} ({first}).{hint}") from exc


def torch_load(path: str) -> Any:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file fails in many ways inside the unpickler
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(f"{path} is not a readable weights-only torch file ({first})") from None


def load_model(spec: str, weights: Optional[str], num_classes: Optional[int]) -> nn.Module:
    """The model ``spec`` with ``weights`` (a state_dict, a training checkpoint or a file written by fairpruner.save).

    Example:
        >>> load_model("zoo:resnet20", "cifar10_resnet20.pt", 10)  # doctest: +SKIP
    """
    model = build_model(spec, num_classes)
    if not weights:
        if not spec.startswith("hf:"):  # hf: directories hold their weights
            print("note: no --weights given; using the model as its factory builds it", file=sys.stderr)
        return model.eval()
    state = torch_load(weights)
    if isinstance(state, dict) and state.get("format") == "fairpruner.model":
        return fp.load(weights, model)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint wrapping its state_dict
    if not isinstance(state, dict):
        raise CliError(f"{weights} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise CliError(f"the weights in {weights} do not fit {spec}: {_misfit(model.state_dict(), state)}; check "
                       "--model and --num-classes") from None
    return model.eval()


def _misfit(want: dict, got: dict) -> str:
    """What differs between a model's state_dict and a file's, a few names of each kind."""
    def few(names: list) -> str:
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    shapes = [f"{k} {tuple(got[k].shape)} in the file, {tuple(want[k].shape)} in the model" for k in want
              if k in got and hasattr(got[k], "shape") and tuple(got[k].shape) != tuple(want[k].shape)]
    parts = [f"{len(missing)} of the model's tensors are not in the file ({few(missing)})" if missing else "",
             f"{len(extra)} tensors of the file are not in the model ({few(extra)})" if extra else "",
             f"{len(shapes)} differ in shape ({few(shapes)})" if shapes else ""]
    return "; ".join(p for p in parts if p) or "load_state_dict refused them"


def load_pruned(path: str, fresh: nn.Module) -> Tuple[nn.Module, Any]:
    """A model written by fairpruner.save and its plan."""
    d = torch_load(path)
    if not isinstance(d, dict) or d.get("format") != "fairpruner.model":
        raise CliError(f"{path} is not a pruned model written by 'fairpruner prune' (fairpruner.save)")
    return fp.load(path, fresh).eval(), fp.Plan.from_json(d["plan"])


def check_runs(model: nn.Module, dataset, spec: str) -> None:
    """Fails early, with a readable message, when the data does not fit the model's input."""
    x = dataset[0][0]
    x = tuple(t.unsqueeze(0) for t in x) if isinstance(x, (tuple, list)) else (x.unsqueeze(0),)
    device = device_of(model)
    try:
        with eval_mode(model), torch.no_grad():
            model(*(t.to(device) for t in x))
    except RuntimeError as exc:
        shapes = ", ".join(str(tuple(t.shape[1:])) for t in x)
        raise CliError(f"the model cannot run on samples of --data {spec} (shape {shapes}): "
                       f"{str(exc).strip().splitlines()[0]}") from None


def open_dataset(spec: str, split: str, augment: bool = False):
    return data.load_dataset(spec, split, augment=augment)


def count_classes(dataset) -> Optional[int]:
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes else None


def check_out(path: str, option: str) -> None:
    """Refuses a file that could not be written, before the work that would fill it: a directory, a path
    under a file, or a folder that cannot be written to. Missing folders are fine (created when written)."""
    p = Path(path)
    if p.is_dir():
        raise CliError(f"{option} {path} is a directory; give a file name")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CliError(f"{option} {path}: {parent} is a file, so nothing can be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"{option} {path}: {parent} is not writable; choose another place")


def out_path(path: str) -> Path:
    check_out(path, "output")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def example_batch(plan, batch_size: int) -> tuple:
    """Seeded random inputs with the plan's recorded shapes and ``batch_size`` rows."""
    if not plan.example_inputs:
        raise CliError("the plan records no input shape; give --data so a real batch can be used")
    return synthetic_inputs(plan.example_inputs, batch=batch_size)


def say(text: str = "") -> None:
    print(text, flush=True)
