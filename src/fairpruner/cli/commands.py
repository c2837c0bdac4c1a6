"""What each ``fairpruner`` sub-command does (``_cmd_<name>``), and the helpers they share."""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

import fairpruner as fp

from .. import data
from .._errors import CliError
from .._recovery import evaluate, finetune, tracked_norms
from .._reporting import format_plan, format_sweep, report
from .demo import run_demo
from .loading import (build_model, check_runs, count_classes, example_batch, load_model, load_pruned, open_dataset,
                      out_path, say, torch_load)

__all__ = ["COMMANDS", "DEFAULT_ALPHAS", "SWEEP_TARGETS"]

DEFAULT_ALPHAS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # plan --sweep
SWEEP_TARGETS = (0.1, 0.2, 0.35, 0.5, 0.65)  # plan --sweep macs|params


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


def _model(args: argparse.Namespace, num_classes: Optional[int] = None) -> nn.Module:
    """--model with --weights; --num-classes, when given, wins over the count found in the data."""
    return load_model(args.model, args.weights, args.num_classes if args.num_classes is not None else num_classes)


def _cmd_score(args: argparse.Namespace) -> int:
    rank, world = _start_distributed(args)
    try:
        dataset = open_dataset(args.data, "train")
        model = _model(args, count_classes(dataset))
        check_runs(model.to(args.device), dataset, args.data)
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
            out = out_path(args.out)
            scores.save(out)
            units = sum(g.n_units for g in scores.groups)
            say(f"scored {len(scores.groups)} groups ({units} units) on {scores.meta['n_samples']} samples"
                + (f" across {world} processes" if world > 1 else "") + f"; wrote {out}")
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    torch_load(args.scores)  # a readable torch file, else a clear error
    scores = fp.Scores.load(args.scores)
    target = {k: getattr(args, k) for k in ("alpha", "params", "macs") if getattr(args, k) is not None}
    if not target and not args.sweep:
        raise CliError("give a target (--alpha, --params or --macs) or --sweep")
    if args.alphas is not None and args.sweep != "alpha":
        raise CliError("--alphas goes with --sweep (an alpha sweep)")
    if args.targets is not None and args.sweep not in ("macs", "params"):
        raise CliError("--targets goes with '--sweep macs' or '--sweep params'")
    if args.sweep == "alpha":
        say("alpha sweep (predicted fractions removed):")
        say(format_sweep(fp.sweep(scores, args.alphas or DEFAULT_ALPHAS, **_depth_options(args))))
    elif args.sweep:
        say(f"{args.sweep} targets (asked, and what each plan removes):")
        targets = {args.sweep: args.targets or SWEEP_TARGETS}
        say(format_sweep(fp.sweep(scores, ties=args.ties, **_depth_options(args), **targets)))
    if target:
        if args.sweep:
            say()
        the_plan = _make_plan(scores, args, target)
        say(format_plan(the_plan))
        if args.out:
            out = out_path(args.out)
            out.write_text(the_plan.to_json() + "\n")
            say(f"\nwrote {out}")
        else:
            say("\n(plan not written: pass --out FILE to keep it)")
    return 0


def _depth_options(args: argparse.Namespace) -> dict:
    """The options that set how deep ToD cuts each layer, shared by plans and sweeps."""
    return {"stream_weight": args.stream_weight, "stream_floor": args.stream_floor, "floor": args.floor,
            "macs_power": args.macs_power, "width_power": args.width_power}


def _make_plan(scores: fp.Scores, args: argparse.Namespace, target: dict) -> fp.Plan:
    """fp.plan, with asked vs achieved said aloud when they differ by more than 1 pt."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said below, in the command's own words
        the_plan = fp.plan(scores, signal=args.signal, allocation=args.allocation, seed=args.seed, ties=args.ties,
                           **_depth_options(args), **target)
    for key, asked in the_plan.requested.items():
        if key == "alpha":
            continue
        got = the_plan.achieved[key]
        say(f"target: {key} -{100 * asked:.1f}% asked, -{100 * got:.1f}% achieved")
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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CliError(f"{args.plan} is not a JSON plan ({exc}); write plans with 'fairpruner plan --out'") from None
    train = open_dataset(args.data, "train") if args.data else None
    model = _model(args, count_classes(train) if train is not None else None)
    if train is not None:
        check_runs(model, train, args.data)
    pruned = fp.prune(model, the_plan)
    before, after = fp.count_params(model), fp.count_params(pruned)
    say(f"pruned {the_plan.units_removed} of {the_plan.units_total} units: params {before:,} -> {after:,} "
        f"({100 * (1 - after / before):.1f}% removed)")
    recal = _recalibration_loader(train, args, pruned) if train is not None else None
    if recal is not None:
        fp.recalibrate(pruned, recal, progress=args.progress)
        say(f"re-estimated the BatchNorm statistics on {len(recal.dataset)} training samples")
    out = out_path(args.out)
    fp.save(out, pruned, the_plan)
    say(f"wrote {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    dataset = open_dataset(args.data, "test") if args.data else None
    n = count_classes(dataset) if dataset is not None else None
    original = _model(args, n)
    pruned, the_plan = load_pruned(args.pruned, build_model(args.model, args.num_classes or n))
    if dataset is not None:
        check_runs(original, dataset, args.data)
    loader = DataLoader(dataset, batch_size=args.batch_size) if dataset is not None else None
    example = next(iter(loader))[0] if loader is not None else example_batch(the_plan, args.batch_size)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rep = report(original, pruned, the_plan, example, eval_loader=loader, latency_repeats=args.latency_repeats,
                 progress=args.progress)
    say(rep.to_text())
    if args.json:
        out = out_path(args.json)
        out.write_text(rep.to_json() + "\n")
        say(f"\nwrote {out}")
    if args.plots:
        paths = rep.plot(args.plots)
        say(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def _check_distill(args: argparse.Namespace, needs: str, given: bool) -> None:
    """--distill is a weight in [0, 1] and needs what it distils with; checked before any long computation."""
    if not 0 <= args.distill <= 1:
        raise CliError(f"--distill must be in [0, 1], got {args.distill}")
    if args.distill > 0 and not given:
        raise CliError(f"--distill needs {needs}")


def _cmd_finetune(args: argparse.Namespace) -> int:
    _check_distill(args, "--teacher (the unpruned weights)", args.teacher is not None)
    if args.teacher is not None and args.distill == 0:
        raise CliError("--teacher needs --distill W, the weight of the distillation term (e.g. 0.9)")
    train = open_dataset(args.data, "train", augment=not args.no_augment)
    test = open_dataset(args.data, "test")
    n = args.num_classes or count_classes(train)
    pruned, the_plan = load_pruned(args.pruned, build_model(args.model, n))
    device = torch.device(args.device)
    check_runs(pruned.to(device), train, args.data)
    teacher = None
    if args.distill > 0:
        teacher = load_model(args.model, args.teacher, n).to(device)
    gen = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=gen)
    test_loader = DataLoader(test, batch_size=256)
    before = evaluate(pruned, test_loader, progress=args.progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)  # augmentation draws from the global RNG
        finetune(pruned, loader, epochs=args.epochs, lr=args.lr, momentum=args.momentum,
                 weight_decay=args.weight_decay, device=device, progress=args.progress, max_steps=args.max_steps,
                 autocast=torch.bfloat16 if args.bf16 else None, teacher=teacher, distill=args.distill)
    after = evaluate(pruned, test_loader, progress=args.progress)
    out = out_path(args.out)
    fp.save(out, pruned.cpu(), the_plan)
    say(f"test accuracy {100 * before:.2f}% -> {100 * after:.2f}% after fine-tuning; wrote {out}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    """score -> plan -> prune -> recalibrate -> (fine-tune) -> report -> save, in one command."""
    _check_distill(args, "--finetune-epochs", bool(args.finetune_epochs))
    train = open_dataset(args.data, "train")
    test_loader = DataLoader(open_dataset(args.data, "test"), batch_size=256)
    model = _model(args, count_classes(train))
    device = torch.device(args.device)
    check_runs(model.to(device), train, args.data)
    calib = data.calibration_loader(train, args.samples_per_class, args.batch_size, args.seed,
                                    num_classes=args.num_classes)
    say(f"scoring on {len(calib.dataset)} calibration samples ...")
    scores = fp.score(model, calib, seed=args.seed, device=device, progress=args.progress,
                      family_options=_attention_options(args), max_memory=args.max_memory)
    target = {k: getattr(args, k) for k in ("alpha", "params", "macs") if getattr(args, k) is not None}
    the_plan = _make_plan(scores, args, target or {"macs": 0.5})
    oneshot = fp.prune(model, the_plan)
    stages = {"one-shot": oneshot}
    pruned = copy.deepcopy(oneshot)
    recal = _recalibration_loader(train, args, pruned)
    final = "one-shot"
    if recal is not None:
        fp.recalibrate(pruned, recal, progress=args.progress)
        final = "recalibrated"
    if args.finetune_epochs:
        if recal is not None:
            stages["recalibrated"] = copy.deepcopy(pruned)
        final = "fine-tuned"
        aug = open_dataset(args.data, "train", augment=True)
        loader = DataLoader(aug, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)  # augmentation draws from the global RNG
            fp.finetune(pruned, loader, epochs=args.finetune_epochs, lr=args.lr, device=device,
                        progress=args.progress, autocast=torch.bfloat16 if args.bf16 else None,
                        teacher=model if args.distill > 0 else None, distill=args.distill)
    if final == "one-shot":
        stages = {}
    example = next(iter(test_loader))[0][:64].to(device)
    rep = report(model, pruned, the_plan, example, eval_loader=test_loader, latency_repeats=args.latency_repeats,
                 stages=stages, final_stage=final, progress=args.progress)
    say()
    say(rep.to_text())
    out = out_path(args.out)
    fp.save(out, pruned.cpu(), the_plan)
    say(f"\nwrote {out}")
    return 0


def _recalibration_loader(train, args: argparse.Namespace, pruned: nn.Module) -> Optional[DataLoader]:
    """Unlabelled training images for BatchNorm recalibration (seeded), or None with --recalibrate 0 or a model
    without BatchNorm (said once here, not as a warning from fp.recalibrate)."""
    if args.recalibrate <= 0:
        return None
    if not tracked_norms(pruned):
        say("the model has no BatchNorm layers: no statistics to re-estimate")
        return None
    n = min(args.recalibrate, len(train))
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + 1))[:n]
    return DataLoader(torch.utils.data.Subset(train, idx.tolist()), batch_size=100)


COMMANDS = {"run": _cmd_run, "demo": _cmd_demo, "score": _cmd_score, "plan": _cmd_plan, "prune": _cmd_prune,
            "report": _cmd_report, "finetune": _cmd_finetune}
