"""The whole data path (score -> plan -> prune -> recalibrate -> fine-tune -> evaluate) on every device present:
the CPU always, CUDA where a GPU is (the CUDA cases skip elsewhere). Calibration batches stay on the CPU, as a
user's DataLoader yields them; the library moves them to the model's device."""
import pytest
import torch

import fairpruner as fp
from fairpruner import zoo
from helpers import assert_prune_equals_mask, assert_unchanged, snapshot, tiny_loader

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]


@pytest.fixture
def exact_cuda():
    """Full float32 on CUDA (no TF32), so that pruned and masked models agree to float tolerance."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _resnet(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.create("resnet20", num_classes=4).eval().to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_the_data_path_runs_on_the_models_device_and_leaves_the_model_alone(device, exact_cuda):
    model = _resnet(device)
    before = snapshot(model)
    loader = tiny_loader((3, 32, 32), classes=4, per=4)
    scores = fp.score(model, loader, progress=False)
    plan = fp.plan(scores, macs=0.3)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5)).to(device)
    pruned, _ = assert_prune_equals_mask(model, plan, x, rtol=1e-4)
    assert {p.device.type for p in pruned.parameters()} == {device}
    fp.recalibrate(pruned, loader)
    assert {b.device.type for b in pruned.buffers()} == {device}
    fp.finetune(pruned, loader, epochs=1, lr=1e-3, progress=False)
    assert 0.0 <= fp.evaluate(pruned, loader) <= 1.0
    assert_unchanged(model, before, device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_scores_match_cpu_scores(exact_cuda):
    loader = tiny_loader((3, 32, 32), classes=4, per=4)
    on_cpu = fp.score(_resnet("cpu"), loader, progress=False)
    on_gpu = fp.score(_resnet("cuda"), loader, progress=False)
    for a, b in zip(on_cpu.groups, on_gpu.groups):
        assert a.name == b.name
        for s, t in ((a.u, b.u), (a.r, b.r)):
            assert (s - t.cpu()).abs().max() <= 1e-3 * s.abs().max() + 1e-12, a.name
