"""Tests for fairpruner._scoring.scores: which layers become groups (ignore, output layers, streams) and the
Scores file (round trip, refusals, older versions)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fairpruner as fp
from helpers import assert_scores_equal, randomize_norms, tiny_loader
from fairpruner import zoo


# ---------------------------------------------------------------- groups: ignore, output layers, streams

def test_ignore_keeps_a_group_out():
    model = zoo.vgg(cfg=[8, "M", 16, 16], batch_norm=True).eval()
    loader = tiny_loader((3, 8, 8))
    full = fp.score(model, loader, projections=8)
    assert set(full.names) == {"features.0", "features.4", "features.7"}
    s = fp.score(model, loader, projections=8, ignore=["features.4"])
    assert set(s.names) == {"features.0", "features.7"}
    assert s.meta["ignore"] == ["features.4"]
    # Ignoring a coupled member (the BatchNorm after features.0) drops the whole group.
    s2 = fp.score(model, loader, projections=8, ignore=["features.1"])
    assert set(s2.names) == {"features.4", "features.7"}
    # The ignored layer keeps its width after pruning.
    pruned = fp.prune(model, fp.plan(s, alpha=1.0))
    assert pruned.features[4].out_channels == 16
    assert pruned.features[0].out_channels < 8


@pytest.mark.parametrize("family,shape,head", [("mlp", (64,), "classifier"), ("digits_cnn", (1, 8, 8), "classifier"),
                                               ("resnet20", (3, 16, 16), "fc")])
def test_output_layer_is_never_a_group(family, shape, head):
    scores = fp.score(zoo.create(family).eval(), tiny_loader(shape), projections=8)
    assert scores.meta["output_layers"] == [head]
    assert head not in scores.names
    plan = fp.plan(scores, alpha=1.0)
    assert head not in plan.removed


def test_conv_head_output_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(6, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    scores = fp.score(net, tiny_loader((3, 8, 8)), projections=8)
    assert "4" not in scores.names
    assert set(scores.names) == {"0", "2"}
    pruned = fp.prune(net, fp.plan(scores, alpha=1.0))
    assert pruned[4].out_channels == 4


# ---------------------------------------------------------------- Scores file

def test_scores_save_load_round_trip(tmp_path):
    model = randomize_norms(zoo.digits_cnn()).eval()
    scores = fp.score(model, tiny_loader((1, 8, 8)), projections=8)
    path = tmp_path / "scores.pt"
    scores.save(path)
    raw = torch.load(path, weights_only=True)
    assert isinstance(raw, dict)
    loaded = fp.Scores.load(path)
    assert_scores_equal(scores, loaded)
    assert loaded.meta == scores.meta
    assert all(a.channels == b.channels for a, b in zip(scores.groups, loaded.groups))
    assert fp.plan(loaded, macs=0.2).removed == fp.plan(scores, macs=0.2).removed
    with pytest.raises(KeyError):
        loaded["no.such.group"]


def test_scores_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"format": "something"}, path)
    with pytest.raises(fp.FairPrunerError):
        fp.Scores.load(path)
    model = zoo.mlp(in_features=16, hidden=(12, 10), num_classes=4).eval()
    scores = fp.score(model, tiny_loader((16,)), projections=8)
    scores.save(path)
    d = torch.load(path, weights_only=True)
    d["version"] = 999
    torch.save(d, path)
    with pytest.raises(fp.FairPrunerError, match="newer"):
        fp.Scores.load(path)


def test_scores_written_before_writers_were_recorded_still_load(tmp_path):
    torch.manual_seed(0)
    model = zoo.resnet20().eval()
    scores = fp.score(model, tiny_loader((3, 16, 16)), projections=4)
    path = tmp_path / "s.pt"
    scores.save(path)
    d = torch.load(path, weights_only=True)
    for g in d["groups"]:
        del g["writers"], g["feeds_output"]  # the format as version 1 files without them hold it
    torch.save(d, path)
    old = fp.Scores.load(path)
    assert [g.writers for g in old.groups] == [1] * len(old.groups)
    assert not any(g.feeds_output for g in old.groups)
    assert fp.plan(old, alpha=0.1).removed == fp.plan(scores, alpha=0.1, stream_weight=1,
                                                 stream_floor="free").removed


def test_the_group_the_output_layer_reads_is_marked(tmp_path):
    """ResNet-20: the last stage's stream (rooted at its projection shortcut) is the head's input; a plain
    CNN: its last conv. The mark survives save and load."""
    torch.manual_seed(0)
    scores = fp.score(zoo.resnet20().eval(), tiny_loader((3, 16, 16)), projections=4)
    assert [g.name for g in scores.groups if g.feeds_output] == ["layer3.0.shortcut.0"]
    scores.save(tmp_path / "s.pt")
    assert [g.feeds_output for g in fp.Scores.load(tmp_path / "s.pt").groups] == [g.feeds_output for g in scores.groups]
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()
    marked = fp.score(cnn, tiny_loader((3, 16, 16), classes=4), projections=4)
    assert [g.name for g in marked.groups if g.feeds_output] == ["3"]


def test_streams_are_groups_several_layers_write_and_several_read():
    """ResNet-20: the stem's and the two projection shortcuts' streams. MobileNetV2: only the projection convs
    whose outputs are added (not the expansion conv a depthwise conv follows). A gated MLP (gate * up -> down):
    two writers, one reader, not a stream."""
    torch.manual_seed(0)
    resnet = fp.score(zoo.resnet20().eval(), tiny_loader((3, 16, 16)), projections=4)
    streams = sorted(g.name for g in resnet.groups if g.is_stream)
    assert streams == ["conv1", "layer2.0.shortcut.0", "layer3.0.shortcut.0"]
    mobile = fp.score(zoo.mobilenetv2(num_classes=4).eval(), tiny_loader((3, 16, 16)), projections=4)
    streams = sorted(g.name for g in mobile.groups if g.is_stream)
    assert streams and all(n.endswith("conv.6") for n in streams)  # the blocks' projection convs

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down, self.head = nn.Linear(6, 12), nn.Linear(6, 12), nn.Linear(12, 6), \
                nn.Linear(6, 4)

        def forward(self, x):
            return self.head(self.down(F.silu(self.gate(x)) * self.up(x)))

    gated = fp.score(Gated().eval(), tiny_loader((6,), classes=4), projections=4)
    mlp = [g for g in gated.groups if g.channels == 12]
    assert len(mlp) == 1 and not mlp[0].is_stream
