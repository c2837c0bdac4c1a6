"""The methods ``accuracy.py`` compares and the studies its defaults were chosen by, as settings of
``fp.score`` and ``fp.plan``: every label here is a row of a results file, so a label never changes meaning."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import accuracy_report as report


# this library's defaults before the validation studies
PAPER_DEFAULTS = {"u_reduce": "max", "r_reduce": "sum", "u_consumer_power": 0, "u_at": "input"}

# Every layer that is not a residual stream loses its whole alpha=0 count (the default, made explicit where a
# variant also sets the stream rule), and every layer's ToD levels count alike (macs_power=0: the default before
# the MACs-weighting study, pinned in every row measured before it).
FREE = {"floor": "free", "macs_power": 0}
P0 = {"macs_power": 0}
# The floor study: every other layer's free alpha=0 count capped at sqrt(width) too.
CAPPED = "FAIR, every other layer's free floor capped at sqrt(width) too (floor=sqrt)"
IN = {"u_at": "input"}
PLAIN = {"u_consumer_power": 0, **IN}
# Residual streams as the defaults before the stream study cut them: weight 4, the whole alpha=0 count free.
FREE4 = {"stream_weight": 4, "stream_floor": "free", **FREE}
EARLIER = "FAIR, streams lose their whole alpha=0 count (default before the stream study)"
# The default before the output layer's stream was spared: every stream's free floor capped at sqrt(width).
SQRT = {"stream_floor": "sqrt", **FREE}
PREVIOUS = "FAIR, every stream loses at most sqrt(width) for free (default before the head's stream was spared)"
# The default before the MACs-weighting study: one ToD level for every layer.
ONE_LEVEL = "FAIR, one ToD level for every layer (macs_power=0, default before the MACs-weighting study)"
# Every row measured before the tie/floor study pins that study's previous rules (Bench.fair adds PINNED under
# a row's own settings): free ToD steps ordered by relative U per MAC, every other layer's whole floor free;
# and every row measured before the writers study the stream cap of its time (sqrt(width) whatever the writers).
# The tie/floor study's rules order them by relative R and take a free or sqrt-capped floor by the least total
# R-Score; the writers study's cap streams that more than 4 layers write, or narrower than 64, below sqrt(width).
# Every row measured before the width study pins its previous rule too: no width weighting.
PINNED = {"ties": "u", "floor": "free", "stream_floor": "capped", "width_power": 0}
NEW = {"ties": "r", "floor": "auto"}
WRITERS = {**NEW, "stream_floor": "writers"}
PREVIOUS_DEFAULT = "FAIR, free steps by relative U, every floor free (default before the tie/floor study)"
# The default before the writers study (the same plans wherever no stream has more than 4 writers or fewer than 64
# units: VGG-16-BN).
CAPPED_DEFAULT = "FAIR, every stream's free floor sqrt(width) whatever its writers (default before the writers study)"
# The default before the shallow-streams study (the same plans wherever no stream has more than 4 writers: ResNet-20,
# VGG-16-BN).
SHALLOW = {**NEW, "stream_floor": "shallow"}
WRITERS_DEFAULT = ("FAIR, a stream's free floor shrinks as 2 / sqrt(writers) beyond 4 writers (stream_floor=writers, "
                   "default before the shallow-streams study)")
# The default before the width study (the same plans wherever the least total R-Score keeps width_power=0).
WIDE = {**SHALLOW, "width_power": "auto"}
SHALLOW_DEFAULT = ("FAIR, nothing of a residual stream more than 4 layers write is free (stream_floor=shallow, "
                   "previous default)")
DEFAULT, TP_L1 = report.DEFAULT, report.TP_L1
# name -> (score settings, plan settings); None = a Torch-Pruning method.
METHODS: Dict[str, Tuple[Optional[dict], Optional[dict]]] = {
    DEFAULT: ({}, WIDE),
    SHALLOW_DEFAULT: ({}, SHALLOW),
    WRITERS_DEFAULT: ({}, WRITERS),
    CAPPED_DEFAULT: ({}, NEW),
    PREVIOUS_DEFAULT: ({}, {}),
    ONE_LEVEL: ({}, P0),
    "FAIR, first defaults (U max, R sum, streams like any layer)": (
        PAPER_DEFAULTS, {"stream_weight": 1, "ties": "share", "stream_floor": "free", **FREE}),
    "FAIR, plain U at the input, equal shares of the floor (defaults before the last two studies)": (
        PLAIN, {"ties": "share", **FREE4}),
    "FAIR, U x consumer norm at the next layer's input (u_at=input), streams' floor free": (IN, FREE4),
    EARLIER: ({}, FREE4),
    PREVIOUS: ({}, SQRT),
    CAPPED: ({}, {"floor": "sqrt", **P0}),
    "U + uniform": ({}, {"allocation": "uniform"}),
    "L1 + ToD": ({}, {"signal": "l1", **P0}),
    "L1 + uniform": ({}, {"signal": "l1", "allocation": "uniform"}),
    "Taylor + ToD": ({}, {"signal": "taylor", **P0}),
    "Taylor + uniform": ({}, {"signal": "taylor", "allocation": "uniform"}),
    "random + ToD": ({}, {"signal": "random", **P0}),
    "random + uniform": ({}, {"signal": "random", "allocation": "uniform"}),
    TP_L1: (None, {"importance": "l1"}),
    "Torch-Pruning global Taylor": (None, {"importance": "taylor"}),
}
# --methods core (bigger models): the default against the two best uniform baselines and Torch-Pruning's best
# method on ResNet-20 (global L1: global Taylor tied it at 20 % and trailed it at 35-65 % there).
CORE = [DEFAULT, "U + uniform", "L1 + uniform", TP_L1]
# --methods others: the remaining baselines for the bigger models, Torch-Pruning's global Taylor and uniform depths
# by Taylor and random scores (the most telling first: a long run stopped midway keeps the methods it finished).
OTHERS = ["Torch-Pruning global Taylor", "Taylor + uniform", "random + uniform"]
# L1, Taylor and random scores picking the units within ToD's depths (the depth rules of the L1 row, measured
# before the MACs-weighting study, pinned for all three so that only the score differs).
SIGNAL_TOD = ["L1 + ToD", "Taylor + ToD", "random + ToD"]
# The paper's ablations on VGG-16 (fractions of parameters removed): ToD against uniform depths, with U and with
# random scores.
ABLATION = [DEFAULT, "U + uniform", "random + ToD", "random + uniform"]
MODELS = ("resnet20", "resnet56", "vgg16_bn")  # the README's order

# The validation study: where U is measured and how it is weighted, how a coupled group combines U and R, how
# deep residual streams are cut, how a target orders ToD's equal-level steps. Label -> (score, plan settings).
VARIANTS: Dict[str, Tuple[dict, dict]] = {
    "plain U at the input, equal shares of the floor (default before the last two studies)": (
        PLAIN, {"ties": "share", **FREE4}),
    "plain U at the input, cost-ordered ties": (PLAIN, FREE4),
    "U x consumer norm at the input, equal shares of the floor": (IN, {"ties": "share", **FREE4}),
    "U x consumer norm at the input, cost-ordered ties": (IN, FREE4),
    "U x consumer norm^2 at the input, cost-ordered ties": ({"u_consumer_power": 2, **IN}, FREE4),
    "U x consumer norm at the input, stream weight 1": (IN, {"stream_weight": 1, "stream_floor": "free", **FREE}),
    "U x consumer norm at the input, stream weight 8": (IN, {"stream_weight": 8, "stream_floor": "free", **FREE}),
    "U x consumer norm at the input, U max over sites": ({"u_reduce": "max", **IN}, FREE4),
    "U x consumer norm at the input, R sum": ({"r_reduce": "sum", **IN}, FREE4),
    "U x consumer norm on the layer output (u_at=output), streams' whole floor free, weight 4": ({}, FREE4),
    "U x consumer norm on the layer output, streams' free floor capped at sqrt(width), weight 8 (default before "
    "the head's stream was spared)": ({}, SQRT),
    "U x consumer norm on the layer output, streams' free floor capped at sqrt(width), none of the output "
    "layer's stream, weight 8 (default before the MACs-weighting study)": ({}, P0),
    "U x consumer norm on the layer output, streams cut only at positive levels, weight 8": (
        {}, {"stream_floor": "none", **FREE}),
}
PREVIOUS_SELECTED = ("U x consumer norm on the layer output, streams' free floor capped at sqrt(width), none of the "
                     "output layer's stream, weight 8 (default before the MACs-weighting study)")
# The rows that change one thing of that default start with this (their labels are the results files' keys).
AS_BEFORE_MACS = "as the default before the MACs-weighting study"
AUTO_POWER = (f"{AS_BEFORE_MACS}, each MACs target weighted by the power of 0, -0.25, 0.25 whose plan removes the "
              "least total R-Score (macs_power=auto, default before the tie/floor study)")
TIES_SELECTED = ("as macs_power=auto, free steps ordered by relative R per MAC, every other layer's floor free or "
                 "capped at sqrt(width) with the power whose plan removes the least total R-Score (ties=r, floor=auto, "
                 "default before the writers study)")
WRITERS_SELECTED = ("as ties=r, floor=auto, every stream but the head's loses at most sqrt(4 x width / max(writers, "
                    "4)) and at most width / 8 for free: fewer units where more than 4 layers write it or where it is "
                    "narrow (stream_floor=writers, default before the shallow-streams study)")
SHALLOW_SELECTED = ("as stream_floor=writers, a stream that more than 4 layers write loses nothing for free; one of at "
                    "most 4 writers, as before, at most sqrt(width) and width / 8 (stream_floor=shallow, default "
                    "before the width study)")
SELECTED = ("as stream_floor=shallow, the least total R-Score also chooses among the plans whose every layer's levels "
            "are x (width / typical)^-1, cutting wide layers deeper (width_power=auto, default)")
# --part select --methods core: the stream study (ResNet-56 and ResNet-20), the last four variants above.
STREAM_STUDY = list(VARIANTS)[-4:]
# --part select --methods floor: that default against the other floor rules and uniform depths (every
# model).
FLOOR_VARIANTS: Dict[str, Tuple[dict, dict]] = {
    f"{AS_BEFORE_MACS}, every other layer's free floor capped at sqrt(width) too (floor=sqrt)": (
        {}, {"floor": "sqrt", **P0}),
    f"{AS_BEFORE_MACS}, every other layer loses units only at positive levels (floor=none)": (
        {}, {"floor": "none", **P0}),
    "U + uniform depths (the baseline to beat)": ({}, {"allocation": "uniform"}),
}
VARIANTS.update(FLOOR_VARIANTS)
FLOOR_STUDY = [PREVIOUS_SELECTED, *FLOOR_VARIANTS]
# --part select --methods cost: every layer's ToD levels weighted by (the MACs one of its units holds /
# a typical unit's)^p (plan's macs_power), so that a MACs target cuts layers of cheap or of costly units deeper,
# and the default that picks p per target by the least total R-Score (every model).
COST_VARIANTS: Dict[str, Tuple[dict, dict]] = {
    f"{AS_BEFORE_MACS}, every layer's levels x (unit MACs / typical)^{p:g} (macs_power={p:g})": (
        {}, {"macs_power": p}) for p in (-1.0, -0.5, -0.25, 0.25, 0.5)}
VARIANTS.update(COST_VARIANTS)
VARIANTS[AUTO_POWER] = ({}, {})
COST_STUDY = [*COST_VARIANTS, AUTO_POWER]
# --part select --methods ties: the tie/floor study (free steps by R instead of U, floors chosen by R).
VARIANTS[TIES_SELECTED] = ({}, NEW)
TIE_STUDY = [AUTO_POWER, TIES_SELECTED]
# --part select --methods writers: the writers study (a stream's free cap shrinks with the layers writing it).
VARIANTS[WRITERS_SELECTED] = ({}, WRITERS)
WRITERS_STUDY = [TIES_SELECTED, WRITERS_SELECTED]
# --part select --methods streams: the writers rule against the same rules with every stream spared until a
# positive level (the stream study's "none", which led on ResNet-56 with the rules of its time).
SPARED = "as the default, every stream loses units only at positive levels, none for free (stream_floor=none)"
VARIANTS[SPARED] = ({}, {**NEW, "stream_floor": "none"})
SPARED_STUDY = [WRITERS_SELECTED, SPARED]
# --part select --methods shallow: the shallow-streams study ("none" where more than 4 layers write a stream,
# the writers' cap elsewhere).
VARIANTS[SHALLOW_SELECTED] = ({}, SHALLOW)
SHALLOW_STUDY = [WRITERS_SELECTED, SHALLOW_SELECTED]
# --part select --methods width: the width study (width_power=1 always, or among the candidates of the least
# total R-Score).
WIDTH_ONE = ("as stream_floor=shallow, every layer's levels x (width / typical)^-1 whatever the total R-Score "
             "(width_power=1)")
VARIANTS[WIDTH_ONE] = ({}, {**SHALLOW, "width_power": 1})
VARIANTS[SELECTED] = ({}, WIDE)
WIDTH_STUDY = [SHALLOW_SELECTED, WIDTH_ONE, SELECTED]
# --part select --methods tp: Torch-Pruning global L1 on the validation split, the rival the default must beat
# there too (a reference row, never a candidate).
TP_REFERENCE = "Torch-Pruning global L1 (the rival, for reference; not a candidate)"
VARIANTS[TP_REFERENCE] = METHODS[TP_L1]
# --part select --methods tp_taylor: Torch-Pruning global Taylor there, which leads the default at light levels on
# ResNet-56's test images (a reference row for the studies that try to close that gap, never a candidate).
TP_TAYLOR_REFERENCE = "Torch-Pruning global Taylor (a rival, for reference; not a candidate)"
VARIANTS[TP_TAYLOR_REFERENCE] = METHODS["Torch-Pruning global Taylor"]


# --methods of each part -> the labels it runs.
PART_METHODS: Dict[str, Dict[str, List[str]]] = {
    "select": {"all": list(VARIANTS), "core": STREAM_STUDY, "floor": FLOOR_STUDY, "cost": COST_STUDY,
               "ties": TIE_STUDY, "writers": WRITERS_STUDY, "streams": SPARED_STUDY,
               "shallow": SHALLOW_STUDY, "width": WIDTH_STUDY, "width_one": [WIDTH_ONE],
               "default": [SELECTED],
               "previous": [SHALLOW_SELECTED],
               "tp": [TP_REFERENCE], "tp_taylor": [TP_TAYLOR_REFERENCE]},
    "test": {"all": list(METHODS), "core": CORE, "baselines": CORE[1:], "default": [DEFAULT],
             "previous": [SHALLOW_DEFAULT, WRITERS_DEFAULT, CAPPED_DEFAULT, PREVIOUS_DEFAULT, ONE_LEVEL],
             "tp": [TP_L1, "Torch-Pruning global Taylor"],
             "signals": SIGNAL_TOD, "others": OTHERS},
    "ablation": {"all": ABLATION, "default": [DEFAULT],
                 "previous": [SHALLOW_DEFAULT, WRITERS_DEFAULT, CAPPED_DEFAULT, PREVIOUS_DEFAULT, ONE_LEVEL]},
    "targets": {"all": [DEFAULT], "default": [DEFAULT]},
    # writers, capped: the earlier defaults whose fine-tuned rows the results files keep (ResNet-56, ResNet-20).
    "finetune": {"all": [DEFAULT, SHALLOW_DEFAULT, TP_L1], "default": [DEFAULT], "previous": [SHALLOW_DEFAULT],
                 "writers": [WRITERS_DEFAULT], "capped": [CAPPED_DEFAULT],
                 "tp": [TP_L1]},
}
