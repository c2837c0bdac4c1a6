"""The accuracy benchmark's method table: every label a part runs exists, and the default row is the library's."""
import inspect
import sys
from pathlib import Path

import fairpruner as fp

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
import accuracy_methods as am  # noqa: E402


def test_every_part_runs_only_defined_rows():
    for part, choices in am.PART_METHODS.items():
        table = am.VARIANTS if part == "select" else am.METHODS
        for choice, labels in choices.items():
            assert labels and set(labels) <= set(table), (part, choice)


def test_the_default_rows_are_the_librarys_defaults():
    """Rows pin the rules they were measured under; the default rows must pin exactly fp.plan's defaults."""
    defaults = {k: p.default for k, p in inspect.signature(fp.plan).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for table, label in ((am.METHODS, am.DEFAULT), (am.VARIANTS, am.SELECTED)):
        score_kw, plan_kw = table[label]
        assert score_kw == {}
        pinned = {**am.PINNED, **plan_kw}  # what Bench.fair passes to fp.plan for this row
        assert {k: defaults[k] for k in pinned} == pinned
