"""The architecture matrix the pruning tests share: each family's factory and input shape, the targets, and
the scored and pruned case of each (computed once per session)."""
from __future__ import annotations

import torch
from torch import nn

from helpers import Scored, randomize_norms, tiny_loader
from fairpruner import zoo


# name -> (factory, per-sample input shape)
FAMILIES = {
    "vgg_small": (lambda: zoo.vgg(cfg=[8, "M", 16, 16, "M", 32], batch_norm=True), (3, 16, 16)),
    "vgg16_bn": (lambda: zoo.create("vgg16_bn"), (3, 32, 32)),
    "resnet20": (lambda: zoo.resnet20(), (3, 32, 32)),
    "resnet56": (lambda: zoo.resnet56(), (3, 16, 16)),
    "densenet": (lambda: zoo.densenet(), (3, 32, 32)),
    "mobilenetv2": (lambda: zoo.mobilenetv2(width_mult=0.5), (3, 32, 32)),
    "resnet50": (lambda: zoo.resnet50(num_classes=10), (3, 32, 32)),
    "mobilenet_v2": (lambda: zoo.mobilenet_v2(num_classes=10, width_mult=0.5), (3, 32, 32)),
    "mlp": (lambda: zoo.mlp(), (64,)),
    "mlp_bn": (lambda: zoo.mlp(batch_norm=True), (64,)),
    "conv1d_net": (lambda: zoo.conv1d_net(), (1, 64)),
    "groupnorm_cnn": (lambda: zoo.groupnorm_cnn(), (3, 16, 16)),
    "digits_cnn": (lambda: zoo.digits_cnn(), (1, 8, 8)),
}
TARGETS = {"alpha": {"alpha": 0.3}, "macs": {"macs": 0.3}}
CASES = [(f, t) for f in FAMILIES for t in TARGETS
         if not (f in ("vgg16_bn", "resnet56", "resnet50", "mobilenet_v2") and t == "macs")]
IDS = [f"{f}-{t}" for f, t in CASES]


def make_model(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_norms(FAMILIES[family][0](), seed).eval()


scored = Scored(lambda family: (make_model(family), tiny_loader(FAMILIES[family][1]), {}), TARGETS)
case = scored.case
