"""Tests for fairpruner._recovery.training: evaluate and finetune."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fairpruner as fp
import fairpruner._recovery.training as training
from fairpruner import zoo
from fairpruner._recovery import native_cpu_autocast
from fairpruner._errors import DataError, FairPrunerError


def _blobs(n: int = 256, seed: int = 0) -> TensorDataset:
    """Two well-separated Gaussian blobs in 8 dimensions."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 8, generator=g) + 3.0 * (2 * y[:, None] - 1)
    return TensorDataset(x, y)


def _loader(seed: int = 0, **kw) -> DataLoader:
    return DataLoader(_blobs(), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed), **kw)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))


class Constant(nn.Module):
    """Always predicts class ``k``."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(x.shape[0], 2) + self.dummy
        out[:, self.k] = 1.0
        return out


def test_evaluate_counts_top1_and_restores_flag():
    loader = DataLoader(_blobs(), batch_size=50)  # 256 samples, half of each class
    model = Constant(1).train()
    assert fp.evaluate(model, loader) == pytest.approx(0.5)
    assert model.training
    model.eval()
    fp.evaluate(model, loader)
    assert not model.training


def test_evaluate_leaves_the_global_rng_as_it_was():
    """A DataLoader draws its base seed from the global RNG when iterated; evaluation needs none."""
    loader = DataLoader(_blobs(), batch_size=32)
    torch.manual_seed(5)
    fp.evaluate(_mlp(), loader)
    after = torch.rand(1)
    torch.manual_seed(5)
    _mlp()  # evaluate's model above was built after the seed too
    assert torch.equal(torch.rand(1), after)


def test_evaluate_shows_a_progress_bar_when_asked(capsys):
    fp.evaluate(Constant(1), DataLoader(_blobs(), batch_size=50), progress=True, desc="evaluating blobs")
    assert "fairpruner: evaluating blobs" in capsys.readouterr().err
    fp.evaluate(Constant(1), DataLoader(_blobs(), batch_size=50), progress=False)
    assert "evaluating" not in capsys.readouterr().err


def test_evaluate_rejects_empty_and_malformed_loaders():
    with pytest.raises(DataError):
        fp.evaluate(Constant(0), [])
    with pytest.raises(DataError):
        fp.evaluate(Constant(0), [torch.zeros(2, 8)])
    x, y = _blobs(8).tensors  # (B, 1) labels would broadcast against (B,) predictions: refused, not > 100 %
    with pytest.raises(DataError, match=r"shape \(8, 1\)"):
        fp.evaluate(Constant(0), [(x, y[:, None])])


@pytest.mark.parametrize("run", [lambda m, b: fp.evaluate(m, [b], device="meta"),
                                 lambda m, b: fp.recalibrate(m, [b[0]], device="meta")])
def test_a_device_other_than_the_model_s_is_refused_and_the_model_not_moved(run):
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(FairPrunerError, match="move it there first"):
        run(model, _blobs(8).tensors)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_finetune_learns_in_place_and_returns_eval_model(capsys):
    model = _mlp()
    loader = _loader()
    before = fp.evaluate(model, DataLoader(_blobs(seed=1), batch_size=64))
    out = fp.finetune(model, loader, epochs=3, lr=0.05, progress=False)
    assert out is model and not model.training
    after = fp.evaluate(model, DataLoader(_blobs(seed=1), batch_size=64))
    assert after > 0.95 and after >= before
    assert capsys.readouterr().err == ""  # progress=False: no bar


def test_finetune_is_deterministic():
    a = fp.finetune(_mlp(), _loader(), epochs=1, lr=0.05, progress=False)
    b = fp.finetune(_mlp(), _loader(), epochs=1, lr=0.05, progress=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_finetune_under_bfloat16_autocast_learns_and_keeps_float32_weights():
    model = _mlp()
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    fp.finetune(model, _loader(), epochs=3, lr=0.05, progress=False, autocast=torch.bfloat16)
    assert seen and set(seen) == {torch.bfloat16}  # the layers did run in bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert fp.evaluate(model, DataLoader(_blobs(seed=1), batch_size=64)) > 0.95
    with pytest.raises(FairPrunerError, match="autocast must be"):
        fp.finetune(_mlp(), _loader(), autocast=torch.float64)


@pytest.mark.parametrize("native", [False, True])
def test_finetune_warns_where_cpu_autocast_is_emulated(monkeypatch, native):
    monkeypatch.setattr(training, "native_cpu_autocast", lambda dtype: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fp.finetune(_mlp(), _loader(), epochs=1, lr=0.05, progress=False, autocast=torch.bfloat16)
        fp.finetune(_mlp(), _loader(), epochs=1, lr=0.05, progress=False)  # float32: never a warning
    slow = [w for w in caught if "emulated on this CPU" in str(w.message)]
    assert len(slow) == (0 if native else 1)
    assert all("autocast=None" in str(w.message) for w in slow)  # the warning names the fix


def test_native_cpu_autocast_answers_for_16_bit_types_only():
    assert isinstance(native_cpu_autocast(torch.bfloat16), bool)
    assert isinstance(native_cpu_autocast(torch.float16), bool)
    assert native_cpu_autocast(torch.float32) is True


def test_max_steps_limits_the_number_of_batches():
    seen = []

    class Counting:
        def __init__(self):
            self.data = list(_loader())

        def __len__(self):
            return len(self.data)

        def __iter__(self):
            for batch in self.data:
                seen.append(1)
                yield batch

    fp.finetune(_mlp(), Counting(), epochs=5, lr=0.01, max_steps=3, progress=False)
    assert len(seen) == 3
    # Without a length the schedule needs max_steps.
    with pytest.raises(FairPrunerError, match="max_steps"):
        fp.finetune(_mlp(), iter(list(_loader())), epochs=1)
    fp.finetune(_mlp(), (b for b in list(_loader())), max_steps=2, progress=False)

    class Unsized:  # re-iterable, no length: stops at max_steps or after `epochs` passes, whichever is first
        def __iter__(self):
            for batch in list(_loader())[:4]:
                seen.append(1)
                yield batch
    for epochs, steps, expected in ((0, 10, 0), (1, 10, 4), (2, 6, 6), (3, 20, 12)):
        seen.clear()
        fp.finetune(_mlp(), Unsized(), epochs=epochs, lr=0.01, max_steps=steps, progress=False)
        assert len(seen) == expected, (epochs, steps)


def test_a_bfloat16_model_takes_float32_batches():
    """Floating inputs follow the model's dtype in evaluate, recalibrate and finetune (not a dtype error)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)).bfloat16()
    fp.recalibrate(model, [x for x, _ in _loader()])
    fp.finetune(model, _loader(), lr=0.05, progress=False)
    assert fp.evaluate(model, _loader()) > 0.9 and next(model.parameters()).dtype == torch.bfloat16


def test_a_bfloat16_student_distils_from_a_float32_teacher():
    teacher = fp.finetune(_mlp(), _loader(), lr=0.05, progress=False)
    student = copy.deepcopy(teacher).bfloat16()
    fp.finetune(student, _loader(), lr=0.01, teacher=teacher, max_steps=3, progress=False)
    assert next(teacher.parameters()).dtype == torch.float32 and fp.evaluate(student, _loader()) > 0.9


@pytest.mark.parametrize("loader", [[], DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0).long()))])
def test_finetune_refuses_an_empty_loader(loader):
    with pytest.raises(DataError, match="no batches"):
        fp.finetune(_mlp(), loader, lr=0.01, progress=False)


def test_zero_epochs_or_steps_return_the_model_whatever_the_loader():
    model = _mlp()
    assert fp.finetune(model, [], epochs=0) is model and fp.finetune(model, [], max_steps=0) is model


def test_finetune_leaves_no_gradients_on_the_parameters():
    model = fp.finetune(_mlp(), _loader(), lr=0.01, max_steps=2, progress=False)
    assert all(p.grad is None for p in model.parameters())


def test_frozen_parameters_stay_frozen():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.clone()
    fp.finetune(model, _loader(), epochs=1, lr=0.05, progress=False)
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[3].weight, _mlp()[3].weight)


@pytest.mark.parametrize("kwargs", [{"epochs": -1}, {"epochs": 1.5}, {"lr": 0}, {"lr": float("nan")},
                                    {"max_steps": -2}])
def test_invalid_settings_raise(kwargs):
    with pytest.raises(FairPrunerError):
        fp.finetune(_mlp(), _loader(), progress=False, **kwargs)


def test_zero_epochs_leaves_weights_alone():
    model = _mlp().train()
    before = [p.clone() for p in model.parameters()]
    fp.finetune(model, _loader(), epochs=0)
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_non_finite_loss_is_reported():
    model = _mlp()
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))
    with pytest.raises(FairPrunerError, match="loss"):
        fp.finetune(model, _loader(), progress=False)


def test_finetunes_a_pruned_model():
    torch.manual_seed(0)
    model = zoo.create("digits_cnn").eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 1, 8, 8, generator=g), torch.arange(60) % 3
    scores = fp.score(model, DataLoader(TensorDataset(x, y), batch_size=30), samples_per_class=8,
                      projections=8, progress=False)
    pruned = fp.prune(model, fp.plan(scores, alpha=0.3))
    shapes = {n: p.shape for n, p in pruned.named_parameters()}
    start = {n: p.clone() for n, p in pruned.named_parameters()}
    fp.finetune(pruned, DataLoader(TensorDataset(x, y), batch_size=20), epochs=1, lr=0.05, progress=False)
    assert {n: p.shape for n, p in pruned.named_parameters()} == shapes
    assert any(not torch.equal(start[n], p) for n, p in pruned.named_parameters())


def _frozen_copy_state(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


def test_distilling_from_an_identical_teacher_alone_changes_nothing():
    # Student and teacher agree exactly (no dropout, no BatchNorm): the distillation term and its gradient are
    # zero, so with distill=1 and no weight decay the weights stay where they are.
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    teacher = copy.deepcopy(student)
    fp.finetune(student, _loader(), epochs=1, lr=0.1, weight_decay=0.0, progress=False, teacher=teacher,
                distill=1.0)
    for a, b in zip(student.parameters(), teacher.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # ... while cross-entropy alone (distill=0) does move them
    fp.finetune(student, _loader(), epochs=1, lr=0.1, weight_decay=0.0, progress=False, teacher=teacher,
                distill=0.0)
    assert not torch.allclose(student[0].weight, teacher[0].weight)


def test_distillation_pulls_the_model_towards_the_teacher_and_leaves_the_teacher_alone():
    teacher = _mlp(seed=1).train()
    fp.finetune(teacher, _loader(), epochs=3, lr=0.05, progress=False)
    teacher.train()[2].eval()  # mixed flags, which must survive
    teacher[0].weight.requires_grad_(False)
    before = _frozen_copy_state(teacher)
    x = _blobs(seed=2).tensors[0]

    def gap(model):
        with torch.no_grad():
            return F.kl_div(F.log_softmax(model.eval()(x), -1), F.log_softmax(teacher.eval()(x), -1),
                            reduction="batchmean", log_target=True).item()

    student = _mlp(seed=2)
    start = gap(student)
    teacher.train()[2].eval()
    fp.finetune(student, _loader(), epochs=3, lr=0.05, progress=False, teacher=teacher, distill=1.0)
    after = _frozen_copy_state(teacher)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]
    assert gap(student) < 0.25 * start


def test_distillation_settings_are_checked_before_training():
    student, teacher = _mlp(), _mlp(seed=1)
    for kw, msg in (({"teacher": "model"}, "teacher must be an nn.Module"),
                    ({"teacher": student}, "shares parameters"),
                    ({"teacher": nn.Sequential(student)}, "shares parameters"),
                    ({"teacher": teacher, "distill": 1.5}, "distill must be"),
                    ({"teacher": teacher, "temperature": 0}, "temperature must be"),
                    ({"teacher": nn.Sequential(nn.Linear(8, 3))}, "teacher's logits have shape")):
        with pytest.raises(FairPrunerError, match=msg):
            fp.finetune(student, _loader(), progress=False, **kw)


def test_a_teacher_on_another_device_is_refused_not_moved():
    teacher = _mlp(seed=1).to("meta")
    with pytest.raises(FairPrunerError, match="move it there first"):
        fp.finetune(_mlp(), _loader(), progress=False, teacher=teacher)
    assert next(teacher.parameters()).device.type == "meta"


def test_a_refused_teacher_leaves_the_model_s_batchnorm_statistics_alone():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(FairPrunerError, match="teacher's logits have shape"):
        fp.finetune(student, _loader(), progress=False, teacher=nn.Linear(8, 3))
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_finetune_trains_on_the_loss_it_is_given():
    """A causal-LM-like output (batch, positions, classes) trained on its last position's logits."""
    class PerPosition(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, x):
            return self.net(x).unsqueeze(1).expand(-1, 3, -1)

    model = PerPosition()
    before = fp.evaluate(model.net, _loader())
    with pytest.raises(DataError, match="logits of shape .*loss_fn="):
        fp.finetune(model, _loader(), epochs=1, lr=0.05)
    fp.finetune(model, _loader(), epochs=2, lr=0.05, loss_fn=lambda logits, y: F.cross_entropy(logits[:, -1], y),
                progress=False)
    assert fp.evaluate(model.net, _loader()) > max(before, 0.95)
