"""Tests for fairpruner._pruning.io: save and load replay the plans on a fresh model, and refuse foreign files
and other architectures."""
from __future__ import annotations

import pytest
import torch

import fairpruner as fp
from helpers import fresh_inputs
from fairpruner import zoo
from pruning.matrix import FAMILIES, case, make_model


# ---------------------------------------------------------------- save / load

@pytest.mark.parametrize("family", ["resnet20", "densenet", "groupnorm_cnn", "mlp_bn", "mobilenetv2"])
def test_save_load_round_trip(family, tmp_path):
    _, _, plan, pruned = case(family, target="macs")
    path = tmp_path / "pruned.pt"
    fp.save(path, pruned, plan)
    raw = torch.load(path, weights_only=True)
    assert isinstance(raw, dict)
    fresh = make_model(family, seed=1)  # a different init: weights must come from the file
    fresh_sd = {k: v.clone() for k, v in fresh.state_dict().items()}
    loaded = fp.load(path, fresh)
    assert all(torch.equal(fresh_sd[k], v) for k, v in fresh.state_dict().items())  # not modified
    x = fresh_inputs(FAMILIES[family][1])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), pruned.eval()(x))
    assert fp.count_params(loaded) == fp.count_params(pruned)


def test_load_rejects_foreign_files_and_wrong_architecture(tmp_path):
    _, _, plan, pruned = case("resnet20", target="alpha")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": pruned.state_dict()}, other)
    with pytest.raises(fp.FairPrunerError):
        fp.load(other, zoo.resnet20())
    path = tmp_path / "pruned.pt"
    fp.save(path, pruned, plan)
    with pytest.raises(fp.PlanError):
        fp.load(path, zoo.resnet56())
    with pytest.raises(fp.PlanError):
        fp.load(path, pruned)  # an already pruned instance


def test_two_rounds_save_and_load(tmp_path):
    """prune -> re-score -> prune again; the saved file replays both plans on a fresh model."""
    torch.manual_seed(0)
    model = zoo.create("digits_cnn").eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 8, 8, generator=g), torch.arange(4).repeat(6)
    loader = [(x[:12], y[:12]), (x[12:], y[12:])]
    plan1 = fp.plan(fp.score(model, loader, projections=8), alpha=0.3)
    once = fp.prune(model, plan1)
    plan2 = fp.plan(fp.score(once, loader, projections=8), alpha=0.3)
    twice = fp.prune(once, plan2)
    assert fp.count_params(twice) < fp.count_params(once) < fp.count_params(model)
    with pytest.raises(fp.PlanError, match="does not match"):
        fp.prune(model, plan2)  # the second plan belongs to the once-pruned model
    fp.save(tmp_path / "m.pt", twice, plan2)
    restored = fp.load(tmp_path / "m.pt", zoo.create("digits_cnn"))
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), twice.eval()(x))


def test_load_rejects_foreign_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(fp.FairPrunerError, match="not a readable"):
        fp.load(tmp_path / "junk.pt", zoo.create("digits_cnn"))
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(fp.FairPrunerError, match="fairpruner.model"):
        fp.load(tmp_path / "other.pt", zoo.create("digits_cnn"))
    with pytest.raises(fp.FairPrunerError, match="fairpruner.scores"):
        fp.Scores.load(tmp_path / "other.pt")


def test_save_refuses_a_model_the_plan_did_not_make(tmp_path):
    """Saving with another plan, or the unpruned model, would write a file that cannot load: refused."""
    model, scores, plan, pruned = case("resnet20", target="alpha")
    other = fp.plan(scores, alpha=0.6)
    assert other.removed != plan.removed
    with pytest.raises(fp.PlanError, match="another plan"):
        fp.save(tmp_path / "a.pt", pruned, other)
    with pytest.raises(fp.PlanError, match="parameters"):
        fp.save(tmp_path / "b.pt", model, plan)
    assert not list(tmp_path.iterdir())
