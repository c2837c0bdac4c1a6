"""The U sample store within a memory budget: what one kept sample costs per site, and the passes that keep the
store under the budget (exact: every pass holds whole sites or slices of a site's units, nothing is dropped).

Sizes: a site stores, per kept sample, ``units x width`` float32 values, where width is 1 for scalar unit
outputs, P (projections) for feature maps, or the map's own size S where S < P and the budget binds (the map
is kept as it is and projected when U is computed: the same product, so the same values, in less room).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .._errors import FairPrunerError

__all__ = ["parse_memory", "default_budget", "SiteSize", "plan_passes", "REDUCE_FACTOR", "format_bytes", "StoreMeter",
           "trim_heap"]

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
# Computing U of a slice holds its samples about three times over (the class-sorted copy, its transpose and
# the padded quantile grid), so a slice reduced at once is sized to a third of the room left by the store.
REDUCE_FACTOR = 3


def parse_memory(value: Union[int, float, str]) -> int:
    """Bytes from an int/float or a string such as ``"8GB"``, ``"512 MiB"`` or ``"2e9"``.

    Example:
        >>> parse_memory("2GB"), parse_memory("1.5 GiB"), parse_memory(4096)
        (2000000000, 1610612736, 4096)
    """
    if isinstance(value, bool):
        raise FairPrunerError(f"max_memory must be a number of bytes or a string like '8GB', got {value!r}.")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise FairPrunerError(f"max_memory={value!r} is not understood; give bytes or a string like '8GB', "
                                  "'512MB' or '2GiB'.")
        n = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(n) or n <= 0:
        raise FairPrunerError(f"max_memory must be positive, got {value!r}.")
    return int(n)


def available_memory() -> Optional[int]:
    """Memory available to new allocations now (MemAvailable on Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget(device=None) -> int:
    """A quarter of the memory available when scoring starts (8 GB where it cannot be read); of the GPU's free
    memory when scoring on a GPU."""
    if device is not None and getattr(device, "type", None) == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = available_memory()
    return free // 4 if free else 8 * 10 ** 9


def format_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class SiteSize:
    """One site's store per kept sample: ``units`` units of ``width`` values each (``raw_width``: the
    unprojected map's size, used instead of the projections where smaller and the budget binds)."""

    units: int
    width: int
    raw_width: int


Slice = Tuple[int, int, int]  # (site, first unit, end unit)


def plan_passes(sizes: Sequence[SiteSize], samples: int, projections: int, budget: int, pieces: int = 1,
                layout: Optional[Tuple[int, int]] = None) -> Tuple[List[List[Slice]], List[bool]]:
    """Splits the sites into passes whose stores stay within three quarters of the budget (the last quarter is
    the room in which U of one slice is computed).

    Args:
        sizes: each site's store per kept sample.
        samples: kept samples (or a bound on them).
        projections: projections per map.
        budget: bytes.
        pieces: cut the store into at least this many slices (under torch.distributed each slice goes to one
            owner rank, so small slices keep what a rank receives at once small).
        layout: ``(padded, grid)``: the samples computing U lays out per unit, every class padded to the largest,
            and one unit's quantile grid (classes x grid points), which it gathers a unit at a time where classes
            differ in size; ``(samples, samples)`` if None.

    Returns:
        (passes, raw): per pass the (site, lo, hi) unit slices it stores (the smallest pass first), and per
        site whether it is stored unprojected. One pass, nothing raw, and whole sites (unless ``pieces``) where
        the store fits.

    Raises:
        FairPrunerError: the budget cannot hold one unit of every site, naming the smallest that can.
    """
    padded, grid = layout or (samples, samples)
    full = [4 * samples * s.units * s.width for s in sizes]
    laid = max(samples, padded) / samples if samples else 1.0
    # Whole sites in one pass where the store and the room to compute U of its largest site fit.
    binding = sum(full) + REDUCE_FACTOR * laid * max(full, default=0) > budget
    raw = [binding and 0 < s.raw_width < s.width for s in sizes]
    per_unit = [4 * samples * (s.raw_width if r else s.width) for s, r in zip(sizes, raw)]
    # A slice is computed projected: REDUCE_FACTOR x its projected size must fit in a quarter of the budget,
    # beside the store of its pass (the other three quarters).
    # Unequal classes: the sorted samples (padded per unit) and a block of them on the common grid, at least one
    # unit's grid, are held together.
    reduce_unit = [REDUCE_FACTOR * 4 * max(samples, padded) * s.width for s in sizes]
    laid_unit = [4 * max(samples, padded) * s.width for s in sizes]
    gather = [4 * grid * s.width if grid > padded else 0 for s in sizes]
    smallest = 4 * max(max(r, u + g) for r, u, g in zip(reduce_unit, laid_unit, gather))
    if smallest > budget:
        raise FairPrunerError(
            f"max_memory={format_bytes(budget)} cannot hold one unit's samples ({samples} kept samples); the "
            f"smallest budget that works is {smallest} bytes ({format_bytes(smallest)}). "
            "Raise max_memory, or lower samples_per_class or projections.")
    total = sum(p * s.units for p, s in zip(per_unit, sizes))
    room = budget * 3 // 4 if binding else total + 1
    piece = max(1, total // pieces) if pieces > 1 else room
    passes: List[List[Slice]] = [[]]
    used = 0
    for i, s in enumerate(sizes):
        lo = 0
        # Units per slice: bounded by the store's room, the room to compute U of the slice, and the piece.
        reduce_cap = min(budget // 4 // reduce_unit[i], (budget // 4 - gather[i]) // laid_unit[i]) if binding \
            else s.units
        step = max(1, min(room // per_unit[i], reduce_cap, piece // per_unit[i]))
        while lo < s.units:
            take = min(s.units - lo, step, max(0, (room - used) // per_unit[i]))
            if take == 0:
                passes.append([])
                used = 0
                continue
            passes[-1].append((i, lo, lo + take))
            used += take * per_unit[i]
            lo += take
    # The first pass also holds the backward's activations, so it takes the smallest store: the last pass,
    # the only one not filled to the room. Which pass measures a slice does not change its samples.
    return passes[-1:] + passes[:-1], raw


class StoreMeter:
    """Bytes of U samples held now, and the most held at once."""

    def __init__(self) -> None:
        self.held = 0
        self.peak = 0

    def add(self, n: int) -> None:
        self.held += n
        self.peak = max(self.peak, self.held)

    def release(self, n: int) -> None:
        self.held -= n


def trim_heap() -> None:
    """Gives the heap's free pages back to the operating system (glibc's ``malloc_trim``; nothing elsewhere).

    The store is many batch-sized tensors, too small for their own memory maps, freed pass by pass among the
    activations' blocks: glibc keeps those pages resident, and the next pass's store lands beside them. Called
    between passes (ResNet-50 at 1,000 classes under a 2 GB budget: the peak fell from 4.2 to 3.8 GiB above the
    loaded process, and the process ends where it started); it frees nothing in use.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


_LIBC = _libc()
