"""The boards of the README's accuracy section: the default against its rivals, the paper's ablations,
fine-tuning, and the list of comparisons the default does not clearly win (from results dicts only)."""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np


def _mean_std(recs: List[dict], key: str = "recalibrated") -> Tuple[float, float]:
    v = [100 * r[key] for r in recs]
    return float(np.mean(v)), float(np.std(v))


def _pm(ms: Tuple[float, float]) -> str:
    return f"{ms[0]:.2f} ± {ms[1]:.2f}"


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


def _measured(grid: Dict[str, Any], label: str, level: str, key: str = "recalibrated") -> bool:
    """Whether ``label`` has a cell at ``level`` with ``key`` in every record (older results and ``--skip-one-shot``
    runs lack the one-shot column)."""
    return level in grid.get(label, {}) and all(key in r for r in grid[label][level])


def _torch_pruning(labels: Iterable[str], tp_l1: str) -> List[str]:
    """Torch-Pruning global L1, then every other Torch-Pruning method among ``labels`` by name."""
    return [tp_l1] + sorted({k for k in labels if k.startswith("Torch-Pruning") and k != tp_l1})


def _rivals(grid: Dict[str, Any], level: str, tp_l1: str, key: str = "recalibrated"
            ) -> Tuple[Dict[str, Tuple[float, float]], Optional[str]]:
    """Torch-Pruning's methods (global L1, and any other measured, e.g. global Taylor) and the best uniform-depth
    baseline at ``level`` (mean, std), and the latter's name."""
    tp = {k: _mean_std(grid[k][level], key) for k in _torch_pruning(grid, tp_l1) if _measured(grid, k, level, key)}
    uni = {k: _mean_std(grid[k][level], key) for k in grid
           if k.endswith("+ uniform") and _measured(grid, k, level, key)}
    best = max(uni, key=lambda k: uni[k][0]) if uni else None
    return {**tp, **({best: uni[best]} if best else {})}, best


def usual_seeds(grid: Dict[str, Any]) -> int:
    """The most common number of seeds per cell of a results grid (0 when it is empty; a tie goes to the count
    met first)."""
    counts = Counter(len(recs) for rows in grid.values() if isinstance(rows, dict) for recs in rows.values())
    return counts.most_common(1)[0][0] if counts else 0


def seeds_mixed(grid: Dict[str, Any]) -> bool:
    """Whether some cell of a results grid holds another number of seeds than the usual one."""
    usual = usual_seeds(grid)
    return any(len(recs) != usual for rows in grid.values() if isinstance(rows, dict) for recs in rows.values())


def seeds_note(recs: List[dict], usual: int) -> str:
    """`` (5 seeds)`` after a cell whose seed count is not its table's usual one, else nothing."""
    return f" ({len(recs)} seeds)" if len(recs) != usual else ""


def _best_cell(recs: List[dict], label: str, usual: int) -> str:
    n = f"{len(recs)} seeds; " if len(recs) != usual else ""
    return f"{_pm(_mean_std(recs))} ({n}{label})"


def scoreboard(all_results: Dict[str, Dict[str, Any]], default: str, tp_l1: str) -> List[str]:
    """One line per model and level: the default against Torch-Pruning (global L1, and a column for each other
    Torch-Pruning method any model measured) and the best uniform baseline."""
    tps = _torch_pruning((k for r in all_results.values() for k in r.get("test", {})), tp_l1)
    lines = ["| model | MACs removed | FAIR default | " + " | ".join(tps) + " | best uniform depths | default is |",
             "|---|---|---|" + "---|" * len(tps) + "---|---|"]
    for name, results in all_results.items():
        grid = results.get("test", {})
        usual = usual_seeds(grid)

        def cell(label: str, level: str) -> str:
            if not _measured(grid, label, level):
                return "-"
            return _pm(_mean_std(grid[label][level])) + seeds_note(grid[label][level], usual)
        for level, recs in grid.get(default, {}).items():
            ours, (rivals, best) = _mean_std(recs), _rivals(grid, level, tp_l1)
            cells = [cell(default, level), *(cell(k, level) for k in tps),
                     _best_cell(grid[best][level], best, usual) if best else "-", _verdict(ours, rivals)]
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
    out, usual = [], usual_seeds(grid)
    for key, how in (("recalibrated", "after recalibration"), ("one_shot", "one-shot, no recalibration")):
        for level, recs in grid.get(default, {}).items():
            if not all(key in r for r in recs):
                continue
            ours, rivals = _mean_std(recs, key), _rivals(grid, level, tp_l1, key)[0]
            if not rivals:
                continue
            _, gap, noisy = _strongest(ours, rivals)
            if gap < 0 or noisy:
                out.append(f"{float(level):.0%} MACs removed{seeds_note(recs, usual)}, {how}: "
                           f"{_verdict(ours, rivals, bold=False)}")
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
    for ft in (results[k] for k in finetune_keys(results)):
        if default in ft and tp_l1 not in ft:
            out.append(f"fine-tuned ({_recipe_of(ft)}): no Torch-Pruning row to compare with yet")
        elif tp_l1 in ft and default not in ft:
            out.append(f"fine-tuned ({_recipe_of(ft)}): no row of the default to compare with yet")
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


def finetune_keys(results: Dict[str, Any]) -> List[str]:
    """A results file's fine-tuning parts, one per recipe (plain or distilled, and the epochs: a short budget and
    a long one are both kept), plain first, then by epochs.

    Example:
        >>> finetune_keys({"test": {}, "finetune_distill_5ep": {"epochs": 5, "distill": 0.9},
        ...                "finetune_distill_1ep": {"epochs": 1, "distill": 0.9}, "finetune": {"epochs": 10}})
        ['finetune', 'finetune_distill_1ep', 'finetune_distill_5ep']
    """
    keys = [k for k in results if k == "finetune" or k.startswith("finetune_")]
    return sorted(keys, key=lambda k: (bool(results[k].get("distill")), results[k].get("epochs", 0), k))


def epochs_of(ft: Dict[str, Any]) -> str:
    """A fine-tuning part's length: "1 epoch", "15 epochs"."""
    n = ft["epochs"]
    return f"{n} epoch{'s' if n != 1 else ''}"


def _recipe_of(ft: Dict[str, Any]) -> str:
    return epochs_of(ft) + (f", distilled ({ft['distill']:g})" if ft.get("distill") else "")


def finetune_board(all_results: Dict[str, Dict[str, Any]], default: str, tp_l1: str) -> List[str]:
    """Each fine-tuning recipe's default and Torch-Pruning rows against the unpruned checkpoint."""
    lines = []
    for name, results in all_results.items():
        for ft in (results[k] for k in finetune_keys(results)):
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
