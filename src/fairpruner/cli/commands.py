"""What each ``fairpruner`` sub-command does (``_cmd_<name>``), and the helpers they share."""
from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

import fairpruner as fp

from .. import data, zoo
from .._core.inputs import device_of, synthetic_inputs
from .._core.state import eval_mode
from .._errors import CliError
from .._recovery import evaluate, finetune
from .._reporting import format_plan, format_sweep, report
from .demo import run_demo

__all__ = ["COMMANDS"]


# ---------------------------------------------------------------------------------------------- helpers

def _build_model(spec: str, num_classes: Optional[int]) -> nn.Module:
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
    return cls.from_pretrained(directory, local_files_only=True)


def _torch_load(path: str) -> Any:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file fails in many ways inside the unpickler
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(f"{path} is not a readable weights-only torch file ({first})") from None


def _load_model(args: argparse.Namespace, num_classes: Optional[int] = None) -> nn.Module:
    """The model of ``--model`` with ``--weights`` (a state_dict or a file written by fairpruner.save)."""
    n = args.num_classes if args.num_classes is not None else num_classes
    model = _build_model(args.model, n)
    if not getattr(args, "weights", None):
        if not args.model.startswith("hf:"):  # hf: directories hold their weights
            print("note: no --weights given; using the model as its factory builds it", file=sys.stderr)
    else:
        state = _torch_load(args.weights)
        if isinstance(state, dict) and state.get("format") == "fairpruner.model":
            return fp.load(args.weights, model)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # a training checkpoint wrapping its state_dict
        if not isinstance(state, dict):
            raise CliError(f"{args.weights} holds a {type(state).__name__}, not a state_dict")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CliError(f"the weights in {args.weights} do not fit {args.model}: "
                           f"{str(exc).splitlines()[0]} (check --num-classes)") from None
    return model.eval()


def _load_pruned(path: str, fresh: nn.Module) -> Tuple[nn.Module, Any]:
    """A model written by fairpruner.save and its plan."""
    d = _torch_load(path)
    if not isinstance(d, dict) or d.get("format") != "fairpruner.model":
        raise CliError(f"{path} is not a pruned model written by 'fairpruner prune' (fairpruner.save)")
    return fp.load(path, fresh).eval(), fp.Plan.from_json(d["plan"])


def _check_runs(model: nn.Module, dataset, spec: str) -> None:
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


def _dataset(spec: str, split: str, augment: bool = False):
    return data.load_dataset(spec, split, augment=augment)


def _num_classes(dataset) -> Optional[int]:
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes else None


def _out_path(path: str) -> Path:
    p = Path(path)
    if p.exists() and p.is_dir():
        raise CliError(f"{path} is a directory; give a file name")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _example_batch(plan, batch_size: int) -> tuple:
    """Seeded random inputs with the plan's recorded shapes and ``batch_size`` rows."""
    if not plan.example_inputs:
        raise CliError("the plan records no input shape; give --data so a real batch can be used")
    return synthetic_inputs(plan.example_inputs, batch=batch_size)


def _alphas(text: str, flag: str = "--alphas") -> List[float]:
    try:
        return [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise CliError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def _say(text: str = "") -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------- commands

def _cmd_demo(args: argparse.Namespace) -> int:
    if args.fast:  # a quick smoke run for tests
        run_demo(out=args.out, seed=args.seed, epochs=3, finetune_epochs=1, alphas=(0.0, 0.1, 0.3),
                 latency_repeats=2, progress=False)
    else:
        run_demo(out=args.out, seed=args.seed, progress=args.progress)
    return 0


def _start_distributed(args: argparse.Namespace) -> Tuple[int, int]:
    """Joins a torchrun launch (WORLD_SIZE > 1): gloo on CPU, nccl on GPU. Returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(args.device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def _attention_options(args: argparse.Namespace) -> dict:
    """--attention and --gqa as the options of every attention family."""
    return fp.families.for_attention_families(fp.families.AttentionOptions(units=args.attention, gqa=args.gqa))


def _cmd_score(args: argparse.Namespace) -> int:
    rank, world = _start_distributed(args)
    try:
        dataset = _dataset(args.data, "train")
        model = _load_model(args, _num_classes(dataset))
        _check_runs(model.to(args.device), dataset, args.data)
        loader = data.calibration_loader(dataset, args.samples_per_class, args.batch_size, args.seed,
                                         num_classes=args.num_classes)
        if world > 1:  # every process scores its shard of the batches; fp.score merges them
            loader = [b for i, b in enumerate(loader) if i % world == rank]
        scores = fp.score(model, loader, samples_per_class=args.samples_per_class, projections=args.projections,
                          seed=args.seed, device=args.device, progress=args.progress and rank == 0,
                          u_at=args.u_at, u_reduce=args.u_reduce, r_reduce=args.r_reduce,
                          u_consumer_power=args.u_consumer_power,
                          family_options=_attention_options(args), max_memory=args.max_memory,
                          class_pairs=args.class_pairs)
        if rank == 0:
            out = _out_path(args.out)
            scores.save(out)
            units = sum(g.n_units for g in scores.groups)
            _say(f"scored {len(scores.groups)} groups ({units} units) on {scores.meta['n_samples']} samples"
                 + (f" across {world} processes" if world > 1 else "") + f"; wrote {out}")
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    _torch_load(args.scores)  # a readable torch file, else a clear error
    scores = fp.Scores.load(args.scores)
    target = {k: getattr(args, k) for k in ("alpha", "params", "macs") if getattr(args, k) is not None}
    if not target and not args.sweep:
        raise CliError("give a target (--alpha, --params or --macs) or --sweep")
    if args.sweep == "alpha":
        _say("alpha sweep (predicted fractions removed):")
        _say(format_sweep(fp.sweep(scores, _alphas(args.alphas), stream_weight=args.stream_weight,
                                     stream_floor=args.stream_floor, floor=args.floor)))
    elif args.sweep:
        _say(f"{args.sweep} targets (asked, and what each plan removes):")
        targets = {args.sweep: _alphas(args.targets, "--targets")}
        _say(format_sweep(fp.sweep(scores, stream_weight=args.stream_weight, ties=args.ties,
                                     stream_floor=args.stream_floor, floor=args.floor, **targets)))
    if target:
        if args.sweep:
            _say()
        the_plan = _make_plan(scores, args, target)
        _say(format_plan(the_plan))
        if args.out:
            out = _out_path(args.out)
            out.write_text(the_plan.to_json() + "\n")
            _say(f"\nwrote {out}")
        else:
            _say("\n(plan not written: pass --out FILE to keep it)")
    return 0


def _make_plan(scores: fp.Scores, args: argparse.Namespace, target: dict) -> fp.Plan:
    """fp.plan, with asked vs achieved said aloud when they differ by more than 1 pt."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said below, in the command's own words
        the_plan = fp.plan(scores, signal=args.signal, allocation=args.allocation, seed=args.seed,
                           stream_weight=args.stream_weight, ties=args.ties,
                           stream_floor=args.stream_floor, floor=args.floor, **target)
    for key, asked in the_plan.requested.items():
        if key == "alpha":
            continue
        got = the_plan.achieved[key]
        _say(f"target: {key} -{100 * asked:.1f}% asked, -{100 * got:.1f}% achieved")
        if abs(got - asked) > 0.01:
            print(f"warning: the plan misses the {key} target by {100 * abs(got - asked):.1f} pt: the units of "
                  "this model are too large for a closer plan", file=sys.stderr)
    return the_plan


def _cmd_prune(args: argparse.Namespace) -> int:
    if not Path(args.plan).is_file():
        raise FileNotFoundError(f"no such file: {args.plan}")
    try:
        the_plan = fp.Plan.from_json(Path(args.plan).read_text())
    except (KeyError, TypeError) as exc:
        raise CliError(f"{args.plan} is not a complete fairpruner plan (missing {exc})") from None
    except json.JSONDecodeError as exc:
        raise CliError(f"{args.plan} is not valid JSON ({exc}); write plans with 'fairpruner plan --out'") from None
    model = _load_model(args)
    pruned = fp.prune(model, the_plan)
    out = _out_path(args.out)
    fp.save(out, pruned, the_plan)
    before, after = fp.count_params(model), fp.count_params(pruned)
    _say(f"pruned {the_plan.units_removed} of {the_plan.units_total} units: params {before:,} -> {after:,} "
         f"({100 * (1 - after / before):.1f}% removed); wrote {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    dataset = _dataset(args.data, "test") if args.data else None
    n = _num_classes(dataset) if dataset is not None else None
    original = _load_model(args, n)
    pruned, the_plan = _load_pruned(args.pruned, _build_model(args.model, args.num_classes or n))
    if dataset is not None:
        _check_runs(original, dataset, args.data)
    loader = DataLoader(dataset, batch_size=args.batch_size) if dataset is not None else None
    example = next(iter(loader))[0] if loader is not None else _example_batch(the_plan, args.batch_size)
    if args.threads is not None:
        if args.threads < 1:
            raise CliError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    rep = report(original, pruned, the_plan, example, eval_loader=loader, latency_repeats=args.latency_repeats)
    _say(rep.to_text())
    if args.json:
        out = _out_path(args.json)
        out.write_text(rep.to_json() + "\n")
        _say(f"\nwrote {out}")
    if args.plots:
        paths = rep.plot(args.plots)
        _say(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    train = _dataset(args.data, "train", augment=not args.no_augment)
    test = _dataset(args.data, "test")
    n = args.num_classes or _num_classes(train)
    pruned, the_plan = _load_pruned(args.pruned, _build_model(args.model, n))
    device = torch.device(args.device)
    _check_runs(pruned.to(device), train, args.data)
    gen = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=gen)
    test_loader = DataLoader(test, batch_size=256)
    before = evaluate(pruned, test_loader)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)  # augmentation draws from the global RNG
        finetune(pruned, loader, epochs=args.epochs, lr=args.lr, momentum=args.momentum,
                 weight_decay=args.weight_decay, device=device, progress=args.progress, max_steps=args.max_steps,
                 autocast=torch.bfloat16 if args.bf16 else None)
    after = evaluate(pruned, test_loader)
    out = _out_path(args.out)
    fp.save(out, pruned.cpu(), the_plan)
    _say(f"test accuracy {100 * before:.2f}% -> {100 * after:.2f}% after fine-tuning; wrote {out}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    """score -> plan -> prune -> recalibrate -> (fine-tune) -> report -> save, in one command."""
    train = _dataset(args.data, "train")
    test_loader = DataLoader(_dataset(args.data, "test"), batch_size=256)
    model = _load_model(args, _num_classes(train))
    device = torch.device(args.device)
    _check_runs(model.to(device), train, args.data)
    calib = data.calibration_loader(train, args.samples_per_class, args.batch_size, args.seed,
                                    num_classes=args.num_classes)
    _say(f"scoring on {len(calib.dataset)} calibration samples ...")
    scores = fp.score(model, calib, seed=args.seed, device=device, progress=args.progress,
                      family_options=_attention_options(args), max_memory=args.max_memory)
    target = {k: getattr(args, k) for k in ("alpha", "params", "macs") if getattr(args, k) is not None}
    the_plan = _make_plan(scores, args, target or {"macs": 0.5})
    oneshot = fp.prune(model, the_plan)
    stages = {"one-shot": oneshot}
    pruned = copy.deepcopy(oneshot)
    recal = _recalibration_loader(train, args)
    final = "one-shot"
    if recal is not None:
        fp.recalibrate(pruned, recal, progress=args.progress)
        final = "recalibrated"
    if args.finetune_epochs:
        if recal is not None:
            stages["recalibrated"] = copy.deepcopy(pruned)
        final = "fine-tuned"
        aug = _dataset(args.data, "train", augment=True)
        loader = DataLoader(aug, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)  # augmentation draws from the global RNG
            fp.finetune(pruned, loader, epochs=args.finetune_epochs, lr=args.lr, device=device,
                        progress=args.progress, autocast=torch.bfloat16 if args.bf16 else None)
    if final == "one-shot":
        stages = {}
    example = next(iter(test_loader))[0][:64].to(device)
    rep = report(model, pruned, the_plan, example, eval_loader=test_loader, latency_repeats=args.latency_repeats,
                 stages=stages, final_stage=final)
    _say()
    _say(rep.to_text())
    out = _out_path(args.out)
    fp.save(out, pruned.cpu(), the_plan)
    _say(f"\nwrote {out}")
    return 0


def _recalibration_loader(train, args: argparse.Namespace) -> Optional[DataLoader]:
    """Unlabelled training images for BatchNorm recalibration (seeded), or None with --recalibrate 0."""
    if args.recalibrate <= 0:
        return None
    n = min(args.recalibrate, len(train))
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + 1))[:n]
    return DataLoader(torch.utils.data.Subset(train, idx.tolist()), batch_size=100)


COMMANDS = {"run": _cmd_run, "demo": _cmd_demo, "score": _cmd_score, "plan": _cmd_plan, "prune": _cmd_prune,
            "report": _cmd_report, "finetune": _cmd_finetune}
