"""Pruning transformers, recurrent nets and mixtures of experts: accuracy and cost after FAIR-Pruner.

For every family the model is trained briefly here (seeded), scored once with ``fairpruner.score`` on a
class-balanced calibration set, then pruned at ToD alpha 0.05 and at a 30 % MACs target; each pruned model is
evaluated one-shot and after the same short ``fairpruner.finetune`` run. Parameters and MACs come from
``fairpruner.count_params`` / ``fairpruner.count_macs`` on the pruned models (MACs of one sample).

Families: zoo ViT and ConvNeXt on a CIFAR-10 slice, an ``nn.TransformerEncoder`` classifier, zoo LSTM and GRU
classifiers (bidirectional, 2 layers), the zoo mixture-of-experts classifier, and Hugging Face BERT / ViT when
``transformers`` is installed. The sequence families learn synthetic tasks generated in ``sequence_tasks.py``
(see ``majority``).

    python benchmarks/sequence.py            # full run (a few minutes on 2 cores) -> benchmarks/results/sequence.md
    python benchmarks/sequence.py --quick    # smoke run (about a minute), results printed only
    python benchmarks/sequence.py --families vit lstm --quick
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import fairpruner as fp
from fairpruner import data as fpdata, zoo
from sequence_tasks import (CIFAR, FAMILIES, FEATURES, SEQ_CLASSES, STEPS, TOKENS, VOCAB, Batches, Data, Family,
                            cifar_slice, majority, majority_tokens)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "sequence.md"


@dataclass
class Sizes:
    """How much data, training and fine-tuning a run uses."""

    cifar_train: int
    cifar_test: int
    seq_train: int
    seq_test: int
    image_epochs: int
    seq_epochs: int
    finetune_steps: int
    calib_per_class: int


FULL = Sizes(cifar_train=5000, cifar_test=2000, seq_train=4000, seq_test=1000, image_epochs=4, seq_epochs=6,
             finetune_steps=60, calib_per_class=32)
QUICK = Sizes(cifar_train=1000, cifar_test=500, seq_train=1000, seq_test=500, image_epochs=1, seq_epochs=3,
              finetune_steps=5, calib_per_class=16)
BATCH = 64
# SGD at 0.01 threw the AdamW-trained transformers out of their minimum (HF BERT's training loss 0.04 -> 0.55
# unpruned, 0.13 -> 1.91 pruned, within 10 steps); 0.001 is the paper's fine-tuning rate.
FINETUNE_LR = 0.001
SETTINGS = (("alpha 0.05", {"alpha": 0.05}), ("MACs -30%", {"macs": 0.3}))


# ------------------------------------------------------------------------------------------- training

def logits(out) -> torch.Tensor:
    """The logits of a plain model or of a Hugging Face model's output object."""
    return out.logits if hasattr(out, "logits") else out


def train(model: nn.Module, data: Data, epochs: int, lr: float, seed: int) -> nn.Module:
    """AdamW with a linear warm-up (5 % of the steps) and a cosine decay; gradients clipped at norm 1."""
    torch.manual_seed(seed)
    batches = Batches(data, BATCH, seed=seed)
    total = epochs * len(batches)
    warm = max(1, total // 20)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    model.train()
    for _ in range(epochs):
        for x, y in batches:
            loss = F.cross_entropy(logits(model(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    return model.eval()


def accuracy(model: nn.Module, data: Data) -> float:
    return fp.evaluate(model, Batches(data, 256))


# -------------------------------------------------------------------------------------------- one run

def unit_summary(plan: "fp.Plan") -> str:
    """Removed / total units per kind of group: family groups by their name's suffix (":heads", ":hidden",
    ...), torch-pruning groups as "channels"."""
    kinds: Dict[str, List[int]] = {}
    for g in plan.groups:
        kind = g["name"].rsplit(":", 1)[1] if ":" in g["name"] else "channels"
        if re.fullmatch(r"layer\d+", kind):  # recurrent groups: hidden units of one layer of an LSTM/GRU
            kind = f"rnn {kind}"
        k = kinds.setdefault(kind, [0, 0])
        k[0] += len(plan.removed[g["name"]])
        k[1] += g["units"]
    return ", ".join(f"{k} {a}/{b}" for k, (a, b) in sorted(kinds.items()))


def missing(fam: Family) -> Optional[str]:
    for mod in fam.needs:
        if importlib.util.find_spec(mod) is None:
            return f"`{mod}` is not installed/available"
    names = zoo.list_models()
    for name in fam.needs_zoo:
        if name not in names:
            return f"zoo model `{name}` is not available"
    return None


def run_family(fam: Family, sizes: Sizes, data: Dict[str, Tuple[Data, Data]]) -> Tuple[dict, List[dict]]:
    train_set, test_set = data[fam.task]
    torch.manual_seed(0)
    model = fam.build().eval()
    t0 = time.perf_counter()
    epochs = sizes.image_epochs if fam.task == "cifar" else sizes.seq_epochs
    train(model, train_set, epochs, fam.lr, seed=0)
    train_s = time.perf_counter() - t0
    acc0 = accuracy(model, test_set)

    calib = fpdata.calibration_loader(train_set, samples_per_class=sizes.calib_per_class, batch_size=BATCH)
    example = train_set.x[:1]
    params0, macs0 = fp.count_params(model), fp.count_macs(model, example)
    info = {"family": fam.label, "task": fam.task, "epochs": epochs, "train_n": len(train_set),
            "test_n": len(test_set), "train_s": train_s, "acc": acc0, "params": params0, "macs": macs0,
            "groups": []}
    rows = []
    for variant, kwargs in fam.variants:
        label = f"{fam.label}, {variant}" if variant else fam.label
        t0 = time.perf_counter()
        scores = fp.score(model, calib, samples_per_class=sizes.calib_per_class, progress=False, **kwargs(model))
        score_s = time.perf_counter() - t0
        info["groups"].append(f"{len(scores.groups)} ({sum(g.n_units for g in scores.groups)})")
        for setting, target in SETTINGS:
            rows.append(prune_and_tune(model, scores, setting, target, sizes, train_set, test_set, example,
                                       {"family": label, "params0": params0, "macs0": macs0, "acc0": acc0,
                                        "score_s": score_s}))
    return info, rows


def prune_and_tune(model: nn.Module, scores: "fp.Scores", setting: str, target: Dict, sizes: Sizes, train_set: Data,
                   test_set: Data, example: torch.Tensor, row: Dict) -> Dict:
    """One table row: plan, prune, count, evaluate one-shot, fine-tune, evaluate."""
    row = dict(row, setting=setting)
    try:
        plan = fp.plan(scores, **target)
    except fp.PlanError as e:
        row["note"] = f"not reachable: {str(e).split(' (')[0]}"
        return row
    pruned = fp.prune(model, plan)
    params1, macs1 = fp.count_params(pruned), fp.count_macs(pruned, example)
    row.update(params1=params1, macs1=macs1, units=unit_summary(plan), alpha=plan.alpha,
               oneshot=accuracy(pruned, test_set))
    off = [f"{what} predicted {plan.predicted[key]:.0f}, counted {val}"
           for what, key, val in (("params", "params_after", params1), ("MACs", "macs_after", macs1))
           if plan.predicted[key] != val]
    if off:
        row["note"] = "; ".join(off)
    torch.manual_seed(0)
    fp.finetune(pruned, Batches(train_set, BATCH, seed=1), epochs=10 ** 6, lr=FINETUNE_LR,
                max_steps=sizes.finetune_steps, progress=False)
    row["finetuned"] = accuracy(pruned, test_set)
    return row


# ------------------------------------------------------------------------------------------- reporting

def pct(v: Optional[float]) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def table(rows: List[dict]) -> List[str]:
    out = ["| family | setting | alpha | params before → after | MACs removed | units removed | acc before "
           "| one-shot acc | fine-tuned acc | score s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "params1" in r:
            params = f"{r['params0'] / 1e3:.1f}k → {r['params1'] / 1e3:.1f}k"
            macs = f"{100 * (1 - r['macs1'] / r['macs0']):.1f} %"
            units = r["units"] + (f" ({r['note']})" if r.get("note") else "")
            alpha = f"{r['alpha']:.3g}"
        else:
            params = macs = alpha = ""
            units = r.get("note", "")
        out.append(f"| {r['family']} | {r['setting']} | {alpha} | {params} | {macs} | {units} | {pct(r['acc0'])} "
                   f"| {pct(r.get('oneshot'))} | {pct(r.get('finetuned'))} | {r['score_s']:.2f} |")
    return out


def family_table(infos: List[dict]) -> List[str]:
    out = ["| family | task | train / test samples | epochs | train s | acc | params | MACs / sample "
           "| scored groups (units) |", "|---|---|---|---|---|---|---|---|---|"]
    for i in infos:
        out.append(f"| {i['family']} | {i['task']} | {i['train_n']} / {i['test_n']} | {i['epochs']} "
                   f"| {i['train_s']:.1f} | {pct(i['acc'])} | {i['params'] / 1e3:.1f}k | {i['macs'] / 1e6:.2f}M "
                   f"| {', '.join(i['groups'])} |")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (small data, 1-3 epochs, 5 fine-tune "
                        "steps); results are printed, not written")
    parser.add_argument("--families", nargs="+", choices=[f.key for f in FAMILIES], help="run only these")
    parser.add_argument("--out", type=Path, help=f"results file (default: {RESULTS.relative_to(HERE.parent)} "
                        "for a full run of all families, none otherwise)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    wall0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    chosen = [f for f in FAMILIES if not args.families or f.key in args.families]

    notes, infos, rows = [], [], []
    runnable = []
    for fam in chosen:
        why = missing(fam)
        if why:
            notes.append(f"{fam.label}: skipped, {why}.")
            print(f"skip {fam.key}: {why}", flush=True)
        else:
            runnable.append(fam)
    tasks = {f.task for f in runnable}
    data: Dict[str, Tuple[Data, Data]] = {}
    if "cifar" in tasks:
        if CIFAR.exists():
            data["cifar"] = (cifar_slice("train", sizes.cifar_train), cifar_slice("test", sizes.cifar_test))
        else:
            for fam in [f for f in runnable if f.task == "cifar"]:
                notes.append(f"{fam.label}: skipped, {CIFAR} not found.")
            runnable = [f for f in runnable if f.task != "cifar"]
    data["majority"] = (majority(sizes.seq_train, seed=0), majority(sizes.seq_test, seed=1))
    data["tokens"] = (majority_tokens(sizes.seq_train, seed=0), majority_tokens(sizes.seq_test, seed=1))

    for fam in runnable:
        t0, c0 = time.perf_counter(), time.process_time()
        print(f"{fam.key}: training, scoring, pruning ...", flush=True)
        try:
            info, fam_rows = run_family(fam, sizes, data)
        except Exception as e:  # noqa: BLE001 - one failing family must not hide the others' results
            traceback.print_exc()
            notes.append(f"{fam.label}: FAILED, {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        infos.append(info)
        rows.extend(fam_rows)
        print("\n".join(table(fam_rows)[2:]) + f"   [{time.perf_counter() - t0:.0f} s, "
              f"{time.process_time() - c0:.0f} CPU s]", flush=True)

    wall = time.perf_counter() - wall0
    versions = f"torch {torch.__version__}"
    if importlib.util.find_spec("transformers") is not None:
        import transformers
        versions += f", transformers {transformers.__version__}"
    cmd = "python benchmarks/sequence.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    lines = [
        "# Pruning transformers, recurrent nets and mixtures of experts",
        "",
        f"Command: `{cmd}`; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {versions}; "
        f"{torch.get_num_threads()} threads; wall time {wall / 60:.1f} min (load average {load0:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at the end).",
        "",
        f"Each model is trained here (AdamW, seeded), scored once with `fairpruner.score` on a class-balanced "
        f"calibration set ({sizes.calib_per_class} samples per class), then pruned with `fairpruner.prune` at "
        f"ToD alpha 0.05 and at the smallest alpha that removes 30 % of the MACs. "
        f"Params and MACs (per sample) are counted on the pruned models with `fairpruner.count_params` / "
        f"`count_macs`. One-shot = straight after pruning; fine-tuned = after `fairpruner.finetune` with "
        f"{sizes.finetune_steps} SGD steps of {BATCH} samples (lr {FINETUNE_LR}, cosine), the same for every "
        f"model. Accuracies (%) on held-out test samples; score s = the scoring call's wall time. Units removed: "
        f"per kind of group (heads, hidden units of recurrent layers, experts, channels = MLP hidden units and "
        'convolution channels grouped by torch-pruning). The zoo ViT is scored twice, with `attention="heads"` '
        'and `attention="head_dims"`; the MoE twice, whole experts (default) and, with its routers in `ignore=`, '
        "the hidden units inside every expert.",
        "",
        *table(rows),
        "",
        *family_table(infos),
        "",
        "Tasks: cifar = the first images of every class of the CIFAR-10 train/test splits (10 classes); majority = "
        f"{STEPS} steps x {FEATURES} float features, each step a noisy copy of one of {SEQ_CLASSES} prototype "
        "vectors, label = the prototype planted at 6 random steps (the others fill the rest at random); tokens = "
        f"the same on token ids ({SEQ_CLASSES} keyword tokens among filler tokens, {TOKENS} tokens, vocabulary "
        f"{VOCAB}). Chance: 10 % (cifar), 20 % (majority, tokens).",
    ]
    if any("counted" in r.get("note", "") for r in rows):
        notes.append("Where predicted (cost model) and counted params/MACs differ, the row says so. For the "
                     "hidden units inside MoE experts this is documented behaviour: an expert's MACs depend on "
                     "how many tokens it receives, and the cost model uses the example input's routing, which "
                     "pruning an earlier block can change (fairpruner/families/experts.py).")
    if any("not reachable" in r.get("note", "") for r in rows):
        notes.append("A target that cannot be reached in one round of ToD is reported as such. Removing whole "
                     "experts saves parameters but hardly any MACs: every token still runs its top-k experts.")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    out = args.out or (RESULTS if not args.quick and not args.families else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
