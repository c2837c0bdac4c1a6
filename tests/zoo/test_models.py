"""Tests for the fairpruner model zoo."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fairpruner import zoo

ALL_MODELS = zoo.list_models()


@pytest.fixture(autouse=True)
def _single_thread_seeded():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_contents():
    expected = {
        "resnet20", "resnet56", "vgg16_bn", "mobilenetv2", "densenet",
        "mlp", "conv1d_net", "groupnorm_cnn", "digits_cnn",
    }
    assert expected <= set(ALL_MODELS)
    assert ALL_MODELS == sorted(ALL_MODELS)


def test_unknown_model_error_is_helpful():
    with pytest.raises(ValueError) as excinfo:
        zoo.create("resnet9000")
    msg = str(excinfo.value)
    assert "resnet9000" in msg
    assert "resnet20" in msg and "vgg16_bn" in msg
    with pytest.raises(ValueError, match="resnet9000"):
        zoo.example_input("resnet9000")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_eval_forward_shape(name):
    model = zoo.create(name).eval()
    x = zoo.example_input(name, batch_size=2)
    with torch.no_grad():
        assert model(x).shape == (2, 10)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_num_classes_honoured(name):
    model = zoo.create(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(zoo.example_input(name, batch_size=3)).shape == (3, 7)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_train_forward_backward(name):
    model = zoo.create(name).train()
    out = model(zoo.example_input(name, batch_size=2))
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_fx_symbolic_trace_matches_eager(name):
    model = zoo.create(name).eval()
    traced = torch.fx.symbolic_trace(model)
    x = zoo.example_input(name)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize(
    "name, low, high",
    [
        ("resnet20", 0.26e6, 0.28e6),
        ("resnet56", 0.84e6, 0.87e6),
        ("vgg16_bn", 14.6e6, 14.8e6),
        ("densenet", 0.1e6, 0.2e6),
    ],
)
def test_param_counts(name, low, high):
    assert low <= _n_params(zoo.create(name)) <= high


def test_example_input_shapes():
    assert zoo.example_input("resnet20", 4).shape == (4, 3, 32, 32)
    assert zoo.example_input("digits_cnn").shape == (2, 1, 8, 8)
    assert zoo.example_input("conv1d_net").shape == (2, 1, 64)
    assert zoo.example_input("mlp").shape == (2, 64)


def test_resnet_pad_shortcut_runs_without_shortcut_params():
    model = zoo.resnet20(shortcut="pad").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    shortcut_params = [n for n, _ in model.named_parameters() if "shortcut" in n]
    assert shortcut_params == []
    assert _n_params(model) < _n_params(zoo.resnet20())
    assert any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in zoo.resnet20().modules())
    # The option-A shortcut is built on F.pad, which must remain visible to tracers.
    traced = torch.fx.symbolic_trace(model)
    assert any(node.target is torch.nn.functional.pad for node in traced.graph.nodes)


def test_resnet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shortcut"):
        zoo.resnet20(shortcut="bogus")
    with pytest.raises(ValueError, match="6n\\+2"):
        zoo.CifarResNet(21)


def test_resnet_mixes_inplace_module_and_functional_relu():
    model = zoo.resnet20()
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == 64


def test_small_vgg_from_cfg():
    model = zoo.vgg(cfg=[16, "M", 32, "M"], num_classes=5, batch_norm=True).eval()
    assert isinstance(model.features, nn.Sequential)
    assert model.classifier.in_features == 32
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 2
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    plain = zoo.vgg(cfg=[8, "M"], batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())


@pytest.mark.parametrize("width", [0.5, 0.75])
def test_mobilenetv2_width_mult(width):
    model = zoo.mobilenetv2(num_classes=4, width_mult=width).eval()
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths)
    assert _n_params(model) < _n_params(zoo.mobilenetv2())
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_densenet_concatenates_features():
    model = zoo.densenet(growth_rate=8, block_config=(2, 2), num_classes=3).eval()
    # stem 16 + 2*8 = 32 -> transition 16 -> + 2*8 = 32 into the head.
    assert model.classifier.in_features == 32
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_small_model_options():
    bn_mlp = zoo.mlp(in_features=20, hidden=(16,), num_classes=3, batch_norm=True)
    assert any(isinstance(m, nn.BatchNorm1d) for m in bn_mlp.modules())
    assert bn_mlp.eval()(torch.randn(2, 20)).shape == (2, 3)
    net1d = zoo.conv1d_net(in_channels=2, length=32, channels=(8, 8, 8), num_classes=4).eval()
    assert net1d(torch.randn(2, 2, 32)).shape == (2, 4)
    with pytest.raises(ValueError):
        zoo.conv1d_net(length=2, channels=(8, 8))
    gn = zoo.groupnorm_cnn(channels=(16, 32), groups=4, num_classes=2).eval()
    assert sum(isinstance(m, nn.GroupNorm) for m in gn.modules()) == 4
    with pytest.raises(ValueError, match="groups"):
        zoo.groupnorm_cnn(channels=(30,), groups=8)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_torch_pruning_dependency_graph_builds(name):
    tp = pytest.importorskip("torch_pruning")
    model = zoo.create(name).eval()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=zoo.example_input(name))
    assert len(list(dg.get_all_groups())) > 0


def test_vgg_classifier_starts_small():
    """Kaiming fan-out on VGG's classifier made the first CIFAR-10 epoch diverge; it is drawn from N(0, 0.01)."""
    torch.manual_seed(0)
    model = zoo.vgg16_bn(num_classes=10)
    assert 0.005 < float(model.classifier.weight.std()) < 0.015
    assert float(model.classifier.bias.abs().max()) == 0.0
