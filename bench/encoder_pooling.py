"""Benchmark, not a test: which pooling the encoder kind's head reads, chosen on a validation split. Each variant trains
all-MiniLM-L6-v2 with the kind's LoRA settings for the same steps (plain PyTorch loop, no Ray) and reports in-scope
accuracy without a threshold, and (in-scope accuracy, oos recall) at a few abstain thresholds.

    python -m bench.encoder_pooling --train-file train.jsonl --validation-file validation.jsonl [--steps 400]

Variants: cls (BERT's own head: the [CLS] state through its pretrained pooler), mean-pretrained (the mean of the
token states through that pooler), mean-identity (the kind's choice: the pooler starts as the identity, trained in
full), mean-linear (the mean straight into the classifier; vLLM's BERT classifier cannot serve it).
Writes bench/results/encoder-pooling.md.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np

from textclf.config import PROJECT_ROOT

VARIANTS = ("cls", "mean-pretrained", "mean-identity", "mean-linear")
THRESHOLDS = (0.3, 0.5, 0.7)


def build(variant: str, path: str, labels: list[str]):
    """(the model, its logits for a batch) with the kind's LoRA settings."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModel

    from textclf.config import load_config
    from textclf.kinds.encoder import load_model, start_pooler_as_identity, train_pooler_in_full
    from textclf.training import lora_config

    config = lora_config(load_config(overrides={"model_kind": "encoder"}))  # the kind's LoRA, task SEQ_CLS
    if variant == "mean-linear":
        backbone = AutoModel.from_pretrained(path)

        class MeanLinear(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert, self.classifier = backbone, torch.nn.Linear(backbone.config.hidden_size, len(labels))

            def forward(self, input_ids, attention_mask):
                mask = attention_mask.unsqueeze(-1).float()
                states = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                return self.classifier((states * mask).sum(1) / mask.sum(1))

        config.task_type, config.modules_to_save = None, ["classifier"]  # a plain module, its head in full
        model = get_peft_model(MeanLinear(), config)
        return model, lambda ids, am: model(input_ids=ids, attention_mask=am)
    base = load_model(path, labels, pooling=None if variant == "cls" else "MEAN")
    if variant == "mean-identity":
        start_pooler_as_identity(base)
        train_pooler_in_full(config)
    model = get_peft_model(base, config)
    return model, lambda ids, am: model(input_ids=ids, attention_mask=am).logits


def run(variant: str, path: str, train: list[dict], val: list[dict], steps: int, lr: float, batch: int) -> dict:
    import torch
    from transformers import get_linear_schedule_with_warmup

    from textclf.abstain import oos_label
    from textclf.kinds.encoder import load_tokenizer

    torch.manual_seed(0)
    rng = random.Random(0)
    labels = sorted({r["label"] for r in train})
    index = {label: i for i, label in enumerate(labels)}
    tokenizer = load_tokenizer(path)
    model, logits = build(variant, path, labels)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(opt, max(1, steps // 20), steps)

    def tensors(rows):
        e = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
        return e["input_ids"], e["attention_mask"]

    order: list[int] = []
    started = time.time()
    model.train()
    for _ in range(steps):
        if len(order) < batch:
            more = list(range(len(train)))
            rng.shuffle(more)
            order += more
        rows, order = [train[i] for i in order[:batch]], order[batch:]
        target = torch.tensor([index[r["label"]] for r in rows])
        loss = torch.nn.functional.cross_entropy(logits(*tensors(rows)), target)
        loss.backward()
        opt.step()
        schedule.step()
        opt.zero_grad()
    seconds = time.time() - started
    model.eval()
    with torch.no_grad():
        probs = np.concatenate(
            [torch.softmax(logits(*tensors(val[i : i + 128])), -1).numpy() for i in range(0, len(val), 128)]
        )
    gold = np.array([index[r["label"]] for r in val])
    pred, conf = probs.argmax(1), probs.max(1)
    oos = oos_label(labels)
    is_oos = gold == index[oos] if oos else np.zeros(len(gold), dtype=bool)
    out = {"variant": variant, "steps": steps, "train_s": round(seconds, 1)}
    out["in_scope_accuracy"] = float((pred == gold)[~is_oos].mean())
    for t in THRESHOLDS:
        held = (conf < t) | (is_oos & (pred == gold))  # abstained, or answered oos
        out[f"at {t}"] = [
            round(float(((pred == gold) & ~(conf < t))[~is_oos].mean()), 3),
            round(float(held[is_oos].mean()), 3) if is_oos.any() else None,
        ]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-file", required=True)
    ap.add_argument("--validation-file", required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(PROJECT_ROOT / "bench" / "results" / "encoder-pooling.md"))
    args = ap.parse_args(argv)
    from textclf.models import resolve_model

    def read(f):
        return [json.loads(line) for line in open(f) if line.strip()]

    train, val = read(args.train_file), read(args.validation_file)
    path = resolve_model("all-minilm-l6-v2")
    results = [run(v, path, train, val, args.steps, args.lr, args.batch) for v in args.variants.split(",")]
    head = " | ".join(f"at {t}: in-scope / oos recall" for t in THRESHOLDS)
    lines = [
        f"# Encoder head pooling on {args.train_file} ({len(train)} train rows), chosen on {args.validation_file}",
        "",
        f"all-MiniLM-L6-v2, LoRA r 16 on query/key/value/dense, {args.steps} steps of batch {args.batch}, "
        f"lr {args.lr:g} (linear, 5 % warm-up), seed 0; `python -m bench.encoder_pooling`, "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        f"| variant | train s | in-scope accuracy | {head} |",
        "|---|---:|---:|" + "---:|" * len(THRESHOLDS),
    ]
    for r in results:
        cells = " | ".join(" / ".join("" if x is None else f"{x:.3f}" for x in r[f"at {t}"]) for t in THRESHOLDS)
        lines.append(f"| {r['variant']} | {r['train_s']} | {r['in_scope_accuracy']:.3f} | {cells} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
