"""The ``fairpruner`` command line: demo, score, plan, prune, report, finetune."""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

import fairpruner as fp

from . import data, zoo
from ._demo import run_demo
from ._finetune import evaluate, finetune
from ._report import format_plan, format_sweep, report

__all__ = ["main", "build_parser"]

MODEL_HELP = ("zoo:NAME (see fairpruner.zoo.list_models()) or package.module:factory (imported from the current "
              "directory or the Python path; called with num_classes= when it accepts it)")
DATA_HELP = ("'digits' (scikit-learn digits), 'cifar10:PATH' or a .tar.gz with train/ and test/ class folders, "
             "or an image-folder directory")
DEFAULT_ALPHAS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


class CliError(ValueError):
    """A command-line input that cannot be used; printed as ``error: <message>``."""


# ---------------------------------------------------------------------------------------------- helpers

def _build_model(spec: str, num_classes: Optional[int]) -> nn.Module:
    """Instantiates a model from ``zoo:NAME`` or ``package.module:factory``."""
    if ":" not in spec:
        raise CliError(f"model spec {spec!r} needs a colon: zoo:NAME or package.module:factory")
    where, name = spec.split(":", 1)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if where == "zoo":
        return zoo.create(name, **kwargs)
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
    p = next(model.parameters(), None)
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(*(t.to(p.device) if p is not None else t for t in x))
    except RuntimeError as exc:
        shapes = ", ".join(str(tuple(t.shape[1:])) for t in x)
        raise CliError(f"the model cannot run on samples of --data {spec} (shape {shapes}): "
                       f"{str(exc).strip().splitlines()[0]}") from None
    finally:
        model.train(was_training)


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
    gen = torch.Generator().manual_seed(0)
    out = []
    for spec in plan.example_inputs:
        shape = [batch_size, *spec["shape"][1:]]
        dtype = getattr(torch, spec["dtype"])
        out.append(torch.randn(*shape, generator=gen).to(dtype) if dtype.is_floating_point
                   else torch.zeros(*shape, dtype=dtype))
    return tuple(out)


def _alphas(text: str) -> List[float]:
    try:
        return [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise CliError(f"--alphas must be comma-separated numbers, got {text!r}") from None


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
                          attention=args.attention)
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
    if args.sweep:
        _say("alpha sweep (predicted fractions removed):")
        _say(format_sweep(fp.sweep(scores, _alphas(args.alphas))))
    if target:
        if args.sweep:
            _say()
        the_plan = fp.plan(scores, signal=args.signal, allocation=args.allocation, seed=args.seed, **target)
        _say(format_plan(the_plan))
        if args.out:
            out = _out_path(args.out)
            out.write_text(the_plan.to_json() + "\n")
            _say(f"\nwrote {out}")
        else:
            _say("\n(plan not written: pass --out FILE to keep it)")
    return 0


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
                 weight_decay=args.weight_decay, device=device, progress=args.progress, max_steps=args.max_steps)
    after = evaluate(pruned, test_loader)
    out = _out_path(args.out)
    fp.save(out, pruned.cpu(), the_plan)
    _say(f"test accuracy {100 * before:.2f}% -> {100 * after:.2f}% after fine-tuning; wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------------- parser

EXAMPLES = {
    "demo": """
        Trains a small CNN on scikit-learn digits (seconds), scores it, prints an alpha sweep with the
        one-shot accuracy at each alpha, prunes to -50% MACs, fine-tunes and prints the report.

        example:
          fairpruner demo                      # print only
          fairpruner demo --out demo-results   # also write report, plots, plan and models
        """,
    "score": """
        Computes U-Scores (class separation) and R-Scores (first-order loss change) of every prunable group,
        in one pass over a class-balanced calibration subset of the training split.

        example:
          fairpruner score --model zoo:resnet20 --weights resnet20.pt --data cifar10.tar.gz \\
              --samples-per-class 32 --out scores.pt
          fairpruner score --model mypackage.models:build_net --num-classes 100 --data images/ --out scores.pt
          torchrun --nproc_per_node=2 -m fairpruner.cli score --model zoo:resnet20 --data cifar10.tar.gz \
              --out scores.pt        # each process scores a shard; identical scores, rank 0 writes
        """,
    "plan": """
        Turns scores into a plan: per group, how many units go (Tolerance of Difference at --alpha, or the
        smallest alpha that reaches a --params/--macs reduction) and which (lowest --signal first).
        Scores are reused: try as many targets as you like, each takes milliseconds.

        example:
          fairpruner plan --scores scores.pt --sweep                 # what each alpha would remove
          fairpruner plan --scores scores.pt --macs 0.5 --out plan.json
          fairpruner plan --scores scores.pt --alpha 0.05 --signal l1 --out plan-l1.json
        """,
    "prune": """
        Physically removes the plan's units from the model and saves the smaller model with its plan.

        example:
          fairpruner prune --model zoo:resnet20 --weights resnet20.pt --plan plan.json --out pruned.pt
        """,
    "report": """
        Compares the original and the pruned model: units per group, measured params, MACs, latency at the
        example batch and, with --data, test-split accuracy.

        example:
          fairpruner report --model zoo:resnet20 --weights resnet20.pt --pruned pruned.pt \\
              --data cifar10.tar.gz --json report.json --plots report-plots
        """,
    "finetune": """
        Fine-tunes a pruned model (SGD with momentum, cosine learning rate per step) on the training split
        and reports test-split accuracy before and after.

        example:
          fairpruner finetune --model zoo:resnet20 --pruned pruned.pt --data cifar10.tar.gz \\
              --epochs 5 --lr 0.01 --out finetuned.pt
        """,
}


def _sub(subs, name: str, summary: str) -> argparse.ArgumentParser:
    about, example = textwrap.dedent(EXAMPLES[name]).strip().split("\nexample:", 1)
    p = subs.add_parser(name, help=summary, description=about.strip(), epilog="example:" + example,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=globals()[f"_cmd_{name}"])
    return p


def _progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def _model_args(p: argparse.ArgumentParser, weights: bool = True) -> None:
    p.add_argument("--model", required=True, metavar="SPEC", help=MODEL_HELP)
    p.add_argument("--num-classes", type=int, metavar="N",
                   help="passed to the model factory (default: the number of classes in --data, if given)")
    if weights:
        p.add_argument("--weights", metavar="FILE",
                       help="trained weights: a state_dict saved with torch.save, or a file from fairpruner.save")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fairpruner`` command."""
    parser = argparse.ArgumentParser(
        prog="fairpruner", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="FAIR-Pruner: automatic layer-wise structured pruning by Tolerance of Difference.",
        epilog=textwrap.dedent("""
            typical workflow:
              fairpruner score --model zoo:resnet20 --weights w.pt --data cifar10.tar.gz --out scores.pt
              fairpruner plan --scores scores.pt --macs 0.5 --out plan.json
              fairpruner prune --model zoo:resnet20 --weights w.pt --plan plan.json --out pruned.pt
              fairpruner finetune --model zoo:resnet20 --pruned pruned.pt --data cifar10.tar.gz --out ft.pt
              fairpruner report --model zoo:resnet20 --weights w.pt --pruned ft.pt --data cifar10.tar.gz

            'fairpruner COMMAND --help' shows each command's options and an example.""").strip())
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _sub(subs, "demo", "train, prune and fine-tune a digits CNN in seconds")
    p.add_argument("--out", metavar="DIR", help="write report, plots, plan and models here (default: nothing)")
    p.add_argument("--seed", type=int, default=0, help="seed of training, scoring and fine-tuning (default 0)")
    p.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)
    _progress_flag(p)

    p = _sub(subs, "score", "compute U- and R-Scores on calibration data")
    _model_args(p)
    p.add_argument("--data", required=True, metavar="SPEC", help=DATA_HELP + " (its train split is used)")
    p.add_argument("--samples-per-class", type=int, default=32, metavar="N", help="calibration samples per class "
                   "(default 32)")
    p.add_argument("--projections", type=int, default=128, metavar="P",
                   help="random directions of the sliced W1 (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seeds the calibration draw and directions (default 0)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="calibration batch size (default 64)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--u-at", default="input", choices=("output", "norm", "input"),
                   help="where U is measured: the next layer's input (default), after normalisation, or the raw layer output")
    p.add_argument("--u-reduce", default="max", choices=("max", "mean"),
                   help="how a coupled group combines the U of its members (default max)")
    p.add_argument("--r-reduce", default="sum", choices=("sum", "max"),
                   help="how a coupled group combines the Taylor terms of its members (default sum)")
    p.add_argument("--attention", default="heads", choices=("heads", "head_dims"),
                   help="attention units: whole heads (default), or one dimension of every head so all heads keep "
                        "the same width")
    p.add_argument("--out", required=True, metavar="FILE", help="scores file to write")
    _progress_flag(p)

    p = _sub(subs, "plan", "choose the units to remove (alpha or params/MACs target)")
    p.add_argument("--scores", required=True, metavar="FILE", help="from 'fairpruner score'")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--alpha", type=float, metavar="A", help="ToD level in [0, 1]")
    target.add_argument("--params", type=float, metavar="F", help="fraction of parameters to remove")
    target.add_argument("--macs", type=float, metavar="F", help="fraction of MACs to remove")
    p.add_argument("--signal", default="u", choices=("u", "l1", "taylor", "random"),
                   help="which units go once the counts are fixed (default u: lowest U-Score)")
    p.add_argument("--allocation", default="tod", choices=("tod", "uniform"),
                   help="per-group counts by ToD (default) or the same fraction everywhere")
    p.add_argument("--seed", type=int, default=0, help="seeds the random signal (default 0)")
    p.add_argument("--sweep", action="store_true", help="print what each alpha of --alphas would remove")
    p.add_argument("--alphas", default=",".join(f"{a:g}" for a in DEFAULT_ALPHAS),
                   help="comma-separated alphas for --sweep")
    p.add_argument("--out", metavar="FILE", help="plan JSON to write")

    p = _sub(subs, "prune", "remove the planned units from a model")
    _model_args(p)
    p.add_argument("--plan", required=True, metavar="FILE", help="from 'fairpruner plan'")
    p.add_argument("--out", required=True, metavar="FILE", help="pruned model file to write")

    p = _sub(subs, "report", "compare the original and the pruned model")
    _model_args(p)
    p.add_argument("--pruned", required=True, metavar="FILE", help="from 'fairpruner prune' or 'finetune'")
    p.add_argument("--data", metavar="SPEC", help=DATA_HELP + " (its test split measures accuracy)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B",
                   help="example batch for latency, and evaluation batch size (default 64)")
    p.add_argument("--latency-repeats", type=int, default=20, metavar="N",
                   help="timed forward passes per model (default 20; 0 skips latency)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads while measuring (default: torch's choice; 1 is steadier on a busy machine)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--plots", metavar="DIR", help="also write PNG charts into this directory")

    p = _sub(subs, "finetune", "fine-tune a pruned model")
    _model_args(p, weights=False)
    p.add_argument("--pruned", required=True, metavar="FILE", help="from 'fairpruner prune'")
    p.add_argument("--data", required=True, metavar="SPEC", help=DATA_HELP)
    p.add_argument("--epochs", type=int, default=1, help="passes over the training split (default 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="initial learning rate (default 1e-3, as the paper)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 penalty (default 5e-4)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="training batch size (default 64)")
    p.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps")
    p.add_argument("--no-augment", action="store_true", help="no random crop/flip on image data")
    p.add_argument("--seed", type=int, default=0, help="seeds shuffling and augmentation (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", required=True, metavar="FILE", help="fine-tuned model file to write")
    _progress_flag(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``fairpruner`` command line.

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` by default.

    Returns:
        The exit status: 0 on success, 2 on a usage or input error (printed as ``error: <message>``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:  # FairPrunerError is a ValueError
        message = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename else exc
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
