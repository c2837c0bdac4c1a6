"""The unit-choice benchmark's helpers: per-layer counts read back from a pruned model, plans at given counts, and
Torch-Pruning's importance mapped onto the library's units."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fairpruner as fp
from fairpruner import zoo
from helpers import tiny_loader

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
import unit_choice  # noqa: E402


@pytest.fixture(scope="module")
def scored():
    torch.manual_seed(0)
    model = zoo.resnet20().eval()
    loader = tiny_loader((3, 16, 16))
    return model, loader, fp.score(model, loader, projections=8)


def test_counts_read_back_from_a_pruned_model_rebuild_its_plan(scored):
    model, _, scores = scored
    p = fp.plan(scores, macs=0.3)
    counts = unit_choice.counts_of(model, fp.prune(model, p, verify=False), scores)
    assert counts.tolist() == [len(p.removed[g.name]) for g in scores.groups] and counts.sum() > 0
    assert unit_choice.at_counts(scores, counts, "u", 0).removed == p.removed  # the default's units are lowest U
    by_r = unit_choice.at_counts(scores, counts, "taylor", 0)
    assert by_r.removed != p.removed
    assert unit_choice.counts_of(model, fp.prune(model, by_r, verify=False), scores).tolist() == counts.tolist()


def test_torch_pruning_importance_gives_every_unit_a_finite_value(scored):
    model, loader, scores = scored
    bench = SimpleNamespace(model=model, device=torch.device("cpu"), example=loader[0][0][:1],
                            split=lambda seed: (loader, None))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    imp = unit_choice.tp_importance(bench, 0, scores)
    assert set(imp) == {g.name for g in scores.groups}
    for g in scores.groups:
        v = imp[g.name]
        assert v.shape == (g.n_units,) and bool(torch.isfinite(v).all()) and float(v.std()) > 0
    # the gradients are taken on a copy: the benchmark's model is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
