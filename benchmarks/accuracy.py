"""CIFAR-10 accuracy at matched MACs: FAIR-Pruner's default against its variants and the baselines.

Every method prunes the same checkpoint to the same MACs levels; every pruned model gets the same BatchNorm
recalibration (``fp.recalibrate`` on 1,000 training images); results are the mean +- std over calibration
seeds. The data never overlap:

* validation: 5,000 training images (500 per class, a fixed draw), used only by ``--part select``, which
  measures the FAIR variants the defaults were chosen from;
* calibration (32 per class) and recalibration (1,000) images: drawn per seed from the other 45,000;
* test: the 10,000 test images, used by ``--part test`` (the table and plot) and ``--part finetune``.

    python benchmarks/accuracy.py --part select                # FAIR variants on validation (~8 min, ResNet-20)
    python benchmarks/accuracy.py --part select --model resnet56 --methods shallow   # one study's rows
    python benchmarks/accuracy.py --part select --model vgg16_bn --methods tp   # the rival on validation
    python benchmarks/accuracy.py --part test                  # all methods on test (~30 min)
    python benchmarks/accuracy.py --part test --model resnet56 --methods core   # default, uniform, Torch-Pruning
    python benchmarks/accuracy.py --part test --model vgg16_bn --methods others --skip-one-shot
                                                               # Taylor/random + uniform, Torch-Pruning Taylor
    python benchmarks/accuracy.py --part ablation --model vgg16_bn   # the paper's ToD/uniform ablations (params)
    python benchmarks/accuracy.py --part test --model vgg16_bn --methods core --levels 0.2 --seeds 3,4 --add-seeds
                                                               # two more seeds for cells measured with 0,1,2
    python benchmarks/accuracy.py --part targets --model resnet56    # plan(macs=t)/plan(params=t), t=0.05..0.95
    python benchmarks/accuracy.py --part finetune --epochs 3   # headline: FAIR vs Torch-Pruning, fine-tuned
    python benchmarks/accuracy.py --part finetune --epochs 3 --distill 0.9   # the same, distilled from the original
    python benchmarks/accuracy.py --part finetune --epochs 15 --bf16 --device cuda --workers 4   # on a GPU
    python benchmarks/accuracy.py --part readme                # README section from every model's results

Raw results go to ``benchmarks/results/accuracy_<model>.json`` (each part adds its own key; select, test and
ablation runs write after every method, so that a run stopped midway keeps the methods it finished), the tables to
``benchmarks/results/accuracy_<model>.md`` and the plot to ``benchmarks/results/accuracy_<model>.png``. A results
file records its checkpoint's SHA-256: a part run on another checkpoint replaces the file instead of joining it.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
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
import accuracy_report as report
from accuracy_boards import seeds_mixed, usual_seeds
from accuracy_cells import gap, in_study_order, merged
import splits
from accuracy_methods import DEFAULT, METHODS, MODELS, PART_METHODS, PINNED, SELECTED, TP_L1, VARIANTS
from fairpruner import data, zoo

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
RESULTS = HERE / "results"


def log(msg: str) -> None:
    print(msg, flush=True)


class Bench:
    """One checkpoint with its data splits."""

    def __init__(self, args: argparse.Namespace, name: str) -> None:
        self.args, self.name = args, name
        self.model = zoo.create(name, num_classes=10)
        state = torch.load(HERE / "checkpoints" / f"cifar10_{name}.pt", map_location="cpu", weights_only=True)
        self.checkpoint = report.fingerprint(name)
        self.model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        self.device = torch.device(args.device)
        self.model.eval().to(self.device)
        self.example = zoo.example_input(name, batch_size=1).to(self.device)
        self.macs0 = fp.count_macs(self.model, self.example)
        self.params0 = fp.count_params(self.model)
        self.train = data.cifar10(args.data, "train")
        self.test_loader = DataLoader(data.cifar10(args.data, "test"), batch_size=1000)
        val, rest = splits.validation_split(self.train.targets)  # train.py holds these out by default
        self.val_loader = DataLoader(self._subset(val), batch_size=1000)
        self.rest = torch.tensor(rest)
        self.scores: Dict[tuple, fp.Scores] = {}

    def _subset(self, idx: List[int]) -> data.ArrayDataset:
        return splits.subset(self.train, idx)

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

    def removed(self, model: nn.Module, unit: str = "macs") -> float:
        """The fraction of the checkpoint's MACs (or params) that ``model`` no longer has."""
        if unit == "params":
            return 1 - fp.count_params(model) / self.params0
        return 1 - fp.count_macs(model, self.example) / self.macs0

    def fair(self, seed: int, level: float, score_kw: dict, plan_kw: dict, unit: str = "macs") -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a missed target shows in the measured MACs column
            p = fp.plan(self.scored(seed, score_kw), seed=seed, **{unit: level}, **{**PINNED, **plan_kw})
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
                        F.cross_entropy(m(x.to(self.device)), y.to(self.device)).backward()
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

    def build(self, method: Tuple[Optional[dict], Optional[dict]], seed: int, level: float,
              unit: str = "macs") -> nn.Module:
        score_kw, plan_kw = method
        if score_kw is None:
            return self.torch_pruning(seed, level, plan_kw["importance"])
        return self.fair(seed, level, score_kw, plan_kw, unit)

    def measure(self, pruned: nn.Module, seed: int, loader: DataLoader, one_shot: bool = True) -> dict:
        rec = {"seed": seed, "macs_removed": self.removed(pruned), "params_removed": self.removed(pruned, "params")}
        if one_shot:
            rec["one_shot"] = fp.evaluate(pruned, loader)
        fp.recalibrate(pruned, self.split(seed)[1])
        rec["recalibrated"] = fp.evaluate(pruned, loader)
        return rec


def run_grid(b: Bench, methods: Dict[str, tuple], loader: DataLoader, one_shot: bool,
             done: Callable[[Dict[str, Any]], None], levels: Optional[List[float]] = None, unit: str = "macs") -> None:
    """Every method at every level and seed; ``done`` gets each method's rows as soon as they are measured (so that
    a long run stopped midway keeps the methods it finished)."""
    for label, method in methods.items():
        t0 = time.perf_counter()
        rows = {}
        for level in levels or b.args.levels:
            recs = [b.measure(b.build(method, s, level, unit), s, loader, one_shot) for s in b.args.seeds]
            rows[f"{level:g}"] = recs
        log(f"  {label}: " + "  ".join(
            f"{float(L):.0%} {100 * np.mean([r['recalibrated'] for r in rs]):.2f}" for L, rs in rows.items())
            + f"  [{time.perf_counter() - t0:.0f} s]")
        done({label: rows})


def run_finetune(b: Bench) -> Dict[str, Any]:
    """FAIR's default, its previous default and Torch-Pruning global L1 at the headline level, fine-tuned with one
    recipe."""
    a = b.args
    train_aug = data.cifar10(a.data, "train", augment=True)
    out = {"level": a.headline, "epochs": a.epochs, "lr": a.lr, "bf16": a.bf16, "distill": a.distill,
           "device": b.device.type, "unpruned": fp.evaluate(b.model, b.test_loader)}
    for label in PART_METHODS["finetune"][a.methods]:
        pruned = b.build(METHODS[label], 0, a.headline)
        rec = b.measure(pruned, 0, b.test_loader)
        loader = DataLoader(train_aug, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0),
                            num_workers=a.workers, persistent_workers=a.workers > 0,
                            pin_memory=b.device.type == "cuda")
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # augmentation draws from torch's global RNG (workers seed from it too)
            fp.finetune(pruned, loader, epochs=a.epochs, lr=a.lr, progress=sys.stderr.isatty(),
                        autocast=torch.bfloat16 if a.bf16 else None, teacher=b.model if a.distill else None,
                        distill=a.distill)
        rec["finetuned"], rec["finetune_s"] = fp.evaluate(pruned, b.test_loader), time.perf_counter() - t0
        out[label] = rec
        log(f"  {label}: MACs -{100 * rec['macs_removed']:.1f}%, recalibrated {100 * rec['recalibrated']:.2f}%, "
            f"fine-tuned {100 * rec['finetuned']:.2f}% ({a.epochs} epochs, {rec['finetune_s']:.0f} s)")
    return out


def run_targets(b: Bench) -> Dict[str, Any]:
    """Every MACs and params target t = 0.05 ... 0.95: the plan's measured removal after real surgery."""
    sc = b.scored(0, {})
    out: Dict[str, Any] = {}
    for unit in ("macs", "params"):
        rows = []
        for t in [round(0.05 * i, 2) for i in range(1, 20)]:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    p = fp.plan(sc, **{unit: t})
                except fp.PlanError as e:
                    rows.append({"target": t, "refused": str(e)})
                    continue
            done = b.removed(fp.prune(b.model, p, verify=False), unit)
            rows.append({"target": t, "achieved": done, "warned": any("asked" in str(w.message) for w in caught)})
        out[unit] = rows
        worst = max(abs(r["achieved"] - r["target"]) for r in rows if "achieved" in r)
        log(f"  {unit}: {sum('achieved' in r for r in rows)} of {len(rows)} targets planned, worst miss "
            f"{100 * worst:.2f} pt, {sum(r.get('warned', False) for r in rows)} warned")
    # The first of 99.9 %, 99.99 % ... that one round cannot reach: VGG-16-BN's deepest plan removes more than
    # 99.9 % of its MACs.
    for probe in (0.999, 0.9999, 0.99999, 0.999999):
        out["unreachable_target"] = probe
        try:
            fp.plan(sc, macs=probe)
            out["unreachable"] = "planned without error"
        except fp.PlanError as e:
            out["unreachable"] = str(e)
            break
    log(f"  macs={probe:.5g}: {out['unreachable']}")
    return out


def write_page(name: str, results: Dict[str, Any]) -> Path:
    """``results/accuracy_<name>.md`` from that model's results."""
    md = RESULTS / f"accuracy_{name}.md"
    md.write_text(report.write_markdown(results, name, (DEFAULT, SELECTED), TP_L1))
    return md


def _measures_one_shot(args: argparse.Namespace) -> bool:
    """Whether this run's records carry the one-shot column (select never does)."""
    return args.part != "select" and not args.skip_one_shot


def _check_add_seeds(ap: argparse.ArgumentParser, args: argparse.Namespace, names: List[str], raw: Path) -> None:
    """Refuses ``--add-seeds`` before any measuring where its seeds cannot join the cells measured before."""
    if args.part not in ("select", "test", "ablation"):
        ap.error(f"--add-seeds applies to --part select, test or ablation, not {args.part}")
    old = report.load_results(raw, report.fingerprint(args.model)).get(args.part, {})
    levels = args.ablation_levels if args.part == "ablation" else args.levels
    one_shot = _measures_one_shot(args)
    gaps = [f"{label!r} at {L:g} {why}" for label in names for L in levels
            if (why := gap(old.get(label, {}).get(f"{L:g}", []), args.seeds, one_shot))]
    if gaps:
        ap.error("--add-seeds: " + "; ".join(gaps[:3]) + (f"; and {len(gaps) - 3} more" if len(gaps) > 3 else ""))


def plot_page(name: str, results: Dict[str, Any]) -> None:
    """``results/accuracy_<name>.png`` from that model's test results."""
    usual, mixed = usual_seeds(results["test"]), seeds_mixed(results["test"])
    report.plot(results["test"], RESULTS / f"accuracy_{name}.png",
                f"{name}, CIFAR-10 test: one-shot + BatchNorm recalibration "
                f"(mean ± std, {usual} seeds{', some cells more' if mixed else ''})", DEFAULT)


def save(b: Bench, args: argparse.Namespace, raw: Path, t0: float, key: str, rows: Dict[str, Any]) -> None:
    """Merges one part's new rows into the model's results file and rewrites its page (and plot)."""
    # Read at write time, so that runs of other parts for the same model in the meantime are kept.
    results = report.load_results(raw, b.checkpoint)
    old = results.get(key, {})
    recipe = {"level": None, "epochs": None, "lr": None, "bf16": False, "distill": 0.0, "device": "cpu"}
    if key in ("select", "test", "ablation"):
        results[key], notes = merged(old, rows, args.seeds, args.add_seeds, _measures_one_shot(args),
                                     list(VARIANTS if key == "select" else METHODS))
        for note in notes:
            log(f"  note: {note}")
    elif key.startswith("finetune") and all(old.get(k, d) == rows[k] for k, d in recipe.items()):
        # Rows of methods not run this time stay, under the same recipe only.
        results[key] = in_study_order({**old, **rows}, list(METHODS))
    else:
        results[key] = rows
    results.pop("seeds", None)  # each cell holds its own seeds' records
    results["checkpoint"] = b.checkpoint
    results["checkpoint_accuracy"] = report.checkpoint_accuracy(args.model)  # its heading once it is replaced
    if key == "test":
        plot_page(args.model, results)
    RESULTS.mkdir(exist_ok=True)
    tmp = raw.with_suffix(".json.tmp")  # written whole, then renamed: a run stopped mid-write leaves the old file
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, raw)
    md = write_page(args.model, results)
    log(f"wrote {raw} and {md} after {(time.perf_counter() - t0) / 60:.1f} min")


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", required=True,
                    choices=("select", "test", "ablation", "targets", "finetune", "readme"))
    ap.add_argument("--model", default="resnet20", help="a zoo model with benchmarks/checkpoints/cifar10_<model>.pt")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--levels", default="0.2,0.35,0.5,0.65", help="fractions of MACs removed")
    ap.add_argument("--methods", default="all",
                    choices=list(dict.fromkeys(m for part in PART_METHODS.values() for m in part)),
                    help="which rows to run; rows measured before for other methods are kept. --part test: "
                         "every method, the default with the uniform baselines and Torch-Pruning (core), "
                         "those baselines alone (baselines), L1, Taylor and random scores within ToD's depths "
                         "(signals), Taylor and random scores at uniform depths with Torch-Pruning global Taylor "
                         "(others), the default, the five previous defaults or "
                         "Torch-Pruning alone (default, previous, tp); "
                         "--part select: every variant, the stream study (core), the floor study (floor), the cost "
                         "study (cost), the tie/floor study (ties), the writers study (writers), the writers rule "
                         "against every stream spared until a positive level (streams), the shallow-streams study "
                         "(shallow), the width study (width) or its width_power=1 row alone (width_one), "
                         "the default or the previous "
                         "default alone, or Torch-Pruning global L1 or global Taylor for reference (tp, tp_taylor); "
                         "--part ablation: every method, the default or the previous defaults; --part finetune: "
                         "the default, the previous default and Torch-Pruning, or some of them (default, "
                         "previous, tp), or an earlier default (writers, capped)")
    ap.add_argument("--skip-one-shot", action="store_true",
                    help="measure only after recalibration (halves the evaluation time)")
    ap.add_argument("--ablation-levels", default="0.678,0.354",
                    help="fractions of parameters removed by --part ablation (the paper's VGG-16 figures)")
    ap.add_argument("--headline", type=float, default=0.5, help="MACs level of --part finetune")
    ap.add_argument("--epochs", type=int, default=3,
                    help="fine-tuning epochs of --part finetune (each count's results are kept apart)")
    ap.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    ap.add_argument("--bf16", action="store_true", help="fine-tune under bfloat16 autocast (same for every method)")
    ap.add_argument("--distill", type=float, default=0.0,
                    help="--part finetune: distil from the unpruned checkpoint with this weight (temperature 4); "
                         "kept apart from the plain fine-tuning results")
    ap.add_argument("--device", default="cpu",
                    help="where the checkpoint is scored, pruned, evaluated and fine-tuned (e.g. cuda); fine-tuned "
                         "rows of another device are not mixed in")
    ap.add_argument("--workers", type=int, default=0, help="--part finetune: data-loading processes")
    ap.add_argument("--add-seeds", action="store_true",
                    help="--part select|test|ablation: append these seeds' results to the cells measured before "
                         "instead of replacing them; --seeds must continue each cell's seeds (3,4 after 0,1,2); "
                         "after a stopped run, re-run only the methods it did not finish (each is saved when done)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not 0 <= args.distill <= 1:
        ap.error(f"--distill must be in [0, 1], got {args.distill}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.levels = [float(x) for x in args.levels.split(",")]
    args.ablation_levels = [float(x) for x in args.ablation_levels.split(",")]
    torch.set_num_threads(args.threads)
    if args.part == "readme":  # every model's tables are rewritten from its results file, then the README
        for name in MODELS:
            if (RESULTS / f"accuracy_{name}.json").is_file():
                results = json.loads((RESULTS / f"accuracy_{name}.json").read_text())
                write_page(name, results)
                if "test" in results:
                    plot_page(name, results)
        report.update_readme(ROOT / "README.md", RESULTS, MODELS)
        return
    names = PART_METHODS[args.part].get(args.methods)
    if names is None:
        ap.error(f"--part {args.part} takes --methods {' or '.join(PART_METHODS[args.part])}, "
                 f"not {args.methods}")
    raw = RESULTS / f"accuracy_{args.model}.json"
    if args.add_seeds:
        _check_add_seeds(ap, args, names, raw)
    b = Bench(args, args.model)
    t0 = time.perf_counter()
    done = functools.partial(save, b, args, raw, t0, args.part)  # grid parts: written after every method
    if args.part == "select":
        log(f"{args.model}: FAIR variants on validation, seeds {args.seeds}")
        run_grid(b, {k: VARIANTS[k] for k in names}, b.val_loader, one_shot=False, done=done)
    elif args.part == "test":
        log(f"{args.model}: {len(names)} methods ({args.methods}) on test, seeds {args.seeds}")
        run_grid(b, {k: METHODS[k] for k in names}, b.test_loader, one_shot=not args.skip_one_shot, done=done)
    elif args.part == "ablation":
        log(f"{args.model}: ToD against uniform depths at {args.ablation_levels} of the parameters, seeds {args.seeds}")
        run_grid(b, {k: METHODS[k] for k in names}, b.test_loader, one_shot=not args.skip_one_shot,
                 levels=args.ablation_levels, unit="params", done=done)
    elif args.part == "targets":
        log(f"{args.model}: plan(macs=t) and plan(params=t), t = 0.05 ... 0.95, measured after surgery")
        save(b, args, raw, t0, "targets", run_targets(b))
    else:
        log(f"{args.model}: fine-tuning at {args.headline:.0%} MACs removed")
        # One part per recipe's kind and length, so that a short budget and a long one are shown side by side.
        save(b, args, raw, t0, f"{'finetune_distill' if args.distill else 'finetune'}_{args.epochs}ep",
             run_finetune(b))


if __name__ == "__main__":
    main()
