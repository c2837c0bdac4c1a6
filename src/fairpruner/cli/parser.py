"""The ``fairpruner`` argument parser: one ``--help`` page with an example per sub-command."""
from __future__ import annotations

import argparse
import textwrap
from typing import Callable, List

from .._core.inputs import check_device
from .._errors import FairPrunerError
from .._planning.options import FLOORS, MACS_POWER, STREAM_FLOOR, STREAM_FLOORS, STREAM_WEIGHT, TIES, WIDTH_POWER
from .._scoring.reduce import U_CONSUMER_POWER
from .commands import COMMANDS, DEFAULT_ALPHAS, SWEEP_TARGETS

__all__ = ["build_parser", "MODEL_HELP", "DATA_HELP", "DEFAULT_ALPHAS"]

MODEL_HELP = ("zoo:NAME (see fairpruner.zoo.list_models()), hf:DIR (a Hugging Face model written by save_pretrained, "
              "loaded offline with its weights) or package.module:factory (imported from the current directory or the "
              "Python path; called with num_classes= when it accepts it)")
DATA_HELP = ("'digits' (scikit-learn digits), 'cifar10:PATH' or a .tar.gz with train/ and test/ class folders, "
             "or an image-folder directory")
BF16_HELP = ("fine-tune under bfloat16 autocast (mixed precision): faster on CPUs with AMX or AVX512-BF16 and on "
             "recent GPUs, many times slower on other CPUs (a warning says so); evaluation stays float32")
DISTILL_HELP = ("weight W in [0, 1] of distilling from the unpruned model while fine-tuning: the loss is "
                "(1 - W) x cross-entropy + W x T^2 x KL(original || pruned) at temperature 4 (0.9 is the usual "
                "CIFAR setting; default 0: cross-entropy alone)")


EXAMPLES = {
    "run": """
        The whole path in one command: scores the model on a class-balanced calibration subset of the training
        split, plans (a --macs or --params target, or --alpha; default --macs 0.5), prunes, re-estimates the
        BatchNorm statistics on unlabelled training images, optionally fine-tunes, and prints the per-layer
        table with the test accuracy one-shot, recalibrated and fine-tuned. Writes the pruned model.

        example:
          fairpruner run --model zoo:resnet20 --weights resnet20.pt --data cifar10.tar.gz --macs 0.5 \\
              --out pruned.pt
          fairpruner run --model zoo:resnet20 --weights resnet20.pt --data cifar10.tar.gz --params 0.4 \\
              --finetune-epochs 3 --distill 0.9 --out pruned.pt
        """,
    "demo": """
        Trains a small CNN on scikit-learn digits (seconds), scores it, prints an alpha sweep with the
        one-shot accuracy at each alpha, prunes to -50% MACs, re-estimates the BatchNorm statistics,
        fine-tunes and prints the report with the accuracy after each step.

        example:
          fairpruner demo                      # print only
          fairpruner demo --out demo-results   # also write report, plots, plan and models
        """,
    "score": """
        Computes U-Scores (class separation) and R-Scores (first-order loss change) of every prunable group,
        in one pass over a class-balanced calibration subset of the training split.

        example:
          fairpruner score --model zoo:resnet20 --weights resnet20.pt --data cifar10.tar.gz \\
              --samples-per-class 32 --out scores.pt
          fairpruner score --model mypackage.models:build_net --num-classes 100 --data images/ --out scores.pt
          torchrun --nproc_per_node=2 -m fairpruner.cli score --model zoo:resnet20 --data cifar10.tar.gz \\
              --out scores.pt        # each process scores a shard; identical scores, rank 0 writes
        """,
    "plan": """
        Turns scores into a plan: per group, how many units go (Tolerance of Difference at --alpha, or the
        ToD level a --params/--macs target needs) and which (lowest --signal first).
        Scores are reused: try as many targets as you like, each takes milliseconds.

        example:
          fairpruner plan --scores scores.pt --sweep                 # what each alpha would remove
          fairpruner plan --scores scores.pt --sweep macs            # MACs targets: asked vs achieved
          fairpruner plan --scores scores.pt --macs 0.5 --out plan.json
          fairpruner plan --scores scores.pt --alpha 0.05 --signal l1 --out plan-l1.json
        """,
    "prune": """
        Physically removes the plan's units from the model and saves the smaller model with its plan. With
        --data, re-estimates the BatchNorm statistics on training images first (as 'run' does).

        example:
          fairpruner prune --model zoo:resnet20 --weights resnet20.pt --plan plan.json --data cifar10.tar.gz \\
              --out pruned.pt
        """,
    "report": """
        Compares the original and the pruned model: units per group, measured params, MACs, latency at the
        example batch and, with --data, test-split accuracy.

        example:
          fairpruner report --model zoo:resnet20 --weights resnet20.pt --pruned pruned.pt \\
              --data cifar10.tar.gz --json report.json --plots report-plots
        """,
    "finetune": """
        Fine-tunes a pruned model (SGD with momentum, cosine learning rate per step) on the training split
        and reports test-split accuracy before and after.

        example:
          fairpruner finetune --model zoo:resnet20 --pruned pruned.pt --data cifar10.tar.gz \\
              --epochs 5 --lr 0.01 --out finetuned.pt
          fairpruner finetune --model zoo:resnet20 --pruned pruned.pt --data cifar10.tar.gz \\
              --epochs 5 --lr 0.01 --teacher resnet20.pt --distill 0.9 --out finetuned.pt
        """,
}


def _sub(subs, name: str, summary: str) -> argparse.ArgumentParser:
    about, example = textwrap.dedent(EXAMPLES[name]).strip().split("\nexample:", 1)
    p = subs.add_parser(name, help=summary, description=about.strip(), epilog="example:" + example,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=COMMANDS[name])
    return p


def _progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def _model_args(p: argparse.ArgumentParser, weights: bool = True) -> None:
    p.add_argument("--model", required=True, metavar="SPEC", help=MODEL_HELP)
    p.add_argument("--num-classes", type=_positive, metavar="N",
                   help="passed to the model factory (default: the number of classes in --data, if given)")
    if weights:
        p.add_argument("--weights", metavar="FILE",
                       help="trained weights: a state_dict saved with torch.save, or a file from fairpruner.save")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fairpruner`` command."""
    parser = argparse.ArgumentParser(
        prog="fairpruner", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="FAIR-Pruner: automatic layer-wise structured pruning by Tolerance of Difference.",
        epilog=textwrap.dedent("""
            the common path, in one command:
              fairpruner run --model zoo:resnet20 --weights w.pt --data cifar10.tar.gz --macs 0.5 --out pruned.pt

            step by step:
              fairpruner score --model zoo:resnet20 --weights w.pt --data cifar10.tar.gz --out scores.pt
              fairpruner plan --scores scores.pt --macs 0.5 --out plan.json
              fairpruner prune --model zoo:resnet20 --weights w.pt --plan plan.json --data cifar10.tar.gz \\
                  --out pruned.pt
              fairpruner finetune --model zoo:resnet20 --pruned pruned.pt --data cifar10.tar.gz --out ft.pt
              fairpruner report --model zoo:resnet20 --weights w.pt --pruned ft.pt --data cifar10.tar.gz

            'fairpruner COMMAND --help' shows each command's options and an example.""").strip())
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_run, _add_demo, _add_score, _add_plan, _add_prune, _add_report, _add_finetune):
        add(subs)
    return parser


def _number(text: str, low: float, high: float, closed: bool) -> float:
    """A float in [low, high] (closed) or (low, high), checked when the arguments are read, before any work."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    inside = low <= x <= high if closed else low < x < high
    if not inside:
        span = f"[{low:g}, {high:g}]" if closed else f"({low:g}, {high:g})"
        raise argparse.ArgumentTypeError(f"expected a number in {span}, got {text}")
    return x


def _level(text: str) -> float:
    return _number(text, 0, 1, closed=True)


def _fraction(text: str) -> float:
    return _number(text, 0, 1, closed=False)


def _levels(text: str) -> List[float]:
    """Comma-separated alphas, each in [0, 1]."""
    return _numbers(text, _level)


def _fractions(text: str) -> List[float]:
    """Comma-separated targets, each in (0, 1)."""
    return _numbers(text, _fraction)


def _numbers(text: str, one: Callable[[str], float]) -> List[float]:
    values = [one(a) for a in text.split(",") if a.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def _at_least(low: int) -> Callable[[str], int]:
    """An integer >= low, checked when the arguments are read, before any work."""
    def whole(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"expected {low} or more, got {n}")
        return n
    return whole


_count, _positive = _at_least(0), _at_least(1)


def _device(text: str) -> str:
    """A torch device this machine has (a CUDA device on a machine without one fails here, not mid-run)."""
    try:
        check_device(text)
    except FairPrunerError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _target_args(p: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    target = p.add_mutually_exclusive_group()
    target.add_argument("--alpha", type=_level, metavar="A", help="ToD level in [0, 1]")
    target.add_argument("--params", type=_fraction, metavar="F", help="fraction of parameters to remove, in (0, 1)")
    target.add_argument("--macs", type=_fraction, metavar="F", help="fraction of MACs to remove, in (0, 1)")
    return target


def _power(text: str):
    """--macs-power, --width-power: "auto" or a number."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number, got {text!r}") from None


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--signal", default="u", choices=("u", "l1", "taylor", "random"),
                   help="which units go once the counts are fixed (default u: lowest U-Score)")
    p.add_argument("--allocation", default="tod", choices=("tod", "uniform"),
                   help="per-group counts by ToD (default) or the same fraction everywhere")
    p.add_argument("--stream-weight", type=float, default=STREAM_WEIGHT, metavar="W",
                   help=f"residual streams are cut at alpha/W (default {STREAM_WEIGHT:g}; 1: like any layer)")
    p.add_argument("--ties", default="r", choices=TIES,
                   help="for --params/--macs, the order of ToD steps of one level: the layer whose next unit keeps "
                        "the largest relative R-Score removed lowest per MAC or parameter first (default r), the "
                        "same by relative U (u), or an equal share of every layer's alpha=0 count (share)")
    p.add_argument("--stream-floor", default=STREAM_FLOOR, choices=STREAM_FLOORS,
                   help="how much of a residual stream's alpha=0 ToD count it loses for free (the count swings "
                        "between calibration samples): none of the stream the output layer reads nor of one that "
                        "more than 4 layers write into, and at most sqrt(width) and width / 8 units of the others "
                        f"(default {STREAM_FLOOR}); the same but sqrt(4 x width / writers) beyond 4 writers "
                        "(writers); sqrt(width) whatever the writers and width (capped); at most sqrt(width) of "
                        "every stream, the head's too (sqrt); all of it (free: the paper's ToD); or none")
    p.add_argument("--floor", default="auto", choices=FLOORS,
                   help="the same for every other layer: all of its alpha=0 count (free: the paper's ToD), at "
                        "most sqrt(width) units (sqrt) or none; auto (default): for --params/--macs, free or sqrt, "
                        "whichever removes the least total R-Score (with --macs-power); free for --alpha")
    p.add_argument("--macs-power", type=_power, default=MACS_POWER, metavar="P",
                   help="every layer's ToD levels are multiplied by (MACs of one of its units / a typical unit's)^P: "
                        "P > 0 cuts layers of cheap units (wide, low resolution) deeper, P < 0 layers of costly ones; "
                        "0: one level everywhere (the paper's ToD); auto (default): for --params/--macs, whichever "
                        "of 0, -0.25, 0.25 removes the least total R-Score")
    p.add_argument("--width-power", type=_power, default=WIDTH_POWER, metavar="P",
                   help="every layer's ToD levels are also multiplied by (its width / a typical layer's)^-P: P > 0 "
                        "cuts wide layers deeper; 0: no width weighting; auto (default): for --macs, 0 or 1, chosen "
                        "with --floor and --macs-power by the least total R-Score; 0 for --params and --alpha")


def _attention_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attention", default="heads", choices=("heads", "head_dims"),
                   help="attention units: whole heads (default), or one dimension of every head so all heads keep "
                        "the same width")
    p.add_argument("--gqa", default="query_heads", choices=("query_heads", "kv_groups"),
                   help="under grouped-query attention (Llama, Qwen2, Mistral ...): prune query heads, the same "
                        "number from every key/value group (default: more accuracy at the same MACs), or whole "
                        "key/value groups (kv_groups: the key/value cache shrinks too)")


def _add_run(subs) -> None:
    p = _sub(subs, "run", "score, plan, prune, recalibrate, fine-tune and report in one go")
    _model_args(p)
    p.add_argument("--data", required=True, metavar="SPEC", help=DATA_HELP)
    _target_args(p)
    _plan_args(p)
    p.add_argument("--samples-per-class", type=_at_least(2), default=32, metavar="N",
                   help="calibration samples per class (default 32)")
    p.add_argument("--batch-size", type=_positive, default=64, metavar="B", help="calibration batch size (default 64)")
    _attention_args(p)
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="bound on the U sample store, e.g. 8GB (default: a quarter of the free memory); a smaller "
                        "budget scores in more passes over the data, with the same scores")
    p.add_argument("--recalibrate", type=_count, default=1000, metavar="N",
                   help="training images that re-estimate BatchNorm statistics (default 1000; 0: skip)")
    p.add_argument("--finetune-epochs", type=_count, default=0, metavar="N",
                   help="fine-tuning epochs over the augmented training split, batches of 128 (default 0)")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate (default 0.01)")
    p.add_argument("--distill", type=float, default=0.0, metavar="W", help=DISTILL_HELP)
    p.add_argument("--bf16", action="store_true", help=BF16_HELP)
    p.add_argument("--latency-repeats", type=_count, default=10, metavar="N",
                   help="timed forward passes per model (default 10; 0 skips latency)")
    p.add_argument("--seed", type=int, default=0, help="seeds calibration, recalibration and fine-tuning (default 0)")
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", required=True, metavar="FILE", help="pruned model file to write")
    _progress_flag(p)


def _add_demo(subs) -> None:
    p = _sub(subs, "demo", "train, prune and fine-tune a digits CNN in seconds")
    p.add_argument("--out", metavar="DIR", help="write report, plots, plan and models here (default: nothing)")
    p.add_argument("--seed", type=int, default=0, help="seed of training, scoring and fine-tuning (default 0)")
    p.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)
    _progress_flag(p)


def _add_score(subs) -> None:
    p = _sub(subs, "score", "compute U- and R-Scores on calibration data")
    _model_args(p)
    p.add_argument("--data", required=True, metavar="SPEC", help=DATA_HELP + " (its train split is used)")
    p.add_argument("--samples-per-class", type=_at_least(2), default=32, metavar="N",
                   help="calibration samples per class (default 32)")
    p.add_argument("--projections", type=_positive, default=128, metavar="P",
                   help="random directions of the sliced W1 (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seeds the calibration draw and directions (default 0)")
    p.add_argument("--batch-size", type=_positive, default=64, metavar="B", help="calibration batch size (default 64)")
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu)")
    p.add_argument("--u-at", default="output", choices=("output", "norm", "input"),
                   help="where U is measured: the raw layer output (default), after normalisation, or the next "
                        "layer's input")
    p.add_argument("--u-reduce", default="mean", choices=("max", "mean"),
                   help="how a coupled group combines the U of its members (default mean)")
    p.add_argument("--u-consumer-power", type=float, default=U_CONSUMER_POWER, metavar="P",
                   help="U is multiplied by the norm of the weights that read the unit to this power, so it "
                        f"measures what the next layer receives (default {U_CONSUMER_POWER:g}; 0: the paper's U)")
    p.add_argument("--r-reduce", default="max", choices=("sum", "max"),
                   help="how a coupled group combines the Taylor terms of its members (default max)")
    _attention_args(p)
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="bound on the U sample store, e.g. 8GB (default: a quarter of the free memory); a smaller "
                        "budget scores in more passes over the data, with the same scores")
    p.add_argument("--class-pairs", default="auto", choices=("auto", "all", "search"),
                   help="largest class-pair W1 over all pairs, or by a search linear in the classes (default auto: "
                        "all pairs up to 32 classes)")
    p.add_argument("--out", required=True, metavar="FILE", help="scores file to write")
    _progress_flag(p)


def _add_plan(subs) -> None:
    p = _sub(subs, "plan", "choose the units to remove (alpha or params/MACs target)")
    p.add_argument("--scores", required=True, metavar="FILE", help="from 'fairpruner score'")
    _target_args(p)
    _plan_args(p)
    p.add_argument("--seed", type=int, default=0, help="seeds the random signal (default 0)")
    p.add_argument("--sweep", nargs="?", const="alpha", choices=("alpha", "macs", "params"),
                   help="print what each alpha of --alphas (or each target of --targets, asked beside achieved, "
                        "with '--sweep macs' or '--sweep params') would remove")
    p.add_argument("--alphas", type=_levels,
                   help="comma-separated alphas in [0, 1] for --sweep (default "
                        f"{','.join(f'{a:g}' for a in DEFAULT_ALPHAS)})")
    p.add_argument("--targets", type=_fractions,
                   help="comma-separated fractions in (0, 1) for '--sweep macs|params' (default "
                        f"{','.join(f'{a:g}' for a in SWEEP_TARGETS)})")
    p.add_argument("--out", metavar="FILE", help="plan JSON to write")


def _add_prune(subs) -> None:
    p = _sub(subs, "prune", "remove the planned units from a model")
    _model_args(p)
    p.add_argument("--plan", required=True, metavar="FILE", help="from 'fairpruner plan'")
    p.add_argument("--data", metavar="SPEC", help=DATA_HELP + " (its training images re-estimate the pruned "
                   "model's BatchNorm statistics, which surgery leaves stale; recommended)")
    p.add_argument("--recalibrate", type=_count, default=1000, metavar="N",
                   help="training images that re-estimate BatchNorm statistics, with --data (default 1000; 0: skip)")
    p.add_argument("--seed", type=int, default=0, help="seeds the recalibration draw (default 0)")
    p.add_argument("--out", required=True, metavar="FILE", help="pruned model file to write")
    _progress_flag(p)


def _add_report(subs) -> None:
    p = _sub(subs, "report", "compare the original and the pruned model")
    _model_args(p)
    p.add_argument("--pruned", required=True, metavar="FILE", help="from 'fairpruner prune' or 'finetune'")
    p.add_argument("--data", metavar="SPEC", help=DATA_HELP + " (its test split measures accuracy)")
    p.add_argument("--batch-size", type=_positive, default=64, metavar="B",
                   help="example batch for latency, and evaluation batch size (default 64)")
    p.add_argument("--latency-repeats", type=_count, default=20, metavar="N",
                   help="timed forward passes per model (default 20; 0 skips latency)")
    p.add_argument("--threads", type=_positive, metavar="N",
                   help="torch CPU threads while measuring (default: torch's choice; 1 is steadier on a busy machine)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--plots", metavar="DIR", help="also write PNG charts into this directory")
    _progress_flag(p)


def _add_finetune(subs) -> None:
    p = _sub(subs, "finetune", "fine-tune a pruned model")
    _model_args(p, weights=False)
    p.add_argument("--pruned", required=True, metavar="FILE", help="from 'fairpruner prune'")
    p.add_argument("--data", required=True, metavar="SPEC", help=DATA_HELP)
    p.add_argument("--epochs", type=_positive, default=1, help="passes over the training split (default 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="initial learning rate (default 1e-3, as the paper)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 penalty (default 5e-4)")
    p.add_argument("--batch-size", type=_positive, default=64, metavar="B", help="training batch size (default 64)")
    p.add_argument("--max-steps", type=_positive, metavar="N", help="stop after N optimizer steps")
    p.add_argument("--no-augment", action="store_true", help="no random crop/flip on image data")
    p.add_argument("--teacher", metavar="FILE", help="the unpruned weights of --model, to distil from (with --distill)")
    p.add_argument("--distill", type=float, default=0.0, metavar="W", help=DISTILL_HELP.replace(
        "the unpruned model", "--teacher"))
    p.add_argument("--bf16", action="store_true", help=BF16_HELP)
    p.add_argument("--seed", type=int, default=0, help="seeds shuffling and augmentation (default 0)")
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", required=True, metavar="FILE", help="fine-tuned model file to write")
    _progress_flag(p)
