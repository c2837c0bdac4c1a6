"""Train a zoo model on CIFAR-10 and save a plain state_dict checkpoint with its log.

Recipe: SGD with Nesterov momentum, one-cycle learning rate, weight decay 5e-4, batch 128, random crop + flip,
channels-last memory format (about 1.4 min per ResNet-20 epoch on 2 CPU cores).

    python benchmarks/train.py --model resnet20 --epochs 30
    python benchmarks/train.py --model resnet56 --epochs 60 --device cuda --workers 6 --bf16
    python benchmarks/train.py --model vgg16_bn --epochs 40 --resume     # continue an interrupted run
    python benchmarks/train.py --model resnet56 --epochs 200 --minutes 8 --device cuda --augment-on device --bf16
    python benchmarks/train.py --model vgg16_bn --init-from benchmarks/checkpoints/cifar10_vgg16_bn.pt \
        --lr 0.03 --cutout 16 --epochs 34 --bf16 --half --out /tmp/vgg_restart.pt    # a warm restart

By default the 5,000 training images that ``accuracy.py`` chooses its defaults on (``splits.py``) are held out
(``--holdout val``), so validation accuracy measures generalisation; the log's first line records the recipe.
``--augment-on device`` keeps the training set on the device and crops and flips whole batches there (on a GPU,
per-image augmentation in loader workers is the bottleneck). ``--minutes M`` times 20 training steps on a
throw-away copy and caps the epochs so that the run fits in M minutes (a one-cycle schedule must know its
length before it starts).

The checkpoint loads with ``model.load_state_dict(torch.load(path, weights_only=True))``; the log (one JSON
line per epoch) is written next to it as ``<name>.log``. After every epoch the whole training state (model,
optimizer, schedule, RNG) is saved as ``<name>.state``; ``--resume`` continues from it, so a long run survives
interruptions; SIGTERM or SIGINT (``kill PID``, Ctrl-C) ends the run after the current epoch is saved, so it can
be resumed with other settings (``OMP_NUM_THREADS``, device) without losing work. ``--init-from`` starts from a
checkpoint's weights with a fresh optimizer and schedule (a warm restart: a second one-cycle run continues a
finished one); ``--cutout S`` zeroes one random SxS square of every (normalised) training image, the usual
regulariser once a model fits its training set. ``--half`` stores the final
weights as float16 (half the file; load with ``.float()``). ``--bf16`` trains under bfloat16 autocast (weights,
optimizer and BatchNorm stay float32): faster on a CPU with AMX or AVX512-BF16 (ResNet-56 on 2 cores: 98-105 s
per epoch against 178-180 s in float32, see its log) and on recent GPUs; on a CPU without them it is emulated
and many times slower (a warning says so). Test accuracy is measured in float32.
"""
from __future__ import annotations

import argparse
import copy
import json
import signal
import sys
import time
from pathlib import Path
from typing import Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import fairpruner as fp
import splits
from fairpruner import data, zoo
from fairpruner._recovery import native_cpu_autocast

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
TIMING_STEPS = 20


def crop_flip(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Random-crop (zero padding) and flip a uint8 NxCxHxW batch at once, as ``ArrayDataset`` does per image.

    ``shifts`` (Nx2) are the crop's top-left corner in the padded image, ``flips`` (N, bool) the images to
    mirror after cropping.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dev = x.device
    rows = shifts[:, :1].to(dev) + torch.arange(h, device=dev)
    cols = shifts[:, 1:].to(dev) + torch.arange(w, device=dev)
    cols = torch.where(flips.to(dev)[:, None], cols.flip(1), cols)
    return padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class DeviceBatches:
    """The training images held on the device as uint8; each batch is augmented there in one go.

    Every epoch's order, crops and flips come from its own seed, so a resumed run sees the same batches.
    """

    def __init__(self, dataset: data.ArrayDataset, batch_size: int, device: torch.device, seed: int) -> None:
        self.x = dataset.images.permute(0, 3, 1, 2).contiguous().to(device)
        self.y = torch.tensor(dataset.targets, device=device)
        self.mean, self.std = dataset._mean.to(device), dataset._std.to(device)
        self.batch_size, self.seed, self.padding = batch_size, seed, dataset.padding
        self.prefetched = 0

    def __len__(self) -> int:
        return len(self.y) // self.batch_size  # the last partial batch is dropped, as in the loader

    def epoch(self, epoch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        n, b, dev = len(self.y), self.batch_size, self.x.device
        order = torch.randperm(n, generator=g)
        shifts = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        order, shifts, flips = order.to(dev), shifts.to(dev), flips.to(dev)  # one copy per epoch, none per step
        for k in range(len(self)):
            idx = order[k * b:(k + 1) * b]
            x = crop_flip(self.x[idx], shifts[idx], flips[idx], self.padding)
            yield (x.float().div_(255) - self.mean) / self.std, self.y[idx]


class LoaderBatches:
    """Per-image augmentation in a DataLoader (the CPU path)."""

    def __init__(self, dataset: data.ArrayDataset, batch_size: int, workers: int, pin: bool, seed: int) -> None:
        self.seed, self.prefetched = seed, 2 * workers  # batches the workers load ahead (prefetch_factor 2)
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                                 persistent_workers=workers > 0, pin_memory=pin,
                                 generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        self.loader.generator.manual_seed(self.seed * 1000 + epoch)  # the same shuffle after a resume
        return iter(self.loader)


def cutout(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero one ``size`` x ``size`` square per image of a normalised NxCxHxW batch (DeVries & Taylor, 2017).

    Centres are drawn uniformly over the image from the global RNG (saved with the training state), so a square
    may be clipped by the border; zero is the mean pixel once the batch is normalised.
    """
    n, _, h, w = x.shape
    dev = x.device  # only the 2n centres cross to the device; the mask is built there
    cy, cx = torch.randint(0, h, (n, 1)).to(dev), torch.randint(0, w, (n, 1)).to(dev)
    rows, cols = torch.arange(h, device=dev)[None], torch.arange(w, device=dev)[None]
    in_rows = (rows >= cy - size // 2) & (rows < cy - size // 2 + size)
    in_cols = (cols >= cx - size // 2) & (cols < cx - size // 2 + size)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, device: torch.device,
               bf16: bool, cutout_size: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SGD step; returns the loss, the logits and the labels, all on the device."""
    x = x.to(device, memory_format=torch.channels_last, non_blocking=True)
    if cutout_size:
        x = cutout(x, cutout_size)
    y = y.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), logits.detach(), y


def seconds_per_epoch(model: nn.Module, batches, device: torch.device, bf16: bool) -> float:
    """Seconds per epoch, timed on TIMING_STEPS steps of a throw-away copy after a warm-up.

    The warm-up (3 steps, plus the batches loader workers fetch ahead) keeps start-up and prefetching out of the
    estimate; the global RNG is restored, so the run trains as it would without the timing.
    """
    warm = 3 + batches.prefetched
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        trial = copy.deepcopy(model)
        opt = torch.optim.SGD(trial.parameters(), lr=1e-3, momentum=0.9)
        it, times = batches.epoch(0), []  # epoch 0 is never trained on
        for _ in range(min(warm + TIMING_STEPS, len(batches))):
            t0 = time.perf_counter()
            x, y = next(it)
            train_step(trial, opt, x, y, device, bf16)[0].item()  # .item() waits for the device
            times.append(time.perf_counter() - t0)
    timed = times[warm:] or times
    return sum(timed) / len(timed) * len(batches)


def fit_epochs(args: argparse.Namespace, model: nn.Module, batches, device: torch.device) -> int:
    """The epochs that fit in ``--minutes`` (10 % kept for test passes and state saves), at most ``--epochs``."""
    per_epoch = seconds_per_epoch(model, batches, device, args.bf16)
    fit = int(args.minutes * 60 / (per_epoch * 1.1))
    if fit < 1:
        raise SystemExit(f"--minutes {args.minutes:g} is shorter than one epoch (about {per_epoch:.0f} s "
                         "measured): give more minutes or drop --minutes")
    print(f"about {per_epoch:.1f} s per epoch: {min(fit, args.epochs)} of {args.epochs} epochs fit in "
          f"{args.minutes:g} min", flush=True)
    return min(fit, args.epochs)


def make_optimizer(args: argparse.Namespace, model: nn.Module, steps_per_epoch: int):
    if args.epochs * steps_per_epoch < 8:  # OneCycleLR's warm-up needs a few steps
        raise SystemExit(f"{args.epochs} epochs of {steps_per_epoch} steps are too few for the one-cycle schedule "
                         "(8 steps at least): train longer or use smaller batches")
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # BN and biases are not decayed
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.25)
    return opt, sched


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20", help="zoo model name (fairpruner.zoo.list_models())")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 directory or .tar.gz")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--minutes", type=float, default=None,
                    help="cap the epochs so the run fits in this many minutes (timed on 20 steps first)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--holdout", choices=("val", "none"), default="val",
                    help="val: leave out the 5,000 images accuracy.py validates on (default); none: train on all")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--augment-on", choices=("loader", "device"), default="loader",
                    help="loader: per image in DataLoader workers; device: whole batches on the device (GPU)")
    ap.add_argument("--workers", type=int, default=0,
                    help="data-loading processes of --augment-on loader (use 4-8 on a GPU)")
    ap.add_argument("--eval-every", type=int, default=5, help="test accuracy every N epochs (and at the end)")
    ap.add_argument("--out", default=None, help="checkpoint path (default benchmarks/checkpoints/cifar10_<model>.pt)")
    ap.add_argument("--resume", action="store_true", help="continue from <out>.state, written after every epoch")
    ap.add_argument("--half", action="store_true", help="store the final state_dict as float16")
    ap.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast (mixed precision)")
    ap.add_argument("--init-from", default=None,
                    help="start from this checkpoint's weights with a fresh optimizer and schedule (a warm restart)")
    ap.add_argument("--cutout", type=int, default=0, help="zero one random SxS square per training image (0: off)")
    args = ap.parse_args(argv)
    if args.cutout < 0:
        ap.error("--cutout must be 0 (off) or a square's side in pixels")
    if args.init_from is not None and not Path(args.init_from).is_file():
        ap.error(f"--init-from {args.init_from}: no such file")
    if args.bf16 and args.device == "cpu":
        if not torch.backends.mkldnn.is_available():
            ap.error("--bf16 on the CPU needs PyTorch built with oneDNN; drop --bf16")
        if not native_cpu_autocast(torch.bfloat16):
            print("warning: this CPU has no native bfloat16 kernels (AVX512-BF16 or AMX); --bf16 trains many "
                  "times slower than float32 here: drop it", file=sys.stderr)
    if args.minutes is not None and args.minutes <= 0:
        ap.error("--minutes must be positive")
    return args


def training_set(args: argparse.Namespace) -> data.ArrayDataset:
    train = data.cifar10(args.data, "train", augment=True)
    if args.holdout == "none":
        return train
    return splits.subset(train, splits.validation_split(train.targets)[1], augment=True)


def recipe(args: argparse.Namespace, steps_per_epoch: int) -> dict:
    """What a resumed run must share with the run it continues (the schedule counts its steps)."""
    keys = ("model", "lr", "weight_decay", "batch_size", "seed", "holdout", "augment_on", "cutout", "init_from")
    return {**{k: getattr(args, k) for k in keys}, "steps_per_epoch": steps_per_epoch}


def check_recipe(saved: dict | None, now: dict, state_path: Path) -> None:
    """Refuses to resume with other settings; states written before the recipe was saved are taken as they are."""
    diff = {k: (saved[k], now[k]) for k in now if saved is not None and k in saved and saved[k] != now[k]}
    if diff:
        listed = ", ".join(f"{k} {a!r} (now {b!r})" for k, (a, b) in diff.items())
        raise SystemExit(f"{state_path} was trained with {listed}: resume with the same settings, or start afresh "
                         "without --resume")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out or HERE / "checkpoints" / f"cifar10_{args.model}.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path, state_path = out.with_suffix(".log"), out.with_suffix(".state")
    device = torch.device(args.device)
    train = training_set(args)
    test_loader = DataLoader(data.cifar10(args.data, "test"), batch_size=500)
    batches = (DeviceBatches(train, args.batch_size, device, args.seed) if args.augment_on == "device" else
               LoaderBatches(train, args.batch_size, args.workers, device.type == "cuda", args.seed))
    if len(batches) == 0:
        raise SystemExit(f"--batch-size {args.batch_size} exceeds the {len(train)} training images")
    run_recipe = recipe(args, len(batches))
    st = torch.load(state_path, map_location="cpu", weights_only=True) if args.resume and state_path.is_file() else None
    model = zoo.create(args.model, num_classes=10)
    if args.init_from is not None and st is None:
        start_from(model, Path(args.init_from))
    model = model.to(device, memory_format=torch.channels_last)
    if st is not None:
        args.epochs = int(st.get("epochs", args.epochs))  # the schedule's length is fixed at the start
        check_recipe(st.get("recipe"), run_recipe, state_path)
    elif args.minutes is not None:
        args.epochs = fit_epochs(args, model, batches, device)
    opt, sched = make_optimizer(args, model, len(batches))
    first = 1
    if st is not None:
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])  # moves the optimizer state onto the parameters' device
        sched.load_state_dict(st["sched"])
        torch.set_rng_state(st["rng"])
        first = int(st["epoch"]) + 1
        print(f"resumed from {state_path} after epoch {first - 1} of {args.epochs}", flush=True)
    else:
        config = {k: v for k, v in vars(args).items() if k not in ("data", "out", "resume", "workers")}
        log_path.write_text(json.dumps({"config": {**config, "train_images": len(train)}}) + "\n")
    stop: list = []  # a signal ends the run at the next epoch boundary, after the state is saved
    previous = {sig: signal.signal(sig, lambda *_: stop.append(True)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        start = time.perf_counter()
        for epoch in range(first, args.epochs + 1):
            record = run_epoch(model, opt, sched, batches, epoch, device, args.bf16, args.cutout)
            if epoch % args.eval_every == 0 or epoch == args.epochs:
                record["test_acc"] = round(fp.evaluate(model, test_loader, device=device), 4)
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "rng": torch.get_rng_state(), "epoch": epoch, "epochs": args.epochs,
                        "recipe": run_recipe}, state_path.with_suffix(".state-tmp"))
            state_path.with_suffix(".state-tmp").replace(state_path)
            if stop and epoch < args.epochs:
                print(f"stopped after epoch {epoch}; continue with --resume", flush=True)
                return
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    save_final(model, out, args.half)
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB) after {(time.perf_counter() - start) / 60:.1f} min")


def start_from(model: nn.Module, path: Path) -> None:
    """Loads a checkpoint's weights into ``model`` (load_state_dict copies float16 into float32); all must fit."""
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except RuntimeError as e:
        raise SystemExit(f"--init-from {path} does not fit this --model: {str(e).splitlines()[0]}") from None


def run_epoch(model: nn.Module, opt: torch.optim.Optimizer, sched, batches, epoch: int, device: torch.device,
              bf16: bool, cutout_size: int = 0) -> dict:
    model.train()
    t0, seen = time.perf_counter(), 0
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
    for x, y in batches.epoch(epoch):
        loss, logits, y = train_step(model, opt, x, y, device, bf16, cutout_size)
        sched.step()
        loss_sum += loss.float() * len(y)  # summed on the device: no sync per step
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    return {"epoch": epoch, "train_loss": round(float(loss_sum) / seen, 4), "train_acc": round(int(correct) / seen, 4),
            "lr": opt.param_groups[0]["lr"], "epoch_s": round(time.perf_counter() - t0, 1)}


def save_final(model: nn.Module, out: Path, half: bool) -> None:
    final = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if half:
        final = {k: v.half() if v.is_floating_point() else v for k, v in final.items()}
    torch.save(final, out)


if __name__ == "__main__":
    main()
