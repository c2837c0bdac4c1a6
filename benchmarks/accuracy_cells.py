"""The accuracy benchmark's cells across runs: seeds appended to a cell (``--add-seeds``), and a cell kept whole
where a re-run reproduced its first seeds. A cell is the list of per-seed records of one method at one level."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

__all__ = ["gap", "appended", "kept"]


def gap(before: List[dict], seeds: List[int], one_shot: bool) -> Optional[str]:
    """Why ``seeds`` cannot be appended to a cell holding ``before`` (None if they can)."""
    held = [r.get("seed", i) for i, r in enumerate(before)]  # records of older runs are seeds 0, 1, ... in order
    if not before:
        return "has no results yet"
    if held != list(range(len(held))):
        return f"holds seeds {held}, not 0, 1, ..."
    if seeds != list(range(len(held), len(held) + len(seeds))):
        return f"holds seeds 0..{len(held) - 1}, which --seeds {','.join(map(str, seeds))} does not continue"
    had = all("one_shot" in r for r in before)
    if had != one_shot:
        return "was measured " + ("without" if had else "with") + " --skip-one-shot"
    return None


def appended(old: Dict[str, Any], new: Dict[str, Any], seeds: List[int], one_shot: bool) -> Dict[str, Any]:
    """``new``'s cells appended to ``old``'s, whose records are seeds 0, 1, ... in order (checked)."""
    out: Dict[str, Any] = {}
    for label, rows in new.items():
        out[label] = {}
        for level, recs in rows.items():
            before = old.get(label, {}).get(level, [])
            why = gap(before, seeds, one_shot)
            if why:
                raise SystemExit(f"--add-seeds: {label!r} at {level} {why}")
            out[label][level] = before + recs
    return out


def kept(old: Dict[str, Any], new: Dict[str, Any], seeds: List[int]) -> Dict[str, Any]:
    """``new``'s cells, except where a cell measured before holds more seeds and this run, of seeds 0, 1, ...,
    reproduced its first ones exactly: that cell stays whole, so re-running a row (a study's default) does not
    drop the seeds added to it."""
    out: Dict[str, Any] = {}
    for label, rows in new.items():
        out[label] = {}
        for level, recs in rows.items():
            before = old.get(label, {}).get(level, [])
            same = seeds == list(range(len(recs))) and before[:len(recs)] == recs
            out[label][level] = before if len(before) > len(recs) and same else recs
    return out
