"""The accuracy benchmark's reports: table headings, results tied to their checkpoint, the at-a-glance board."""
import json
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
import accuracy_report  # noqa: E402


def test_tables_say_whether_the_checkpoint_saw_the_validation_images(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy_report, "CHECKPOINTS", tmp_path)
    assert "unknown" in accuracy_report.validation_note("m")
    (tmp_path / "cifar10_m.log").write_text('{"epoch": 1, "test_acc": 0.5}\n')
    assert "trained on them" in accuracy_report.validation_note("m")
    (tmp_path / "cifar10_m.log").write_text('{"config": {"holdout": "val"}}\n{"epoch": 1, "test_acc": 0.5}\n{"epo')
    assert "held out" in accuracy_report.validation_note("m")
    assert accuracy_report.checkpoint_accuracy("m") == "50.00 % after 1 epochs"


def test_results_of_another_checkpoint_are_replaced_and_flagged(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(accuracy_report, "CHECKPOINTS", tmp_path)
    (tmp_path / "cifar10_m.pt").write_bytes(b"weights one")
    one = accuracy_report.fingerprint("m")
    raw = tmp_path / "accuracy_m.json"
    raw.write_text(json.dumps({"checkpoint": one, "targets": {}}))
    assert accuracy_report.load_results(raw, one) == {"checkpoint": one, "targets": {}}
    assert "Measured on checkpoint" not in accuracy_report.write_markdown({"checkpoint": one}, "m", [], "")
    (tmp_path / "cifar10_m.pt").write_bytes(b"weights two")
    two = accuracy_report.fingerprint("m")
    assert two != one and accuracy_report.load_results(raw, two) == {}
    assert "replaced" in capsys.readouterr().out
    assert f"Measured on checkpoint {one}" in accuracy_report.write_markdown({"checkpoint": one}, "m", [], "")
    raw.write_text(json.dumps({"targets": {}}))  # a file from before checkpoints were recorded
    assert accuracy_report.load_results(raw, two) == {}


def _cells(*accs):
    return [{"recalibrated": a} for a in accs]


def test_scoreboard_names_the_rival_the_default_trails_and_by_how_much():
    test = {"FAIR default (U + ToD)": {"0.2": _cells(0.80, 0.82), "0.5": _cells(0.70, 0.70)},
            "Torch-Pruning global L1": {"0.2": _cells(0.79, 0.79), "0.5": _cells(0.75, 0.75)},
            "U + uniform": {"0.2": _cells(0.815, 0.815), "0.5": _cells(0.60, 0.60)},
            "L1 + uniform": {"0.2": _cells(0.50, 0.50), "0.5": _cells(0.72, 0.72)}}
    lines = accuracy_report.scoreboard({"m": {"test": test}}, accuracy_report.DEFAULT, accuracy_report.TP_L1)
    assert len(lines) == 4
    assert "81.50 ± 0.00 (U + uniform)" in lines[2]
    assert lines[2].endswith("**behind U + uniform by 0.50 pt** (within one std) |")  # std of the default: 1 pt
    assert "72.00 ± 0.00 (L1 + uniform)" in lines[3]
    assert lines[3].endswith("**behind Torch-Pruning global L1 by 5.00 pt** |")
    test["FAIR default (U + ToD)"]["0.5"] = _cells(0.76, 0.76)
    lines = accuracy_report.scoreboard({"m": {"test": test}}, accuracy_report.DEFAULT, accuracy_report.TP_L1)
    assert lines[3].endswith("| ahead of Torch-Pruning global L1 by 1.00 pt |")
    test["FAIR default (U + ToD)"]["0.5"] = _cells(0.755, 0.755)
    lines = accuracy_report.scoreboard({"m": {"test": test}}, accuracy_report.DEFAULT, accuracy_report.TP_L1)
    assert lines[3].endswith("| ahead of Torch-Pruning global L1 by 0.50 pt |")  # both spreads are 0


def test_shortfalls_list_every_comparison_the_default_does_not_clearly_win():
    d, tp = accuracy_report.DEFAULT, accuracy_report.TP_L1
    cell = lambda recal, one: [{"recalibrated": recal + e, "one_shot": one + e} for e in (-0.01, 0.01)]  # noqa: E731
    test = {d: {"0.2": cell(0.80, 0.50), "0.5": cell(0.70, 0.30)},
            tp: {"0.2": cell(0.79, 0.60), "0.5": cell(0.60, 0.20)},
            "U + uniform": {"0.2": cell(0.70, 0.40), "0.5": cell(0.50, 0.10)}}
    ablation = {d: {"0.678": cell(0.70, 0.1)}, "U + uniform": {"0.678": cell(0.60, 0.1)},
                "random + ToD": {"0.678": cell(0.50, 0.1)}, "random + uniform": {"0.678": cell(0.51, 0.1)}}
    ft = {"epochs": 15, "unpruned": 0.9, "level": 0.5, d: {"finetuned": 0.88}, tp: {"finetuned": 0.885}}
    distilled = {"epochs": 15, "distill": 0.9, "unpruned": 0.9, "level": 0.5, d: {"finetuned": 0.89}}
    out = accuracy_report.shortfalls({"m": {"test": test, "ablation": ablation, "finetune": ft,
                                            "finetune_distill": distilled}}, d, tp)
    assert out == [
        "- m, 20% MACs removed, after recalibration: ahead of Torch-Pruning global L1 by 1.00 pt (within one std)",
        "- m, 20% MACs removed, one-shot, no recalibration: behind Torch-Pruning global L1 by 10.00 pt",
        "- m, 67.8% of parameters removed, random scores: ToD -1.00 pt against uniform depths (within one std)",
        "- m, fine-tuned (15 epochs): behind Torch-Pruning global L1 by 0.50 pt (one seed)",
        "- m, fine-tuned (15 epochs, distilled (0.9)): no Torch-Pruning row to compare with yet"]
    test[d]["0.2"] = cell(0.90, 0.90)
    ft[d]["finetuned"], distilled[tp] = 0.89, {"finetuned": 0.88}
    ablation["random + ToD"]["0.678"] = cell(0.60, 0.1)
    assert accuracy_report.shortfalls({"m": {"test": test, "ablation": ablation, "finetune": ft,
                                             "finetune_distill": distilled}}, d, tp) == []


def test_checkpoints_table_reads_the_recipe_from_the_log(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy_report, "CHECKPOINTS", tmp_path)
    (tmp_path / "cifar10_old.log").write_text('{"epoch": 1}\n{"epoch": 2, "test_acc": 0.5}\n')
    config = {"holdout": "val", "lr": 0.05, "batch_size": 128, "weight_decay": 5e-4, "bf16": True, "epochs": 80}
    (tmp_path / "cifar10_new.log").write_text(json.dumps({"config": config}) + '\n{"epoch": 5, "test_acc": 0.9}\n')
    lines = accuracy_report.checkpoints_table(["old", "new", "absent"])
    assert lines[2] == "| old | 50.00 % | 2 | all 50,000 training images | not recorded in the log |"
    assert lines[3] == ("| new | 90.00 % | 5 of 80 | 45,000 (validation held out) | one-cycle lr 0.05, batch 128, "
                        "weight decay 0.0005, bfloat16 autocast |")
    assert len(lines) == 4


def test_a_restart_of_a_run_without_recipe_lists_both(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy_report, "CHECKPOINTS", tmp_path)
    second = {"holdout": "none", "lr": 0.05, "batch_size": 128, "weight_decay": 5e-4, "epochs": 47, "cutout": 16,
              "init_from": "cifar10_m.pt"}
    log = [{"epoch": 60, "test_acc": 0.894}, {"config": second}, {"epoch": 47, "test_acc": 0.92}]
    (tmp_path / "cifar10_m.log").write_text("".join(json.dumps(r) + "\n" for r in log))
    assert accuracy_report.checkpoints_table(["m"])[2] == (
        "| m | 92.00 % | 60 + 47 | all 50,000 training images | not recorded in the log; then warm restart from "
        "the run before, one-cycle lr 0.05, batch 128, weight decay 0.0005, cutout 16 |")
    assert "trained on them" in accuracy_report.validation_note("m")


def test_a_warm_restart_is_listed_as_a_second_run(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy_report, "CHECKPOINTS", tmp_path)
    first = {"holdout": "val", "lr": 0.05, "batch_size": 128, "weight_decay": 5e-4, "epochs": 80}
    second = {**first, "lr": 0.03, "epochs": 34, "cutout": 16, "init_from": "cifar10_m.pt", "bf16": True}
    log = [{"config": first}, {"epoch": 80, "test_acc": 0.9}, {"config": second}, {"epoch": 1},
           {"epoch": 34, "test_acc": 0.91}]
    (tmp_path / "cifar10_m.log").write_text("".join(json.dumps(r) + "\n" for r in log))
    assert accuracy_report.checkpoints_table(["m"])[2] == (
        "| m | 91.00 % | 80 + 34 | 45,000 (validation held out) | one-cycle lr 0.05, batch 128, weight decay 0.0005; "
        "then warm restart from the run before, one-cycle lr 0.03, batch 128, weight decay 0.0005, cutout 16, "
        "bfloat16 autocast |")
    assert accuracy_report.checkpoint_accuracy("m") == "91.00 % after 80 + 34 epochs"
    assert "held out" in accuracy_report.validation_note("m")
    log[2]["config"]["holdout"] = "none"  # one run saw the validation images: the checkpoint did
    (tmp_path / "cifar10_m.log").write_text("".join(json.dumps(r) + "\n" for r in log))
    assert "trained on them" in accuracy_report.validation_note("m")


def test_a_replaced_checkpoints_rows_are_marked_on_the_board_and_in_its_heading(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy_report, "CHECKPOINTS", tmp_path)
    (tmp_path / "cifar10_m.pt").write_bytes(b"weights one")
    (tmp_path / "cifar10_m.log").write_text('{"epoch": 80, "test_acc": 0.9}\n')
    cell = {"macs_removed": 0.2, "one_shot": 0.5}
    test = {accuracy_report.DEFAULT: {"0.2": [{**cell, "recalibrated": 0.8}]},
            accuracy_report.TP_L1: {"0.2": [{**cell, "recalibrated": 0.7}]}}
    results = {"checkpoint": accuracy_report.fingerprint("m"), "test": test,
               "checkpoint_accuracy": accuracy_report.checkpoint_accuracy("m")}
    (tmp_path / "accuracy_m.json").write_text(json.dumps(results))
    readme = tmp_path / "README.md"
    blank = f"intro\n{accuracy_report.BEGIN}\nold\n{accuracy_report.END}\nafter\n"
    readme.write_text(blank)
    accuracy_report.update_readme(readme, tmp_path, ["m"])
    assert "| m | 20% |" in readme.read_text() and "earlier checkpoint" not in readme.read_text()
    assert "(m, checkpoint 90.00 % after 80 epochs)" in accuracy_report.write_markdown(results, "m", [], "")
    (tmp_path / "cifar10_m.pt").write_bytes(b"weights two")  # retrained: the results now describe the old one
    (tmp_path / "cifar10_m.log").write_text('{"epoch": 80, "test_acc": 0.9}\n{"epoch": 120, "test_acc": 0.91}\n')
    readme.write_text(blank)
    accuracy_report.update_readme(readme, tmp_path, ["m"])
    text = readme.read_text()
    assert "| m (earlier checkpoint) | 20% |" in text and "Rows marked *earlier checkpoint* (m)" in text
    assert text.startswith("intro\n") and text.endswith(f"{accuracy_report.END}\nafter\n")
    page = accuracy_report.write_markdown(results, "m", [], "")
    assert "(m, checkpoint 90.00 % after 80 epochs, an earlier one)" in page and "91.00" not in page
    del results["checkpoint_accuracy"]  # a file written before the accuracy was recorded
    assert "(m, checkpoint an earlier one)" in accuracy_report.write_markdown(results, "m", [], "")
