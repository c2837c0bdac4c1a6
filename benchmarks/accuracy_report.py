"""Tables, plot and README section of ``benchmarks/accuracy.py``, written from its results files only."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
DEFAULT, TP_L1 = "FAIR default (U + ToD)", "Torch-Pruning global L1"  # the rows the goals compare
BEGIN, END = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"


def _mean_std(recs: List[dict], key: str = "recalibrated") -> Tuple[float, float]:
    v = [100 * r[key] for r in recs]
    return float(np.mean(v)), float(np.std(v))


def _pm(ms: Tuple[float, float]) -> str:
    return f"{ms[0]:.2f} ± {ms[1]:.2f}"


def _stat(recs: List[dict], key: str) -> str:
    return _pm(_mean_std(recs, key)) if len(recs) > 1 else f"{100 * recs[0][key]:.2f}"


def table(grid: Dict[str, Any], key: str, bold: Sequence[str], removed: str = "macs_removed") -> List[str]:
    """One row per method, one column per level; † marks a measured removal more than 1 pt off the level."""
    levels = list(next(iter(grid.values())))
    seeds = {len(recs) for rows in grid.values() for recs in rows.values()}
    lines = [f"Calibration seeds per cell: {', '.join(map(str, sorted(seeds)))}.", "",
             "| method | " + " | ".join(f"{float(L):.1%}".replace(".0%", "%") for L in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for label, rows in grid.items():
        cells = []
        for L in levels:
            off = np.mean([r[removed] for r in rows[L]]) - float(L)
            cells.append(_stat(rows[L], key) + (f" †{100 * off:+.1f}" if abs(off) > 0.01 else ""))
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


def _has(grid: Dict[str, Any], key: str) -> bool:
    return all(key in r for rows in grid.values() for recs in rows.values() for r in recs)


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


def checkpoint_accuracy(name: str) -> str:
    """The last test accuracy in the checkpoint's training log, with its epochs."""
    rows = _log(name)
    tested = [r for r in rows if "test_acc" in r]
    if not tested:
        return "no training log"
    return f"{100 * tested[-1]['test_acc']:.2f} % after {_epochs(_stages(rows))} epochs"


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
        last = [r for r in rows if "test_acc" in r][-1:]
        acc = f"{100 * last[0]['test_acc']:.2f} %" if last else "not measured"
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
                        f"`plan(macs=0.999)`: {t['unreachable']}"]


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
             "(seeds 0, 1, ... as many as each table says); the header is the fraction removed; "
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
        if _has(results["test"], "one_shot"):
            lines += ["### One-shot (no recalibration)", ""] + table(results["test"], "one_shot", bold) + [""]
        lines += [f"![top-1 against MACs kept](accuracy_{name}.png)", ""]
    if "ablation" in results:
        lines += ["## The paper's ablations: parameters removed, ToD against uniform depths (test)", ""]
        if _has(results["ablation"], "one_shot"):
            lines += ["### One-shot (no recalibration)", ""]
            lines += table(results["ablation"], "one_shot", bold, "params_removed") + [""]
        lines += ["### One-shot + BatchNorm recalibration", ""]
        lines += table(results["ablation"], "recalibrated", bold, "params_removed") + [""]
    if "targets" in results:
        lines += ["## Targets: `plan(macs=t)` and `plan(params=t)`, measured after surgery (seed 0)", ""]
        lines += _targets(results["targets"]) + [""]
    for key in ("finetune", "finetune_distill"):
        if key in results:
            lines += _finetuned(results[key])
    return "\n".join(lines)


def _finetuned(ft: Dict[str, Any]) -> List[str]:
    how = f"distilled from the unpruned model, weight {ft['distill']:g}, T 4; " if ft.get("distill") else ""
    device = ft.get("device", "cpu")
    on = "GPU" if device == "cuda" else device.upper()
    lines = [f"## Fine-tuned at {ft['level']:.0%} MACs removed (test; seed 0; {ft['epochs']} epochs, SGD "
             f"lr {ft['lr']}, cosine; {how}on the {on}; unpruned {100 * ft['unpruned']:.2f} %)", "",
             "| method | MACs removed | recalibrated | fine-tuned | vs unpruned |", "|---|---|---|---|---|"]
    for label in [k for k, v in ft.items() if isinstance(v, dict)]:  # the methods fine-tuned
        r = ft[label]
        lines.append(f"| {label} | {100 * r['macs_removed']:.1f} % | {100 * r['recalibrated']:.2f} | "
                     f"{100 * r['finetuned']:.2f} | {100 * (r['finetuned'] - ft['unpruned']):+.2f} pt |")
    return lines + [""]


def _within_std(a: Tuple[float, float], b: Tuple[float, float]) -> bool:
    """Whether two (mean, std) cells differ by no more than the larger standard deviation."""
    return abs(a[0] - b[0]) <= max(a[1], b[1])


def _strongest(ours: Tuple[float, float], rivals: Dict[str, Tuple[float, float]]) -> Tuple[str, float, bool]:
    """The rival with the best mean, the default's lead over it in pt (negative: behind), and whether in noise."""
    label = max(rivals, key=lambda k: rivals[k][0])
    return label, ours[0] - rivals[label][0], _within_std(ours, rivals[label])


def _verdict(ours: Tuple[float, float], rivals: Dict[str, Tuple[float, float]], bold: bool = True) -> str:
    """Ahead of or behind the strongest rival, by how much, and whether within one standard deviation."""
    if not rivals:
        return "-"
    label, gap, noisy = _strongest(ours, rivals)
    noise = " (within one std)" if noisy else ""
    if gap >= 0:
        return f"ahead of {label} by {gap:.2f} pt{noise}"
    mark = "**" if bold else ""
    return f"{mark}behind {label} by {-gap:.2f} pt{mark}{noise}"


def _rivals(grid: Dict[str, Any], level: str, tp_l1: str, key: str = "recalibrated"
            ) -> Tuple[Dict[str, Tuple[float, float]], Optional[str]]:
    """Torch-Pruning global L1 and the best uniform-depth baseline at ``level`` (mean, std), and the latter's name."""
    def has(k: str) -> bool:  # older results lack some columns (one-shot) for some methods
        return level in grid.get(k, {}) and all(key in r for r in grid[k][level])
    tp = {tp_l1: _mean_std(grid[tp_l1][level], key)} if has(tp_l1) else {}
    uni = {k: _mean_std(grid[k][level], key) for k in grid if k.endswith("+ uniform") and has(k)}
    best = max(uni, key=lambda k: uni[k][0]) if uni else None
    return {**tp, **({best: uni[best]} if best else {})}, best


def scoreboard(all_results: Dict[str, Dict[str, Any]], default: str, tp_l1: str) -> List[str]:
    """One line per model and level: the default against Torch-Pruning global L1 and the best uniform baseline."""
    lines = ["| model | MACs removed | FAIR default | Torch-Pruning global L1 | best uniform depths | default is |",
             "|---|---|---|---|---|---|"]
    for name, results in all_results.items():
        grid = results.get("test", {})
        for level, recs in grid.get(default, {}).items():
            ours, (rivals, best) = _mean_std(recs), _rivals(grid, level, tp_l1)
            cells = [_pm(ours), _pm(rivals[tp_l1]) if tp_l1 in rivals else "-",
                     f"{_pm(rivals[best])} ({best})" if best else "-", _verdict(ours, rivals)]
            lines.append(f"| {name} | {float(level):.0%} | " + " | ".join(cells) + " |")
    return lines


def shortfalls(all_results: Dict[str, Dict[str, Any]], default: str, tp_l1: str) -> List[str]:
    """Every comparison on the boards that the default does not clearly win, one bullet each.

    Clearly winning means ahead by more than one standard deviation (one-shot + recalibration and the
    ablations), or ahead at all (fine-tuning, one seed); one-shot cells without recalibration count too.
    """
    out = []
    for name, results in all_results.items():
        out += [f"- {name}, {line}" for line in (_test_shortfalls(results.get("test", {}), default, tp_l1) +
                                                 _ablation_shortfalls(results.get("ablation", {}), default) +
                                                 _finetune_shortfalls(results, default, tp_l1))]
    return out


def _test_shortfalls(grid: Dict[str, Any], default: str, tp_l1: str) -> List[str]:
    out = []
    for key, how in (("recalibrated", "after recalibration"), ("one_shot", "one-shot, no recalibration")):
        for level, recs in grid.get(default, {}).items():
            if not all(key in r for r in recs):
                continue
            ours, rivals = _mean_std(recs, key), _rivals(grid, level, tp_l1, key)[0]
            if not rivals:
                continue
            _, gap, noisy = _strongest(ours, rivals)
            if gap < 0 or noisy:
                out.append(f"{float(level):.0%} MACs removed, {how}: {_verdict(ours, rivals, bold=False)}")
    return out


def _ablation_shortfalls(grid: Dict[str, Any], default: str) -> List[str]:
    out = []
    for level, tod, uni, scores in _ablation_pairs(grid, default):
        noisy = _within_std(tod, uni)
        if tod[0] <= uni[0] or noisy:
            noise = " (within one std)" if noisy else ""
            out.append(f"{float(level):.1%} of parameters removed, {scores} scores: ToD {tod[0] - uni[0]:+.2f} pt "
                       f"against uniform depths{noise}")
    return out


def _finetune_shortfalls(results: Dict[str, Any], default: str, tp_l1: str) -> List[str]:
    out = []
    for ft in (results.get(k, {}) for k in ("finetune", "finetune_distill")):
        if default in ft and tp_l1 not in ft:
            out.append(f"fine-tuned ({_recipe_of(ft)}): no Torch-Pruning row to compare with yet")
        elif default in ft and ft[tp_l1]["finetuned"] >= ft[default]["finetuned"]:
            gap = 100 * (ft[tp_l1]["finetuned"] - ft[default]["finetuned"])
            out.append(f"fine-tuned ({_recipe_of(ft)}): behind {tp_l1} by {gap:.2f} pt (one seed)")
    return out


def _ablation_pairs(grid: Dict[str, Any], default: str):
    """(level, ToD, uniform, scores) per parameters level of the paper's two ablations, (mean, std) each."""
    for scores, tod, uni in (("U", default, "U + uniform"), ("random", "random + ToD", "random + uniform")):
        for level in grid.get(tod, {}):
            if level in grid.get(uni, {}):
                yield level, _mean_std(grid[tod][level]), _mean_std(grid[uni][level]), scores


def ablation_board(all_results: Dict[str, Dict[str, Any]], default: str) -> List[str]:
    """The paper's two ablations per parameters level: ToD against uniform depths, with U and with random scores."""
    lines = [f"| {name} | {float(level):.1%} | {scores} | {_pm(a)} | {_pm(b)} | {a[0] - b[0]:+.2f} pt |"
             for name, results in all_results.items()
             for level, a, b, scores in _ablation_pairs(results.get("ablation", {}), default)]
    head = ["| model | params removed | scores | ToD | uniform depths | ToD - uniform |", "|---|---|---|---|---|---|"]
    return head + lines if lines else []


def _recipe_of(ft: Dict[str, Any]) -> str:
    return f"{ft['epochs']} epochs" + (f", distilled ({ft['distill']:g})" if ft.get("distill") else "")


def finetune_board(all_results: Dict[str, Dict[str, Any]], default: str, tp_l1: str) -> List[str]:
    """Each fine-tuning recipe's default and Torch-Pruning rows against the unpruned checkpoint."""
    lines = []
    for name, results in all_results.items():
        for key in ("finetune", "finetune_distill"):
            ft = results.get(key, {})
            if default not in ft and tp_l1 not in ft:
                continue
            how = _recipe_of(ft)
            cell = {k: f"{100 * ft[k]['finetuned']:.2f} ({100 * (ft[k]['finetuned'] - ft['unpruned']):+.2f} pt)"
                    if k in ft else "-" for k in (default, tp_l1)}
            lines.append(f"| {name} | {ft['level']:.0%} | {how} | {100 * ft['unpruned']:.2f} | {cell[default]} | "
                         f"{cell[tp_l1]} |")
    head = ["| model | MACs removed | fine-tuning | unpruned | FAIR default | Torch-Pruning global L1 |",
            "|---|---|---|---|---|---|"]
    return head + lines if lines else []


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
              "against Torch-Pruning and the best of the uniform-depth baselines:", "",
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
