"""The training script's data path: the held-out validation split, on-device augmentation, resuming, budgets."""
import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
import splits  # noqa: E402
import train  # noqa: E402
from fairpruner import data  # noqa: E402


def _old_split(labels):
    """The split accuracy.py carved inline before it moved to splits.py: the chosen defaults rest on it."""
    labels = torch.tensor(labels)
    g = torch.Generator().manual_seed(12345)
    val, rest = [], []
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        val += idx[:500].tolist()
        rest += idx[500:].tolist()
    return sorted(val), sorted(rest)


def test_validation_split_is_the_one_the_defaults_were_chosen_on():
    labels = torch.randint(0, 10, (8000,), generator=torch.Generator().manual_seed(1)).tolist()
    labels += [c for c in range(10) for _ in range(500)]  # every class has at least 500 images
    assert splits.validation_split(labels) == _old_split(labels)


def test_validation_split_is_balanced_disjoint_and_fixed():
    labels = [c for c in range(10) for _ in range(60)][::-1]
    val, rest = splits.validation_split(labels, per_class=20)
    assert len(val) == 200 and len(rest) == 400
    assert sorted(val + rest) == list(range(600))
    assert np.bincount([labels[i] for i in val]).tolist() == [20] * 10
    assert splits.validation_split(labels, per_class=20) == (val, rest)
    assert splits.validation_split(labels, per_class=20, seed=1)[0] != val


def _dataset(n: int = 40, size: int = 8, classes: int = 4) -> data.ArrayDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return data.ArrayDataset(images, [k % classes for k in range(n)], [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], augment=True)


def _as_the_dataset_augments(ds: data.ArrayDataset, k: int, rng_seed: int):
    """Image k as ``ArrayDataset.__getitem__`` augments it, with the crop and flip it drew."""
    torch.manual_seed(rng_seed)
    i, j = torch.randint(0, 2 * ds.padding + 1, (2,)).tolist()
    flip = bool(torch.rand(()) < 0.5)
    torch.manual_seed(rng_seed)
    return ds[k][0], (i, j), flip


def test_crop_flip_matches_the_datasets_own_augmentation():
    ds = _dataset(12)
    raw = ds.images.permute(0, 3, 1, 2)
    draws = [_as_the_dataset_augments(ds, k, 100 + k) for k in range(12)]
    assert {d[2] for d in draws} == {True, False}  # both branches are exercised
    shifts = torch.tensor([d[1] for d in draws])
    flips = torch.tensor([d[2] for d in draws])
    got = train.crop_flip(raw, shifts, flips, ds.padding)
    assert got.dtype == torch.uint8
    want = torch.stack([d[0] for d in draws])
    assert torch.allclose((got.float() / 255 - ds._mean) / ds._std, want, atol=1e-6)


def test_device_batches_yield_each_epochs_draws_normalised_with_their_labels():
    ds = _dataset()
    batches = train.DeviceBatches(ds, batch_size=16, device=torch.device("cpu"), seed=3)
    assert len(batches) == 2  # the partial batch is dropped
    got = list(batches.epoch(1))
    g = torch.Generator().manual_seed(3 * 1000 + 1)
    order = torch.randperm(40, generator=g)
    shifts = torch.randint(0, 9, (40, 2), generator=g)
    flips = torch.rand(40, generator=g) < 0.5
    for b, (xs, ys) in enumerate(got):
        idx = order[16 * b:16 * (b + 1)]
        crops = []
        for k in idx.tolist():
            i, j = shifts[k].tolist()
            padded = torch.nn.functional.pad(ds.images[k].permute(2, 0, 1), (4, 4, 4, 4))[:, i:i + 8, j:j + 8]
            crops.append(padded.flip(-1) if flips[k] else padded)
        want = (torch.stack(crops).float() / 255 - ds._mean) / ds._std
        assert torch.allclose(xs, want, atol=1e-6)
        assert ys.tolist() == [ds.targets[k] for k in idx.tolist()]
    again = list(batches.epoch(1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, again))
    assert not torch.equal(got[0][0], next(batches.epoch(2))[0])


def test_seconds_per_epoch_times_a_copy_and_leaves_model_and_rng_alone():
    batches = train.DeviceBatches(_dataset(64), batch_size=16, device=torch.device("cpu"), seed=0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    seconds = train.seconds_per_epoch(model, batches, torch.device("cpu"), bf16=False)
    assert 0 < seconds < 60
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("argv, message", [(["--minutes", "0"], "--minutes must be positive")])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.fixture
def tiny_cifar(monkeypatch):
    """CIFAR-10 replaced by 10 classes of 502 random 8x8 images: 5,000 held out, 20 left to train on."""
    full = _dataset(5020, size=8, classes=10)
    monkeypatch.setattr(train.data, "cifar10", lambda root, split, augment=False: data.ArrayDataset(
        full.images.numpy(), full.targets, full.mean, full.std, augment=augment))
    return full


def _run(tmp_path, *extra):
    return train.main(["--model", "resnet20", "--batch-size", "4", "--eval-every", "1",
                       "--out", str(tmp_path / "m.pt"), *extra])


def test_training_holds_out_the_validation_images_and_resumes_its_own_schedule(tiny_cifar, tmp_path, capsys):
    handler = signal.getsignal(signal.SIGINT)
    _run(tmp_path, "--epochs", "2")
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C works again once training is over
    rows = [json.loads(line) for line in (tmp_path / "m.log").read_text().splitlines()]
    assert rows[0]["config"]["holdout"] == "val" and rows[0]["config"]["train_images"] == 20
    assert [r["epoch"] for r in rows[1:]] == [1, 2] and (tmp_path / "m.pt").is_file()
    state = torch.load(tmp_path / "m.state", weights_only=True)
    assert state["epochs"] == 2 and state["recipe"]["steps_per_epoch"] == 5
    _run(tmp_path, "--epochs", "9", "--resume")  # the schedule was fixed at 2 epochs: nothing more to train
    assert "after epoch 2 of 2" in capsys.readouterr().out
    assert len((tmp_path / "m.log").read_text().splitlines()) == 3
    with pytest.raises(SystemExit, match="holdout 'val' \\(now 'none'\\)"):
        _run(tmp_path, "--resume", "--holdout", "none")


def test_minutes_caps_the_epochs_and_refuses_a_budget_below_one_epoch(tiny_cifar, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "seconds_per_epoch", lambda *a: 30.0)
    _run(tmp_path, "--epochs", "50", "--minutes", "1.2")  # 72 s / (30 s x 1.1) = 2 epochs
    assert "2 of 50 epochs fit" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.log").read_text().splitlines()[0])["config"]["epochs"] == 2
    with pytest.raises(SystemExit, match="shorter than one epoch"):
        _run(tmp_path, "--epochs", "50", "--minutes", "0.5")


def test_cutout_zeroes_one_square_per_image_and_keeps_the_rest():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 12, 12) + 10  # no pixel is zero before
    out = train.cutout(x, 4)
    zeroed = out == 0
    assert torch.equal(zeroed.all(1), zeroed.any(1))  # every channel of a pixel alike
    zeroed = zeroed[:, 0]
    assert torch.equal(out[~zeroed[:, None].expand_as(x)], x[~zeroed[:, None].expand_as(x)])
    rows, cols = zeroed.any(2).sum(1), zeroed.any(1).sum(1)
    assert torch.equal(zeroed.sum((1, 2)), rows * cols)  # one rectangle: the square, maybe clipped by the border
    assert 1 <= rows.min() and rows.max() == 4 and cols.max() == 4
    assert (rows * cols == 16).any() and (rows * cols < 16).any()


def test_init_from_starts_a_fresh_schedule_from_a_checkpoints_weights(tiny_cifar, tmp_path):
    start = train.zoo.create("resnet20", num_classes=10)
    start.conv1.weight.data.fill_(0.5)  # unlike any initialisation the run could draw itself
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in start.state_dict().items()},
               tmp_path / "start.pt")
    _run(tmp_path, "--epochs", "2", "--lr", "1e-12", "--cutout", "4", "--init-from", str(tmp_path / "start.pt"))
    trained = torch.load(tmp_path / "m.pt", weights_only=True)["conv1.weight"]
    torch.testing.assert_close(trained, start.conv1.weight.detach().half().float())  # it began at those weights
    config = json.loads((tmp_path / "m.log").read_text().splitlines()[0])["config"]
    assert config["init_from"] == str(tmp_path / "start.pt") and config["cutout"] == 4
    with pytest.raises(SystemExit, match="cutout 4 \\(now 0\\)"):
        _run(tmp_path, "--epochs", "2", "--lr", "1e-12", "--resume", "--init-from", str(tmp_path / "start.pt"))
    torch.save(train.zoo.create("resnet56", num_classes=10).state_dict(), tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="does not fit this --model"):
        _run(tmp_path / "sub", "--epochs", "2", "--init-from", str(tmp_path / "other.pt"))


@pytest.mark.parametrize("argv, message", [(["--cutout", "-1"], "--cutout must be 0"),
                                           (["--init-from", "/no/such.pt"], "no such file")])
def test_bad_restart_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err
