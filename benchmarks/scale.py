"""ImageNet scale: fairpruner.score on ResNet-50 with 1,000 classes within a memory budget, exactness under a
binding budget, the class-pair search against all pairs, and group-sharded U under torchrun.

Every measurement runs in a fresh worker process, so its peak resident memory (ru_maxrss) is its own. Inputs are
CIFAR-10 training images (real pixels) resized to 64 x 64 so that ResNet-50 runs on 2 CPU cores; labels beyond
CIFAR-10's ten are synthetic (image i gets class i mod K), which is what a scale test needs: every class full.

    python benchmarks/scale.py                  # everything -> benchmarks/results/scale.md (about 30 min on 2 cores)
    python benchmarks/scale.py --only exact dist
    python benchmarks/scale.py --classes 1000 --per-class 8 --max-memory 2GB
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
RESULTS = HERE / "results" / "scale.md"


def _rss() -> int:
    """Peak resident memory of this process so far (bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now() -> int:
    """Resident memory now (bytes), from /proc; the peak where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return _rss()


def _images(n: int, size: int):
    """``n`` CIFAR-10 training images resized to size x size (random normal images without the dataset)."""
    import torch
    import torch.nn.functional as F
    if CIFAR.exists():
        from fairpruner.data import cifar10
        ds = cifar10(CIFAR, split="train")
        x = torch.stack([ds[i % len(ds)][0] for i in range(n)])
    else:
        x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return x if size == 32 else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _batches(classes: int, per_class: int, size: int, batch: int = 64):
    import torch
    n = classes * per_class
    x = _images(n, size)
    y = torch.arange(n) % classes  # every batch mixes classes; every class gets per_class samples
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _resnet50(classes: int):
    import torch
    from fairpruner import zoo
    torch.manual_seed(0)
    return zoo.resnet50(num_classes=classes).eval()


def worker_budget(cfg: dict) -> dict:
    """ResNet-50 at 1,000 classes under max_memory: time against the forward+backward floor, peak memory."""
    import torch
    import torch.nn.functional as F
    import fairpruner as fp
    torch.set_num_threads(cfg["threads"])
    model = _resnet50(cfg["classes"])
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    # One batch's activations and gradients, measured before the data is decoded (a high-water mark).
    before = _rss_now()
    x = torch.randn(64, 3, cfg["size"], cfg["size"])
    F.cross_entropy(model(x), torch.arange(64) % cfg["classes"]).backward()
    activations = max(0, _rss() - before)
    model.zero_grad(set_to_none=True)
    batches = _batches(cfg["classes"], cfg["per_class"], cfg["size"])
    base = _rss_now()  # interpreter, torch, the model and the calibration data
    probe = min(len(batches), cfg["floor_batches"])
    t0 = time.perf_counter()
    for x, y in batches[:probe]:
        F.cross_entropy(model(x), y).backward()
    floor = (time.perf_counter() - t0) / probe * len(batches)
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    s = fp.score(model, batches, samples_per_class=cfg["per_class"], max_memory=cfg["max_memory"],
                 progress=cfg["progress"])
    took = time.perf_counter() - t0
    return {"floor_s": floor, "floor_batches": probe, "score_s": took, "store": s.meta["u_store"],
            "groups": len(s.groups), "units": sum(g.n_units for g in s.groups), "model_bytes": model_bytes,
            "activations": activations, "base": base, "peak": _rss(), "samples": s.meta["n_samples"]}


def worker_exact(cfg: dict) -> dict:
    """One configuration scored unbounded, under a binding budget, and with the class-pair search."""
    import torch
    import fairpruner as fp
    torch.set_num_threads(cfg["threads"])
    batches = _batches(cfg["classes"], cfg["per_class"], cfg["size"])
    model = _resnet50(cfg["classes"])
    runs = {}
    for name, kw in (("all", {"class_pairs": "all"}), ("budget", {"class_pairs": "all", "max_memory": cfg["tight"]}),
                     ("search", {"class_pairs": "search"})):
        t0 = time.perf_counter()
        s = fp.score(model, batches, samples_per_class=cfg["per_class"], progress=False, **kw)
        runs[name] = (s, time.perf_counter() - t0)
    ref = runs["all"][0]
    identical = all(torch.equal(a.u, b.u) and torch.equal(a.r, b.r)
                    for a, b in zip(ref.groups, runs["budget"][0].groups))
    rho = [_spearman(a.u, b.u) for a, b in zip(ref.groups, runs["search"][0].groups)]
    plan_a, plan_b = fp.plan(ref, alpha=0.05), fp.plan(runs["search"][0], alpha=0.05)
    changed = sum(len(set(plan_a.removed[n]) ^ set(plan_b.removed[n])) for n in ref.names)
    return {"times": {k: v[1] for k, v in runs.items()}, "store": {k: v[0].meta["u_store"] for k, v in runs.items()},
            "identical": identical, "rho_min": min(rho), "rho_median": sorted(rho)[len(rho) // 2],
            "plan_units": plan_a.units_removed, "plan_changed": changed, "groups": len(rho)}


def _spearman(a, b) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den else 1.0


def worker_dist(cfg: dict) -> dict:
    """Run under torchrun: every rank scores its shard; rank 0 writes the scores and every rank its store."""
    import torch
    import torch.distributed as dist
    import fairpruner as fp
    from fairpruner import zoo
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    batches = _batches(cfg["classes"], cfg["per_class"], 32, batch=32)
    torch.manual_seed(0)
    model = zoo.resnet20(num_classes=cfg["classes"]).eval()
    s = fp.score(model, batches[rank::world], samples_per_class=cfg["per_class"], progress=False)
    torch.save({"u": [g.u for g in s.groups], "r": [g.r for g in s.groups], "peak": s.meta["u_store"]["peak_bytes"]},
               os.path.join(cfg["out"], f"rank{rank}.pt"))
    dist.destroy_process_group()
    return {}


def worker_single(cfg: dict) -> dict:
    import torch
    import fairpruner as fp
    from fairpruner import zoo
    torch.set_num_threads(1)
    batches = _batches(cfg["classes"], cfg["per_class"], 32, batch=32)
    torch.manual_seed(0)
    model = zoo.resnet20(num_classes=cfg["classes"]).eval()
    s = fp.score(model, batches, samples_per_class=cfg["per_class"], progress=False)
    torch.save({"u": [g.u for g in s.groups], "r": [g.r for g in s.groups], "peak": s.meta["u_store"]["peak_bytes"]},
               os.path.join(cfg["out"], "single.pt"))
    return {}


WORKERS = {"budget": worker_budget, "exact": worker_exact, "dist": worker_dist, "single": worker_single}


def _run(kind: str, cfg: dict, torchrun: int = 0) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(cfg)]
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
               f"--master_port={port}"] + cmd[1:]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if cfg.get("progress") else subprocess.PIPE,
                          text=True, env=env, cwd=tempfile.gettempdir())
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{(proc.stderr or '')[-3000:]}")
    return json.loads(lines[-1][7:]) if lines else {}


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def section_budget(args) -> list:
    cfg = {"classes": args.classes, "per_class": args.per_class, "size": 64, "max_memory": args.max_memory,
           "threads": 2, "floor_batches": 5, "progress": True}
    r = _run("budget", cfg)
    # fp.score works on a copy of the model and its gradients: two models' worth beside the caller's.
    bound = (2 * r["model_bytes"] + r["activations"] + r["store"]["max_memory"]) * 1.25
    used = r["peak"] - r["base"]
    st = r["store"]
    return [f"## ResNet-50, {args.classes} classes x {args.per_class} samples, 64 x 64, "
            f"max_memory={args.max_memory}", "",
            f"- {r['groups']} groups, {r['units']} units, {r['samples']} samples; {st['passes']} passes, "
            f"{st['unprojected_sites']} sites stored unprojected, class pairs: {st['class_pairs']}.",
            f"- Time: score {r['score_s']:.0f} s; one forward+backward over the same data {r['floor_s']:.0f} s "
            f"(from {r['floor_batches']} batches) -> {r['score_s'] / r['floor_s']:.2f}x.",
            f"- Sample store at its largest: {_gb(st['peak_bytes'])} (budget {_gb(st['max_memory'])}).",
            f"- Peak resident memory above the process with its model and data loaded: {_gb(used)}; bound (the "
            f"scored copy of the model and its gradients 2 x {_gb(r['model_bytes'])} + one batch's activations "
            f"{_gb(r['activations'])} + budget, +25 %): "
            f"{_gb(bound)} -> {'within' if used <= bound else 'ABOVE'}. Whole process: {_gb(r['peak'])}.", ""]


def section_exact(args) -> list:
    cfg = {"classes": 40, "per_class": 8, "size": 64, "tight": "300MB", "threads": 2}
    r = _run("exact", cfg)
    t, st = r["times"], r["store"]
    return ["## Exactness (ResNet-50, 40 classes x 8 samples, 64 x 64)", "",
            "| run | passes | sample store peak | time |", "|---|---|---|---|",
            f"| all class pairs, unbounded | {st['all']['passes']} | {_gb(st['all']['peak_bytes'])} | "
            f"{t['all']:.0f} s |",
            f"| all class pairs, max_memory=300MB | {st['budget']['passes']} | {_gb(st['budget']['peak_bytes'])} | "
            f"{t['budget']:.0f} s |",
            f"| class-pair search, unbounded | {st['search']['passes']} | {_gb(st['search']['peak_bytes'])} | "
            f"{t['search']:.0f} s |", "",
            f"- Under the binding budget U and R are bit-identical to the unbounded run: {r['identical']}.",
            f"- Class-pair search against all pairs, Spearman of U per group over {r['groups']} groups: min "
            f"{r['rho_min']:.4f}, median {r['rho_median']:.4f}. The plan at alpha 0.05 ({r['plan_units']} units "
            f"removed) changes by {r['plan_changed']} units.", ""]


def section_dist(args) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"classes": 10, "per_class": 32, "out": tmp}
        _run("single", cfg)
        _run("dist", cfg, torchrun=2)
        import torch
        one = torch.load(os.path.join(tmp, "single.pt"), weights_only=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{k}.pt"), weights_only=True) for k in range(2)]
    du = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(ranks[0]["u"], one["u"]))
    dr = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(ranks[0]["r"], one["r"]))
    same = all(torch.equal(a, b) for a, b in zip(ranks[0]["u"] + ranks[0]["r"], ranks[1]["u"] + ranks[1]["r"]))
    peaks = [r["peak"] / one["peak"] for r in ranks]
    return ["## torchrun, 2 ranks (gloo, CPU; ResNet-20, CIFAR-10, 10 classes x 32; 10 batches, 5 per rank)", "",
            f"- Both ranks return identical scores: {same}. Against one process: largest relative difference "
            f"U {du:.1e}, R {dr:.1e} (the samples meet in another order; R sums gradients over ranks).",
            f"- Sample store per rank at its largest: {', '.join(f'{p:.2f}x' for p in peaks)} of one process's "
            f"({one['peak'] / 1e6:.1f} MB).", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="+", choices=("budget", "exact", "dist"), default=("budget", "exact", "dist"))
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--max-memory", default="2GB")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.worker:
        result = WORKERS[args.worker[0]](json.loads(args.worker[1]))
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return
    import torch
    lines = [f"# Scoring at scale (torch {torch.__version__}, {os.cpu_count()} CPU cores)", ""]
    for name, section in (("exact", section_exact), ("dist", section_dist), ("budget", section_budget)):
        if name in args.only:
            part = section(args)
            print("\n".join(part), flush=True)
            lines += part
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
