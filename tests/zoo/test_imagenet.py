"""ImageNet models: torchvision's state_dict layout, so a torchvision checkpoint loads unchanged."""
from __future__ import annotations

import io

import pytest
import torch

from fairpruner import zoo

from .torchvision_keys import MOBILENET_V2, RESNET50


def _layout(model):
    return [f"{k} {'x'.join(map(str, v.shape))}" for k, v in model.state_dict().items()]


@pytest.mark.parametrize("factory, expected, n_params", [
    (zoo.resnet50, RESNET50, 25_557_032), (zoo.mobilenet_v2, MOBILENET_V2, 3_504_872)])
def test_state_dict_matches_torchvision(factory, expected, n_params):
    model = factory()
    assert _layout(model) == expected
    assert sum(p.numel() for p in model.parameters()) == n_params


@pytest.mark.parametrize("factory", [zoo.resnet50, zoo.mobilenet_v2])
def test_a_saved_state_dict_loads_strictly_and_reproduces_outputs(factory):
    torch.manual_seed(0)
    src, dst = factory(num_classes=5).eval(), factory(num_classes=5).eval()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


def test_imagenet_models_in_the_registry():
    assert {"resnet50", "mobilenet_v2"} <= set(zoo.list_models())
    assert zoo.input_shape("resnet50") == (3, 224, 224)
    assert zoo.resnet50().fc.out_features == 1000
    assert zoo.mobilenet_v2().classifier[1].out_features == 1000
