"""A Llama of TinyLlama's shape (1.1 B parameters with its LM head) on CPU: group discovery, scoring, planning
and pruning against one forward+backward.

TinyLlama's shape (hidden 2048, 22 layers, 32 heads over 4 key/value heads, intermediate 5632, vocabulary 32,000),
random weights, as ``LlamaForSequenceClassification`` with 4 classes; 64 sequences of 128 random tokens in
batches of 4 (`--batch`). Measured in one process, under the same load: building the model, group discovery
(torch-pruning's graph and the families' groups), one forward+backward over the same batches (the floor
scoring cannot beat), then ``fp.score`` (samples_per_class 16), ``fp.plan(macs=0.3)`` and ``fp.prune`` (without
the pruned == masked check, which the tests run on small configs); the peak resident memory of score + plan +
prune (the window starts after the forward+backward, whose own peak is reported beside it) against the model's
size.

    python benchmarks/llama.py                  # the 1.1 B model -> benchmarks/results/llama.md (~10 min, 2 cores)
    python benchmarks/llama.py --layers 2       # the same widths, 2 layers (a few minutes), printed only
"""
from __future__ import annotations

import argparse
import datetime
import re
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import fairpruner as fp
from fairpruner import families
from fairpruner._graph import build_graph, discover_groups, find_output_layers

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "llama.md"
CLASSES = 4


def peak_gb() -> float:
    """Peak resident memory since the process started, or since :func:`reset_peak` (Linux's VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024 ** 2
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def reset_peak() -> bool:
    """Starts a new peak window (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--layers", type=int, default=22, help="decoder layers (22: TinyLlama's 1.1 B)")
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    try:
        import transformers
    except ImportError:
        sys.exit("benchmarks/llama.py needs transformers: pip install -e '.[hf]'")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    t = time.perf_counter()
    config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                      max_position_embeddings=2048, num_labels=CLASSES, pad_token_id=0,
                                      use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config).eval()
    build_s = time.perf_counter() - t
    size_gb = fp.count_params(model) * 4 / 1024 ** 3
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 32000, (args.sequences, args.tokens), generator=g)
    y = torch.arange(args.sequences) % CLASSES
    batches = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, args.sequences, args.batch)]
    print(f"model: {fp.count_params(model) / 1e9:.2f} B params ({size_gb:.1f} GB), built in {build_s:.0f} s",
          flush=True)

    t = time.perf_counter()
    fams = families.build()
    example = (x[:1],)
    graph = build_graph(model, example, fams)
    outputs, _ = find_output_layers(model, example)
    groups = discover_groups(graph, model, fams, ignore=tuple(outputs), example_inputs=example)
    discovery_s = time.perf_counter() - t
    del graph
    print(f"group discovery: {discovery_s:.1f} s, {len(groups)} groups", flush=True)

    t = time.perf_counter()
    for xb, yb in batches:
        F.cross_entropy(model(xb).logits, yb).backward()
    model.zero_grad(set_to_none=True)
    floor_s = time.perf_counter() - t
    floor_peak = peak_gb()  # the floor's own peak: the model, all its gradients and one batch's activations
    print(f"forward+backward: {floor_s:.0f} s (peak so far {floor_peak:.1f} GB)", flush=True)
    windowed = reset_peak()  # the scoring window's own peak, not the floor's (model + all its gradients)

    t = time.perf_counter()
    scores = fp.score(model, batches, samples_per_class=16, progress=True)
    score_s = time.perf_counter() - t
    t = time.perf_counter()
    plan = fp.plan(scores, macs=0.3)
    plan_s = time.perf_counter() - t
    t = time.perf_counter()
    pruned = fp.prune(model, plan, verify=False)
    prune_s = time.perf_counter() - t
    total = score_s + plan_s + prune_s
    peak = peak_gb()
    with torch.no_grad():
        out = pruned(x[:2]).logits
    rows = [
        ("model", f"{fp.count_params(model) / 1e9:.2f} B parameters, {args.layers} layers ({size_gb:.1f} GB float32)"),
        ("data", f"{args.sequences} sequences x {args.tokens} tokens, batches of {args.batch}, {CLASSES} classes"),
        ("group discovery", f"{discovery_s:.1f} s ({len(groups)} groups)"),
        ("one forward+backward over the data", f"{floor_s:.0f} s"),
        ("score", f"{score_s:.0f} s ({score_s / floor_s:.2f}x the forward+backward)"),
        ("plan (macs=0.3)", f"{plan_s:.2f} s; removes {100 * plan.achieved['macs']:.1f} % MACs, "
                            f"{100 * plan.achieved['params']:.1f} % params"),
        ("prune", f"{prune_s:.1f} s"),
        ("score + plan + prune", f"{total:.0f} s = {total / floor_s:.2f}x the forward+backward (goal <= 2x)"),
        ("peak resident memory, score + plan + prune" if windowed else "peak resident memory",
         f"{peak:.1f} GB = {peak / size_gb:.2f}x the model (goal <= 3x); the forward+backward alone peaked at "
         f"{floor_peak:.1f} GB ({floor_peak / size_gb:.2f}x: the model, all its gradients, one batch's activations)"),
        ("U sample store", f"{scores.meta['u_store']['passes']} passes, at most "
                           f"{scores.meta['u_store']['peak_bytes'] / 1e9:.2f} GB (budget "
                           f"{scores.meta['u_store']['max_memory'] / 1e9:.2f} GB)"),
        ("pruned model runs", f"logits {tuple(out.shape)}, finite: {bool(torch.isfinite(out).all())}"),
    ]
    for k, v in rows:
        print(f"{k:38s} {v}")
    if args.layers != 22:
        return
    RESULTS.write_text(
        "# A Llama of TinyLlama's shape (1.1 B with its LM head; a classifier here) on CPU\n\n"
        f"Written by `python benchmarks/llama.py` on {datetime.date.today()} ({args.threads} threads, torch "
        f"{torch.__version__}, transformers {transformers.__version__}); one run.\n\n| | |\n|---|---|\n"
        + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
