"""Tests for fairpruner.cli: the ``fairpruner`` command line (parser, commands, demo), run in-process through
``main``, plus one real subprocess."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fairpruner as fp
from fairpruner import zoo
from fairpruner.cli import commands, main

COMMANDS = ("run", "demo", "score", "plan", "prune", "report", "finetune")
SRC = Path(__file__).resolve().parents[2] / "src"


def _listing(path: Path) -> set:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory inside tmp_path, with a seeded (untrained) digits CNN state_dict."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(zoo.create("digits_cnn").state_dict(), work / "w.pt")
    return work


def test_top_level_help_and_no_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS) and "the common path, in one command" in out
    assert main([]) == 2


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help_has_a_worked_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: fairpruner {command}" in out
    assert "example:" in out and f"fairpruner {command}" in out.split("example:", 1)[1]
    assert "--fast" not in out


def test_demo_fast_in_process(workdir, capsys):
    before = _listing(workdir)
    assert main(["demo", "--fast", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "alpha sweep" in out and "MACs removed" in out and "accuracy" in out
    assert "FAIR-Pruner report" in out and "units before" in out and "top-1 accuracy" in out
    assert _listing(workdir) == before  # no --out: nothing written

    assert main(["demo", "--fast", "--no-progress", "--out", "results"]) == 0
    written = {p.name for p in (workdir / "results").iterdir()}
    assert written == {"report.json", "report.txt", "plan.json", "original.pt", "pruned.pt",
                       "removal_by_group.png", "sweep.png"}
    assert _listing(workdir) - before == {"results"} | {f"results/{n}" for n in written}
    rep = fp.Report.from_json((workdir / "results" / "report.json").read_text())
    assert rep.totals["accuracy_after"] is not None
    # The saved model reloads on a fresh architecture.
    pruned = fp.load(workdir / "results" / "pruned.pt", zoo.create("digits_cnn"))
    assert fp.count_params(pruned) == rep.totals["params_after"]


def test_real_demo_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "fairpruner.cli", "demo", "--no-progress"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    trained = re.search(r"trained .* test accuracy ([\d.]+)%", out)
    assert trained and float(trained.group(1)) >= 95.0
    # The sweep table (with one-shot accuracy) and the report table.
    assert re.search(r"alpha\s+units removed\s+params removed\s+MACs removed\s+accuracy", out)
    assert re.search(r"group\s+units before\s+units after\s+removed", out)
    for row in ("params", "MACs / sample", "latency", "top-1 accuracy", "total"):
        assert re.search(rf"^{re.escape(row)}", out, re.M), row
    final = re.search(r"fine-tuned .* -> ([\d.]+)%", out)
    assert final and float(final.group(1)) >= 90.0
    assert list(tmp_path.iterdir()) == []


def test_score_plan_prune_finetune_report_chain(workdir, capsys):
    before = _listing(workdir)
    common = ["--model", "zoo:digits_cnn", "--no-progress"]
    assert main(["score", *common, "--weights", "w.pt", "--data", "digits", "--samples-per-class", "8",
                 "--projections", "16", "--out", "out/scores.pt"]) == 0
    assert "scored 3 groups" in capsys.readouterr().out

    assert main(["plan", "--scores", "out/scores.pt", "--sweep", "--alphas", "0,0.1,0.3"]) == 0
    out = capsys.readouterr().out
    assert "MACs removed" in out and "not written" not in out and len(out.strip().splitlines()) == 6

    assert main(["plan", "--scores", "out/scores.pt", "--macs", "0.4", "--out", "out/plan.json"]) == 0
    out = capsys.readouterr().out
    assert "units before" in out and "predicted" in out and "target macs" in out
    plan = fp.Plan.from_json((workdir / "out" / "plan.json").read_text())
    assert 1 - plan.predicted["macs_after"] / plan.predicted["macs_before"] >= 0.4 - 0.005
    assert plan.settings["stream_floor"] == "shallow" and plan.settings["stream_weight"] == 8
    assert plan.settings["floor"] == "auto" and plan.settings["ties"] == "r"
    assert plan.settings["floor_used"] in ("free", "sqrt") and f"floor {plan.settings['floor_used']} (auto" in out
    assert plan.settings["width_power"] == "auto" and plan.settings["width_power_used"] in (0, 1)
    assert main(["plan", "--scores", "out/scores.pt", "--macs", "0.4", "--stream-floor", "free", "--stream-weight",
                 "2", "--floor", "sqrt", "--width-power", "0.5", "--out", "out/plan_free.json"]) == 0
    capsys.readouterr()
    free = fp.Plan.from_json((workdir / "out" / "plan_free.json").read_text())
    (workdir / "out" / "plan_free.json").unlink()  # the listing below is of the chain's own files
    assert free.settings["stream_floor"] == "free" and free.settings["stream_weight"] == 2
    assert free.settings["floor"] == "sqrt" and free.settings["width_power_used"] == 0.5

    assert main(["prune", "--model", "zoo:digits_cnn", "--weights", "w.pt", "--plan", "out/plan.json",
                 "--out", "out/pruned.pt"]) == 0
    assert "wrote out/pruned.pt" in capsys.readouterr().out

    assert main(["finetune", *common, "--pruned", "out/pruned.pt", "--data", "digits", "--max-steps", "3",
                 "--lr", "0.01", "--bf16", "--out", "out/ft.pt"]) == 0
    assert "after fine-tuning" in capsys.readouterr().out
    assert main(["finetune", *common, "--pruned", "out/pruned.pt", "--data", "digits", "--max-steps", "3",
                 "--lr", "0.01", "--teacher", "w.pt", "--distill", "0.9", "--out", "out/ft_kd.pt"]) == 0
    assert "after fine-tuning" in capsys.readouterr().out
    (workdir / "out" / "ft_kd.pt").unlink()  # the listing below is of the chain's own files

    assert main(["report", "--model", "zoo:digits_cnn", "--weights", "w.pt", "--pruned", "out/ft.pt",
                 "--data", "digits", "--latency-repeats", "1", "--threads", "1", "--json", "out/report.json",
                 "--plots", "out/plots"]) == 0
    out = capsys.readouterr().out
    for name in plan.removed:
        assert name in out
    assert "top-1 accuracy" in out and "latency (batch 64, cpu, 1 thread)" in out
    rep = json.loads((workdir / "out" / "report.json").read_text())
    original = zoo.create("digits_cnn")
    original.load_state_dict(torch.load(workdir / "w.pt", weights_only=True))
    assert rep["totals"]["params_before"] == fp.count_params(original)
    assert rep["totals"]["params_after"] == plan.predicted["params_after"]

    # A fairpruner.save file is accepted as --weights (here: scoring the pruned model again).
    assert main(["score", *common, "--weights", "out/pruned.pt", "--data", "digits", "--samples-per-class", "4",
                 "--projections", "4", "--out", "out/scores2.pt"]) == 0
    assert fp.Scores.load(workdir / "out" / "scores2.pt").groups[0].n_units < 64

    # A second round: plan on the re-scored pruned model, prune it again; the file rebuilds from a fresh model.
    assert main(["plan", "--scores", "out/scores2.pt", "--alpha", "0.3", "--out", "out/plan2.json"]) == 0
    assert main(["prune", "--model", "zoo:digits_cnn", "--weights", "out/pruned.pt", "--plan", "out/plan2.json",
                 "--out", "out/twice.pt"]) == 0
    once = fp.load(workdir / "out" / "pruned.pt", zoo.create("digits_cnn"))
    twice = fp.load(workdir / "out" / "twice.pt", zoo.create("digits_cnn"))
    assert fp.count_params(twice) < fp.count_params(once)
    assert len(torch.load(workdir / "out" / "twice.pt", weights_only=True)["plans"]) == 2

    expected = {"out", "out/scores.pt", "out/plan.json", "out/pruned.pt", "out/ft.pt", "out/report.json",
                "out/plots", "out/plots/removal_by_group.png", "out/scores2.pt", "out/plan2.json", "out/twice.pt"}
    assert _listing(workdir) - before == expected


def test_module_factory_spec(workdir, monkeypatch, capsys):
    (workdir / "my_cli_models.py").write_text(
        "from fairpruner import zoo\n\ndef build(num_classes=10):\n    return zoo.digits_cnn(num_classes)\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "my_cli_models", raising=False)
    assert main(["score", "--model", "my_cli_models:build", "--weights", "w.pt", "--data", "digits",
                 "--samples-per-class", "4", "--projections", "4", "--no-progress", "--out", "s.pt"]) == 0
    sys.modules.pop("my_cli_models", None)
    assert (workdir / "s.pt").is_file()


@pytest.mark.parametrize("argv, message", [
    (["plan", "--scores", "missing.pt", "--alpha", "0.1"], "missing.pt"),
    (["plan", "--scores", "w.pt", "--alpha", "0.1"], "not a fairpruner.scores file"),
    (["score", "--model", "zoo:nope", "--data", "digits", "--out", "s.pt"], "Unknown model 'nope'"),
    (["score", "--model", "resnet20", "--data", "digits", "--out", "s.pt"], "zoo:NAME"),
    (["score", "--model", "no_such_module_xyz:f", "--data", "digits", "--out", "s.pt"], "cannot import"),
    (["score", "--model", "zoo:digits_cnn", "--data", "nowhere/at/all", "--out", "s.pt"], "No such file"),
    (["score", "--model", "zoo:digits_cnn", "--data", "nowhere", "--out", "s.pt"], "unknown dataset spec"),
    (["score", "--model", "zoo:digits_cnn", "--weights", "w.pt", "--num-classes", "5", "--data", "digits",
      "--out", "s.pt"], "2 differ in shape (classifier.weight (10, 64) in the file, (5, 64) in the model"),
    (["score", "--model", "zoo:mlp", "--weights", "w.pt", "--data", "digits", "--out", "s.pt"],
     "tensors of the file are not in the model (features.0.weight"),
    (["prune", "--model", "zoo:digits_cnn", "--weights", "not-there.pt", "--plan", "p.json", "--out", "x.pt"],
     "p.json"),
    (["report", "--model", "zoo:digits_cnn", "--pruned", "w.pt"], "not a pruned model"),
    (["score", "--model", "zoo:resnet20", "--data", "digits", "--out", "s.pt"], "cannot run on samples"),
    (["run", "--model", "zoo:digits_cnn", "--data", "digits", "--distill", "0.9", "--out", "r.pt"],
     "--distill needs --finetune-epochs"),
    (["run", "--model", "zoo:digits_cnn", "--data", "digits", "--finetune-epochs", "1", "--distill", "1.5",
      "--out", "r.pt"], "--distill must be in [0, 1]"),
    (["finetune", "--model", "zoo:digits_cnn", "--pruned", "w.pt", "--data", "digits", "--distill", "0.9",
      "--out", "f.pt"], "--distill needs --teacher"),
    (["finetune", "--model", "zoo:digits_cnn", "--pruned", "w.pt", "--data", "digits", "--teacher", "w.pt",
      "--out", "f.pt"], "--teacher needs --distill"),
])
def test_bad_input_exits_2_with_a_clear_message(workdir, capsys, argv, message):
    before = _listing(workdir)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err
    assert _listing(workdir) == before


def test_plan_errors(workdir, capsys):
    assert main(["score", "--model", "zoo:digits_cnn", "--weights", "w.pt", "--data", "digits",
                 "--samples-per-class", "4", "--projections", "4", "--no-progress", "--out", "s.pt"]) == 0
    capsys.readouterr()
    assert main(["plan", "--scores", "s.pt"]) == 2
    assert "give a target" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # out of range: refused while the arguments are read
        main(["plan", "--scores", "s.pt", "--alpha", "2"])
    assert e.value.code == 2 and "--alpha: expected a number in [0, 1], got 2" in capsys.readouterr().err
    assert main(["plan", "--scores", "s.pt", "--alpha", "0.1", "--allocation", "uniform"]) == 2
    assert "Uniform allocation has no alpha" in capsys.readouterr().err
    for argv, says in ((["--sweep", "--targets", "0.3"], "--targets goes with '--sweep macs'"),
                       (["--sweep", "macs", "--alphas", "0.3"], "--alphas goes with --sweep"),
                       (["--macs", "0.3", "--targets", "0.3"], "--targets goes with")):
        assert main(["plan", "--scores", "s.pt", *argv]) == 2  # an option the command would ignore
        assert says in capsys.readouterr().err
    (workdir / "bad.json").write_text("{not json")
    assert main(["prune", "--model", "zoo:digits_cnn", "--plan", "bad.json", "--out", "x.pt"]) == 2
    assert capsys.readouterr().err.startswith("error: bad.json is not a JSON plan")
    assert main(["prune", "--model", "zoo:digits_cnn", "--plan", "w.pt", "--out", "x.pt"]) == 2  # binary
    assert capsys.readouterr().err.startswith("error: w.pt is not a JSON plan")
    (workdir / "text.pt").write_text("hello")
    assert main(["plan", "--scores", "text.pt", "--alpha", "0.1"]) == 2
    assert capsys.readouterr().err.startswith("error: text.pt is not a readable weights-only torch file")
    # argparse usage errors also exit with status 2.
    with pytest.raises(SystemExit) as e:
        main(["plan", "--scores", "s.pt", "--alpha", "0.1", "--macs", "0.5"])
    assert e.value.code == 2
    assert not (workdir / "x.pt").exists()


def test_score_under_torchrun_matches_single_process(tmp_path):
    """`torchrun -m fairpruner.cli score` with 2 CPU processes writes the single-process scores."""
    torch.manual_seed(0)
    torch.save(zoo.create("digits_cnn").state_dict(), tmp_path / "w.pt")
    common = ["score", "--model", "zoo:digits_cnn", "--weights", str(tmp_path / "w.pt"), "--data", "digits",
              "--samples-per-class", "8", "--projections", "8", "--batch-size", "16", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "fairpruner.cli", *common, "--out", str(tmp_path / "dist.pt")],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert dist.returncode == 0, dist.stderr[-2000:]
    assert "across 2 processes" in dist.stdout
    assert main([*common, "--out", str(tmp_path / "single.pt")]) == 0
    a, b = fp.Scores.load(tmp_path / "dist.pt"), fp.Scores.load(tmp_path / "single.pt")
    assert a.names == b.names
    for ga, gb in zip(a.groups, b.groups):
        torch.testing.assert_close(ga.u, gb.u, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ga.r, gb.r, rtol=1e-4, atol=1e-7)


def test_run_whole_path_in_one_command(workdir, capsys, monkeypatch):
    weights = (workdir / "w.pt").read_bytes()
    before = _listing(workdir)
    loaded = []  # the model run loads: scored, pruned from, distilled from; it must come out as it went in
    real_load = commands.load_model

    def load_and_record(*a, **k):
        model = real_load(*a, **k)
        loaded.append((model, {k: v.clone() for k, v in model.state_dict().items()},
                       {n: m.training for n, m in model.named_modules()},
                       {n: p.requires_grad for n, p in model.named_parameters()}))
        return model
    monkeypatch.setattr(commands, "load_model", load_and_record)
    assert main(["run", "--model", "zoo:digits_cnn", "--weights", "w.pt", "--data", "digits", "--macs", "0.3",
                 "--samples-per-class", "8", "--recalibrate", "200", "--finetune-epochs", "1", "--distill", "0.5",
                 "--latency-repeats", "1", "--no-progress", "--out", "out/run.pt"]) == 0
    out = capsys.readouterr().out
    assert "target: macs -30.0% asked" in out
    for stage in ("one-shot", "recalibrated", "fine-tuned"):
        assert f"top-1 accuracy, {stage}" in out
    assert "units before" in out and "features.0" in out
    assert (workdir / "w.pt").read_bytes() == weights  # the caller's weights are untouched
    (model, state, modes, grads), = loaded
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # weights and BatchNorm statistics
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert _listing(workdir) - before == {"out", "out/run.pt"}  # nothing else written
    pruned = fp.load(workdir / "out" / "run.pt", zoo.create("digits_cnn"))
    model = zoo.create("digits_cnn")
    x = torch.randn(2, 1, 8, 8)
    assert abs(1 - fp.count_macs(pruned, x) / fp.count_macs(model, x) - 0.3) <= 0.005


@pytest.mark.parametrize("flag,value,says", [
    ("--macs", "1.2", "in (0, 1)"), ("--params", "0", "in (0, 1)"), ("--alpha", "-0.1", "in [0, 1]"),
    ("--finetune-epochs", "-1", "0 or more"), ("--recalibrate", "x", "whole number"),
    ("--samples-per-class", "1", "2 or more"), ("--latency-repeats", "-1", "0 or more"),
    ("--batch-size", "0", "1 or more"), ("--device", "foo", "Unknown device 'foo'"),
    ("--device", "cuda:99", "'cuda:99' asked for")])
def test_run_refuses_out_of_range_numbers_before_any_work(workdir, capsys, monkeypatch, flag, value, says):
    monkeypatch.setattr(commands, "open_dataset", lambda *a, **k: pytest.fail("read data before checking"))
    with pytest.raises(SystemExit) as e:
        main(["run", "--model", "zoo:digits_cnn", "--data", "digits", flag, value, "--out", "run.pt"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and says in err


@pytest.mark.parametrize("out,says", [(".", "is a directory"), ("w.pt/x.pt", "w.pt is a file")])
def test_run_refuses_an_unwritable_out_before_any_work(workdir, capsys, monkeypatch, out, says):
    monkeypatch.setattr(commands, "open_dataset", lambda *a, **k: pytest.fail("read data before checking --out"))
    assert main(["run", "--model", "zoo:digits_cnn", "--data", "digits", "--out", out]) == 2
    assert says in capsys.readouterr().err


def test_prune_with_data_recalibrates(workdir, capsys):
    assert main(["score", "--model", "zoo:digits_cnn", "--weights", "w.pt", "--data", "digits", "--no-progress",
                 "--samples-per-class", "4", "--projections", "4", "--out", "s.pt"]) == 0
    assert main(["plan", "--scores", "s.pt", "--macs", "0.4", "--out", "p.json"]) == 0
    common = ["prune", "--model", "zoo:digits_cnn", "--weights", "w.pt", "--plan", "p.json", "--no-progress"]
    assert main([*common, "--out", "plain.pt"]) == 0
    assert "re-estimated" not in capsys.readouterr().out
    assert main([*common, "--data", "digits", "--recalibrate", "100", "--out", "recal.pt"]) == 0
    assert "re-estimated the BatchNorm statistics on 100 training samples" in capsys.readouterr().out
    plain, recal = (fp.load(workdir / f, zoo.create("digits_cnn")) for f in ("plain.pt", "recal.pt"))
    stats = [k for k in plain.state_dict() if k.endswith("running_mean")]
    assert stats and all(not torch.equal(plain.state_dict()[k], recal.state_dict()[k]) for k in stats)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in recal.state_dict().items() if "running" not in k
               and "num_batches" not in k)


def test_run_without_recalibration_reports_one_shot(workdir, capsys):
    assert main(["run", "--model", "zoo:digits_cnn", "--weights", "w.pt", "--data", "digits", "--alpha", "0.05",
                 "--samples-per-class", "8", "--recalibrate", "0", "--latency-repeats", "0", "--no-progress",
                 "--out", "run.pt"]) == 0
    out = capsys.readouterr().out
    assert "top-1 accuracy" in out and "recalibrated" not in out


def test_run_on_a_model_without_batchnorm_says_so_once(workdir, capsys):
    assert main(["run", "--model", "zoo:mlp", "--data", "digits", "--alpha", "0.05", "--samples-per-class", "8",
                 "--latency-repeats", "0", "--no-progress", "--out", "run.pt"]) == 0
    captured = capsys.readouterr()
    assert "no BatchNorm layers" in captured.out and "recalibrated" not in captured.out
    assert "warning" not in captured.err


def test_plan_warns_when_the_target_is_missed_and_sweeps_targets(workdir, capsys, monkeypatch):
    (workdir / "coarse.py").write_text(
        "import torch.nn as nn\n"
        "def net(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(4 * 6 * 6, num_classes))\n")
    monkeypatch.setattr(sys, "path", [str(workdir)] + sys.path)
    monkeypatch.delitem(sys.modules, "coarse", raising=False)
    assert main(["score", "--model", "coarse:net", "--data", "digits", "--samples-per-class", "4",
                 "--projections", "4", "--no-progress", "--out", "s.pt"]) == 0
    capsys.readouterr()
    assert main(["plan", "--scores", "s.pt", "--macs", "0.1"]) == 0  # one of four channels is ~25% of MACs
    captured = capsys.readouterr()
    assert "macs -10.0% asked, -2" in captured.out
    assert "warning: the plan misses the macs target" in captured.err
    assert main(["plan", "--scores", "s.pt", "--sweep", "macs", "--targets", "0.2,0.4"]) == 0
    captured = capsys.readouterr()
    assert "asked (MACs)" in captured.out and "20.0%" in captured.out and "40.0%" in captured.out
    # the sweep's missed targets warn in one line each, without a source location
    assert "warning: The plan removes" in captured.err and ".py:" not in captured.err
    for argv, message in ((["--sweep", "macs", "--targets", "0.2,1"], "--targets: expected a number in (0, 1), got 1"),
                          (["--sweep", "--alphas", "0.1,1.5"], "--alphas: expected a number in [0, 1], got 1.5"),
                          (["--sweep", "macs", "--targets", ","], "--targets: expected comma-separated numbers")):
        with pytest.raises(SystemExit) as e:  # refused while the arguments are read
            main(["plan", "--scores", "s.pt", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_hugging_face_directory_spec(workdir, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=10)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    model.save_pretrained(workdir / "vit")
    common = ["--model", "hf:vit", "--no-progress"]
    assert main(["score", *common, "--data", "digits", "--samples-per-class", "4", "--projections", "4",
                 "--gqa", "kv_groups", "--out", "s.pt"]) == 0
    assert main(["plan", "--scores", "s.pt", "--alpha", "0.3", "--out", "p.json"]) == 0
    recorded = fp.Plan.from_json((workdir / "p.json").read_text()).settings["scoring"]["family_options"]
    assert recorded["hf_attention_heads"]["gqa"] == "kv_groups"
    assert main(["prune", "--model", "hf:vit", "--plan", "p.json", "--out", "pruned.pt"]) == 0
    fresh = transformers.ViTForImageClassification.from_pretrained(workdir / "vit")
    pruned = fp.load(workdir / "pruned.pt", fresh).eval()
    masked = fp.mask(model, fp.Plan.from_json((workdir / "p.json").read_text()))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, masked(x).logits, rtol=1e-4, atol=1e-5)
    assert fp.count_params(pruned) < fp.count_params(model)
    assert main(["score", "--model", "hf:nowhere", "--data", "digits", "--out", "s2.pt"]) != 0
    assert "save_pretrained" in capsys.readouterr().err
    # A pruned model written by save_pretrained has a config of the original sizes: a clear refusal, not a traceback.
    pruned.save_pretrained(workdir / "vit_pruned")
    assert main(["report", "--model", "hf:vit_pruned", "--pruned", "pruned.pt", "--no-progress"]) == 2
    assert "does not round-trip through save_pretrained" in capsys.readouterr().err
