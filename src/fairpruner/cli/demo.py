"""A self-contained tour of FAIR-Pruner on scikit-learn digits: train, score, sweep, prune, fine-tune, report."""
from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, TextIO, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .. import data, zoo
from .._errors import PlanError
from .._measure.counting import count_macs
from .._planning.plans import Plan, plan as make_plan, sweep
from .._pruning import prune, save
from .._recovery import evaluate, finetune, recalibrate
from .._reporting import Report, format_sweep, report
from .._scoring import score

__all__ = ["run_demo", "SWEEP_ALPHAS"]

SWEEP_ALPHAS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)


def _tensors(dataset) -> TensorDataset:
    # The digits set is tiny: stacking it once makes every epoch a few tensor slices.
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return TensorDataset(torch.stack(xs), torch.tensor(ys, dtype=torch.long))


def _train(model: nn.Module, train: TensorDataset, epochs: int, seed: int) -> None:
    """Adam with a one-cycle schedule: reaches ~98% test accuracy on digits in about a second."""
    x, y = train.tensors
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(x) + 63) // 64
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def run_demo(
    out: Optional[Union[str, "os.PathLike[str]"]] = None,
    seed: int = 0,
    alpha: Optional[float] = None,
    macs_target: float = 0.5,
    epochs: int = 12,
    finetune_epochs: int = 3,
    alphas: Sequence[float] = SWEEP_ALPHAS,
    latency_repeats: int = 50,
    progress: bool = False,
    stream: Optional[TextIO] = None,
) -> Report:
    """Trains a small CNN on digits, prunes it with FAIR-Pruner and prints what happened.

    Steps: train ``zoo.digits_cnn``; score it on 32 calibration images per class; print an alpha sweep with
    the predicted removal and the measured test accuracy of the one-shot pruned model at every alpha; prune
    to ``macs_target`` (or at ``alpha``); re-estimate its BatchNorm statistics; fine-tune briefly; print the
    report. Seeded and deterministic (up to the latency measurements).

    Args:
        out: directory for ``report.json``, ``report.txt``, the plots, ``plan.json``, the pruned model
            (``pruned.pt``, via :func:`fairpruner.save`) and the trained original weights (``original.pt``);
            nothing is written when None.
        seed: seeds training, scoring and fine-tuning.
        alpha: prune at this ToD level instead of a MACs target.
        macs_target: fraction of MACs to remove (ToD's steps taken in order of their level until it is met).
        epochs: training epochs of the original model.
        finetune_epochs: fine-tuning epochs after pruning.
        alphas: the ToD levels of the sweep table.
        latency_repeats: timed forward passes per model in the report (0 skips latency).
        progress: show progress bars.
        stream: where to print; stdout by default.

    Returns:
        The :class:`Report` of the pruned and fine-tuned model.
    """
    stream = stream or sys.stdout
    run = _Demo(out, seed, alpha, macs_target, epochs, finetune_epochs, tuple(alphas), latency_repeats, progress,
                stream, time.perf_counter())
    threads = torch.get_num_threads()
    # The model is tiny, so per-op overhead dominates: extra threads gain nothing and, on a busy machine,
    # their spin-waiting makes training several times slower. One thread also keeps the run reproducible.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return run.go()
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Demo:
    """The demo's settings, and its steps as methods."""

    out: Optional[Union[str, "os.PathLike[str]"]]
    seed: int
    alpha: Optional[float]
    macs_target: float
    epochs: int
    finetune_epochs: int
    alphas: Tuple[float, ...]
    latency_repeats: int
    progress: bool
    stream: TextIO
    t_start: float

    def say(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def go(self) -> Report:
        train_ds, test_ds = data.digits("train"), data.digits("test")
        train, test = _tensors(train_ds), _tensors(test_ds)
        self.test_loader = DataLoader(test, batch_size=256)
        example = test.tensors[0][:64]
        model = self.train_model(train, len(test))
        scores, rows, accs = self.score_and_sweep(model, train_ds)
        the_plan = self.make_the_plan(scores)
        oneshot, pruned = self.prune_and_recalibrate(model, the_plan, train, example)
        self.finetune(pruned, train)
        stages = {"one-shot": oneshot, "recalibrated": self.recalibrated}
        rep = report(model, pruned, the_plan, example, eval_loader=self.test_loader,
                     latency_repeats=self.latency_repeats, stages=stages, final_stage="fine-tuned",
                     progress=self.progress)
        self.say()
        self.say(rep.to_text())
        if self.out is not None:
            self.write(rep, model, pruned, the_plan, rows, accs)
        self.say()
        self.say(f"demo finished in {time.perf_counter() - self.t_start:.1f} s")
        return rep

    def train_model(self, train: TensorDataset, n_test: int) -> nn.Module:
        self.say(f"FAIR-Pruner demo: zoo.digits_cnn on scikit-learn digits ({len(train)} train / {n_test} test "
                 f"images, 8x8, 10 classes), seed {self.seed}")
        model = zoo.create("digits_cnn", num_classes=10)
        t0 = time.perf_counter()
        _train(model, train, self.epochs, self.seed)
        self.base_acc = evaluate(model, self.test_loader)
        self.say(f"1. trained {self.epochs} epochs in {time.perf_counter() - t0:.1f} s: test accuracy "
                 f"{100 * self.base_acc:.2f}%")
        return model

    def score_and_sweep(self, model: nn.Module, train_ds) -> tuple:
        t0 = time.perf_counter()
        calib = data.calibration_loader(train_ds, samples_per_class=32, seed=self.seed)
        scores = score(model, calib, seed=self.seed, progress=self.progress)
        self.say(f"2. scored {len(scores.groups)} groups ({sum(g.n_units for g in scores.groups)} units) on "
                 f"{scores.meta['n_samples']} calibration images in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        rows = sweep(scores, self.alphas)
        accs = [evaluate(prune(model, make_plan(scores, alpha=a)), self.test_loader) for a in self.alphas]
        self.say(f"3. alpha sweep (predicted removal; accuracy measured one-shot, no fine-tuning; "
                 f"{time.perf_counter() - t0:.1f} s)")
        self.say(f"   unpruned accuracy {100 * self.base_acc:.2f}%")
        self.say(_indent(format_sweep(rows, accs)))
        return scores, rows, accs

    def make_the_plan(self, scores) -> Plan:
        if self.alpha is not None:
            self.say(f"4. plan at alpha {self.alpha:g}")
            return make_plan(scores, alpha=self.alpha)
        try:
            the_plan = make_plan(scores, macs=self.macs_target)
            self.say(f"4. plan for -{100 * self.macs_target:.0f}% MACs: reached at ToD level {the_plan.alpha:.4g}")
        except PlanError as exc:
            # One ToD round removes at most about half of a group; take the deepest plan it allows.
            the_plan = make_plan(scores, alpha=1.0)
            self.say(f"4. -{100 * self.macs_target:.0f}% MACs is out of reach in one ToD round ({exc}); using "
                     "the deepest reachable plan, alpha 1")
        return the_plan

    def prune_and_recalibrate(self, model: nn.Module, the_plan: Plan, train: TensorDataset, example) -> tuple:
        oneshot = prune(model, the_plan)
        predicted = the_plan.achieved["macs"]
        measured = 1 - count_macs(oneshot, example) / count_macs(model, example)
        pruned = recalibrate(copy.deepcopy(oneshot), DataLoader(train.tensors[0], batch_size=256))
        self.recalibrated = copy.deepcopy(pruned)
        self.oneshot_acc, self.recal_acc = evaluate(oneshot, self.test_loader), evaluate(pruned, self.test_loader)
        self.say(f"   MACs removed: {100 * predicted:.1f}% predicted, {100 * measured:.1f}% measured; accuracy "
                 f"{100 * self.oneshot_acc:.2f}% one-shot, {100 * self.recal_acc:.2f}% with BatchNorm statistics "
                 "re-estimated on the training images")
        return oneshot, pruned

    def finetune(self, pruned: nn.Module, train: TensorDataset) -> None:
        t0 = time.perf_counter()
        loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(self.seed))
        # The paper fine-tunes with lr 1e-3; a larger rate suits these few epochs on a tiny model.
        finetune(pruned, loader, epochs=self.finetune_epochs, lr=0.01, progress=self.progress)
        self.say(f"5. fine-tuned {self.finetune_epochs} epochs (SGD, cosine) in {time.perf_counter() - t0:.1f} s: "
                 f"test accuracy {100 * self.recal_acc:.2f}% -> {100 * evaluate(pruned, self.test_loader):.2f}%")

    def write(self, rep: Report, model: nn.Module, pruned: nn.Module, the_plan: Plan, rows, accs) -> None:
        out = Path(self.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(rep.to_json() + "\n")
        (out / "report.txt").write_text(rep.to_text() + "\n\n" + format_sweep(rows, accs) + "\n")
        (out / "plan.json").write_text(the_plan.to_json() + "\n")
        torch.save(model.state_dict(), out / "original.pt")
        save(out / "pruned.pt", pruned, the_plan)
        plots = rep.plot(out, sweep=rows, accuracy=accs)
        self.say()
        self.say(f"wrote {out}: report.json, report.txt, plan.json, original.pt, pruned.pt, "
                 + ", ".join(p.name for p in plots))
        self.say(f"   re-create the report: fairpruner report --model zoo:digits_cnn --weights "
                 f"{out / 'original.pt'} --pruned {out / 'pruned.pt'} --data digits --threads 1")


def _indent(text: str, by: str = "   ") -> str:
    return "\n".join(by + line for line in text.splitlines())
