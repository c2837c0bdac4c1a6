"""The accuracy benchmark's reports: table headings, results tied to their checkpoint, the README section."""
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


def test_a_cell_with_more_seeds_than_its_table_says_so():
    rec, half = {"recalibrated": 0.8, "macs_removed": 0.2}, {"recalibrated": 0.8, "macs_removed": 0.5}
    grid = {"a": {"0.2": [rec] * 5, "0.5": [half] * 3}, "b": {"0.2": [rec] * 3, "0.5": [half] * 3}}
    lines = accuracy_report.table(grid, "recalibrated", [])
    assert lines[0] == "Calibration seeds per cell: 3, except where a cell gives its own count."
    assert lines[4] == "| a | 80.00 ± 0.00 (5 seeds) | 80.00 ± 0.00 |"
    assert lines[5] == "| b | 80.00 ± 0.00 | 80.00 ± 0.00 |"
    del grid["a"]
    assert accuracy_report.table(grid, "recalibrated", [])[0] == "Calibration seeds per cell: 3."


def test_rows_measured_without_one_shot_leave_the_one_shot_table_to_the_others():
    both = {"recalibrated": 0.8, "one_shot": 0.3, "macs_removed": 0.2}
    recal = {"recalibrated": 0.7, "macs_removed": 0.2}
    grid = {"a": {"0.2": [both] * 3}, "b": {"0.2": [recal] * 3}}
    lines = accuracy_report._one_shot_table(grid, [])
    assert lines[2] == "Measured after recalibration only (not in this table): b."
    assert "| a | 30.00 ± 0.00 |" in lines and not any(line.startswith("| b ") for line in lines)
    assert accuracy_report._one_shot_table({"b": grid["b"]}, []) == []
    grid["b"]["0.5"] = [dict(both, macs_removed=0.5)] * 3  # one-shot at one level only: "-" at the other
    grid["a"]["0.5"] = [dict(both, macs_removed=0.5)] * 3
    lines = accuracy_report._one_shot_table(grid, [])
    assert "| b | - | 30.00 ± 0.00 |" in lines and not lines[2].startswith("Measured")
