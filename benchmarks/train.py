"""Train a zoo model on CIFAR-10 and save a plain state_dict checkpoint with its log.

Recipe: SGD with Nesterov momentum, one-cycle learning rate, weight decay 5e-4, batch 128, random crop + flip,
channels-last memory format (about 1.4 min per ResNet-20 epoch on 2 CPU cores).

    python benchmarks/train.py --model resnet20 --epochs 30
    python benchmarks/train.py --model resnet56 --epochs 60 --device cuda --workers 6 --bf16
    python benchmarks/train.py --model vgg16_bn --epochs 40 --resume     # continue an interrupted run

The checkpoint loads with ``model.load_state_dict(torch.load(path, weights_only=True))``; the log (one JSON
line per epoch) is written next to it as ``<name>.log``. After every epoch the whole training state (model,
optimizer, schedule, RNG) is saved as ``<name>.state``; ``--resume`` continues from it, so a long run survives
interruptions; SIGTERM or SIGINT (``kill PID``, Ctrl-C) ends the run after the current epoch is saved, so it can
be resumed with other settings (``OMP_NUM_THREADS``, device) without losing work. ``--half`` stores the final
weights as float16 (half the file; load with ``.float()``). ``--bf16`` trains under bfloat16 autocast (weights,
optimizer and BatchNorm stay float32): faster on a CPU with AMX or AVX512-BF16 (ResNet-56 on 2 cores: 98-105 s
per epoch against 178-180 s in float32, see its log) and on recent GPUs. Test accuracy is measured in float32.
"""
from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import fairpruner as fp
from fairpruner import data, zoo

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20", help="zoo model name (fairpruner.zoo.list_models())")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 directory or .tar.gz")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0,
                    help="data-loading processes (augmentation runs per image: use 4-8 on a GPU)")
    ap.add_argument("--eval-every", type=int, default=5, help="test accuracy every N epochs (and at the end)")
    ap.add_argument("--out", default=None, help="checkpoint path (default benchmarks/checkpoints/cifar10_<model>.pt)")
    ap.add_argument("--resume", action="store_true", help="continue from <out>.state, written after every epoch")
    ap.add_argument("--half", action="store_true", help="store the final state_dict as float16")
    ap.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast (mixed precision)")
    args = ap.parse_args(argv)
    if args.bf16 and args.device == "cpu" and not torch.backends.mkldnn.is_available():
        raise SystemExit("--bf16 on the CPU needs PyTorch built with oneDNN; drop --bf16")

    torch.manual_seed(args.seed)
    out = Path(args.out or HERE / "checkpoints" / f"cifar10_{args.model}.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log")
    device = torch.device(args.device)

    train = data.cifar10(args.data, "train", augment=True)
    test = data.cifar10(args.data, "test")
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              num_workers=args.workers, persistent_workers=args.workers > 0,
                              pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(test, batch_size=500)

    model = zoo.create(args.model, num_classes=10).to(device, memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # BN and biases are not decayed
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs,
                                                steps_per_epoch=len(train_loader), pct_start=0.25)
    state_path = out.with_suffix(".state")
    first = 1
    if args.resume and state_path.is_file():
        st = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        torch.set_rng_state(st["rng"])
        first = int(st["epoch"]) + 1
        print(f"resumed from {state_path} after epoch {first - 1}", flush=True)
    else:
        log_path.write_text("")
    gen = train_loader.generator
    stop = []  # a signal ends the run at the next epoch boundary, after the state is saved
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    start = time.perf_counter()
    for epoch in range(first, args.epochs + 1):
        gen.manual_seed(args.seed * 1000 + epoch)  # the shuffle of each epoch, the same after a resume
        model.train()
        t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        for x, y in train_loader:
            x = x.to(device, memory_format=torch.channels_last, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        record = {"epoch": epoch, "train_loss": round(loss_sum / seen, 4), "train_acc": round(correct / seen, 4),
                  "lr": opt.param_groups[0]["lr"], "epoch_s": round(time.perf_counter() - t0, 1)}
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            record["test_acc"] = round(fp.evaluate(model, test_loader, device=device), 4)
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "rng": torch.get_rng_state(), "epoch": epoch}, state_path.with_suffix(".state-tmp"))
        state_path.with_suffix(".state-tmp").replace(state_path)
        if stop and epoch < args.epochs:
            print(f"stopped after epoch {epoch}; continue with --resume", flush=True)
            return
    final = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if args.half:
        final = {k: v.half() if v.is_floating_point() else v for k, v in final.items()}
    torch.save(final, out)
    total = time.perf_counter() - start
    acc = record.get("test_acc") if first <= args.epochs else None
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB) after {total / 60:.1f} min"
          + (f"; test accuracy {acc:.2%}" if acc is not None else ""))


if __name__ == "__main__":
    main()
