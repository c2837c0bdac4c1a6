"""The accuracy section's boards: margins against the strongest rival, the ablations, fine-tuning, the shortfalls."""
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
import accuracy_boards  # noqa: E402

D, TP = "FAIR default (U + ToD)", "Torch-Pruning global L1"


def _cells(*accs):
    return [{"recalibrated": a} for a in accs]


def test_scoreboard_names_the_rival_the_default_trails_and_by_how_much():
    test = {"FAIR default (U + ToD)": {"0.2": _cells(0.80, 0.82), "0.5": _cells(0.70, 0.70)},
            "Torch-Pruning global L1": {"0.2": _cells(0.79, 0.79), "0.5": _cells(0.75, 0.75)},
            "U + uniform": {"0.2": _cells(0.815, 0.815), "0.5": _cells(0.60, 0.60)},
            "L1 + uniform": {"0.2": _cells(0.50, 0.50), "0.5": _cells(0.72, 0.72)}}
    lines = accuracy_boards.scoreboard({"m": {"test": test}}, D, TP)
    assert len(lines) == 4
    assert "81.50 ± 0.00 (U + uniform)" in lines[2]
    assert lines[2].endswith("**behind U + uniform by 0.50 pt** (within one std) |")  # std of the default: 1 pt
    assert "72.00 ± 0.00 (L1 + uniform)" in lines[3]
    assert lines[3].endswith("**behind Torch-Pruning global L1 by 5.00 pt** |")
    test["FAIR default (U + ToD)"]["0.5"] = _cells(0.76, 0.76)
    lines = accuracy_boards.scoreboard({"m": {"test": test}}, D, TP)
    assert lines[3].endswith("| ahead of Torch-Pruning global L1 by 1.00 pt |")
    test["FAIR default (U + ToD)"]["0.5"] = _cells(0.755, 0.755)
    lines = accuracy_boards.scoreboard({"m": {"test": test}}, D, TP)
    assert lines[3].endswith("| ahead of Torch-Pruning global L1 by 0.50 pt |")  # both spreads are 0


def test_the_verdict_counts_every_torch_pruning_method_measured_as_a_rival():
    test = {D: {"0.2": _cells(0.80, 0.80)}, TP: {"0.2": _cells(0.78, 0.78)},
            "Torch-Pruning global Taylor": {"0.2": _cells(0.81, 0.81)}, "U + uniform": {"0.2": _cells(0.70, 0.70)}}
    lines = accuracy_boards.scoreboard({"m": {"test": test}, "n": {"test": {D: {"0.2": _cells(0.8)}}}}, D, TP)
    assert "| Torch-Pruning global L1 | Torch-Pruning global Taylor | best uniform depths |" in lines[0]
    assert lines[2].startswith("| m | 20% | 80.00 ± 0.00 | 78.00 ± 0.00 | 81.00 ± 0.00 | 70.00 ± 0.00")
    assert lines[2].endswith("**behind Torch-Pruning global Taylor by 1.00 pt** |")
    assert lines[3] == "| n | 20% | 80.00 ± 0.00 | - | - | - | - |"  # a model without those rows
    test["Torch-Pruning global Taylor"]["0.2"] = [{"one_shot": 0.9}]  # no recalibrated column: not a rival
    assert accuracy_boards.scoreboard({"m": {"test": test}}, D, TP)[2].endswith(
        "| ahead of Torch-Pruning global L1 by 2.00 pt |")


def test_shortfalls_list_every_comparison_the_default_does_not_clearly_win():
    d, tp = D, TP
    cell = lambda recal, one: [{"recalibrated": recal + e, "one_shot": one + e} for e in (-0.01, 0.01)]  # noqa: E731
    test = {d: {"0.2": cell(0.80, 0.50), "0.5": cell(0.70, 0.30)},
            tp: {"0.2": cell(0.79, 0.60), "0.5": cell(0.60, 0.20)},
            "U + uniform": {"0.2": cell(0.70, 0.40), "0.5": cell(0.50, 0.10)}}
    ablation = {d: {"0.678": cell(0.70, 0.1)}, "U + uniform": {"0.678": cell(0.60, 0.1)},
                "random + ToD": {"0.678": cell(0.50, 0.1)}, "random + uniform": {"0.678": cell(0.51, 0.1)}}
    ft = {"epochs": 15, "unpruned": 0.9, "level": 0.5, d: {"finetuned": 0.88}, tp: {"finetuned": 0.885}}
    distilled = {"epochs": 15, "distill": 0.9, "unpruned": 0.9, "level": 0.5, d: {"finetuned": 0.89}}
    out = accuracy_boards.shortfalls({"m": {"test": test, "ablation": ablation, "finetune": ft,
                                            "finetune_distill": distilled},
                                      "n": {"finetune": {"epochs": 10, "unpruned": 0.9, "level": 0.5,
                                                         tp: {"finetuned": 0.88}}}}, d, tp)
    assert out == [
        "- m, 20% MACs removed, after recalibration: ahead of Torch-Pruning global L1 by 1.00 pt (within one std)",
        "- m, 20% MACs removed, one-shot, no recalibration: behind Torch-Pruning global L1 by 10.00 pt",
        "- m, 67.8% of parameters removed, random scores: ToD -1.00 pt against uniform depths (within one std)",
        "- m, fine-tuned (15 epochs): behind Torch-Pruning global L1 by 0.50 pt (one seed)",
        "- m, fine-tuned (15 epochs, distilled (0.9)): no Torch-Pruning row to compare with yet",
        "- n, fine-tuned (10 epochs): no row of the default to compare with yet"]
    test[d]["0.2"] = cell(0.90, 0.90)
    ft[d]["finetuned"], distilled[tp] = 0.89, {"finetuned": 0.88}
    ablation["random + ToD"]["0.678"] = cell(0.60, 0.1)
    assert accuracy_boards.shortfalls({"m": {"test": test, "ablation": ablation, "finetune": ft,
                                             "finetune_distill": distilled}}, d, tp) == []


def test_ablation_board_pairs_tod_with_uniform_depths_per_score():
    grid = {D: {"0.678": _cells(0.90, 0.92)}, "U + uniform": {"0.678": _cells(0.80, 0.80)},
            "random + ToD": {"0.354": _cells(0.70, 0.70), "0.2": _cells(0.5)},  # 0.2 has no uniform pair
            "random + uniform": {"0.354": _cells(0.10, 0.10)}}
    lines = accuracy_boards.ablation_board({"m": {"ablation": grid}}, D)
    assert lines[2:] == ["| m | 67.8% | U | 91.00 ± 1.00 | 80.00 ± 0.00 | +11.00 pt |",
                         "| m | 35.4% | random | 70.00 ± 0.00 | 10.00 ± 0.00 | +60.00 pt |"]
    assert accuracy_boards.ablation_board({"m": {}}, D) == []


def test_finetune_board_shows_each_recipe_against_the_unpruned_model():
    ft = {"epochs": 15, "unpruned": 0.9, "level": 0.5, D: {"finetuned": 0.88}}
    distilled = {"epochs": 15, "distill": 0.9, "unpruned": 0.9, "level": 0.5, TP: {"finetuned": 0.905}}
    lines = accuracy_boards.finetune_board({"m": {"finetune": ft, "finetune_distill": distilled},
                                            "other": {"finetune": {"epochs": 3, "level": 0.5, "unpruned": 0.9}}}, D, TP)
    assert lines[2:] == ["| m | 50% | 15 epochs | 90.00 | 88.00 (-2.00 pt) | - |",
                         "| m | 50% | 15 epochs, distilled (0.9) | 90.00 | - | 90.50 (+0.50 pt) |"]


def test_a_board_row_whose_cell_has_other_seeds_says_how_many():
    def cell(n):
        return [{"recalibrated": 0.8, "macs_removed": 0.2}] * n
    test = {D: {"0.2": cell(5), "0.5": cell(3)}, TP: {"0.2": cell(5), "0.5": cell(3)}, "x": {"0.2": cell(3)}}
    test["y + uniform"] = {"0.2": cell(5), "0.5": cell(3)}
    lines = accuracy_boards.scoreboard({"m": {"test": test}}, D, TP)
    assert lines[2].startswith("| m | 20% | 80.00 ± 0.00 (5 seeds) | 80.00 ± 0.00 (5 seeds) | 80.00 ± 0.00 "
                               "(5 seeds; y + uniform) |")
    assert lines[3].startswith("| m | 50% | 80.00 ± 0.00 | 80.00 ± 0.00 | 80.00 ± 0.00 (y + uniform) |")
    short = accuracy_boards.shortfalls({"m": {"test": test}}, D, TP)
    assert short[0].startswith("- m, 20% MACs removed (5 seeds), after recalibration: ahead of")


def test_finetune_keys_keep_every_recipe_plain_first_then_by_epochs():
    results = {"test": {}, "finetune_distill_5ep": {"epochs": 5, "distill": 0.9},
               "finetune_distill_1ep": {"epochs": 1, "distill": 0.9}, "finetune_10ep": {"epochs": 10},
               "finetuned_elsewhere": {"epochs": 2}}
    assert accuracy_boards.finetune_keys(results) == ["finetune_10ep", "finetune_distill_1ep", "finetune_distill_5ep"]


def test_finetune_board_shows_a_short_and_a_long_budget_side_by_side():
    short = {"epochs": 1, "distill": 0.9, "unpruned": 0.9, "level": 0.5,
             D: {"finetuned": 0.88}, TP: {"finetuned": 0.87}}
    long = {**short, "epochs": 5, D: {"finetuned": 0.89}, TP: {"finetuned": 0.895}}
    results = {"m": {"finetune_distill_5ep": long, "finetune_distill_1ep": short}}
    lines = accuracy_boards.finetune_board(results, D, TP)
    assert lines[2:] == ["| m | 50% | 1 epoch, distilled (0.9) | 90.00 | 88.00 (-2.00 pt) | 87.00 (-3.00 pt) |",
                         "| m | 50% | 5 epochs, distilled (0.9) | 90.00 | 89.00 (-1.00 pt) | 89.50 (-0.50 pt) |"]
    assert accuracy_boards.shortfalls(results, D, TP) == [
        "- m, fine-tuned (5 epochs, distilled (0.9)): behind Torch-Pruning global L1 by 0.50 pt (one seed)"]
