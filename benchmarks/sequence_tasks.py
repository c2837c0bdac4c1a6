"""The families ``sequence.py`` benchmarks and the data they learn: a CIFAR-10 slice and two synthetic
sequence tasks generated here (seeded), with the models built for them."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from fairpruner import data as fpdata, zoo

HERE = Path(__file__).resolve().parent
CIFAR = HERE.parent.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"

# Synthetic sequences: time steps, features per step, classes (the zoo recurrent classifiers' input shape).
STEPS, FEATURES, SEQ_CLASSES = 16, 12, 5
VOCAB, TOKENS = 64, 24  # the token task for BERT: vocabulary size, sequence length


# ----------------------------------------------------------------------------------------------- data

class Data(torch.utils.data.Dataset):
    """In-memory labelled tensors with the ``.targets``/``.classes`` that calibration_loader reads."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: int) -> None:
        self.x, self.y = x, y
        self.targets = y.tolist()
        self.classes = [str(c) for c in range(classes)]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


class Batches:
    """Mini-batches sliced from a :class:`Data` (no per-sample collation); reshuffled each pass when seeded."""

    def __init__(self, data: Data, batch_size: int, seed: Optional[int] = None) -> None:
        self.data, self.batch_size = data, batch_size
        self.gen = None if seed is None else torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.data)
        order = torch.arange(n) if self.gen is None else torch.randperm(n, generator=self.gen)
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.data.x[idx], self.data.y[idx]


def cifar_slice(split: str, n: int) -> Data:
    """The first ``n // 10`` images of every class of a CIFAR-10 split, classes interleaved."""
    ds = fpdata.cifar10(CIFAR, split)
    targets = torch.as_tensor(ds.targets)
    per = n // 10
    idx = torch.stack([(targets == c).nonzero().flatten()[:per] for c in range(10)], 1).flatten()
    x = torch.stack([ds[int(i)][0] for i in idx])
    return Data(x, targets[idx], 10)


def majority(n: int, seed: int) -> Data:
    """Float sequences (STEPS x FEATURES): every step is one of SEQ_CLASSES prototype vectors plus noise; the
    label's prototype fills 6 random steps, the other 10 steps draw from the other prototypes, so the label is
    (almost always) the most frequent prototype. Noise makes single steps ambiguous: the model must aggregate
    over time."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(SEQ_CLASSES, FEATURES, generator=torch.Generator().manual_seed(1234)) * 1.5
    y = torch.arange(n) % SEQ_CLASSES
    others = (y[:, None] + torch.randint(1, SEQ_CLASSES, (n, STEPS), generator=g)) % SEQ_CLASSES
    planted = torch.rand(n, STEPS, generator=g).argsort(1) < 6
    ids = torch.where(planted, y[:, None], others)
    x = protos[ids] + torch.randn(n, STEPS, FEATURES, generator=g)
    return Data(x, y, SEQ_CLASSES)


def majority_tokens(n: int, seed: int) -> Data:
    """The majority task on token ids (for BERT): the label's keyword token (ids 1..SEQ_CLASSES) sits at 5
    random positions; every other position holds another keyword (probability 0.35) or a filler token."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % SEQ_CLASSES
    others = (y[:, None] + torch.randint(1, SEQ_CLASSES, (n, TOKENS), generator=g)) % SEQ_CLASSES
    planted = torch.rand(n, TOKENS, generator=g).argsort(1) < 5
    keywords = torch.where(planted, y[:, None], others) + 1           # token ids 1..SEQ_CLASSES
    filler = torch.randint(SEQ_CLASSES + 1, VOCAB, (n, TOKENS), generator=g)
    keep = planted | (torch.rand(n, TOKENS, generator=g) < 0.35)
    return Data(torch.where(keep, keywords, filler), y, SEQ_CLASSES)


# --------------------------------------------------------------------------------------------- models

class TransformerClassifier(nn.Module):
    """Linear token embedding + learned positions -> nn.TransformerEncoder (pre-norm) -> LayerNorm -> mean over
    time -> Linear."""

    def __init__(self, in_features: int = FEATURES, dim: int = 48, heads: int = 4, layers: int = 2,
                 ff: int = 96, classes: int = SEQ_CLASSES, steps: int = STEPS) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, dim)
        self.pos = nn.Parameter(torch.randn(1, steps, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.embed(x) + self.pos)).mean(1))


def hf_bert() -> nn.Module:
    import transformers
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=TOKENS,
                                     num_labels=SEQ_CLASSES, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    return transformers.BertForSequenceClassification(config)


def hf_vit() -> nn.Module:
    import transformers
    config = transformers.ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=64,
                                    num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                                    num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                    attn_implementation="sdpa")
    return transformers.ViTForImageClassification(config)


Variant = Tuple[str, Callable[[nn.Module], Dict]]  # (label, model -> extra fp.score keyword arguments)
DEFAULT: Tuple[Variant, ...] = (("", lambda model: {}),)


@dataclass
class Family:
    """One benchmarked model family: trained once, then scored and pruned once per variant."""

    key: str
    label: str
    build: Callable[[], nn.Module]
    task: str                      # "cifar", "majority" or "tokens"
    lr: float
    needs: Tuple[str, ...] = ()    # importable modules the family needs (skipped with a note otherwise)
    needs_zoo: Tuple[str, ...] = ()
    variants: Tuple[Variant, ...] = DEFAULT


def _routers(model: nn.Module) -> Dict:
    from fairpruner import moe_routers
    return {"ignore": moe_routers(model)}


FAMILIES = [
    Family("vit", "ViT-Tiny/4 (zoo vit_tiny_cifar)", lambda: zoo.create("vit_tiny_cifar"), "cifar", 1e-3,
           needs_zoo=("vit_tiny_cifar",),
           variants=(("heads", lambda m: {"attention": "heads"}), ("head dims", lambda m: {"attention": "head_dims"}))),
    Family("convnext", "ConvNeXt-Atto (zoo convnext_atto)", lambda: zoo.create("convnext_atto"), "cifar", 2e-3,
           needs_zoo=("convnext_atto",)),
    Family("transformer", "nn.TransformerEncoder, 2 layers x 4 heads", TransformerClassifier, "majority", 2e-3),
    Family("lstm", "LSTM (zoo), 2 layers, bidirectional",
           lambda: zoo.create("lstm_classifier", input_size=FEATURES, hidden_size=48, num_layers=2,
                              bidirectional=True, head="mean", num_classes=SEQ_CLASSES), "majority", 3e-3,
           needs=("fairpruner.families.recurrent",), needs_zoo=("lstm_classifier",)),
    Family("gru", "GRU (zoo), 2 layers, bidirectional",
           lambda: zoo.create("gru_classifier", input_size=FEATURES, hidden_size=48, num_layers=2,
                              bidirectional=True, head="mean", num_classes=SEQ_CLASSES), "majority", 3e-3,
           needs=("fairpruner.families.recurrent",), needs_zoo=("gru_classifier",)),
    Family("moe", "MoE (zoo moe_classifier), 2 blocks x 4 experts, top-2",
           lambda: zoo.create("moe_classifier", in_features=FEATURES, num_classes=SEQ_CLASSES), "majority", 3e-3,
           needs=("fairpruner.families.experts",), needs_zoo=("moe_classifier",),
           variants=(("whole experts", lambda m: {}), ("expert hidden units", _routers))),
    Family("bert", "HF BERT, 2 layers x 4 heads", hf_bert, "tokens", 2e-3,
           needs=("transformers", "fairpruner.families.attention_hf")),
    Family("hf_vit", "HF ViT/4, 4 layers x 4 heads", hf_vit, "cifar", 1e-3,
           needs=("transformers", "fairpruner.families.attention_hf")),
]
