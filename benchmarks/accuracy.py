"""CIFAR-10 accuracy of FAIR-Pruner against other removal signals and allocations at matched MACs.

For every model with a checkpoint ``benchmarks/checkpoints/cifar10_<model>.pt`` (a plain state_dict, as written
by ``benchmarks/train.py``):

* the unpruned top-1 on the full test set;
* at each MACs-removed level: FAIR (U-Score + ToD allocation), U + uniform, L1 + uniform, L1 + ToD,
  Taylor (R-Score) + uniform, random + ToD, random + uniform (all from ONE ``fp.score`` call, re-planned), and
  Torch-Pruning's global magnitude pruning (GroupMagnitudeImportance(p=1), pruning ratio bisected to the MACs
  level); measured MACs/params removed, top-1 one-shot and after the same short fine-tune;
* ablations of the scoring settings (one-shot, FAIR): where U is measured, how sites/members are reduced,
  calibration samples per class, random projections; each setting is scored once;
* multi-round pruning to a final MACs level (re-score, plan, prune, fine-tune per round) against one-shot
  pruning to the same level followed by the same total number of fine-tune epochs.

Everything printed or written is measured in the run. Results go to ``benchmarks/results/cifar10.md`` and
``benchmarks/results/cifar10_<model>_accuracy.png``.

    python benchmarks/accuracy.py                                   # full run (~40 min for resnet20 on 2 cores)
    python benchmarks/accuracy.py --quick --checkpoint /tmp/r20.pt --models resnet20 --out-dir /tmp/acc
"""
from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

import fairpruner as fp
from fairpruner import data, zoo

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"

# (label, signal, allocation); signal None = Torch-Pruning's own global magnitude pruner.
METHODS: List[Tuple[str, Optional[str], Optional[str]]] = [
    ("FAIR (U + ToD)", "u", "tod"),
    ("U + uniform", "u", "uniform"),
    ("L1 + ToD", "l1", "tod"),
    ("L1 + uniform", "l1", "uniform"),
    ("Taylor + uniform", "taylor", "uniform"),
    ("random + ToD", "random", "tod"),
    ("random + uniform", "random", "uniform"),
    ("Torch-Pruning global L1", None, None),
]
FAIR = METHODS[0]
TP_LABEL = METHODS[-1][0]

# Scoring settings that the ablations vary; every other fp.score argument keeps its default.
SCORE_KEYS = ("samples_per_class", "projections", "u_at", "u_reduce", "r_reduce")
SCORE_DEFAULTS = {k: p.default for k, p in inspect.signature(fp.score).parameters.items() if k in SCORE_KEYS}

# name -> (title, list of setting dicts)
ABLATIONS: Dict[str, Tuple[str, List[Dict[str, Any]]]] = {
    "u_at": ("Where U is measured (u_at)", [{"u_at": v} for v in ("input", "norm", "output")]),
    "reduce": ("How a group's sites (u_reduce) and members (r_reduce) are combined",
               [{"u_reduce": u, "r_reduce": r} for u in ("max", "mean") for r in ("sum", "max")]),
    "samples_per_class": ("Calibration samples per class (the calibration loader and samples_per_class)",
                          [{"samples_per_class": v} for v in (8, 32, 64)]),
    "projections": ("Random projections of the sliced W1 (projections)", [{"projections": v} for v in (32, 128)]),
}
QUICK_ABLATIONS = ("u_at", "projections")


def log(msg: str) -> None:
    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


def pct(x: Optional[float], digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


# ----------------------------------------------------------------------------------------------------------
# Context: data, loaders and the measured baseline of one model
# ----------------------------------------------------------------------------------------------------------

class Bench:
    """Everything one model's experiments share."""

    def __init__(self, args: argparse.Namespace, name: str, ckpt: Path):
        self.args, self.name = args, name
        self.model = zoo.create(name, num_classes=10)
        self.model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        self.model.eval()
        self.example = zoo.example_input(name, batch_size=1)
        self.macs0 = fp.count_macs(self.model, self.example)
        self.params0 = fp.count_params(self.model)
        self.train_plain = data.cifar10(args.data, "train", augment=False)
        self.train_aug = data.cifar10(args.data, "train", augment=True)
        test = data.cifar10(args.data, "test")
        if args.test_subset:
            idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[:args.test_subset]
            test = Subset(test, sorted(idx.tolist()))
        self.test_loader = DataLoader(test, batch_size=500, shuffle=False)
        self.n_test = len(test)
        self.scores: Dict[tuple, fp.Scores] = {}
        self.score_s: Dict[tuple, float] = {}
        self.oneshot: Dict[tuple, dict] = {}

    # -- measurements ----------------------------------------------------------------------------------------
    def measure(self, model: nn.Module) -> Tuple[float, float]:
        """Fractions of the original MACs and parameters removed."""
        return (1 - fp.count_macs(model, self.example) / self.macs0,
                1 - fp.count_params(model) / self.params0)

    def evaluate(self, model: nn.Module) -> float:
        return fp.evaluate(model, self.test_loader)

    def train_loader(self) -> DataLoader:
        return DataLoader(self.train_aug, batch_size=128, shuffle=True,
                          generator=torch.Generator().manual_seed(self.args.seed))

    def finetune(self, model: nn.Module, epochs: int, max_steps: Optional[int]) -> float:
        """The one fine-tune recipe of every method (seeded); returns the seconds it took."""
        torch.manual_seed(self.args.seed)  # augmentation draws from torch's global RNG
        t0 = time.perf_counter()
        fp.finetune(model, self.train_loader(), epochs=epochs, lr=self.args.lr, max_steps=max_steps,
                    progress=sys.stderr.isatty())
        return time.perf_counter() - t0

    # -- scoring ---------------------------------------------------------------------------------------------
    def settings(self, **over: Any) -> dict:
        s = dict(SCORE_DEFAULTS, samples_per_class=self.args.calib_per_class)
        s.update(over)
        return s

    @staticmethod
    def key(settings: dict) -> tuple:
        return tuple(sorted(settings.items()))

    def calib(self, samples_per_class: int) -> DataLoader:
        return data.calibration_loader(self.train_plain, samples_per_class=samples_per_class, batch_size=128,
                                       seed=self.args.seed)

    def score(self, model: nn.Module, settings: dict) -> Tuple[fp.Scores, float]:
        t0 = time.perf_counter()
        s = fp.score(model, self.calib(settings["samples_per_class"]), seed=self.args.seed, progress=False,
                     **settings)
        return s, time.perf_counter() - t0

    def scores_for(self, settings: dict) -> fp.Scores:
        """Scores of the unpruned model with these settings, computed once."""
        k = self.key(settings)
        if k not in self.scores:
            self.scores[k], self.score_s[k] = self.score(self.model, settings)
            log(f"  scored {self.name} {describe(settings)} in {self.score_s[k]:.1f} s")
        return self.scores[k]

    # -- one-shot pruning ------------------------------------------------------------------------------------
    def prune_fair(self, settings: dict, signal: str, allocation: str, level: float,
                   need_model: bool = True) -> Tuple[Optional[nn.Module], dict]:
        """Pruned copy (if needed) and its one-shot record (cached per scoring settings, method and level)."""
        k = (self.key(settings), signal, allocation, level)
        if k in self.oneshot and not need_model:
            return None, self.oneshot[k]
        scores = self.scores_for(settings)
        p = plan_closest(scores, level, signal=signal, allocation=allocation, seed=self.args.seed)
        pruned = fp.prune(self.model, p)
        if k not in self.oneshot:
            macs, params = self.measure(pruned)
            self.oneshot[k] = {"macs": macs, "params": params, "oneshot": self.evaluate(pruned),
                               "alpha": p.alpha}
        return pruned, self.oneshot[k]

    def prune_tp(self, level: float) -> Tuple[nn.Module, dict]:
        """Torch-Pruning global magnitude pruning with the channel ratio bisected to the MACs level."""
        import torch_pruning as tp
        classifier = [m for m in self.model.modules() if isinstance(m, nn.Linear)][-1]

        def run(ratio: float) -> Optional[nn.Module]:
            m = copy.deepcopy(self.model).eval()
            try:
                with torch.random.fork_rng(devices=[]):
                    pruner = tp.pruner.BasePruner(
                        m, self.example, importance=tp.importance.GroupMagnitudeImportance(p=1),
                        global_pruning=True, pruning_ratio=ratio,
                        ignored_layers=[dict(zip(self.model.modules(), m.modules()))[classifier]])
                    pruner.step()
                    with torch.no_grad():
                        m(self.example)
            except Exception:  # noqa: BLE001 - a ratio that collapses a layer fails somewhere in TP's surgery
                return None
            if any(getattr(x, "out_channels", 1) == 0 or getattr(x, "out_features", 1) == 0 for x in m.modules()):
                return None
            return m

        def removed(m: Optional[nn.Module]) -> float:
            return 1.0 if m is None else self.measure(m)[0]

        lo, hi, tries = 0.0, 1.0, 0
        best: Tuple[float, float, Optional[nn.Module]] = (math.inf, 0.0, None)
        for tries in range(1, 25):  # bisection on the channel ratio; MACs removed grows with it
            mid = (lo + hi) / 2
            m = run(mid)
            r = removed(m)
            if m is not None and abs(r - level) < best[0]:
                best = (abs(r - level), mid, m)
            if best[0] < 0.001:
                break
            lo, hi = (mid, hi) if r < level else (lo, mid)
            if hi - lo < 1e-4:
                break
        _, ratio, pruned = best
        if pruned is None:
            raise RuntimeError(f"Torch-Pruning found no working ratio for {level:.0%} MACs")
        macs, params = self.measure(pruned)
        rec = {"macs": macs, "params": params, "oneshot": self.evaluate(pruned), "tp_ratio": ratio,
               "tp_tries": tries}
        self.oneshot[("tp", level)] = rec
        return pruned, rec


def _removed(p: fp.Plan) -> float:
    return 1 - p.predicted["macs_after"] / p.predicted["macs_before"]


def plan_closest(scores: fp.Scores, frac: float, **kw: Any) -> fp.Plan:
    """The plan whose MACs removal is closest to ``frac``.

    ``fp.plan(macs=frac)`` returns the smallest plan removing AT LEAST ``frac``; ToD moves many groups at the
    same alpha, so on small (or already pruned) models that plan can overshoot by several points. The largest
    plan removing less is found by bisecting the requested fraction (each plan takes milliseconds), and the
    closer of the two is used, so that every method, like Torch-Pruning's bisected ratio, lands as near the
    level as its granularity allows.
    """
    above = fp.plan(scores, macs=frac, **kw)
    if _removed(above) - frac < 1e-9:
        return above
    below, lo, hi = None, 0.0, frac
    for _ in range(30):  # removal of plan(macs=x) is non-decreasing in x
        mid = (lo + hi) / 2
        p = fp.plan(scores, macs=mid, **kw)
        if _removed(p) < frac:
            below, lo = p, mid
        else:
            hi = mid
    if below is None or abs(_removed(above) - frac) <= abs(_removed(below) - frac):
        return above
    return below


def describe(settings: dict) -> str:
    return ", ".join(f"{k}={settings[k]}" for k in SCORE_KEYS)


# ----------------------------------------------------------------------------------------------------------
# Timing estimate
# ----------------------------------------------------------------------------------------------------------

def _time_steps(b: Bench, models: Sequence[nn.Module], steps: int = 4) -> Tuple[float, List[float]]:
    """Seconds per batch of loading+augmenting 128 images, and per SGD step (median) of each model."""
    it = iter(b.train_loader())
    with torch.random.fork_rng(devices=[]):
        t0 = time.perf_counter()
        batches = [next(it) for _ in range(steps + 1)]
        t_data = (time.perf_counter() - t0) / (steps + 1)
        out = []
        for model in models:
            m = copy.deepcopy(model).train()
            opt = torch.optim.SGD(m.parameters(), lr=0.0)
            times = []
            for x, y in batches:
                t0 = time.perf_counter()
                loss = F.cross_entropy(m(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
            out.append(sorted(times[1:])[len(times[1:]) // 2])
    return t_data, out


def estimate(b: Bench, t_eval: float, t_score: float, levels: Sequence[float], ablations: Sequence[str],
             targets: Sequence[float]) -> Dict[str, float]:
    """Expected seconds per part. SGD steps are timed on the unpruned model and on the most pruned one of the
    run; other sizes are interpolated linearly in the MACs kept (data loading is timed apart, it does not
    shrink). Evaluation and scoring are assumed to scale with the MACs kept."""
    a = b.args
    deepest = max(list(levels) + list(targets))
    small = fp.prune(b.model, plan_closest(b.scores_for(b.settings()), deepest))
    keep_small = 1 - b.measure(small)[0]
    t_data, (t_full, t_small) = _time_steps(b, [b.model, small])
    steps = len(b.train_loader())

    def ft(epochs: int, keep: float) -> float:
        n = epochs * steps if a.finetune_max_steps is None else min(epochs * steps, a.finetune_max_steps)
        slope = (t_full - t_small) / max(1 - keep_small, 1e-9)
        return n * (t_data + t_small + slope * (keep - keep_small))

    main = sum(len(METHODS) * (2 * t_eval * (1 - L) + ft(a.finetune_epochs, 1 - L)) for L in levels)
    base = b.settings()
    new = {b.key(b.settings(**s)) for name in ablations for s in ABLATIONS[name][1]} - {b.key(base)}
    keep = sum(1 - L for L in levels)  # one evaluation per level at that level's size
    abl = sum(t_score * dict(k)["samples_per_class"] / base["samples_per_class"] + t_eval * keep for k in new)
    multi = ft(a.finetune_epochs * len(targets), 1 - targets[-1]) + 2 * t_eval
    prev = 0.0
    for T in targets:
        multi += t_score * (1 - prev) + ft(a.finetune_epochs, 1 - T) + 2 * t_eval * (1 - T)
        prev = T
    est = {"main": main, "ablations": abl, "multi-round": multi}
    log(f"  measured: test-set evaluation {t_eval:.1f} s, scoring {t_score:.1f} s, data {t_data * 1e3:.0f} ms/batch, "
        f"SGD step {t_full * 1e3:.0f} ms unpruned / {t_small * 1e3:.0f} ms at {pct(1 - keep_small)}% MACs removed, "
        f"{steps} steps/epoch (fine-tune epoch ~{steps * (t_data + t_full):.0f} s unpruned)")
    log("  expected time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in est.items())
        + f"; total {sum(est.values()) / 60:.1f} min")
    return est


# ----------------------------------------------------------------------------------------------------------
# Experiments
# ----------------------------------------------------------------------------------------------------------

def run_main(b: Bench, levels: Sequence[float]) -> List[dict]:
    a = b.args
    rows = []
    jobs = [(L, m) for L in levels for m in METHODS]
    for L, (label, signal, allocation) in tqdm(jobs, desc=f"{b.name}: methods x levels", file=sys.stderr,
                                               disable=not sys.stderr.isatty()):
        if signal is None:
            pruned, rec = b.prune_tp(L)
        else:
            pruned, rec = b.prune_fair(b.settings(), signal, allocation, L)
        row = dict(rec, method=label, level=L, finetuned=None, ft_s=None)
        if a.finetune_epochs > 0:
            row["ft_s"] = b.finetune(pruned, a.finetune_epochs, a.finetune_max_steps)
            row["finetuned"] = b.evaluate(pruned)
        rows.append(row)
        extra = f" (TP ratio {rec['tp_ratio']:.4f})" if "tp_ratio" in rec else \
            (f" (alpha {rec['alpha']:.4f})" if rec.get("alpha") is not None else "")
        log(f"  {L:.0%} {label:<24} MACs -{pct(rec['macs'])}% params -{pct(rec['params'])}% "
            f"one-shot {pct(rec['oneshot'], 2)}% fine-tuned {pct(row['finetuned'], 2)}%"
            + (f" [{row['ft_s']:.0f} s]" if row["ft_s"] else "") + extra)
    return rows


def run_ablations(b: Bench, levels: Sequence[float], names: Sequence[str]) -> Dict[str, List[dict]]:
    out = {}
    jobs = [(n, s) for n in names for s in ABLATIONS[n][1]]
    for name, over in tqdm(jobs, desc=f"{b.name}: ablations", file=sys.stderr, disable=not sys.stderr.isatty()):
        settings = b.settings(**over)
        row = {"over": over, "settings": settings, "levels": {}}
        for L in levels:
            _, rec = b.prune_fair(settings, FAIR[1], FAIR[2], L, need_model=False)
            row["levels"][L] = rec
        row["score_s"] = b.score_s[b.key(settings)]
        row["mean"] = sum(r["oneshot"] for r in row["levels"].values()) / len(levels)
        out.setdefault(name, []).append(row)
        log(f"  ablation {', '.join(f'{k}={v}' for k, v in over.items()):<28} one-shot "
            + " ".join(f"{L:.0%}: {pct(r['oneshot'], 2)}%" for L, r in row["levels"].items())
            + f"  mean {pct(row['mean'], 2)}%")
    return out


def round_targets(final: float, rounds: int) -> List[float]:
    """Cumulative MACs removed after each round, evenly spaced in log(MACs kept)."""
    return [1 - (1 - final) ** (k / rounds) for k in range(1, rounds + 1)]


def run_multiround(b: Bench, targets: Sequence[float]) -> List[dict]:
    a = b.args
    rows = []
    model = b.model
    settings = b.settings()
    for k, T in enumerate(tqdm(targets, desc=f"{b.name}: rounds", file=sys.stderr, disable=not sys.stderr.isatty()), 1):
        macs_now = fp.count_macs(model, b.example)
        frac = 1 - (1 - T) * b.macs0 / macs_now  # of the current model's MACs
        scores, t_score = b.score(model, settings)
        p = plan_closest(scores, frac, signal=FAIR[1], allocation=FAIR[2], seed=a.seed)
        model = fp.prune(model, p)
        macs, params = b.measure(model)
        row = {"name": f"round {k}", "target": T, "plan_frac": frac, "macs": macs, "params": params,
               "oneshot": b.evaluate(model), "finetuned": None, "score_s": t_score,
               "epochs": a.finetune_epochs * k}
        if a.finetune_epochs > 0:
            b.finetune(model, a.finetune_epochs, a.finetune_max_steps)
            row["finetuned"] = b.evaluate(model)
        rows.append(row)
        log(f"  round {k}: target {pct(T)}% (plan removes {pct(frac)}% of the current MACs) MACs -{pct(macs)}% "
            f"params -{pct(params)}% pruned {pct(row['oneshot'], 2)}% fine-tuned {pct(row['finetuned'], 2)}%")
    # One shot to the final level, then the same total fine-tuning (one schedule over rounds x epochs).
    T = targets[-1]
    pruned, rec = b.prune_fair(settings, FAIR[1], FAIR[2], T)
    epochs = a.finetune_epochs * len(targets)
    steps = None if a.finetune_max_steps is None else a.finetune_max_steps * len(targets)
    row = {"name": "one-shot", "target": T, "plan_frac": T, "macs": rec["macs"], "params": rec["params"],
           "oneshot": rec["oneshot"], "finetuned": None, "score_s": None, "epochs": epochs}
    if epochs > 0:
        b.finetune(pruned, epochs, steps)
        row["finetuned"] = b.evaluate(pruned)
    rows.append(row)
    log(f"  one-shot {pct(T)}%: MACs -{pct(rec['macs'])}% params -{pct(rec['params'])}% pruned "
        f"{pct(rec['oneshot'], 2)}% + {epochs} epochs fine-tuned {pct(row['finetuned'], 2)}%")
    return rows


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------

def md_model(b: Bench, res: dict) -> List[str]:
    a = b.args
    levels = res["levels"]
    off = []  # cells whose measured MACs removed is more than 1 pt from the level

    def macs_cell(r: dict, lv: float, params: bool) -> str:
        text = pct(r["macs"]) + (f" / {pct(r['params'])}" if params else "")
        if abs(r["macs"] - lv) > 0.01:
            off.append(lv)
            return text + " †"
        return text

    def note() -> None:
        if off and not noted:
            noted.append(True)
            L.extend([f"† Measured MACs removed is more than 1 pt from the level: the nearest plan this method can "
                      f"make. A ToD plan cannot remove less than ToD at alpha=0 does ({pct(res['tod_min'])}% of the "
                      "MACs with the default scores), so ToD rows cannot reach a smaller level; compare such rows "
                      "at their measured MACs (the plot's x axis).", ""])
    noted: List[bool] = []
    L = [f"## {b.name}", "",
         f"Unpruned: top-1 **{pct(res['base_acc'], 2)}%** on {b.n_test:,} test images; "
         f"{b.macs0 / 1e6:.2f} M MACs, {b.params0 / 1e6:.3f} M parameters. "
         f"Expected time {sum(res['estimate'].values()) / 60:.1f} min, measured "
         f"{sum(res['times'].values()) / 60:.1f} min ("
         + ", ".join(f"{k} {v / 60:.1f}" for k, v in res["times"].items()) + ").", ""]
    ft = "fine-tuned" if a.finetune_epochs > 0 else "fine-tuned (skipped)"
    L += ["### Methods at matched MACs", "",
          "MACs / params = measured fraction removed (%); top-1 (%) one-shot and after the fine-tune. "
          "All FAIR-Pruner rows share one `fp.score` call; Torch-Pruning's channel ratio is bisected to the level.",
          "",
          "| method | " + " | ".join(f"{lv:.0%}: MACs / params | one-shot | {ft}" for lv in levels) + " |",
          "|---|" + "---|---|---|" * len(levels)]
    for label, _, _ in METHODS:
        cells = []
        for lv in levels:
            r = next(x for x in res["main"] if x["method"] == label and x["level"] == lv)
            cells += [macs_cell(r, lv, True), pct(r["oneshot"], 2), pct(r["finetuned"], 2)]
        name = f"**{label}**" if label == FAIR[0] else label
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    L.append("")
    note()
    tp_rows = [r for r in res["main"] if "tp_ratio" in r]
    if tp_rows:
        L += ["Torch-Pruning channel ratios found: " + ", ".join(
            f"{r['level']:.0%} -> {r['tp_ratio']:.4f} ({r['tp_tries']} tries)" for r in tp_rows) + ".", ""]
    for name, rows in res["ablations"].items():
        title = ABLATIONS[name][0]
        varied = list(rows[0]["over"].keys())
        L += [f"### Ablation: {title}", "",
              "FAIR (U + ToD), one-shot top-1 (%); other settings at their defaults "
              f"({describe(b.settings())}). MACs = measured fraction removed (%).", "",
              "| " + " | ".join(varied) + " | " + " | ".join(f"{lv:.0%}: MACs | one-shot" for lv in levels)
              + " | mean one-shot | scoring (s) |",
              "|" + "---|" * len(varied) + "---|---|" * len(levels) + "---|---|"]
        for r in rows:
            default = all(r["settings"][k] == b.settings()[k] for k in varied)
            cells = [f"{r['over'][k]}" + (" (default)" if default else "") for k in varied]
            for lv in levels:
                cells += [macs_cell(r["levels"][lv], lv, False), pct(r["levels"][lv]["oneshot"], 2)]
            cells += [f"**{pct(r['mean'], 2)}**", f"{r['score_s']:.1f}"]
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
        note()
    mr = res["multi"]
    if mr:
        rounds = len(mr) - 1
        L += [f"### Multi-round: {pct(mr[-1]['target'], 0)}% MACs in {rounds} round{'s' * (rounds > 1)} vs one shot", "",
              "Each round re-scores the current model on the same calibration data, plans the MACs fraction "
              "that brings the cumulative removal (relative to the original model) to the round's target "
              "(targets evenly spaced in log(MACs kept)), prunes and fine-tunes; the one-shot row prunes to the "
              "final target at once and fine-tunes for the same total number of epochs (one schedule). "
              "Fractions in %.", "",
              "| schedule | target MACs removed | plan (of current) | MACs removed | params removed | "
              "pruned (no fine-tune) | fine-tuned | fine-tune epochs so far |",
              "|---|---|---|---|---|---|---|---|"]
        for r in mr:
            L.append(f"| {r['name']} | {pct(r['target'])} | {pct(r['plan_frac'])} | {pct(r['macs'])} | "
                     f"{pct(r['params'])} | {pct(r['oneshot'], 2)} | {pct(r['finetuned'], 2)} | {r['epochs']} |")
        L.append("")
    L += [f"![{b.name}: top-1 against MACs removed](cifar10_{b.name}_accuracy.png)", ""]
    return L


def plot(b: Bench, res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("oneshot", "one-shot (no fine-tuning)")]
    if b.args.finetune_epochs > 0:
        panels.append(("finetuned", f"after fine-tuning ({b.args.finetune_epochs} epochs"
                       + (f", at most {b.args.finetune_max_steps} steps" if b.args.finetune_max_steps else "")
                       + ")"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.8), squeeze=False)
    styles = ["o", "s", "^", "v", "D", "P", "X", "*"]
    for ax, (key, title) in zip(axes[0], panels):
        for i, (label, _, _) in enumerate(METHODS):
            pts = sorted((r["macs"], r[key]) for r in res["main"] if r["method"] == label)
            fair = label == FAIR[0]
            ax.plot([100 * x for x, _ in pts], [100 * y for _, y in pts], marker=styles[i % len(styles)],
                    lw=2.6 if fair else 1.3, ls=":" if label == TP_LABEL else "-", label=label, zorder=3 if fair else 2,
                    color="black" if fair else None)
        ax.axhline(100 * res["base_acc"], ls="--", color="gray", lw=1, label=f"unpruned ({pct(res['base_acc'], 2)}%)")
        ax.set_title(f"{b.name}, CIFAR-10: {title}", fontsize=10)
        ax.set_xlabel("MACs removed (%, measured)")
        ax.set_ylabel(f"top-1 (%) on {b.n_test:,} test images")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def header(args: argparse.Namespace, argv: Sequence[str], wall: float, levels, targets) -> List[str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    from importlib.metadata import version
    ft = (f"`fp.finetune(model, DataLoader(cifar10(train, augment=True), batch_size=128, shuffle=True, "
          f"generator seeded {args.seed}), epochs={args.finetune_epochs}, lr={args.lr}"
          + (f", max_steps={args.finetune_max_steps}" if args.finetune_max_steps is not None else "")
          + f")` (SGD momentum 0.9, weight decay 5e-4, cosine schedule; torch seeded {args.seed} before each)"
          if args.finetune_epochs > 0 else "none (`--finetune-epochs 0`)")
    return [
        "# FAIR-Pruner on CIFAR-10: accuracy at matched MACs", "",
        f"Generated by `python {' '.join(argv)}` on {datetime.datetime.now():%Y-%m-%d %H:%M}"
        + (f" (commit {commit})" if commit else "") + f"; torch {torch.__version__}, torch-pruning "
        f"{version('torch-pruning')}, {torch.get_num_threads()} threads on {os.cpu_count()} CPU cores; "
        f"wall time {wall / 60:.1f} min." + (" **Quick smoke run** (not a result)." if args.quick else ""), "",
        f"* Test set: {'%d images (seeded random subset)' % args.test_subset if args.test_subset else 'all 10,000 images'}.",
        f"* Calibration: `calibration_loader(cifar10(train, augment=False), samples_per_class="
        f"{args.calib_per_class}, batch_size=128, seed={args.seed})`; `fp.score` once per scoring setting "
        f"(defaults: {', '.join(f'{k}={v}' for k, v in SCORE_DEFAULTS.items())}; seed {args.seed}); every plan "
        "reuses those scores.",
        f"* MACs levels (fraction removed): {', '.join(f'{x:.0%}' for x in levels)}. `fp.plan(macs=level)` gives "
        "the smallest plan removing at least the level; the benchmark also finds the largest plan removing less "
        "(bisecting the requested fraction, milliseconds per plan) and uses whichever is closer to the level, "
        "for every FAIR-Pruner signal/allocation and in every round. MACs and parameters removed are measured "
        "on the pruned model with `fp.count_macs` / `fp.count_params`.",
        f"* Fine-tune (every method alike): {ft}.",
        "* Torch-Pruning: `tp.pruner.BasePruner(importance=tp.importance.GroupMagnitudeImportance(p=1), "
        "global_pruning=True, ignored_layers=[final Linear])` on a deepcopy, `pruning_ratio` bisected until the "
        "measured MACs removed is closest to the level.",
        f"* Multi-round: {len(targets)} rounds to {targets[-1]:.0%} MACs removed; cumulative targets "
        + ", ".join(f"{t:.1%}" for t in targets) + " (evenly spaced in log(MACs kept)).", "",
    ]


# ----------------------------------------------------------------------------------------------------------

def find_models(args: argparse.Namespace) -> List[Tuple[str, Path]]:
    if args.checkpoint:
        if not args.models or len(args.models) != 1:
            sys.exit("--checkpoint needs exactly one model in --models")
        return [(args.models[0], Path(args.checkpoint))]
    ckdir = Path(args.checkpoint_dir)
    if args.models:
        out = [(m, ckdir / f"cifar10_{m}.pt") for m in args.models]
        missing = [str(p) for _, p in out if not p.exists()]
        if missing:
            sys.exit(f"missing checkpoint(s): {', '.join(missing)} (train with benchmarks/train.py)")
        return out
    known = set(zoo.list_models())
    return [(p.stem[len("cifar10_"):], p) for p in sorted(ckdir.glob("cifar10_*.pt"))
            if p.stem[len("cifar10_"):] in known]


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None,
                    help="zoo models (default: every model with a checkpoint cifar10_<model>.pt)")
    ap.add_argument("--checkpoint-dir", default=str(HERE / "checkpoints"))
    ap.add_argument("--checkpoint", default=None, help="checkpoint file for the single model in --models")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 directory or .tar.gz")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--levels", nargs="+", type=float, default=[0.20, 0.35, 0.50], help="MACs fractions removed")
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--finetune-max-steps", type=int, default=None, help="cap on fine-tune steps (quick runs)")
    ap.add_argument("--lr", type=float, default=0.01, help="fine-tune learning rate")
    ap.add_argument("--calib-per-class", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--multi-target", type=float, default=0.70, help="final MACs fraction of the multi-round run")
    ap.add_argument("--ablations", nargs="*", default=None, choices=list(ABLATIONS),
                    help=f"which ablations (default: all; --quick: {' '.join(QUICK_ABLATIONS)})")
    ap.add_argument("--test-subset", type=int, default=0, help="evaluate on a seeded random subset (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1,000 test images, level 0.35, 5 fine-tune steps, 2 ablations, 2 rounds")
    args = ap.parse_args(argv)
    raw_argv = sys.argv if argv is None else [sys.argv[0]] + list(argv)
    shown_argv = [os.path.relpath(raw_argv[0], ROOT) if os.path.exists(raw_argv[0]) else raw_argv[0]] + raw_argv[1:]
    if args.quick:
        args.test_subset = args.test_subset or 1000
        args.levels = [0.35] if "--levels" not in raw_argv else args.levels
        args.finetune_max_steps = args.finetune_max_steps or 5
        args.rounds = 2 if "--rounds" not in raw_argv else args.rounds
        args.ablations = list(QUICK_ABLATIONS) if args.ablations is None else args.ablations
    if args.ablations is None:
        args.ablations = list(ABLATIONS)
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = sorted(args.levels)
    targets = round_targets(args.multi_target, args.rounds) if args.rounds > 0 else []

    models = find_models(args)
    if not models:
        sys.exit(f"no checkpoints cifar10_<model>.pt in {args.checkpoint_dir}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"models {', '.join(m for m, _ in models)}; levels {levels}; fine-tune {args.finetune_epochs} epochs"
          + (f" (max {args.finetune_max_steps} steps)" if args.finetune_max_steps else "")
          + f"; ablations {args.ablations}; rounds {[round(t, 4) for t in targets]}; "
          f"{torch.get_num_threads()} threads", flush=True)
    body: List[str] = []
    for name, ckpt in models:
        log(f"== {name} ({ckpt})")
        res: Dict[str, Any] = {"levels": levels, "times": {}}
        t0 = time.perf_counter()
        b = Bench(args, name, ckpt)
        t1 = time.perf_counter()
        res["base_acc"] = b.evaluate(b.model)
        t_eval = time.perf_counter() - t1
        log(f"  unpruned top-1 {pct(res['base_acc'], 2)}% on {b.n_test} test images ({t_eval:.1f} s); "
            f"{b.macs0 / 1e6:.2f} M MACs, {b.params0 / 1e6:.3f} M params")
        res["tod_min"] = _removed(fp.plan(b.scores_for(b.settings()), alpha=0.0))
        log(f"  ToD at alpha=0 already removes {pct(res['tod_min'])}% of the MACs (the least a ToD plan removes)")
        res["estimate"] = estimate(b, t_eval, b.score_s[b.key(b.settings())], levels, args.ablations, targets)
        res["times"]["setup"] = time.perf_counter() - t0
        for part, fn in (("main", lambda: run_main(b, levels)),
                         ("ablations", lambda: run_ablations(b, levels, args.ablations)),
                         ("multi-round", lambda: run_multiround(b, targets) if targets else [])):
            t0 = time.perf_counter()
            res[{"main": "main", "ablations": "ablations", "multi-round": "multi"}[part]] = fn()
            res["times"][part] = time.perf_counter() - t0
            log(f"  {part} took {res['times'][part] / 60:.1f} min (expected {res['estimate'][part] / 60:.1f})")
        plot(b, res, out_dir / f"cifar10_{name}_accuracy.png")
        body += md_model(b, res)
        md = header(args, shown_argv, time.perf_counter() - start, levels, targets) + body
        (out_dir / "cifar10.md").write_text("\n".join(md))
    print(f"wrote {out_dir / 'cifar10.md'} and {len(models)} plot(s) in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
