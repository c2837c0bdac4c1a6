"""Tests for fairpruner._recovery.recalibration (fp.recalibrate): BatchNorm statistics re-estimated from unlabelled
data, nothing else."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fairpruner as fp
from fairpruner import zoo
from helpers import randomize_norms


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    return randomize_norms(net).eval()


def _batches(n=3, size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 8, 8, generator=g) * 2 + 1 for _ in range(n)]


def test_statistics_equal_the_hand_computed_cumulative_average():
    net, xs = _net(), _batches()
    out = fp.recalibrate(net, xs)
    assert out is net  # in place, the same object
    with torch.no_grad():
        conv = [net[0](x) for x in xs]
        # Inside the pass BatchNorm normalises with batch statistics, which is what the next layers see.
        mid = [net[5](net[4](net[3](net[2](nn.functional.batch_norm(c, None, None, net[1].weight, net[1].bias,
                                                                    training=True))))) for c in conv]
    mean = torch.stack([c.mean((0, 2, 3)) for c in conv]).mean(0)
    var = torch.stack([c.var((0, 2, 3), unbiased=True) for c in conv]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[6].running_mean, torch.stack([m.mean(0) for m in mid]).mean(0),
                               rtol=1e-5, atol=1e-6)
    assert int(net[1].num_batches_tracked) == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_statistics_are_averaged_in_float32(dtype):
    """In bfloat16 the running update (1 - k/n) * mean + k/n * batch mean loses later batches to rounding; the
    average is kept in float32 and only the result is rounded."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16)).to(dtype).eval()
    x = (torch.randn(4000, 8) + 3).to(dtype)
    fp.recalibrate(net, [x[i:i + 20] for i in range(0, 4000, 20)])
    with torch.no_grad():
        h = torch.stack([net[0](x[i:i + 20]).float() for i in range(0, 4000, 20)])  # (batches, 20, 16)
    torch.testing.assert_close(net[1].running_mean.float(), h.mean((0, 1)), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(net[1].running_var.float(), h.var(1, unbiased=True).mean(0), rtol=2e-2, atol=1e-2)
    assert net[1].running_mean.dtype == dtype and net[1].momentum == 0.1


def test_a_one_sample_batch_is_skipped_with_a_warning_not_a_failure():
    """A loader's last batch of one sample would fail BatchNorm1d after every other batch has run: skipped."""
    net, xs = _net(), _batches(n=2, size=5)
    ref = fp.recalibrate(copy.deepcopy(net), xs)
    with pytest.warns(UserWarning, match="skipped 1 batch"):
        fp.recalibrate(net, xs + [_batches(n=1, size=1, seed=9)[0]])
    for a, b in zip(net.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(fp.DataError, match="one value per channel"):
        fp.recalibrate(net, [_batches(n=1, size=1)[0]])
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_batches_weigh_by_their_samples():
    # 100 + 2 images: the short batch counts for 2 of 102 samples, not for half of the estimate.
    net = _net()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(100, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g) * 3 + 5]
    fp.recalibrate(net, xs)
    with torch.no_grad():
        conv = [net[0](x) for x in xs]
    w = torch.tensor([100.0, 2.0]) / 102
    mean = (torch.stack([c.mean((0, 2, 3)) for c in conv]) * w[:, None]).sum(0)
    var = (torch.stack([c.var((0, 2, 3), unbiased=True) for c in conv]) * w[:, None]).sum(0)
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[1].running_mean, torch.cat(conv).mean((0, 2, 3)), rtol=1e-5, atol=1e-5)


class _Twice(nn.Module):
    """One BatchNorm applied to two inputs of different lengths per forward pass (a shared norm)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(x[:, :, :2]).sum() + self.bn(x[:, :, 2:] * 4 + 1).sum()


def test_a_norm_called_twice_averages_everything_it_saw():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(6, 3, 5, generator=g), torch.randn(1, 3, 5, generator=g)]
    net = _Twice().eval()
    fp.recalibrate(net, xs)
    seen = torch.cat([torch.cat([x[:, :, :2], x[:, :, 2:] * 4 + 1], 2) for x in xs])  # every value, pooled
    torch.testing.assert_close(net.bn.running_mean, seen.mean((0, 2)), rtol=1e-5, atol=1e-6)
    assert int(net.bn.num_batches_tracked) == 4


def test_an_uninitialised_lazy_norm_is_refused_clearly():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d())
    with pytest.raises(fp.FairPrunerError, match="forward pass through the model first"):
        fp.recalibrate(net, _batches(1))


def test_a_failed_pass_keeps_the_statistics_it_was_given():
    net = _net()
    state = copy.deepcopy(net.state_dict())
    with pytest.raises(RuntimeError):
        fp.recalibrate(net, [_batches(1)[0], torch.zeros(5, 7, 8, 8)])  # the second batch has 7 channels
    for k, v in state.items():
        assert torch.equal(net.state_dict()[k], v), k
    assert net[1].momentum == 0.1 and not net.training


def test_modes_momentum_and_other_weights_restored_dropout_stays_off(monkeypatch):
    net = _net()
    net.train()
    net[1].eval()  # a BatchNorm the user froze: its own flag comes back
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    modes = {n: m.training for n, m in net.named_modules()}
    seen = []
    monkeypatch.setattr(nn.Dropout, "forward", lambda self, x: seen.append(self.training) or x)
    fp.recalibrate(net, [(x, torch.zeros(5, dtype=torch.long)) for x in _batches()])  # (inputs, targets) works
    assert seen and not any(seen)  # dropout ran in eval mode
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert net[1].momentum == 0.1 and net[6].momentum == 0.1
    for k, v in before.items():
        torch.testing.assert_close(net.state_dict()[k], v, rtol=0, atol=0)
    assert all(p.grad is None for p in net.parameters())


def test_max_batches_and_dataloader():
    a, b = _net(), _net()
    xs = _batches(4)
    fp.recalibrate(a, DataLoader(TensorDataset(torch.cat(xs)), batch_size=5), max_batches=2)
    fp.recalibrate(b, xs[:2])
    torch.testing.assert_close(a[1].running_mean, b[1].running_mean)
    read = []

    def counted():
        for x in xs:
            read.append(x)
            yield x
    fp.recalibrate(b, counted(), max_batches=2)
    assert len(read) == 2  # no batch is drawn past the last one used
    with pytest.raises(fp.FairPrunerError, match="max_batches"):
        fp.recalibrate(a, xs, max_batches=0)


def test_empty_loader_refused_and_statistics_kept():
    net = _net()
    state = copy.deepcopy(net.state_dict())
    with pytest.raises(fp.DataError, match="no batches"):
        fp.recalibrate(net, [])
    with pytest.raises(fp.DataError, match="no batches"):
        fp.recalibrate(net, DataLoader(TensorDataset(torch.zeros(0, 3, 8, 8)), batch_size=4))
    for k, v in state.items():
        assert torch.equal(net.state_dict()[k], v)


def test_model_without_batchnorm_unchanged_with_a_warning():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    state = copy.deepcopy(net.state_dict())
    with pytest.warns(UserWarning, match="no BatchNorm"):
        out = fp.recalibrate(net, [torch.randn(2, 4)])
    assert out is net
    for k, v in state.items():
        assert torch.equal(net.state_dict()[k], v)


def test_recalibration_recovers_a_pruned_resnet():
    torch.manual_seed(0)
    model = randomize_norms(zoo.resnet20(num_classes=4)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 16, 16, generator=g)
    y = torch.arange(64) % 4
    scores = fp.score(model, [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)], projections=8)
    pruned = fp.prune(model, fp.plan(scores, macs=0.3))
    before = copy.deepcopy(pruned.state_dict())
    again = fp.recalibrate(copy.deepcopy(pruned), [x[:32], x[32:]])
    bn = again.layer1[0].bn1
    assert bn.running_mean.numel() < 16  # a pruned layer, re-estimated
    assert not torch.equal(bn.running_mean, before["layer1.0.bn1.running_mean"])
    for k, v in pruned.state_dict().items():  # the copy changed, the pruned model did not
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("make", [
    lambda: (nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), torch.randn(6, 4) * 3 + 1),
    lambda: (nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)), torch.randn(4, 2, 6, 6) * 3 + 1),
    lambda: (nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2)), torch.randn(2, 1, 5, 5, 5) * 3 + 1),
    lambda: (nn.Sequential(nn.Conv2d(2, 3, 3), nn.SyncBatchNorm(3)), torch.randn(4, 2, 6, 6) * 3 + 1),
], ids=["1d", "2d", "3d", "sync"])
def test_every_batchnorm_kind(make):
    torch.manual_seed(0)
    net, x = make()
    net.eval()
    fp.recalibrate(net, [x])
    with torch.no_grad():
        y = net[0](x)
    dims = [d for d in range(y.dim()) if d != 1]
    torch.testing.assert_close(net[1].running_mean, y.mean(dims), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[1].running_var, y.var(dims, unbiased=True), rtol=1e-5, atol=1e-5)
