"""Tests for fairpruner._reporting: report, Report (text, JSON, plots), format_sweep and plot_sweep."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fairpruner as fp
from fairpruner import zoo
from fairpruner._errors import FairPrunerError
from fairpruner._reporting import format_plan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def setup():
    """An (untrained) digits CNN, its scores on random labelled inputs, a plan and the pruned model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = zoo.create("digits_cnn").eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 1, 8, 8, generator=g), torch.arange(60) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=30)
    scores = fp.score(model, loader, samples_per_class=8, projections=8, progress=False)
    plan = fp.plan(scores, alpha=0.3)
    return model, scores, plan, fp.prune(model, plan), x[:16], loader


def test_report_measures_real_models(setup):
    model, _, plan, pruned, example, loader = setup
    rep = fp.report(model, pruned, plan, example, eval_loader=loader, latency_repeats=2)
    t = rep.totals
    assert t["params_before"] == fp.count_params(model) and t["params_after"] == fp.count_params(pruned)
    assert t["macs_before"] == fp.count_macs(model, example) and t["macs_after"] == fp.count_macs(pruned, example)
    assert t["params_after"] < t["params_before"]
    assert t["latency_before"] > 0 and t["latency_after"] > 0
    assert t["batch_size"] == 16 and t["alpha"] == plan.alpha
    assert t["accuracy_before"] == pytest.approx(fp.evaluate(model, loader))
    assert t["accuracy_after"] == pytest.approx(fp.evaluate(pruned, loader))
    assert not model.training and not pruned.training
    # Per-group rows follow the plan.
    assert [g["name"] for g in rep.groups] == [g["name"] for g in plan.groups]
    for row, g in zip(rep.groups, plan.groups):
        assert row["units_before"] == g["units"]
        assert row["units_after"] == g["units"] - len(plan.removed[g["name"]])
        assert row["removed"] == pytest.approx(len(plan.removed[g["name"]]) / g["units"])


def test_report_refuses_models_the_plan_did_not_make(setup):
    model, scores, plan, pruned, example, _ = setup
    with pytest.raises(fp.PlanError, match="another plan"):
        fp.report(model, pruned, fp.plan(scores, alpha=0.6), example, latency_repeats=0)
    with pytest.raises(fp.PlanError, match="parameters"):  # original and pruned swapped
        fp.report(pruned, model, plan, example, latency_repeats=0)


def test_text_table(setup):
    model, _, plan, pruned, example, loader = setup
    rep = fp.report(model, pruned, plan, example, eval_loader=loader, latency_repeats=1)
    text = rep.to_text()
    lines = text.splitlines()
    assert "alpha 0.3" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("group"))
    assert "units before" in lines[header] and "units after" in lines[header] and "removed" in lines[header]
    for row in rep.groups:
        line = next(ln for ln in lines if ln.startswith(row["name"] + " "))
        cells = line.split()
        assert cells[1:3] == [str(row["units_before"]), str(row["units_after"])]
        assert cells[3] == f"{100 * row['removed']:.1f}%"
    total = next(ln for ln in lines if ln.startswith("total"))
    assert total.split()[1] == str(plan.units_total)
    assert total.split()[2] == str(plan.units_total - plan.units_removed)
    for label in ("params", "MACs / sample", "latency (batch 16,", "top-1 accuracy"):
        assert any(ln.startswith(label) for ln in lines), label
    assert f"{rep.totals['params_before']:,}" in text and f"{rep.totals['params_after']:,}" in text
    # Aligned columns: every row of the group table is as wide as its rule at most.
    rule = lines[header + 1]
    assert set(rule) <= {"-", " "}
    assert all(len(ln) <= len(rule) for ln in lines[header:header + len(rep.groups) + 3])


def test_text_without_accuracy_or_latency(setup):
    model, _, plan, pruned, example, _ = setup
    rep = fp.report(model, pruned, plan, example, latency_repeats=0)
    assert rep.totals["accuracy_before"] is None and rep.totals["latency_before"] is None
    text = rep.to_text()
    assert "accuracy" not in text and "latency" not in text and "params" in text


def test_json_round_trip(setup):
    model, _, plan, pruned, example, loader = setup
    rep = fp.report(model, pruned, plan, example, eval_loader=loader, latency_repeats=1)
    d = json.loads(rep.to_json())
    assert d["format"] == "fairpruner.report"
    assert d["totals"]["params_after"] == rep.totals["params_after"]
    back = fp.Report.from_json(rep.to_json())
    assert back == rep
    assert back.to_text() == rep.to_text()
    assert fp.Report.from_dict(rep.to_dict()) == rep
    with pytest.raises(FairPrunerError):
        fp.Report.from_json(json.dumps({"format": "something else"}))


def test_plots_are_png_files_in_the_directory_only(setup, tmp_path, monkeypatch):
    model, scores, plan, pruned, example, _ = setup
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rep = fp.report(model, pruned, plan, example, latency_repeats=0)
    rows = fp.sweep(scores, (0.0, 0.1, 0.3))
    paths = rep.plot(tmp_path / "plots" / "nested", sweep=rows, accuracy=[0.9, 0.8, None])
    assert [p.name for p in paths] == ["removal_by_group.png", "sweep.png"]
    for p in paths:
        assert p.parent == tmp_path / "plots" / "nested"
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 1000
    assert sorted(x.name for x in (tmp_path / "plots" / "nested").iterdir()) == ["removal_by_group.png",
                                                                                  "sweep.png"]
    assert list(cwd.iterdir()) == []
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cwd", "plots"]
    # Plotting goes through standalone Figures: no pyplot figure is left open.
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_plot_sweep(setup, tmp_path):
    _, scores, *_ = setup
    rows = fp.sweep(scores, (0.0, 0.05, 0.2, 0.5))
    out = fp.plot_sweep(rows, tmp_path / "s.png")
    assert out == tmp_path / "s.png" and out.read_bytes()[:8] == PNG_MAGIC
    out = fp.plot_sweep(rows, tmp_path / "a.png", accuracy=[0.9, 0.85, 0.5, 0.1])
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(FairPrunerError):
        fp.plot_sweep([], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_format_sweep(setup):
    _, scores, *_ = setup
    rows = fp.sweep(scores, (0.0, 0.1, 0.5))
    text = fp.format_sweep(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["alpha", "units", "removed", "params", "removed", "MACs", "removed"]
    assert len(lines) == 2 + len(rows)
    for line, r in zip(lines[2:], rows):
        cells = line.split()
        assert float(cells[0]) == pytest.approx(r["alpha"])
        assert cells[1:] == [f"{100 * r[k]:.1f}%" for k in ("units_removed", "params_removed", "macs_removed")]
    with_acc = fp.format_sweep(rows, accuracy=[0.98765, 0.5, None])
    assert "accuracy" in with_acc.splitlines()[0]
    assert with_acc.splitlines()[2].endswith("98.77%") and with_acc.splitlines()[4].endswith("-")
    # Accuracy may also ride along in the rows.
    assert fp.format_sweep([dict(r, accuracy=0.5) for r in rows]).splitlines()[2].endswith("50.00%")
    with pytest.raises(FairPrunerError, match="accuracy"):
        fp.format_sweep(rows, accuracy=[0.5])


def test_format_plan(setup):
    _, _, plan, *_ = setup
    text = format_plan(plan)
    assert "alpha 0.3" in text.splitlines()[0]
    for g in plan.groups:
        assert g["name"] in text
    assert "predicted" in text and f"{int(plan.predicted['params_before']):,}" in text
    assert "floor free" in text.splitlines()[0] and "auto" not in text.splitlines()[0]  # an alpha: no choice


def test_format_plan_names_what_auto_chose(setup):
    """A target plan's heading says which floor rule, MACs power and width power "auto" took; a fixed one, or
    the width power of a params target (auto does not choose there), is not "auto"."""
    _, scores, *_ = setup
    p = fp.plan(scores, macs=0.3)
    head = format_plan(p).splitlines()[0]
    assert f"floor {p.settings['floor_used']} (auto: least total R)" in head
    assert f"macs_power {p.settings['macs_power_used']:g} (auto: least total R)" in head
    assert f"width_power {p.settings['width_power_used']:g} (auto: least total R)" in head
    head = format_plan(fp.plan(scores, macs=0.3, floor="sqrt", macs_power=0.25, width_power=1)).splitlines()[0]
    assert "floor sqrt," in head and "macs_power 0.25," in head and "width_power 1" in head and "auto" not in head
    head = format_plan(fp.plan(scores, params=0.3)).splitlines()[0]
    assert head.endswith("width_power 0") and "macs_power" in head and "(auto: least total R)" in head
