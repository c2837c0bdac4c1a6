"""Seconds per distilled fine-tuning step in float32 and under bfloat16 autocast, on this machine.

Whether mixed precision pays off on a CPU depends on its kernels: with AVX512-BF16 or AMX it is faster, on
an AVX2-only CPU it is emulated and many times slower (``fp.finetune`` warns there). One ResNet-56 with a
copy of itself as teacher, CIFAR-sized random batches of 128, one warm-up step per precision.

    python benchmarks/autocast_speed.py
    python benchmarks/autocast_speed.py --model resnet20 --steps 10 --threads 2
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

import fairpruner as fp
from fairpruner import zoo
from fairpruner._recovery import native_cpu_autocast


def seconds_per_step(model_name: str, autocast, steps: int) -> float:
    """Mean seconds of ``steps`` distilled steps after one warm-up step."""
    g = torch.Generator().manual_seed(0)
    n = 128 * (steps + 1)
    ds = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    model = zoo.create(model_name)
    teacher = copy.deepcopy(model).eval()
    kw = dict(lr=0.01, teacher=teacher, autocast=autocast, progress=False)
    fp.finetune(model, DataLoader(ds, batch_size=128), max_steps=1, **kw)
    t0 = time.perf_counter()
    fp.finetune(model, DataLoader(ds, batch_size=128), max_steps=steps, **kw)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56", help="a zoo model taking 3x32x32 inputs")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per precision (bfloat16 may take ~40 s each)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="autocast=.* is emulated")  # the first line below says it once
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bfloat16 kernels: "
          f"{native_cpu_autocast(torch.bfloat16)}; {args.model}, batch 128, {args.threads} threads")
    for name, dtype in (("float32", None), ("bfloat16 autocast", torch.bfloat16)):
        print(f"  {name}: {seconds_per_step(args.model, dtype, args.steps):.2f} s per step", flush=True)


if __name__ == "__main__":
    main()
