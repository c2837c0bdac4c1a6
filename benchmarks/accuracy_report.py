"""Tables, plot and README section of ``benchmarks/accuracy.py``, written from its results files only."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from accuracy_boards import (_mean_std, _measured, _pm, ablation_board, epochs_of, finetune_board, finetune_keys,
                             scoreboard, seeds_mixed, seeds_note, shortfalls, usual_seeds)

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
DEFAULT, TP_L1 = "FAIR default (U + ToD)", "Torch-Pruning global L1"  # the rows the goals compare
BEGIN, END = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"


def _stat(recs: List[dict], key: str) -> str:
    return _pm(_mean_std(recs, key)) if len(recs) > 1 else f"{100 * recs[0][key]:.2f}"


def table(grid: Dict[str, Any], key: str, bold: Sequence[str], removed: str = "macs_removed") -> List[str]:
    """One row per method, one column per level; † marks a measured removal more than 1 pt off the level."""
    levels = list(next(iter(grid.values())))
    usual = usual_seeds(grid)
    more = ", except where a cell gives its own count" if seeds_mixed(grid) else ""
    lines = [f"Calibration seeds per cell: {usual}{more}.", "",
             "| method | " + " | ".join(f"{float(L):.1%}".replace(".0%", "%") for L in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for label, rows in grid.items():
        cells = []
        for L in levels:
            if not _measured(grid, label, L, key):  # a level measured with --skip-one-shot, or not at all
                cells.append("-")
                continue
            off = np.mean([r[removed] for r in rows[L]]) - float(L)
            cells.append(_stat(rows[L], key) + (f" †{100 * off:+.1f}" if abs(off) > 0.01 else "")
                         + seeds_note(rows[L], usual))
        name = f"**{label}**" if label in bold else label
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plot(grid: Dict[str, Any], path: Path, title: str, default: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for label, rows in grid.items():
        kept = [100 * (1 - np.mean([r["macs_removed"] for r in rs])) for rs in rows.values()]
        acc = [100 * np.mean([r["recalibrated"] for r in rs]) for rs in rows.values()]
        err = [100 * np.std([r["recalibrated"] for r in rs]) for rs in rows.values()]
        style = {"lw": 2.6, "color": "black"} if label == default else \
            {"lw": 2.0, "ls": "--"} if label.startswith("Torch") else {"lw": 1.0, "alpha": 0.8}
        ax.errorbar(kept, acc, yerr=err, marker="o", ms=3, capsize=2, label=label, **style)
    ax.set_xlabel("MACs kept (%)")
    ax.set_ylabel("top-1 (%), one-shot + BatchNorm recalibration")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _rows_with(grid: Dict[str, Any], key: str) -> Dict[str, Any]:
    """The methods of ``grid`` with ``key`` in every record of some level (``--skip-one-shot`` runs lack one_shot)."""
    return {k: rows for k, rows in grid.items() if any(_measured(grid, k, L, key) for L in rows)}


def _one_shot_table(grid: Dict[str, Any], bold: Sequence[str], removed: str = "macs_removed") -> List[str]:
    """The one-shot table of the methods measured one-shot too, saying which ones were not."""
    rows = _rows_with(grid, "one_shot")
    if not rows:
        return []
    left = [k for k in grid if k not in rows]
    note = [f"Measured after recalibration only (not in this table): {', '.join(left)}.", ""] if left else []
    return ["### One-shot (no recalibration)", "", *note, *table(rows, "one_shot", bold, removed), ""]


def fingerprint(name: str) -> str:
    """The first 16 hex digits of the checkpoint file's SHA-256: results are tied to the weights they measured."""
    path = CHECKPOINTS / f"cifar10_{name}.pt"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"


def load_results(raw: Path, checkpoint: str) -> Dict[str, Any]:
    """The results file if it was measured on ``checkpoint``, else nothing: rows of two checkpoints never mix."""
    if not raw.is_file():
        return {}
    results = json.loads(raw.read_text())
    if results.get("checkpoint") != checkpoint:
        print(f"{raw.name} was measured on checkpoint {results.get('checkpoint', '(unrecorded)')}, not on "
              f"{checkpoint}: its results are replaced", flush=True)
        return {}
    return results


def _log(name: str) -> List[Dict[str, Any]]:
    """The training log's records; a line still being written (a run in progress) is skipped."""
    log = CHECKPOINTS / f"cifar10_{name}.log"
    rows = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


Stages = List[Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]]]]


def _stages(rows: List[Dict[str, Any]]) -> Stages:
    """The log split into training runs, each ``(recipe, epochs)``: a warm restart (``--init-from``) appends a run
    that begins with its own recipe line; logs written before train.py wrote recipes have one run and no recipe."""
    stages: Stages = []
    for r in rows:
        if "config" in r or not stages:
            stages.append((r.get("config"), []))
        if "epoch" in r:
            stages[-1][1].append(r)
    return stages


def _held_out(stages: Stages) -> bool:
    """Whether every run that trained the checkpoint left the validation images out."""
    return bool(stages) and all((c or {}).get("holdout") == "val" for c, _ in stages)


def _epochs(stages: Stages, planned: bool = False) -> str:
    """Epochs per run, ``80`` or ``80 + 34`` after a warm restart (``planned``: ``5 of 80`` for a cut run)."""
    cells = []
    for config, epochs in stages:
        done = max((r["epoch"] for r in epochs), default=0)
        of = f" of {config['epochs']}" if planned and config and config.get("epochs", done) != done else ""
        cells.append(f"{done}{of}")
    return " + ".join(cells)


def _last_test(rows: List[Dict[str, Any]]) -> Optional[str]:
    """The last test accuracy the log records (the checkpoint's own, as train.py tests at the end)."""
    tested = [r for r in rows if "test_acc" in r]
    return f"{100 * tested[-1]['test_acc']:.2f} %" if tested else None


def checkpoint_accuracy(name: str) -> str:
    """The last test accuracy in the checkpoint's training log, with its epochs."""
    rows = _log(name)
    acc = _last_test(rows)
    return f"{acc} after {_epochs(_stages(rows))} epochs" if acc else "no training log"


def validation_note(name: str) -> str:
    """Whether the checkpoint saw the validation images in training (logs without a recipe line did)."""
    rows = _log(name)
    if not rows:
        return "no training log, so whether the checkpoint saw them is unknown"
    if _held_out(_stages(rows)):
        return "held out of the checkpoint's training too"
    return "the checkpoint was trained on them, so its accuracy there is higher than on test"


def _recipe(config: Dict[str, Any]) -> str:
    start = "warm restart from the run before, " if config.get("init_from") else ""
    return (f"{start}one-cycle lr {config['lr']:g}, batch {config['batch_size']}, weight decay "
            f"{config['weight_decay']:g}" + (f", cutout {config['cutout']}" if config.get("cutout") else "")
            + (", bfloat16 autocast" if config.get("bf16") else ""))


def checkpoints_table(models: Sequence[str]) -> List[str]:
    """Each checkpoint's test accuracy and recipe (every run, in order), from its training log."""
    lines = ["| model | test top-1 | epochs | trained on | recipe |", "|---|---|---|---|---|"]
    for name in models:
        rows = _log(name)
        if not rows:
            continue
        acc = _last_test(rows) or "not measured"
        stages = _stages(rows)
        # A run without a recipe line predates them, when every run trained on all 50,000 images.
        held = "45,000 (validation held out)" if _held_out(stages) else "all 50,000 training images"
        recipe = "; then ".join(_recipe(c) if c else "not recorded in the log" for c, _ in stages)
        lines.append(f"| {name} | {acc} | {_epochs(stages, planned=True)} | {held} | {recipe} |")
    return lines


def _targets(t: Dict[str, Any]) -> List[str]:
    lines = ["| target t | " + " | ".join(f"{r['target']:.2f}" for r in t["macs"]) + " |",
             "|---|" + "---|" * len(t["macs"])]
    for unit in ("macs", "params"):
        cells = [f"{100 * r['achieved']:.1f}" if "achieved" in r else "refused" for r in t[unit]]
        lines.append(f"| {unit} removed (%) | " + " | ".join(cells) + " |")
    worst = {u: max(abs(r["achieved"] - r["target"]) for r in t[u] if "achieved" in r) for u in ("macs", "params")}
    return lines + ["", f"Worst miss: {100 * worst['macs']:.2f} pt (MACs), {100 * worst['params']:.2f} pt (params). "
                        f"`plan(macs={t.get('unreachable_target', 0.999):.5g})`: {t['unreachable']}"]


def is_current(results: Dict[str, Any], name: str) -> bool:
    """Whether ``results`` were measured on the checkpoint now in ``benchmarks/checkpoints/``."""
    return results.get("checkpoint") == fingerprint(name)


def write_markdown(results: Dict[str, Any], name: str, bold: Sequence[str], tp_l1: str) -> str:
    about = (checkpoint_accuracy(name) if is_current(results, name) else
             f"{results['checkpoint_accuracy']}, an earlier one" if "checkpoint_accuracy" in results else
             "an earlier one")
    lines = [f"# CIFAR-10 accuracy at matched size ({name}, checkpoint {about})", "",
             "Written by `python benchmarks/accuracy.py`; every figure measured in the runs recorded in "
             f"`accuracy_{name}.json`. Cells: top-1 %, mean ± std over calibration seeds "
             "(seeds 0, 1, ... as many as each table or cell says); the header is the fraction removed; "
             "† marks a measured removal more than 1 pt from the level (its offset in pt).", ""]
    if not is_current(results, name):
        lines += [f"**Measured on checkpoint {results.get('checkpoint', '(unrecorded)')}, not on the current "
                  f"`cifar10_{name}.pt` ({fingerprint(name)}): rerun the parts to refresh these tables.**", ""]
    if "select" in results:
        lines += ["## Choosing the defaults (validation: 5,000 training images, never used to score or recalibrate; "
                  f"{validation_note(name)})",
                  "", "One-shot + BatchNorm recalibration; MACs removed.", ""]
        lines += table(results["select"], "recalibrated", bold) + [""]
    if "test" in results:
        lines += ["## MACs removed, on the 10,000 test images", "", "### One-shot + BatchNorm recalibration", ""]
        lines += table(results["test"], "recalibrated", bold) + [""]
        lines += _one_shot_table(results["test"], bold)
        lines += [f"![top-1 against MACs kept](accuracy_{name}.png)", ""]
    if "ablation" in results:
        lines += ["## The paper's ablations: parameters removed, ToD against uniform depths (test)", ""]
        lines += _one_shot_table(results["ablation"], bold, "params_removed")
        lines += ["### One-shot + BatchNorm recalibration", ""]
        lines += table(results["ablation"], "recalibrated", bold, "params_removed") + [""]
    if "targets" in results:
        lines += ["## Targets: `plan(macs=t)` and `plan(params=t)`, measured after surgery (seed 0)", ""]
        lines += _targets(results["targets"]) + [""]
    for key in finetune_keys(results):
        lines += _finetuned(results[key])
    return "\n".join(lines)


def _finetuned(ft: Dict[str, Any]) -> List[str]:
    how = f"distilled from the unpruned model, weight {ft['distill']:g}, T 4; " if ft.get("distill") else ""
    device = ft.get("device", "cpu")
    on = "GPU" if device == "cuda" else device.upper()
    lines = [f"## Fine-tuned at {ft['level']:.0%} MACs removed (test; seed 0; {epochs_of(ft)}, SGD "
             f"lr {ft['lr']}, cosine; {how}on the {on}; unpruned {100 * ft['unpruned']:.2f} %)", "",
             "| method | MACs removed | recalibrated | fine-tuned | vs unpruned |", "|---|---|---|---|---|"]
    for label in [k for k, v in ft.items() if isinstance(v, dict)]:  # the methods fine-tuned
        r = ft[label]
        lines.append(f"| {label} | {100 * r['macs_removed']:.1f} % | {100 * r['recalibrated']:.2f} | "
                     f"{100 * r['finetuned']:.2f} | {100 * (r['finetuned'] - ft['unpruned']):+.2f} pt |")
    return lines + [""]


def update_readme(readme: Path, results_dir: Path, models: Sequence[str]) -> None:
    """Puts every model's results file, in ``models`` order, into the README between its accuracy markers."""
    text = readme.read_text()
    if BEGIN not in text:
        raise SystemExit(f"{readme} has no accuracy markers")
    measured = {n: json.loads((results_dir / f"accuracy_{n}.json").read_text()) for n in models
                 if (results_dir / f"accuracy_{n}.json").is_file()}
    stale = [n for n, r in measured.items() if not is_current(r, n)]
    # A board row must not pass for the checkpoint listed above it when it was measured on another one.
    measured = {f"{n} (earlier checkpoint)" if n in stale else n: r for n, r in measured.items()}
    glance = ["#### Checkpoints (`benchmarks/checkpoints/`, trained by `benchmarks/train.py`)", "",
              *checkpoints_table(models), "", "#### At a glance (test images)", "",
              "One-shot + BatchNorm recalibration, MACs removed, mean ± std over calibration seeds; the default "
              "against Torch-Pruning's global pruning (L1, and Taylor where measured) and the best of the "
              "uniform-depth baselines; the verdict names the strongest of them:", "",
              *scoreboard(measured, DEFAULT, TP_L1)]
    for intro, board in (("The paper's ablations (parameters removed, after recalibration):",
                          ablation_board(measured, DEFAULT)),
                         ("Fine-tuned (seed 0; recipes in each model's section):",
                          finetune_board(measured, DEFAULT, TP_L1))):
        if board:
            glance += ["", intro, "", *board]
    misses = shortfalls(measured, DEFAULT, TP_L1)
    glance += ["", "Where the default does not clearly win (behind, within one standard deviation, or not yet "
               "compared), from the boards above and the one-shot tables below:", "",
               *(misses or ["- nowhere on these boards"])]
    if stale:
        glance += ["", f"Rows marked *earlier checkpoint* ({', '.join(stale)}) were measured on a checkpoint "
                   "other than the one in the table above; its section says which, and rerunning its parts "
                   "refreshes them."]
    parts = ["\n".join(glance)]
    for name in models:
        md = results_dir / f"accuracy_{name}.md"
        if not md.is_file():
            continue
        body = md.read_text().replace("](accuracy_", "](benchmarks/results/accuracy_")
        body = body.replace("\n## ", "\n##### ").replace("\n### ", "\n###### ").replace("# ", "#### ", 1)
        parts.append(body.strip())
    head, rest = text.split(BEGIN, 1)
    readme.write_text(head + BEGIN + "\n" + "\n\n".join(parts) + "\n" + END + rest.split(END, 1)[1])
