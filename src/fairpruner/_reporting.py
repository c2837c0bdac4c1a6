"""Pruning reports: per-group unit counts, measured params/MACs/latency/accuracy, text tables and plots."""
from __future__ import annotations

import json
import os
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ._core.inputs import as_args, device_of, to_device
from ._errors import FairPrunerError
from ._measure.counting import count_macs, count_params, measure_latency
from ._planning.options import AUTO_TARGETS
from ._planning.plans import Plan
from ._pruning.io import check_made_by
from ._recovery import evaluate

__all__ = ["Report", "report", "format_sweep", "format_plan", "plot_sweep"]

REPORT_VERSION = 1
PathLike = Union[str, "os.PathLike[str]"]


def _count(n: Optional[float]) -> str:
    """Exact counts below a million, then 3 significant digits with a K/M/G suffix."""
    if n is None:
        return "-"
    if abs(n) < 1e6:
        return f"{int(round(n)):,}"
    for div, suffix in ((1e9, "G"), (1e6, "M")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return str(n)  # unreachable


def _pct(x: Optional[float], digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Plain-text table: the first ``left`` columns left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _group_rows(plan: Plan) -> List[Dict[str, Any]]:
    rows = []
    for g in plan.groups:
        removed = len(plan.removed.get(g["name"], []))
        rows.append({"name": g["name"], "units_before": int(g["units"]), "units_after": int(g["units"]) - removed,
                     "removed": removed / max(int(g["units"]), 1)})
    return rows


def _group_table(groups: Sequence[Dict[str, Any]]) -> str:
    before = sum(g["units_before"] for g in groups)
    after = sum(g["units_after"] for g in groups)
    rows = [[g["name"], str(g["units_before"]), str(g["units_after"]), _pct(g["removed"])] for g in groups]
    rows.append(["total", str(before), str(after), _pct(1 - after / before if before else 0.0)])
    return _table(["group", "units before", "units after", "removed"], rows)


def _plan_heading(plan_settings: Dict[str, Any], alpha: Optional[float]) -> str:
    parts = [f"alpha {alpha:.4g}" if alpha is not None else "no alpha (uniform allocation)"]
    target = plan_settings.get("target") or {}
    achieved = plan_settings.get("achieved") or {}
    for key, value in target.items():
        if key != "alpha":
            got = f" (achieved -{_pct(achieved[key])})" if key in achieved else ""
            parts.append(f"target {key} -{_pct(value)}{got}")
    for key in ("signal", "allocation"):
        if key in plan_settings:
            parts.append(f"{key} {plan_settings[key]}")
    if plan_settings.get("allocation") == "tod":
        for key, fmt in (("floor", str), ("macs_power", "{:g}".format), ("width_power", "{:g}".format)):
            used = plan_settings.get(f"{key}_used")
            if used is not None:  # "auto" chooses for these targets only; elsewhere it is a fixed rule
                auto = plan_settings.get(key) == "auto" and set(target) & set(AUTO_TARGETS[key])
                parts.append(f"{key} {fmt(used)}" + (" (auto: least total R)" if auto else ""))
    return ", ".join(parts)


def format_plan(plan: Plan) -> str:
    """Per-group table of a plan and its predicted parameter and MAC totals.

    Args:
        plan: from :func:`fairpruner.plan`.

    Returns:
        Multi-line text, aligned for a terminal.

    Example:
        >>> print(fp.format_plan(fp.plan(scores, macs=0.5)))
    """
    p = plan.predicted
    lines = [f"plan: {_plan_heading(plan.settings, plan.alpha)}", "", _group_table(_group_rows(plan))]
    if p:
        rows = [[name, _count(p[f"{key}_before"]), _count(p[f"{key}_after"]),
                 _pct(-(1 - p[f"{key}_after"] / p[f"{key}_before"]) if p[f"{key}_before"] else None)]
                for name, key in (("params", "params"), ("MACs", "macs"))]
        lines += ["", _table(["predicted", "before", "after", "change"], rows)]
    return "\n".join(lines)


def format_sweep(rows: Sequence[Dict[str, float]], accuracy: Optional[Sequence[Optional[float]]] = None) -> str:
    """Text table of a sweep: per alpha, or per params/MACs target (asked beside achieved).

    Args:
        rows: from :func:`fairpruner.sweep` (fractions removed per alpha or per target).
        accuracy: optional accuracy (in [0, 1]) of the model pruned at each alpha, aligned with ``rows``;
            by default taken from an ``"accuracy"`` key of the rows when present.

    Returns:
        Multi-line text, aligned for a terminal.

    Example:
        >>> print(fp.format_sweep(fp.sweep(scores, macs=[0.2, 0.35, 0.5])))
    """
    accuracy = _sweep_accuracy(rows, accuracy)
    asked = [k for k in ("params", "macs") if rows and all(r.get("target_key") == k for r in rows)]
    header = ([f"asked ({asked[0] if asked[0] == 'params' else 'MACs'})"] if asked else []) + \
        ["alpha", "units removed", "params removed", "MACs removed"]
    if accuracy is not None:
        header.append("accuracy")
    table, refused = [], []
    for i, r in enumerate(rows):
        cells = [_pct(r["target"])] if asked else []
        if "refused" in r:  # a target beyond one round: its reason goes under the table
            cells += ["refused", "-", "-", "-"] + (["-"] if accuracy is not None else [])
            refused.append(f"refused: {r['refused']}")  # the message prints the target to enough digits
            table.append(cells)
            continue
        cells += [f"{r['alpha']:.3g}", _pct(r["units_removed"]), _pct(r["params_removed"]), _pct(r["macs_removed"])]
        if accuracy is not None:
            cells.append(_pct(accuracy[i], 2))
        table.append(cells)
    return "\n".join([_table(header, table, left=0)] + refused)


def _sweep_accuracy(rows: Sequence[Dict[str, float]], accuracy: Optional[Sequence[Optional[float]]]
                    ) -> Optional[List[Optional[float]]]:
    planned = [r for r in rows if "refused" not in r]  # a refused target has no accuracy to give
    if accuracy is None and planned and all("accuracy" in r for r in planned):
        accuracy = [r.get("accuracy") for r in rows]
    if accuracy is None:
        return None
    accuracy = list(accuracy)
    if len(accuracy) != len(rows):
        raise FairPrunerError(f"Got {len(accuracy)} accuracy values for {len(rows)} sweep rows; give one per row.")
    return accuracy


@dataclass
class Report:
    """What pruning did to a model: per-group unit counts and measured totals.

    Attributes:
        groups: one dict per group: ``name``, ``units_before``, ``units_after``, ``removed`` (fraction).
        totals: ``params_before/after``, ``macs_before/after`` (per sample), ``latency_before/after``
            (median seconds per forward pass of the example batch, None if not measured), ``batch_size``,
            ``device``, ``threads`` (torch CPU threads), ``accuracy_before/after`` (None without an evaluation
            loader), ``accuracy_stages`` (accuracy of earlier stages of the pruned model, e.g. one-shot and
            recalibrated, in order), ``final_stage`` (what the pruned model's accuracy row is called then) and
            ``alpha``.
        predicted: the plan's predicted params/MACs, for comparison with the measured totals.
        settings: the plan's settings (signal, allocation, target).
    """

    groups: List[Dict[str, Any]]
    totals: Dict[str, Any]
    predicted: Dict[str, float] = field(default_factory=dict)
    settings: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict that :meth:`from_dict` reads back."""
        return {"format": "fairpruner.report", "version": REPORT_VERSION, **asdict(self)}

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Report":
        """Rebuilds a report from :meth:`to_dict` output."""
        if d.get("format") != "fairpruner.report":
            raise FairPrunerError("This is not a fairpruner report (write one with Report.to_json).")
        return cls([dict(g) for g in d["groups"]], dict(d["totals"]), dict(d.get("predicted", {})),
                   dict(d.get("settings", {})))

    @classmethod
    def from_json(cls, text: str) -> "Report":
        """Rebuilds a report from :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))

    def to_text(self) -> str:
        """An aligned plain-text report: the per-group table, then measured totals before and after."""
        t = self.totals
        rows = []
        for label, key in (("params", "params"), ("MACs / sample", "macs")):
            b, a = t.get(f"{key}_before"), t.get(f"{key}_after")
            change = "-" if not b else f"{-(1 - a / b) * 100:+.1f}%" + (f" ({b / a:.2f}x fewer)" if 0 < a < b else "")
            rows.append([label, _count(b), _count(a), change])
        lb, la = t.get("latency_before"), t.get("latency_after")
        if lb is not None and la is not None:
            where = f"batch {t.get('batch_size', '?')}, {t.get('device', 'cpu')}"
            if t.get("threads") and t.get("device", "cpu") == "cpu":
                where += f", {t['threads']} thread{'s' if t['threads'] > 1 else ''}"
            rows.append([f"latency ({where})", f"{lb * 1e3:.3g} ms", f"{la * 1e3:.3g} ms",
                         f"{lb / la:.2f}x faster" if la > 0 else "-"])
        ab, aa = t.get("accuracy_before"), t.get("accuracy_after")
        for stage, acc in (t.get("accuracy_stages") or {}).items():
            if ab is not None and acc is not None:
                rows.append([f"top-1 accuracy, {stage}", _pct(ab, 2), _pct(acc, 2), f"{100 * (acc - ab):+.2f} pt"])
        if ab is not None and aa is not None:
            label = "top-1 accuracy" + (f", {t.get('final_stage') or 'final'}" if t.get("accuracy_stages") else "")
            rows.append([label, _pct(ab, 2), _pct(aa, 2), f"{100 * (aa - ab):+.2f} pt"])
        heading = f"FAIR-Pruner report: {_plan_heading(self.settings, t.get('alpha'))}"
        return "\n".join([heading, "", _group_table(self.groups), "",
                          _table(["measured", "before", "after", "change"], rows)])

    def plot(self, directory: PathLike, sweep: Optional[Sequence[Dict[str, float]]] = None,
             accuracy: Optional[Sequence[Optional[float]]] = None) -> List[Path]:
        """Writes PNG charts into ``directory`` (created if missing).

        Args:
            directory: where the files go; nothing is written elsewhere.
            sweep: optional rows of :func:`fairpruner.sweep`; adds ``sweep.png`` (see :func:`plot_sweep`).
            accuracy: optional accuracy per sweep row, drawn on the sweep chart.

        Returns:
            Paths of the written files: ``removal_by_group.png`` and, with ``sweep``, ``sweep.png``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = [_plot_groups(self.groups, directory / "removal_by_group.png",
                              f"Units removed per group ({_plan_heading(self.settings, self.totals.get('alpha'))})")]
        if sweep is not None:
            paths.append(plot_sweep(sweep, directory / "sweep.png", accuracy))
        return paths


def _figure(width: float, height: float):
    # An unattached Figure renders through Agg and never touches pyplot's global figure registry.
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _plot_groups(groups: Sequence[Dict[str, Any]], path: Path, title: str) -> Path:
    names = [g["name"] for g in groups]
    fig = _figure(8, min(2 + 0.28 * len(names), 60))
    ax = fig.add_subplot()
    y = list(range(len(names)))
    bars = ax.barh(y, [100 * g["removed"] for g in groups], color="#4c72b0")
    ax.bar_label(bars, [f" {g['units_before'] - g['units_after']}/{g['units_before']}" for g in groups], fontsize=7)
    ax.set_yticks(y, names, fontsize=8 if len(names) < 40 else 6)
    ax.invert_yaxis()  # first group on top, as in the text table
    ax.set_xlim(0, 100)
    ax.set_xlabel("units removed (%)")
    ax.set_title(textwrap.fill(title, 90), fontsize=10)  # a plan's settings make a long title
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, format="png")
    return path


def plot_sweep(rows: Sequence[Dict[str, float]], path: PathLike,
               accuracy: Optional[Sequence[Optional[float]]] = None) -> Path:
    """Writes a PNG of parameters, MACs and units removed against alpha, or against the target asked for a
    params/MACs sweep (and accuracy, if given).

    Args:
        rows: from :func:`fairpruner.sweep`.
        path: the PNG file to write (its directory is created if missing).
        accuracy: optional accuracy (in [0, 1]) per row, drawn on a second axis; by default taken from an
            ``"accuracy"`` key of the rows when present.

    Returns:
        ``path``.

    Example:
        >>> fp.plot_sweep(fp.sweep(scores), "sweep.png")
    """
    if not rows:
        raise FairPrunerError("The sweep has no rows to plot.")
    accuracy = _sweep_accuracy(rows, accuracy)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A target sweep is drawn against the targets asked (its plans' alphas come from different rules).
    asked = rows[0].get("target_key")
    x_of = (lambda r: 100 * r["target"]) if asked else (lambda r: r["alpha"])
    rows = sorted(((r, a) for r, a in zip(rows, accuracy or [None] * len(rows)) if "refused" not in r),
                  key=lambda ra: x_of(ra[0]))  # a refused target has nothing to draw
    if not rows:
        raise FairPrunerError("Every target of the sweep was refused; there is nothing to plot.")
    alphas = [x_of(r) for r, _ in rows]
    fig = _figure(7, 4.2)
    ax = fig.add_subplot()
    for key, label, style in (("params_removed", "params removed", "o-"), ("macs_removed", "MACs removed", "s-"),
                              ("units_removed", "units removed", "^--")):
        ax.plot(alphas, [100 * r[key] for r, _ in rows], style, label=label)
    ax.set_xlabel(f"{'MACs' if asked == 'macs' else 'params'} removal asked (%)" if asked else "alpha (ToD level)")
    ax.set_ylabel("removed (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if accuracy is not None:
        pts = [(a, 100 * acc) for a, (_, acc) in zip(alphas, rows) if acc is not None]
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "d-", color="#c44e52", label="accuracy (pruned)")
        ax2.set_ylabel("top-1 accuracy (%)")
        ax2.set_ylim(0, 100)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best", fontsize=8)
    ax.set_title(f"{'Target' if asked else 'Alpha'} sweep: what one set of scores can remove", fontsize=10)
    fig.savefig(path, format="png")
    return path


def _on_device(example_inputs: Any, model: nn.Module) -> tuple:
    return to_device(as_args(example_inputs), device_of(model))


def report(original: nn.Module, pruned: nn.Module, plan: Plan, example_inputs: Any,
           eval_loader: Optional[Iterable] = None, latency_repeats: int = 20,
           stages: Optional[Mapping[str, nn.Module]] = None, final_stage: str = "final",
           progress: Optional[bool] = None) -> Report:
    """Measures what pruning did: params, MACs, latency and (optionally) accuracy, before and after.

    Parameters and MACs are counted on the real models (not the plan's prediction); latency is the median
    eval-mode forward time of ``example_inputs`` on each model's device. Neither model is modified.

    Args:
        original: the unpruned model.
        pruned: the pruned (possibly fine-tuned) model.
        plan: the plan that made ``pruned``.
        example_inputs: a batch of inputs (tensor or tuple of tensors); MACs are per sample, latency is for
            the whole batch.
        eval_loader: optional ``(inputs, targets)`` loader; adds top-1 accuracy before and after.
        latency_repeats: timed forward passes per model; 0 skips the latency measurement.
        stages: earlier states of the pruned model to measure on ``eval_loader`` too, by name and in order,
            e.g. ``{"one-shot": fp.prune(model, plan), "recalibrated": recalibrated_copy}``; ``pruned`` is
            reported as the final state, named ``final_stage``.
        final_stage: the name of ``pruned``'s accuracy row when ``stages`` are given.
        progress: progress bars while evaluating; by default only when stderr is a terminal.

    Returns:
        A :class:`Report`.

    Raises:
        PlanError: if ``pruned`` was not made by ``plan`` (arguments swapped, another plan's model).

    Example:
        >>> pruned = fp.prune(model, plan)
        >>> recal = fp.recalibrate(copy.deepcopy(pruned), shuffled_train_loader, max_batches=10)
        >>> tuned = fp.finetune(copy.deepcopy(recal), train_loader)
        >>> rep = fp.report(model, tuned, plan, x, test_loader, stages={"one-shot": pruned, "recalibrated": recal},
        ...                 final_stage="fine-tuned")
        >>> print(rep.to_text())
    """
    if latency_repeats < 0:
        raise FairPrunerError(f"latency_repeats must be >= 0, got {latency_repeats}.")
    check_made_by(pruned, plan, "report")
    x_orig, x_pruned = _on_device(example_inputs, original), _on_device(example_inputs, pruned)
    first = next((t for t in x_orig if torch.is_tensor(t)), None)
    totals: Dict[str, Any] = {
        "params_before": count_params(original), "params_after": count_params(pruned),
        "macs_before": count_macs(original, x_orig), "macs_after": count_macs(pruned, x_pruned),
        "latency_before": None, "latency_after": None,
        "batch_size": int(first.shape[0]) if first is not None and first.dim() > 0 else 1,
        "device": str(first.device) if first is not None else "cpu", "threads": torch.get_num_threads(),
        "accuracy_before": None, "accuracy_after": None, "accuracy_stages": {}, "final_stage": final_stage,
        "alpha": plan.alpha,
    }
    if latency_repeats:
        totals["latency_before"] = measure_latency(original, x_orig, repeats=latency_repeats)
        totals["latency_after"] = measure_latency(pruned, x_pruned, repeats=latency_repeats)
    if eval_loader is not None:
        def acc(m: nn.Module, what: str) -> float:
            return evaluate(m, eval_loader, progress=progress, desc=f"evaluating {what}")
        totals["accuracy_before"] = acc(original, "the original")
        totals["accuracy_after"] = acc(pruned, f"({final_stage})")
        totals["accuracy_stages"] = {name: acc(m, f"({name})") for name, m in (stages or {}).items()}
    settings = {k: v for k, v in plan.settings.items()
                if k in ("signal", "allocation", "target", "achieved", "seed", "stream_weight", "stream_floor",
                         "floor", "floor_used", "macs_power", "macs_power_used", "width_power",
                         "width_power_used")}
    return Report(_group_rows(plan), totals, dict(plan.predicted), settings)
