"""The accuracy benchmark's bookkeeping (accuracy_cells, accuracy.main): seeds added to the cells measured before,
cells kept whole where a re-run reproduced them, a run's rows merged into the file after every method."""
import json
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
import accuracy  # noqa: E402
import accuracy_cells  # noqa: E402


def _recs(*seeds, one_shot=True):
    return [{"seed": s, "recalibrated": 0.5, **({"one_shot": 0.1} if one_shot else {})} for s in seeds]


def test_added_seeds_continue_each_cell_and_nothing_else():
    old = {"m": {"0.2": _recs(0, 1, 2), "0.5": _recs(0)}}
    assert accuracy_cells.appended(old, {"m": {"0.2": _recs(3, 4)}}, [3, 4], True) == {
        "m": {"0.2": _recs(0, 1, 2, 3, 4)}}
    with pytest.raises(SystemExit, match="holds seeds 0..0, which --seeds 3,4 does not continue"):
        accuracy_cells.appended(old, {"m": {"0.5": _recs(3, 4)}}, [3, 4], True)
    with pytest.raises(SystemExit, match="'n' at 0.2 has no results yet"):
        accuracy_cells.appended(old, {"n": {"0.2": _recs(0)}}, [0], True)


def test_a_rerun_that_reproduces_a_cells_first_seeds_keeps_the_whole_cell():
    old = {"m": {"0.2": _recs(0, 1, 2, 3, 4), "0.5": _recs(0, 1, 2, 3, 4)}}
    changed = [dict(r, recalibrated=0.6) for r in _recs(0, 1, 2)]
    new = {"m": {"0.2": _recs(0, 1, 2), "0.5": changed}, "n": {"0.2": _recs(0)}}
    assert accuracy_cells.kept(old, new, [0, 1, 2]) == {"m": {"0.2": _recs(0, 1, 2, 3, 4), "0.5": changed},
                                                        "n": {"0.2": _recs(0)}}
    # Other seeds than 0, 1, ... are not the cell's first ones: the run's records replace it.
    assert accuracy_cells.kept(old, {"m": {"0.2": _recs(3, 4)}}, [3, 4]) == {"m": {"0.2": _recs(3, 4)}}


def test_a_runs_rows_join_the_rows_before_in_the_studys_order_and_say_what_they_dropped():
    old = {"b": {"0.2": _recs(0, 1, 2), "0.5": _recs(0)}, "c": {"0.2": _recs(0)}}
    changed = [dict(r, recalibrated=0.6) for r in _recs(0)]
    rows, notes = accuracy_cells.merged(old, {"a": {"0.2": _recs(0)}, "b": {"0.2": changed}}, [0], False, True,
                                        ["a", "b", "c"])
    assert list(rows) == ["a", "b", "c"]
    assert rows["b"] == {"0.2": changed, "0.5": _recs(0)}  # the level not run stays
    assert notes == ["'b' at 0.2 held 3 seeds, which this run did not reproduce; it now holds 1 "
                     "(--add-seeds appends instead)"]
    rows, notes = accuracy_cells.merged(old, {"b": {"0.5": _recs(1)}}, [1], True, True, ["a", "b", "c"])
    assert rows["b"]["0.5"] == _recs(0, 1) and notes == []


def test_a_cell_is_continued_only_in_order_and_with_the_same_columns():
    assert accuracy_cells.gap([{"recalibrated": 0.5}] * 2, [2], one_shot=False) is None  # older records: seeds 0, 1
    assert accuracy_cells.gap(_recs(0, 2), [3], True) == "holds seeds [0, 2], not 0, 1, ..."
    assert accuracy_cells.gap(_recs(0, 1), [2], one_shot=False) == "was measured without --skip-one-shot"
    assert accuracy_cells.gap(_recs(0, 1, one_shot=False), [2], one_shot=True) == "was measured with --skip-one-shot"


def test_add_seeds_is_refused_before_any_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    monkeypatch.setattr(accuracy, "Bench", None)  # measuring would fail the test
    with pytest.raises(SystemExit):
        accuracy.main(["--part", "targets", "--model", "resnet20", "--add-seeds"])
    assert "--add-seeds applies to --part select, test or ablation, not targets" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        accuracy.main(["--part", "test", "--model", "resnet20", "--methods", "tp", "--seeds", "3", "--add-seeds"])
    assert "'Torch-Pruning global L1' at 0.2 has no results yet" in capsys.readouterr().err


class _StoppedBench:
    """Measures the first method, then fails as a run stopped midway would."""
    checkpoint, test_loader, val_loader = "fake", None, None

    def __init__(self, args, name):
        self.args = args

    def build(self, method, seed, level, unit):
        if method[1].get("signal") == "random":
            raise KeyboardInterrupt
        return method

    def measure(self, pruned, seed, loader, one_shot):
        return {"seed": seed, "macs_removed": 0.2, "params_removed": 0.2, "recalibrated": 0.5}


def test_a_run_stopped_midway_keeps_the_methods_it_finished(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    monkeypatch.setattr(accuracy, "Bench", _StoppedBench)
    with pytest.raises(KeyboardInterrupt):  # others: Torch-Pruning global Taylor, Taylor + uniform, random + ...
        accuracy.main(["--part", "test", "--model", "resnet20", "--methods", "others", "--levels", "0.2",
                       "--seeds", "0,1", "--skip-one-shot"])
    results = json.loads((tmp_path / "accuracy_resnet20.json").read_text())
    assert list(results["test"]) == ["Taylor + uniform", "Torch-Pruning global Taylor"]  # in the tables' order
    assert [r["seed"] for r in results["test"]["Taylor + uniform"]["0.2"]] == [0, 1]
    assert (tmp_path / "accuracy_resnet20.md").is_file()
    assert sorted(p.name for p in tmp_path.glob("*.json*")) == ["accuracy_resnet20.json"]  # no temporary left
