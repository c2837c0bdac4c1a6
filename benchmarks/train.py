"""Train a zoo model on CIFAR-10 and save a plain state_dict checkpoint with its log.

Recipe: SGD with Nesterov momentum, one-cycle learning rate, weight decay 5e-4, batch 128, random crop + flip,
channels-last memory format (about 1.4 min per ResNet-20 epoch on 2 CPU cores).

    python benchmarks/train.py --model resnet20 --epochs 30
    python benchmarks/train.py --model resnet56 --epochs 60 --device cuda

The checkpoint loads with ``model.load_state_dict(torch.load(path, weights_only=True))``; the log (one JSON
line per epoch) is written next to it as ``<name>.log``.
"""
from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--eval-every", type=int, default=5, help="test accuracy every N epochs (and at the end)")
    ap.add_argument("--out", default=None, help="checkpoint path (default benchmarks/checkpoints/cifar10_<model>.pt)")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    out = Path(args.out or HERE / "checkpoints" / f"cifar10_{args.model}.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log")
    device = torch.device(args.device)

    train = data.cifar10(args.data, "train", augment=True)
    test = data.cifar10(args.data, "test")
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              num_workers=0, generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(test, batch_size=500)

    model = zoo.create(args.model, num_classes=10).to(device, memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # BN and biases are not decayed
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs,
                                                steps_per_epoch=len(train_loader), pct_start=0.25)
    log_path.write_text("")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        for x, y in train_loader:
            x = x.to(device, memory_format=torch.channels_last)
            y = y.to(device)
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
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        torch.save(state, out.with_suffix(".partial"))
    out.with_suffix(".partial").replace(out)
    total = time.perf_counter() - start
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB) after {total / 60:.1f} min; "
          f"test accuracy {record['test_acc']:.2%}")


if __name__ == "__main__":
    main()
