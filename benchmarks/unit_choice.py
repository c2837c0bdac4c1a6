"""Where a gap to Torch-Pruning's global Taylor pruning comes from: how many units each layer loses (depths) or
which units go (the signal), measured on the validation images of ``accuracy.py``.

Each row prunes the checkpoint to the same MACs, recalibrates BatchNorm (as ``accuracy.py`` does) and evaluates
on the 5,000 validation images; rows differ only in the depths and the signal:

* the default plan (FAIR's depths, lowest U) and the same depths with other signals: lowest R-Score, lowest
  Torch-Pruning group Taylor importance (``GroupTaylorImportance``: sum over every coupled parameter of
  ``|w * dL/dw|``, gradients of the calibration images), and U x that importance (each relative to its layer's
  mean);
* Torch-Pruning's global Taylor plan, and its per-layer counts with units picked by U or by the R-Score.

    python benchmarks/unit_choice.py --model resnet56 --level 0.2    # ~8 min on 2 cores
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp  # the rival's importance, as the accuracy benchmark uses it

import accuracy
import fairpruner as fp
from fairpruner._planning.plans import _make_plan, _signal_values  # counts from another planner
from fairpruner._planning.tod import rank_ascending

HERE = Path(__file__).resolve().parent


def tp_importance(b: accuracy.Bench, seed: int, scores: fp.Scores) -> Dict[str, torch.Tensor]:
    """Torch-Pruning's group Taylor importance of every unit of every group, from the seed's calibration images."""
    model = copy.deepcopy(b.model).eval()
    for x, y in b.split(seed)[0]:
        F.cross_entropy(model(x.to(b.device)), y.to(b.device)).backward()
    graph = tp.DependencyGraph().build_dependency(model, b.example)
    imp, mods, out = tp.importance.GroupTaylorImportance(), dict(model.named_modules()), {}
    for g in scores.groups:
        m = mods[g.name]
        fn = tp.prune_conv_out_channels if isinstance(m, torch.nn.Conv2d) else tp.prune_linear_out_channels
        group = graph.get_pruning_group(m, fn, idxs=list(range(g.channels)))
        out[g.name] = imp(group).detach().cpu().double()[g.unit_channels].mean(1)
    return out


def counts_of(model: torch.nn.Module, pruned: torch.nn.Module, scores: fp.Scores) -> np.ndarray:
    """How many units of each group ``pruned`` lost against ``model`` (its producing layer's width)."""
    before, after = dict(model.named_modules()), dict(pruned.named_modules())

    def width(m: torch.nn.Module) -> int:
        return int(getattr(m, "out_channels", getattr(m, "out_features", 0)))
    return np.array([(width(before[g.name]) - width(after[g.name])) // g.unit_channels.shape[1]
                     for g in scores.groups])


def at_counts(scores: fp.Scores, counts: np.ndarray, signal, seed: int) -> fp.Plan:
    ranks = [rank_ascending(_signal_values(g, signal, seed, i)) for i, g in enumerate(scores.groups)]
    return _make_plan(scores, counts, ranks, signal, seed, None, scores.cost.evaluate(np.zeros(len(counts))), {})


def rows_of(b: accuracy.Bench, seed: int, level: float) -> Dict[str, torch.nn.Module]:
    s = b.scored(seed, {})
    imp = tp_importance(b, seed, s)

    def rel(x: torch.Tensor) -> torch.Tensor:
        return x / x.mean().clamp_min(1e-30)
    signals: Dict[str, object] = {
        "FAIR depths, lowest U (the default)": "u", "FAIR depths, lowest R-Score": "taylor",
        "FAIR depths, lowest Torch-Pruning Taylor importance": lambda g: imp[g.name],
        "FAIR depths, lowest U x Torch-Pruning Taylor importance": lambda g: rel(g.u.double()) * rel(imp[g.name])}
    rows: Dict[str, torch.nn.Module] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missed target shows in the MACs column
        for label, sig in signals.items():
            rows[label] = fp.prune(b.model, fp.plan(s, macs=level, seed=seed, signal=sig), verify=False)
    rival = b.torch_pruning(seed, level, "taylor")
    rows["Torch-Pruning global Taylor"] = rival
    counts = counts_of(b.model, rival, s)
    for label, sig in (("Torch-Pruning's depths, lowest U", "u"), ("Torch-Pruning's depths, lowest R-Score", "taylor")):
        rows[label] = fp.prune(b.model, at_counts(s, counts, sig, seed), verify=False)
    return rows


def _mean_std(v: List[float]) -> str:
    return f"{np.mean(v):.2f} ± {np.std(v):.2f}"  # the population std, as accuracy.py's tables


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56", choices=accuracy.MODELS)
    ap.add_argument("--level", type=float, default=0.2, help="fraction of MACs removed")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data", default=str(accuracy.DEFAULT_DATA))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    b = accuracy.Bench(argparse.Namespace(device="cpu", data=args.data), args.model)
    acc: Dict[str, List[float]] = {}
    macs: Dict[str, List[float]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for label, model in rows_of(b, seed, args.level).items():
            macs.setdefault(label, []).append(b.removed(model))
            fp.recalibrate(model, b.split(seed)[1])
            acc.setdefault(label, []).append(100 * fp.evaluate(model, b.val_loader))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in acc.items()), file=sys.stderr, flush=True)
    seeds = args.seeds.split(",")
    lines = [f"{args.model}, {args.level:.0%} MACs removed, validation images, recalibrated, seeds {args.seeds} "
             f"({(time.perf_counter() - t0) / 60:.1f} min, {args.threads} threads)", "",
             "| depths, signal | top-1 % | " + " | ".join(f"seed {k}" for k in seeds) + " | MACs removed |",
             "|---|---|" + "---|" * len(seeds) + "---|"]
    lines += [f"| {k} | {_mean_std(v)} | " + " | ".join(f"{x:.2f}" for x in v) + f" | {100 * np.mean(macs[k]):.1f} % |"
              for k, v in acc.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "results" / f"unit_choice_{args.model}_{round(100 * args.level)}.md").write_text(text)


if __name__ == "__main__":
    main()
