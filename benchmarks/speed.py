"""Scoring speed and memory: fairpruner.score against the authors' get_metrics and one forward+backward pass.

Every measurement runs in a fresh worker process (so peak RSS belongs to it alone); each worker times one
forward+backward pass over the calibration set (median of 3) and the scoring call in the same process, so
the ratio is measured under the same machine load. The authors' package (network-pruner 2.16) is installed
by this script with ``--no-deps`` into ``benchmarks/.venv-reference`` (sharing this interpreter's torch).

    python benchmarks/speed.py                      # full table -> benchmarks/results/speed.md
    python benchmarks/speed.py --skip-reference     # ours only
    python benchmarks/speed.py --device cuda        # on a GPU machine
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
REF_VENV = HERE / ".venv-reference"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _data(classes: int, per_class: int):
    """CIFAR-10 images (real pixels); labels are the real classes for 10, synthetic beyond."""
    import torch
    n = classes * per_class
    if CIFAR.exists():
        from fairpruner.data import cifar10
        ds = cifar10(CIFAR, split="test" if n <= 10000 else "train")
        if classes == 10:
            targets = torch.as_tensor(ds.targets)
            idx = torch.cat([(targets == c).nonzero().flatten()[:per_class] for c in range(10)])
        else:
            idx = torch.arange(n) % len(ds)
        x = torch.stack([ds[int(i)][0] for i in idx])
        y = torch.as_tensor([int(ds.targets[int(i)]) for i in idx]) if classes == 10 else torch.arange(n) % classes
    else:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % classes
    # Interleave classes so that every batch is mixed.
    order = torch.argsort(y, stable=True).view(classes, per_class).t().flatten()
    return x[order], y[order]


class _Labelled:
    """A tensor dataset with .classes/.targets (the authors' package requires them)."""

    def __init__(self, x, y, classes):
        self.x, self.y = x, y
        self.targets = y.tolist()
        self.classes = [str(c) for c in range(classes)]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _model(name: str, classes: int):
    from fairpruner import zoo
    import torch
    torch.manual_seed(0)
    return zoo.create(name, num_classes=classes)


def _fwd_bwd(model, loader, device):
    import torch
    import torch.nn.functional as F
    model.eval()
    t0 = time.perf_counter()
    for x, y in loader:
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
    if device != "cpu":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return dt


def worker_ours(cfg: dict) -> dict:
    import torch
    import fairpruner as fp
    device = cfg["device"]
    x, y = _data(cfg["classes"], cfg["per_class"])
    model = _model(cfg["model"], cfg["classes"]).to(device)
    loader = torch.utils.data.DataLoader(_Labelled(x, y, cfg["classes"]), batch_size=64, shuffle=False)
    _fwd_bwd(model, [next(iter(loader))], device)  # warm-up
    rss_before = _rss_mb()
    fb = sorted(_fwd_bwd(model, loader, device) for _ in range(3))[1]
    rss_fb = _rss_mb()
    times = []
    for _ in range(3):  # the first call is what a user waits for once; the median matches the floor's protocol
        t0 = time.perf_counter()
        fp.score(model, loader, samples_per_class=cfg["per_class"], device=device, progress=False)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"fwd_bwd_s": fb, "score_s": sorted(times)[1], "score_first_s": times[0], "rss_fwd_bwd_mb": rss_fb,
            "rss_peak_mb": _rss_mb(), "rss_start_mb": rss_before, "samples": len(y)}


def worker_reference(cfg: dict) -> dict:
    import torch
    from Network_Pruner import get_metrics
    device = cfg["device"]
    x, y = _data(cfg["classes"], cfg["per_class"])
    model = _model(cfg["model"], cfg["classes"]).to(device)
    loader = torch.utils.data.DataLoader(_Labelled(x, y, cfg["classes"]), batch_size=64, shuffle=False)
    _fwd_bwd(model, [next(iter(loader))], device)
    fb = sorted(_fwd_bwd(model, loader, device) for _ in range(3))[1]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        get_metrics(model, loader, device=torch.device(device), the_samplesize_for_compute_distance=cfg["per_class"],
                    results_save_path=os.path.join(tmp, "results.pkl"))
        ref = time.perf_counter() - t0
    return {"fwd_bwd_s": fb, "reference_s": ref, "rss_peak_mb": _rss_mb()}


def worker_plan(cfg: dict) -> dict:
    import fairpruner as fp
    x, y = _data(10, 32)
    model = _model("resnet56", 10)
    scores = fp.score(model, [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(y), 64)], progress=False)
    fp.plan(scores, alpha=0.05)
    t0 = time.perf_counter()
    for _ in range(100):
        fp.plan(scores, alpha=0.05)
    alpha_ms = (time.perf_counter() - t0) * 10
    t0 = time.perf_counter()
    for _ in range(10):
        fp.plan(scores, macs=0.3)
    macs_ms = (time.perf_counter() - t0) * 100
    return {"plan_alpha_ms": alpha_ms, "plan_macs_ms": macs_ms, "groups": len(scores.groups)}


def _run(kind: str, cfg: dict, python: str = sys.executable, timeout: int = 3600) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([python, __file__, "--worker", kind, json.dumps(cfg)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=tempfile.gettempdir())
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1][7:])


def _reference_python() -> str:
    py = REF_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(REF_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "network-pruner==2.16"], check=True)
    return str(py)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--models", default="vgg16_bn,resnet20")
    ap.add_argument("--out", default=str(HERE / "results" / "speed.md"))
    ap.add_argument("--all-1000", action="store_true", help="also run 1,000 classes on models other than resnet20")
    args = ap.parse_args()
    if args.worker:
        kind, cfg = args.worker[0], json.loads(args.worker[1])
        work = {"ours": worker_ours, "reference": worker_reference, "plan": worker_plan}[kind]
        print("RESULT " + json.dumps(work(cfg)))
        return
    import torch
    lines = [f"# Scoring speed ({args.device}; torch {torch.__version__}; {os.cpu_count()} CPU cores)", "",
             "Times in seconds; fwd+bwd = one training forward+backward pass over the same calibration set "
             "(eval mode, median of 3), measured in the same process as the scoring calls; fairpruner.score is "
             "the median of 3 calls (the same protocol), its first call beside it; get_metrics / score compares "
             "with that first call.", "",
             "| model | classes x per class | fwd+bwd | fairpruner.score | score / fwd+bwd | first call | "
             "ms per sample | get_metrics (authors) | get_metrics / score | peak RSS ours (MB) | "
             "peak RSS authors (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ref_py = None if args.skip_reference else _reference_python()
    settings = [(10, 32), (100, 32), (100, 4), (1000, 4)]
    for model in args.models.split(","):
        for classes, per_class in settings:
            if classes == 1000 and model != "resnet20" and not args.all_1000:
                continue  # 4,000 images: minutes for VGG on 2 cores
            cfg = {"model": model, "classes": classes, "per_class": per_class, "device": args.device}
            ours = _run("ours", cfg)
            ref = _run("reference", cfg, python=ref_py) if ref_py and classes == 10 else {}
            if "error" in ours:
                row = f"| {model} | {classes} x {per_class} | error: {ours['error']} | | | | | | | | |"
            else:
                r_s = ref.get("reference_s")
                row = (f"| {model} | {classes} x {per_class} | {ours['fwd_bwd_s']:.2f} | {ours['score_s']:.2f} | "
                       f"{ours['score_s'] / ours['fwd_bwd_s']:.2f}x | {ours['score_first_s']:.2f} "
                       f"({ours['score_first_s'] / ours['fwd_bwd_s']:.2f}x) | "
                       f"{1000 * ours['score_s'] / ours['samples']:.2f} | "
                       + (f"{r_s:.1f} | {r_s / ours['score_first_s']:.0f}x | " if r_s else
                          (f"error: {ref['error']} | | " if "error" in ref else "not run | | "))
                       + f"{ours['rss_peak_mb']:.0f} | " + (f"{ref['rss_peak_mb']:.0f} |" if r_s else " |"))
            print(row, flush=True)
            lines.append(row)
    p = _run("plan", {})
    lines += ["", "Re-planning on ResNet-56 (scores computed once): "
              + (f"one alpha {p['plan_alpha_ms']:.2f} ms, a MACs target {p['plan_macs_ms']:.2f} ms "
                 f"({p['groups']} groups)." if "error" not in p else f"error: {p['error']}"),
              "", "The authors' get_metrics caps at 100 classes and grows with the square of the class count, so it "
              "is run at 10 classes only. Above 32 classes fairpruner finds each unit's largest class-pair "
              "distance by a search linear in the classes (class_pairs='auto'); at 1,000 classes the calibration "
              "set is 4 samples per class (4,000 images), compared per sample with 100 classes x 4."]
    print(lines[-3])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
