"""CIFAR-10 accuracy at matched MACs: FAIR-Pruner's default against its variants and the baselines.

Every method prunes the same checkpoint to the same MACs levels; every pruned model gets the same BatchNorm
recalibration (``fp.recalibrate`` on 1,000 training images); results are the mean +- std over calibration
seeds. The data never overlap:

* validation: 5,000 training images (500 per class, a fixed draw), used only by ``--part select``, which
  measures the FAIR variants the defaults were chosen from;
* calibration (32 per class) and recalibration (1,000) images: drawn per seed from the other 45,000;
* test: the 10,000 test images, used by ``--part test`` (the table and plot) and ``--part finetune``.

    python benchmarks/accuracy.py --part select                # FAIR variants on validation (~8 min, ResNet-20)
    python benchmarks/accuracy.py --part test                  # all methods on test (~30 min)
    python benchmarks/accuracy.py --part finetune --epochs 3   # headline: FAIR vs Torch-Pruning, fine-tuned
    python benchmarks/accuracy.py --part readme                # README section from the results

Raw results go to ``benchmarks/results/accuracy_<model>.json`` (each part adds its own key), the tables to
``benchmarks/results/accuracy.md`` and the plot to ``benchmarks/results/accuracy_<model>.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import fairpruner as fp
from fairpruner import data, zoo

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
RESULTS = HERE / "results"
# this library's defaults before the validation studies
PAPER_DEFAULTS = {"u_reduce": "max", "r_reduce": "sum", "u_consumer_power": 0, "u_at": "input"}

IN = {"u_at": "input"}
PLAIN = {"u_consumer_power": 0, **IN}
# name -> (score settings, plan settings); None = a Torch-Pruning method.
METHODS: Dict[str, Tuple[Optional[dict], Optional[dict]]] = {
    "FAIR default (U + ToD)": ({}, {}),
    "FAIR, previous defaults (U max, R sum, streams like any layer)": (PAPER_DEFAULTS, {"stream_weight": 1, "ties": "share"}),
    "FAIR, plain U at the input, equal shares of the floor (defaults before the last study)": (
        PLAIN, {"ties": "share"}),
    "FAIR, U x consumer norm at the next layer's input (u_at=input)": (IN, {}),
    "U + uniform": ({}, {"allocation": "uniform"}),
    "L1 + ToD": ({}, {"signal": "l1"}),
    "L1 + uniform": ({}, {"signal": "l1", "allocation": "uniform"}),
    "Taylor + uniform": ({}, {"signal": "taylor", "allocation": "uniform"}),
    "random + ToD": ({}, {"signal": "random"}),
    "random + uniform": ({}, {"signal": "random", "allocation": "uniform"}),
    "Torch-Pruning global L1": (None, {"importance": "l1"}),
    "Torch-Pruning global Taylor": (None, {"importance": "taylor"}),
}
DEFAULT, TP_L1 = "FAIR default (U + ToD)", "Torch-Pruning global L1"

# The validation study: where U is measured and how it is weighted, how a coupled group combines U and R, how
# deep residual streams are cut, how a target orders ToD's equal-level steps. Label -> (score, plan settings).
SW4 = {"stream_weight": 4}
VARIANTS: Dict[str, Tuple[dict, dict]] = {
    "plain U at the input, equal shares of the floor (previous default)": (PLAIN, {"ties": "share", **SW4}),
    "plain U at the input, cost-ordered ties": (PLAIN, SW4),
    "U x consumer norm at the input, equal shares of the floor": (IN, {"ties": "share", **SW4}),
    "U x consumer norm at the input, cost-ordered ties": (IN, SW4),
    "U x consumer norm^2 at the input, cost-ordered ties": ({"u_consumer_power": 2, **IN}, SW4),
    "U x consumer norm at the input, stream weight 1": (IN, {"stream_weight": 1}),
    "U x consumer norm at the input, stream weight 8": (IN, {"stream_weight": 8}),
    "U x consumer norm at the input, U max over sites": ({"u_reduce": "max", **IN}, SW4),
    "U x consumer norm at the input, R sum": ({"r_reduce": "sum", **IN}, SW4),
    "U x consumer norm on the layer output (u_at=output; default)": ({}, {}),
}
SELECTED = "U x consumer norm on the layer output (u_at=output; default)"


def log(msg: str) -> None:
    print(msg, flush=True)


class Bench:
    """One checkpoint with its data splits."""

    def __init__(self, args: argparse.Namespace, name: str) -> None:
        self.args, self.name = args, name
        self.model = zoo.create(name, num_classes=10)
        state = torch.load(HERE / "checkpoints" / f"cifar10_{name}.pt", map_location="cpu", weights_only=True)
        self.model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        self.model.eval()
        self.example = zoo.example_input(name, batch_size=1)
        self.macs0 = fp.count_macs(self.model, self.example)
        self.train = data.cifar10(args.data, "train")
        self.test_loader = DataLoader(data.cifar10(args.data, "test"), batch_size=1000)
        labels = torch.tensor(self.train.targets)
        g = torch.Generator().manual_seed(12345)  # the validation split is fixed, whatever the seed
        val, rest = [], []
        for c in range(10):
            idx = torch.nonzero(labels == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            val += idx[:500].tolist()
            rest += idx[500:].tolist()
        self.val_loader = DataLoader(self._subset(sorted(val)), batch_size=1000)
        self.rest = torch.tensor(sorted(rest))
        self.scores: Dict[tuple, fp.Scores] = {}

    def _subset(self, idx: List[int]) -> data.ArrayDataset:
        t = self.train
        return data.ArrayDataset(t.images.numpy()[idx], [t.targets[i] for i in idx], t.mean, t.std,
                                 classes=t.classes)

    def split(self, seed: int) -> Tuple[DataLoader, DataLoader]:
        """Calibration (32 per class) and recalibration (1,000 images) loaders of one seed."""
        perm = self.rest[torch.randperm(len(self.rest), generator=torch.Generator().manual_seed(seed))]
        recal = DataLoader(self._subset(perm[:1000].tolist()), batch_size=100)
        calib = data.calibration_loader(self._subset(perm[1000:].tolist()), 32, 128, seed=seed)
        return calib, recal

    def scored(self, seed: int, settings: dict) -> fp.Scores:
        key = (seed, tuple(sorted(settings.items())))
        if key not in self.scores:
            self.scores[key] = fp.score(self.model, self.split(seed)[0], seed=seed, progress=False, **settings)
        return self.scores[key]

    def removed(self, model: nn.Module) -> float:
        return 1 - fp.count_macs(model, self.example) / self.macs0

    def fair(self, seed: int, level: float, score_kw: dict, plan_kw: dict) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a missed target shows in the measured MACs column
            p = fp.plan(self.scored(seed, score_kw), macs=level, seed=seed, **plan_kw)
        return fp.prune(self.model, p, verify=False)

    def torch_pruning(self, seed: int, level: float, importance: str) -> nn.Module:
        """Torch-Pruning's global pruning, its channel ratio bisected to the MACs level."""
        import torch_pruning as tp  # the baseline, not a dependency of the library's code path
        calib = self.split(seed)[0]
        classifier = [m for m in self.model.modules() if isinstance(m, nn.Linear)][-1]

        def run(ratio: float) -> Optional[nn.Module]:
            m = copy.deepcopy(self.model).eval()
            imp = tp.importance.GroupMagnitudeImportance(p=1) if importance == "l1" else \
                tp.importance.GroupTaylorImportance()
            try:
                if importance == "taylor":
                    for x, y in calib:
                        F.cross_entropy(m(x), y).backward()
                pruner = tp.pruner.BasePruner(m, self.example, importance=imp, global_pruning=True,
                                              pruning_ratio=ratio,
                                              ignored_layers=[dict(zip(self.model.modules(), m.modules()))[classifier]])
                pruner.step()
            except Exception:  # noqa: BLE001 - a ratio that empties a layer fails inside Torch-Pruning
                return None
            m.zero_grad(set_to_none=True)
            return m

        lo, hi, best = 0.0, 1.0, None
        for _ in range(20):
            mid = (lo + hi) / 2
            m = run(mid)
            r = 1.0 if m is None else self.removed(m)
            if m is not None and (best is None or abs(r - level) < best[0]):
                best = (abs(r - level), m)
            if best is not None and best[0] < 0.002:
                break
            lo, hi = (mid, hi) if r < level else (lo, mid)
        return best[1]

    def build(self, method: Tuple[Optional[dict], Optional[dict]], seed: int, level: float) -> nn.Module:
        score_kw, plan_kw = method
        if score_kw is None:
            return self.torch_pruning(seed, level, plan_kw["importance"])
        return self.fair(seed, level, score_kw, plan_kw)

    def measure(self, pruned: nn.Module, seed: int, loader: DataLoader, one_shot: bool = True) -> dict:
        rec = {"macs_removed": self.removed(pruned)}
        if one_shot:
            rec["one_shot"] = fp.evaluate(pruned, loader)
        fp.recalibrate(pruned, self.split(seed)[1])
        rec["recalibrated"] = fp.evaluate(pruned, loader)
        return rec


def run_grid(b: Bench, methods: Dict[str, tuple], loader: DataLoader, one_shot: bool) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for label, method in methods.items():
        t0 = time.perf_counter()
        rows = {}
        for level in b.args.levels:
            recs = [b.measure(b.build(method, s, level), s, loader, one_shot) for s in b.args.seeds]
            rows[f"{level:g}"] = recs
        out[label] = rows
        log(f"  {label}: " + "  ".join(
            f"{float(L):.0%} {100 * np.mean([r['recalibrated'] for r in rs]):.2f}" for L, rs in rows.items())
            + f"  [{time.perf_counter() - t0:.0f} s]")
    return out


def run_finetune(b: Bench) -> Dict[str, Any]:
    """FAIR default and Torch-Pruning global L1 at the headline level, fine-tuned with one recipe."""
    a = b.args
    train_aug = data.cifar10(a.data, "train", augment=True)
    out = {"level": a.headline, "epochs": a.epochs, "lr": a.lr, "unpruned": fp.evaluate(b.model, b.test_loader)}
    for label in (DEFAULT, TP_L1):
        pruned = b.build(METHODS[label], 0, a.headline)
        rec = b.measure(pruned, 0, b.test_loader)
        loader = DataLoader(train_aug, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # augmentation draws from torch's global RNG
            fp.finetune(pruned, loader, epochs=a.epochs, lr=a.lr, progress=sys.stderr.isatty())
        rec["finetuned"], rec["finetune_s"] = fp.evaluate(pruned, b.test_loader), time.perf_counter() - t0
        out[label] = rec
        log(f"  {label}: MACs -{100 * rec['macs_removed']:.1f}%, recalibrated {100 * rec['recalibrated']:.2f}%, "
            f"fine-tuned {100 * rec['finetuned']:.2f}% ({a.epochs} epochs, {rec['finetune_s']:.0f} s)")
    return out


# ------------------------------------------------------------------------------------------------ output

def _stat(recs: List[dict], key: str) -> str:
    v = [100 * r[key] for r in recs]
    return f"{np.mean(v):.2f} ± {np.std(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def table(grid: Dict[str, Any], key: str, best_of: Optional[List[str]] = None) -> List[str]:
    levels = list(next(iter(grid.values())))
    lines = ["| method | " + " | ".join(f"{float(L):.0%}" for L in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for label, rows in grid.items():
        cells = []
        for L in levels:
            cell = _stat(rows[L], key)
            off = np.mean([r["macs_removed"] for r in rows[L]]) - float(L)
            cells.append(cell + (f" †{100 * off:+.1f}" if abs(off) > 0.01 else ""))
        name = f"**{label}**" if label in (DEFAULT, SELECTED) else label
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plot(grid: Dict[str, Any], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for label, rows in grid.items():
        kept = [100 * (1 - np.mean([r["macs_removed"] for r in rs])) for rs in rows.values()]
        acc = [100 * np.mean([r["recalibrated"] for r in rs]) for rs in rows.values()]
        err = [100 * np.std([r["recalibrated"] for r in rs]) for rs in rows.values()]
        style = {"lw": 2.6, "color": "black"} if label == DEFAULT else \
            {"lw": 2.0, "ls": "--"} if label.startswith("Torch") else {"lw": 1.0, "alpha": 0.8}
        ax.errorbar(kept, acc, yerr=err, marker="o", ms=3, capsize=2, label=label, **style)
    ax.set_xlabel("MACs kept (%)")
    ax.set_ylabel("top-1 (%), one-shot + BatchNorm recalibration")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def write_markdown(results: Dict[str, Any], name: str) -> str:
    lines = [f"# CIFAR-10 accuracy at matched MACs ({name})", "",
             "Written by `python benchmarks/accuracy.py`; every figure measured in the runs recorded in "
             f"`accuracy_{name}.json`. Cells: top-1 %, mean ± std over calibration seeds "
             f"{results.get('seeds')}; the header is the fraction of MACs removed; † marks a measured removal more "
             "than 1 pt from the level (its offset in pt).", ""]
    if "select" in results:
        lines += ["## Choosing the defaults (validation: 5,000 training images, never used to score or recalibrate)",
                  "", "One-shot + BatchNorm recalibration.", ""] + table(results["select"], "recalibrated") + [""]
    if "test" in results:
        lines += ["## All methods on the 10,000 test images", "", "### One-shot + BatchNorm recalibration", ""]
        lines += table(results["test"], "recalibrated") + ["", "### One-shot (no recalibration)", ""]
        lines += table(results["test"], "one_shot") + ["", f"![top-1 against MACs kept](accuracy_{name}.png)", ""]
    if "finetune" in results:
        ft = results["finetune"]
        lines += [f"## Fine-tuned at {ft['level']:.0%} MACs removed (test; seed 0; {ft['epochs']} epochs, SGD "
                  f"lr {ft['lr']}, cosine; unpruned {100 * ft['unpruned']:.2f} %)", "",
                  "| method | MACs removed | recalibrated | fine-tuned | vs unpruned |", "|---|---|---|---|---|"]
        for label in (DEFAULT, TP_L1):
            r = ft[label]
            lines.append(f"| {label} | {100 * r['macs_removed']:.1f} % | {100 * r['recalibrated']:.2f} | "
                         f"{100 * r['finetuned']:.2f} | {100 * (r['finetuned'] - ft['unpruned']):+.2f} pt |")
        lines.append("")
    return "\n".join(lines)


def update_readme(md_path: Path) -> None:
    """Puts the results file's test tables into the README, between its accuracy markers."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    begin, end = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"
    if begin not in text:
        raise SystemExit("README.md has no accuracy markers")
    body = md_path.read_text().split("\n", 2)[2].replace("](accuracy_", "](benchmarks/results/accuracy_")
    body = body.replace("\n## ", "\n#### ").replace("\n### ", "\n##### ")
    head, rest = text.split(begin, 1)
    readme.write_text(head + begin + "\n" + body.strip() + "\n" + end + rest.split(end, 1)[1])


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", required=True, choices=("select", "test", "finetune", "readme"))
    ap.add_argument("--model", default="resnet20", help="a zoo model with benchmarks/checkpoints/cifar10_<model>.pt")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--levels", default="0.2,0.35,0.5,0.65", help="fractions of MACs removed")
    ap.add_argument("--headline", type=float, default=0.5, help="MACs level of --part finetune")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs of --part finetune")
    ap.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.levels = [float(x) for x in args.levels.split(",")]
    torch.set_num_threads(args.threads)
    raw = RESULTS / f"accuracy_{args.model}.json"
    results = json.loads(raw.read_text()) if raw.is_file() else {}
    md = RESULTS / "accuracy.md"
    if args.part == "readme":
        update_readme(md)
        return
    b = Bench(args, args.model)
    t0 = time.perf_counter()
    if args.part == "select":
        log(f"{args.model}: FAIR variants on validation, seeds {args.seeds}")
        results["select"] = run_grid(b, VARIANTS, b.val_loader, one_shot=False)
    elif args.part == "test":
        log(f"{args.model}: all methods on test, seeds {args.seeds}")
        results["test"] = run_grid(b, METHODS, b.test_loader, one_shot=True)
        plot(results["test"], RESULTS / f"accuracy_{args.model}.png",
             f"{args.model}, CIFAR-10 test: one-shot + BatchNorm recalibration (mean ± std, {len(args.seeds)} seeds)")
    else:
        log(f"{args.model}: fine-tuning at {args.headline:.0%} MACs removed")
        results["finetune"] = run_finetune(b)
    results["seeds"] = args.seeds
    RESULTS.mkdir(exist_ok=True)
    raw.write_text(json.dumps(results, indent=1))
    md.write_text(write_markdown(results, args.model))
    log(f"wrote {raw} and {md} in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
