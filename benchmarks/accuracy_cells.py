"""The accuracy benchmark's cells across runs: seeds appended to a cell (``--add-seeds``), a cell kept whole
where a re-run reproduced its first seeds, and a run's rows merged into the ones measured before. A cell is the list
of per-seed records of one method at one level."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["gap", "appended", "kept", "merged", "in_study_order"]


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


def merged(old: Dict[str, Any], new: Dict[str, Any], seeds: List[int], add: bool, one_shot: bool,
           order: Sequence[str]) -> Tuple[Dict[str, Any], List[str]]:
    """``new``'s rows merged into ``old``'s (appending its seeds where ``add``, else keeping reproduced cells whole),
    in the study's ``order``; and a note per cell that lost seeds it held before."""
    new = appended(old, new, seeds, one_shot) if add else kept(old, new, seeds)
    notes = [f"{label!r} at {level} held {len(old[label][level])} seeds, which this run did not reproduce; it now "
             f"holds {len(recs)} (--add-seeds appends instead)"
             for label, rows in new.items() for level, recs in rows.items()
             if len(old.get(label, {}).get(level, [])) > len(recs)]
    # Rows of methods and levels not run this time stay.
    rows = {k: {**old[k], **v} if isinstance(old.get(k), dict) else v for k, v in new.items()}
    return in_study_order({**old, **rows}, order), notes


def in_study_order(rows: Dict[str, Any], order: Sequence[str]) -> Dict[str, Any]:
    """``rows`` with settings (non-dict values) first, then methods in the study's order, unknown labels last."""
    order = list(order)
    return dict(sorted(rows.items(), key=lambda kv: -1 if not isinstance(kv[1], dict)
                       else order.index(kv[0]) if kv[0] in order else len(order)))
