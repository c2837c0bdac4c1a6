"""Scores the planning tests share: ResNet-20's, and the same groups with distinct seeded values."""
import dataclasses

import pytest
import torch

import fairpruner as fp
from helpers import tiny_loader
from fairpruner import zoo


@pytest.fixture(scope="package")
def resnet_scores():
    torch.manual_seed(0)
    model = zoo.resnet20().eval()
    return fp.score(model, tiny_loader((3, 16, 16)), projections=8)


@pytest.fixture(scope="package")
def synthetic_scores(resnet_scores):
    """resnet20's groups and cost model with distinct, seeded U, R and L1 values (no ties)."""
    g = torch.Generator().manual_seed(123)
    groups = [dataclasses.replace(gs, u=torch.rand(gs.n_units, generator=g), r=torch.rand(gs.n_units, generator=g),
                                  l1=torch.rand(gs.n_units, generator=g)) for gs in resnet_scores.groups]
    return fp.Scores(groups, resnet_scores.cost, dict(resnet_scores.meta))
