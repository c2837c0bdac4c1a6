"""The accuracy benchmark's bookkeeping: seeds added to the cells measured before."""
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
import accuracy  # noqa: E402


def test_added_seeds_continue_each_cell_and_nothing_else():
    old = {"m": {"0.2": [{"seed": 0}, {"seed": 1}, {"seed": 2}], "0.5": [{"seed": 0}]}}
    new = {"m": {"0.2": [{"seed": 3}, {"seed": 4}]}}
    assert accuracy._appended(old, new, [3, 4]) == {"m": {"0.2": [{"seed": s} for s in range(5)]}}
    with pytest.raises(SystemExit, match="holds seeds 0..0; --seeds 3,4 does not continue them"):
        accuracy._appended(old, {"m": {"0.5": [{"seed": 3}, {"seed": 4}]}}, [3, 4])
    assert accuracy._appended({}, {"n": {"0.2": [{"seed": 0}]}}, [0]) == {"n": {"0.2": [{"seed": 0}]}}
