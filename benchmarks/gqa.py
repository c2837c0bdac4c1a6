"""Grouped-query attention: whole key/value groups or query heads evenly within groups, which keeps more accuracy?

A Llama classifier with grouped-query attention (4 layers, 16 query heads over 4 key/value heads, head_dim 8) is
trained here on the token-majority task of ``sequence_tasks.py``, scored once per unit kind and calibration seed, and
pruned to the same MACs with only the attention pruned (the gated MLPs in ``ignore=``):

* ``kv_groups`` (``AttentionOptions(gqa="kv_groups")``): a unit is one key/value head with its 4 query heads;
* ``query_heads`` (``gqa="query_heads"``): a unit is one query head of every key/value group, matched by rank;
  the key/value heads stay.

Each pruned model is evaluated one-shot and after a short fine-tune (60 AdamW steps, lr 1e-4, the same for both),
on a validation split (the choice) and on a test split (the report); the data never overlap.

    python benchmarks/gqa.py            # -> benchmarks/results/gqa.md (about 5 minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

import fairpruner as fp
from fairpruner.data import calibration_loader
from fairpruner.families import AttentionOptions
from sequence import BATCH, accuracy, train
from sequence_tasks import SEQ_CLASSES, TOKENS, VOCAB, Batches, majority_tokens

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "gqa.md"
KINDS = ("kv_groups", "query_heads")
LEVELS = (0.05, 0.1, 0.15, 0.2)  # fractions of the model's MACs removed, all from attention (at most ~24 %)
SEEDS = (0, 1, 2)
FINETUNE_STEPS, FINETUNE_LR = 60, 1e-4


def build() -> torch.nn.Module:
    import transformers
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=TOKENS, pad_token_id=0, num_labels=SEQ_CLASSES,
        attn_implementation="sdpa", use_cache=False)
    return transformers.LlamaForSequenceClassification(config)


def mlps(model: torch.nn.Module) -> List[str]:
    return [n for n, _ in model.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))]


def finetuned(model: torch.nn.Module, train_set) -> torch.nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=FINETUNE_LR, weight_decay=0.0)
    model.train()
    steps = 0
    for x, y in Batches(train_set, BATCH, seed=1):
        loss = torch.nn.functional.cross_entropy(model(x).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        if steps == FINETUNE_STEPS:
            break
    return model.eval()


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train_set, val_set, test_set = majority_tokens(4000, 0), majority_tokens(1000, 1), majority_tokens(2000, 2)
    torch.manual_seed(0)
    model = train(build().eval(), train_set, args.epochs, 3e-3, seed=0)
    acc = {"validation": accuracy(model, val_set), "test": accuracy(model, test_set)}
    print(f"trained: validation {acc['validation']:.2f}, test {acc['test']:.2f}", flush=True)
    example = train_set.x[:1]
    macs0 = fp.count_macs(model, example)
    rows: Dict[tuple, List[dict]] = {}
    for seed in SEEDS:
        calib = calibration_loader(train_set, samples_per_class=32, batch_size=BATCH, seed=seed)
        for kind in KINDS:
            scores = fp.score(model, calib, seed=seed, progress=False, ignore=mlps(model),
                              family_options={"hf_attention_heads": AttentionOptions(gqa=kind)})
            for level in LEVELS:
                plan = fp.plan(scores, macs=level)
                pruned = fp.prune(model, plan)
                rec = {"macs": 1 - fp.count_macs(pruned, example) / macs0,
                       "units": sum(len(v) for v in plan.removed.values()),
                       "one_shot": {s: accuracy(pruned, d) for s, d in (("validation", val_set), ("test", test_set))}}
                finetuned(pruned, train_set)
                rec["finetuned"] = {s: accuracy(pruned, d) for s, d in (("validation", val_set), ("test", test_set))}
                rows.setdefault((kind, level), []).append(rec)
                print(f"seed {seed} {kind:11s} {level:.0%}: MACs -{rec['macs']:.1%}, one-shot val "
                      f"{rec['one_shot']['validation']:.2f}, fine-tuned val {rec['finetuned']['validation']:.2f}",
                      flush=True)
    write(rows, acc, time.perf_counter() - start, args.epochs)


def _cell(recs: List[dict], stage: str, split: str) -> str:
    v = [100 * r[stage][split] for r in recs]
    return f"{np.mean(v):.2f} ± {np.std(v):.2f}"


def write(rows: Dict[tuple, List[dict]], acc: Dict[str, float], seconds: float, epochs: int) -> None:
    lines = ["# Grouped-query attention: key/value groups or query heads", "",
             f"Command: `python benchmarks/gqa.py`; {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC; torch "
             f"{torch.__version__}; {seconds / 60:.1f} min.", "",
             "LlamaForSequenceClassification (hidden 128, 4 layers, 16 query heads over 4 key/value heads, head_dim "
             f"8), trained {epochs} epochs on the token-majority task (4,000 sequences): validation "
             f"{100 * acc['validation']:.2f} %, test {100 * acc['test']:.2f} %. Only attention is pruned (the gated "
             "MLPs in `ignore=`), by `fp.plan(scores, macs=level)`; cells: top-1 %, mean ± std over calibration "
             f"seeds {list(SEEDS)} (32 sequences per class); fine-tuned: {FINETUNE_STEPS} AdamW steps of {BATCH} "
             f"sequences, lr {FINETUNE_LR:g}. Validation (1,000 sequences) chooses; test (2,000) reports.", ""]
    for split in ("validation", "test"):
        lines += [f"## {split.capitalize()}", "", "| MACs target | units | MACs removed | one-shot | fine-tuned |",
                  "|---|---|---|---|---|"]
        for level in LEVELS:
            for kind in KINDS:
                recs = rows[(kind, level)]
                lines.append(f"| {level:.0%} | {kind} | {100 * np.mean([r['macs'] for r in recs]):.1f} % | "
                             f"{_cell(recs, 'one_shot', split)} | {_cell(recs, 'finetuned', split)} |")
        lines.append("")
    means = {k: {stage: np.mean([r[stage]["validation"] for lv in LEVELS for r in rows[(k, lv)]])
                 for stage in ("one_shot", "finetuned")} for k in KINDS}
    lines += ["Mean over the levels on validation: " + "; ".join(
        f"{k} one-shot {100 * m['one_shot']:.2f} %, fine-tuned {100 * m['finetuned']:.2f} %" for k, m in means.items())
        + "."]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
