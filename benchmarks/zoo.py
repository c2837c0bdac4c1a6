"""The Hugging Face model zoo: which ``transformers`` architectures fairpruner prunes, and which it refuses.

Every model is built from a small config of its family (random weights, no download), with its sequence or image
classification head, then run through ``fp.score -> fp.plan(alpha=0.05) -> fp.prune`` on 24 random samples of
3 classes; ``fp.prune`` checks the pruned model against the masked one (to float tolerance) on its own.
A model is *pruned* when that holds and at least one unit went (*nothing removed* when it has groups but alpha
0.05 cuts none of them), *refused* when fairpruner raised one of its own errors before pruning (the reason is its
message), and *crashed* on anything else. Graph exploration is bounded
(``FAIRPRUNER_GRAPH_SECONDS``, 60 s here), so no model can hang the run.

    python benchmarks/zoo.py                       # all configs -> benchmarks/results/zoo.md (about a minute)
    python benchmarks/zoo.py --only llama gpt2     # a few, printed only
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import torch

import fairpruner as fp
from fairpruner._graph import SECONDS_ENV

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "zoo.md"
CLASSES, SAMPLES, SEQ, IMAGE = 3, 24, 16, 32
VOCAB = 128

# name -> (config class, model class, kind, config kwargs); small shapes of each family.
TEXT = dict(vocab_size=VOCAB, num_labels=CLASSES, pad_token_id=0)
BERTLIKE = dict(TEXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=64)
DECODER = dict(TEXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
               intermediate_size=128, max_position_embeddings=64, use_cache=False)
VISION = dict(num_labels=CLASSES, image_size=IMAGE, num_channels=3)
ViTLIKE = dict(VISION, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128)
CONFIGS: Dict[str, Tuple[str, str, str, dict]] = {
    # vision
    "resnet (basic)": ("ResNetConfig", "ResNetForImageClassification", "image",
                       dict(num_labels=CLASSES, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                            layer_type="basic")),
    "resnet (bottleneck)": ("ResNetConfig", "ResNetForImageClassification", "image",
                            dict(num_labels=CLASSES, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                                 layer_type="bottleneck")),
    "convnext": ("ConvNextConfig", "ConvNextForImageClassification", "image",
                 dict(num_labels=CLASSES, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)),
    "convnextv2": ("ConvNextV2Config", "ConvNextV2ForImageClassification", "image",
                   dict(num_labels=CLASSES, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)),
    "mobilenet_v1": ("MobileNetV1Config", "MobileNetV1ForImageClassification", "image",
                     dict(num_labels=CLASSES, image_size=IMAGE, depth_multiplier=0.25)),
    "mobilenet_v2": ("MobileNetV2Config", "MobileNetV2ForImageClassification", "image",
                     dict(num_labels=CLASSES, image_size=IMAGE, depth_multiplier=0.35)),
    "efficientnet": ("EfficientNetConfig", "EfficientNetForImageClassification", "image",
                     dict(num_labels=CLASSES, image_size=IMAGE, width_coefficient=0.25, depth_coefficient=0.2,
                          hidden_dim=320)),
    "regnet": ("RegNetConfig", "RegNetForImageClassification", "image",
               dict(num_labels=CLASSES, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8)),
    "vit": ("ViTConfig", "ViTForImageClassification", "image", ViTLIKE),
    "deit": ("DeiTConfig", "DeiTForImageClassification", "image", ViTLIKE),
    "beit": ("BeitConfig", "BeitForImageClassification", "image", dict(ViTLIKE, use_mean_pooling=True)),
    "dinov2": ("Dinov2Config", "Dinov2ForImageClassification", "image", ViTLIKE),
    "swin": ("SwinConfig", "SwinForImageClassification", "image",
             dict(VISION, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4)),
    "levit": ("LevitConfig", "LevitForImageClassification", "image",
              dict(num_labels=CLASSES, image_size=IMAGE, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 2, 2],
                   depths=[1, 1, 1], key_dim=[8, 8, 8])),
    "poolformer": ("PoolFormerConfig", "PoolFormerForImageClassification", "image",
                   dict(num_labels=CLASSES, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])),
    "cvt": ("CvtConfig", "CvtForImageClassification", "image",
            dict(num_labels=CLASSES, embed_dim=[16, 32, 64], num_heads=[1, 2, 4], depth=[1, 2, 3])),
    # text encoders
    "bert": ("BertConfig", "BertForSequenceClassification", "text", BERTLIKE),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", "text", dict(BERTLIKE, pad_token_id=1)),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification", "text",
                   dict(TEXT, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64)),
    "albert": ("AlbertConfig", "AlbertForSequenceClassification", "text",
               dict(BERTLIKE, embedding_size=32)),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", "text", dict(BERTLIKE, embedding_size=32)),
    "deberta_v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification", "text", BERTLIKE),
    # decoders
    "gpt2": ("GPT2Config", "GPT2ForSequenceClassification", "text",
             dict(TEXT, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False)),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForSequenceClassification", "text",
                dict(TEXT, hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global"], 2]],
                     max_position_embeddings=64, use_cache=False)),
    "opt": ("OPTConfig", "OPTForSequenceClassification", "text",
            dict(TEXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
                 max_position_embeddings=64, use_cache=False)),
    "llama": ("LlamaConfig", "LlamaForSequenceClassification", "text", DECODER),
    "llama (causal LM)": ("LlamaConfig", "LlamaForCausalLM", "causal", DECODER),
    "qwen2": ("Qwen2Config", "Qwen2ForSequenceClassification", "text", DECODER),
    "mistral": ("MistralConfig", "MistralForSequenceClassification", "text", DECODER),
    "gemma": ("GemmaConfig", "GemmaForSequenceClassification", "text", dict(DECODER, head_dim=8)),
    "phi3": ("Phi3Config", "Phi3ForSequenceClassification", "text", DECODER),
    "mixtral": ("MixtralConfig", "MixtralForSequenceClassification", "text",
                dict(DECODER, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForSequenceClassification", "text",
                  dict(DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64)),
    # The routers in ignore=: every expert kept, the hidden units inside the stacked experts pruned instead.
    "mixtral (expert hidden units)": ("MixtralConfig", "MixtralForSequenceClassification", "text+hidden",
                                      dict(DECODER, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe (expert hidden units)": ("Qwen2MoeConfig", "Qwen2MoeForSequenceClassification", "text+hidden",
                                        dict(DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                             shared_expert_intermediate_size=64)),
}


def build(name: str) -> Tuple[torch.nn.Module, List[tuple], dict]:
    """The model of one entry, its calibration batches and the score keywords it needs."""
    import transformers
    config_cls, model_cls, kind, kwargs = CONFIGS[name]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    g = torch.Generator().manual_seed(0)
    if kind == "image":
        x = torch.randn(SAMPLES, 3, IMAGE, IMAGE, generator=g)
    else:
        x = torch.randint(2, VOCAB, (SAMPLES, SEQ), generator=g)
    y = torch.arange(SAMPLES) % CLASSES
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, SAMPLES, 8)]
    extra = {"ignore": fp.moe_routers(model)} if kind.endswith("+hidden") else {}
    if kind == "causal":  # U needs classes: the class is read from the last position's first logits
        extra["loss_fn"] = lambda logits, t: torch.nn.functional.cross_entropy(logits[:, -1, :CLASSES], t)
    return model, batches, extra


def run(name: str) -> Dict[str, object]:
    row: Dict[str, object] = {"model": name}
    start = time.perf_counter()
    try:
        model, batches, extra = build(name)
    except Exception as e:  # noqa: BLE001 - a config this transformers version cannot build is reported
        return {**row, "status": "not built", "reason": f"{type(e).__name__}: {e}"[:160]}
    row["params"] = fp.count_params(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = fp.score(model, batches, samples_per_class=8, projections=16, progress=False, **extra)
            plan = fp.plan(scores, alpha=0.05)
            fp.prune(model, plan)  # verifies pruned == masked
        row.update(status="pruned" if plan.units_removed else "nothing removed",
                   groups=len(scores.groups), units=f"{plan.units_removed}/{plan.units_total}",
                   params_removed=plan.achieved["params"], macs_removed=plan.achieved["macs"],
                   families=", ".join(sorted({g.name.rpartition(":")[2] for g in scores.groups if ":" in g.name})))
    except fp.FairPrunerError as e:
        row.update(status="refused", reason=str(e).split(". ")[0][:200])
    except Exception as e:  # noqa: BLE001 - the table must show a crash, not stop at it
        row.update(status="crashed", reason=f"{type(e).__name__}: {e}"[:200])
        traceback.print_exc()
    row["seconds"] = time.perf_counter() - start
    return row


def table(rows: List[Dict[str, object]]) -> str:
    lines = ["| model | status | groups | units removed | params removed | MACs removed | time (s) | reason |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = (lambda k: f"{100 * r[k]:.1f} %" if k in r else "")
        cells = [r["model"], r["status"], r.get("groups", ""), r.get("units", ""), pct("params_removed"),
                 pct("macs_removed"), f"{r['seconds']:.1f}" if "seconds" in r else "",
                 str(r.get("reason", "")).replace("|", "/")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--only", nargs="+", metavar="NAME", help=f"entries to run, of: {', '.join(CONFIGS)}")
    args = ap.parse_args(argv)
    try:
        import transformers
    except ImportError:
        sys.exit("benchmarks/zoo.py needs transformers: pip install -e '.[hf]'")
    os.environ.setdefault(SECONDS_ENV, "60")  # graph exploration bounded: no model can hang the run
    torch.set_num_threads(min(2, torch.get_num_threads()))
    names = args.only or list(CONFIGS)
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        sys.exit(f"unknown entries {unknown}; choose from {list(CONFIGS)}")
    rows = []
    for name in names:
        rows.append(run(name))
        r = rows[-1]
        print(f"{name:22s} {r['status']:10s} {r.get('units', '')!s:10s} {r.get('reason', '')}", flush=True)
    built = [r for r in rows if r["status"] != "not built"]
    count = {s: sum(1 for r in built if r["status"] == s) for s in ("pruned", "nothing removed", "refused", "crashed")}
    summary = (f"{count['pruned']} of {len(built)} models pruned ({100 * count['pruned'] / max(len(built), 1):.0f} %), "
               f"{count['nothing removed']} with groups but nothing removed at alpha 0.05, {count['refused']} refused, "
               f"{count['crashed']} crashed"
               + (f", {len(rows) - len(built)} not built by this transformers version"
                  if len(built) < len(rows) else ""))
    print(summary)
    if args.only:
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        "# Hugging Face models: pruned or refused\n\n"
        f"Written by `python benchmarks/zoo.py` on {datetime.date.today()} (transformers {transformers.__version__}, "
        f"torch {torch.__version__}). Small configs of each family, random weights, 24 samples of 3 classes; "
        "`score -> plan(alpha=0.05) -> prune`, with the pruned model checked against the masked one. Time: score, "
        "plan and prune together, 2 threads.\n\n" + summary + ".\n\n" + table(rows) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
