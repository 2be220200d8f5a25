"""The encoder kind: a sequence classification head (e.g. BERT) on plain text, no prompt and no chat template.

Training: `AutoModelForSequenceClassification` with a PEFT LoRA adapter (the head trained in full), run by the HF
`Trainer` with the same arguments, callbacks and checkpoints as the generative kind (`textclf.training`).
Inference: vLLM's pooling runner (`encode` with the classify task), offline in evaluation and in Serve.
Label ids are the positions in the classifier's label set (`PromptFormat.labels`, the one list every kind and
step uses); the exported config.json carries them as id2label, so vLLM's class i is `labels[i]`.
A BERT head reads the mean of the text's token states, not the first token's ([CLS]): sentence encoders such as
all-MiniLM-L6-v2 were trained on that mean, and on CLINC150 it learns far faster (README, "Model kinds"). vLLM's BERT
classifier computes the same pooling when told `seq_pooling_type` MEAN, which classifier.json's "pooling" carries.
No Ray here.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from ..prompts import Encoded, PromptFormat, text_token_ids
from .base import ModelKind, Scorer


def encode(tokenizer, fmt: PromptFormat, text: str) -> Encoded:
    """[CLS] text [SEP] token ids, cut to fmt.max_length (keeping the final [SEP]) and flagged when cut; a special
    token written in the text is read as its characters."""
    ids = text_token_ids(tokenizer, text, special_tokens=True)
    truncated = len(ids) > fmt.max_length
    if truncated:
        tail = (
            [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None and ids[-1] == tokenizer.sep_token_id else []
        )
        ids = ids[: fmt.max_length - len(tail)] + tail
    return Encoded(input_ids=ids, prompt_length=len(ids), truncated=truncated)


def label_maps(labels: Sequence[str]) -> dict[str, Any]:
    """The head's id2label / label2id: class i is labels[i]."""
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


def load_tokenizer(model_path: str):
    """The model's tokenizer with a padding token (decoders often have none: their end-of-text token pads)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# Model types whose HF pooler (dense + tanh on one token) vLLM runs after a configurable pooling (its BertPooler).
MEAN_POOLED_TYPES = ("bert",)


def mean_pooling(model_path: str) -> Optional[str]:
    """The head's pooling for this model: MEAN where it has a BERT pooler to read the mean of the token states, else
    None (the model's own)."""
    from transformers import AutoConfig

    return "MEAN" if AutoConfig.from_pretrained(model_path).model_type in MEAN_POOLED_TYPES else None


def pool_mean(model) -> None:
    """Make a BERT classifier's pooler read the mean of the unpadded token states instead of the first token's, with
    its own dense + tanh after it: what vLLM's BertPooler computes with seq_pooling_type MEAN. The weights keep their
    names, so checkpoints, LoRA targets and the merge are unchanged."""
    import torch

    backbone = model.base_model
    pooler = backbone.pooler
    # The pooler is called with the hidden states only: the backbone's call leaves its mask here. Not an attribute of
    # the pooler, which PEFT copies when it trains it in full (modules_to_save).
    batch = {"mask": None}

    class MeanPooler(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense, self.activation = pooler.dense, pooler.activation

        def forward(self, hidden):
            mask = batch["mask"] if batch["mask"] is not None else hidden.new_ones(hidden.shape[:2])
            mask = mask.unsqueeze(-1).to(hidden.dtype)
            return self.activation(self.dense((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)))

    backbone.pooler = MeanPooler()

    def keep_mask(module, args, kwargs):
        batch["mask"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    backbone.register_forward_pre_hook(keep_mask, with_kwargs=True)


def start_pooler_as_identity(model) -> None:
    """Training starts with the pooler's dense layer as the identity, so the head first reads tanh(mean): BERT's
    pretrained pooler was trained on the [CLS] state, and from it CLINC150 validation accuracy after 400 steps was
    0.873 against 0.939 from the identity (README, "Model kinds")."""
    import torch

    dense = model.base_model.pooler.dense
    with torch.no_grad():
        dense.weight.copy_(torch.eye(*dense.weight.shape))
        dense.bias.zero_()


def train_pooler_in_full(lora) -> None:
    """The identity-started pooler is trained in full and saved with the adapter (the merge starts from the base
    model's pooler), without LoRA on it."""
    lora.modules_to_save = [*(lora.modules_to_save or []), "pooler"]
    lora.exclude_modules = ["pooler.dense"]


def load_model(model_path: str, labels: Sequence[str], precision: str = "fp32", pooling: Optional[str] = None):
    import torch
    from transformers import AutoModelForSequenceClassification

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=dtype, **label_maps(labels))
    if model.config.pad_token_id is None:  # a decoder's head reads the last token that is not padding
        model.config.pad_token_id = load_tokenizer(model_path).pad_token_id
    if pooling == "MEAN":
        pool_mean(model)
    return model


def to_hf_dataset(rows: Sequence[dict[str, Any]]):
    """Pre-tokenized rows (input_ids, the label id) as the Trainer's collator takes them."""
    import datasets

    return datasets.Dataset.from_dict(
        {"input_ids": [list(r["input_ids"]) for r in rows], "labels": [int(r["label_id"]) for r in rows]}
    )


def _accuracy(eval_pred) -> dict[str, float]:
    import numpy as np

    logits, labels = eval_pred
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def build_trainer(
    cfg,
    model_path: str,
    train_rows: Sequence[dict[str, Any]],
    eval_rows: Optional[Sequence[dict[str, Any]]],
    output_dir: str,
    use_gpu: bool = False,
    callbacks: Sequence[Any] = (),
    report_to: Sequence[str] = (),
    labels: Optional[Sequence[str]] = None,
    plan=None,
    pooling: Optional[str] = None,
):
    """The encoder counterpart of `textclf.training.build_trainer` (same arguments, plus the label set and the head's
    pooling)."""
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    from ..plan import plan_training
    from ..training import ProgressCallback, lora_config, resolve_precision, trainer_arguments

    if not labels:
        raise ValueError("the encoder kind needs the label set")
    plan = plan or plan_training(cfg.train, len(train_rows), len(eval_rows or []))
    args = TrainingArguments(
        **trainer_arguments(cfg, output_dir, use_gpu, plan, bool(eval_rows), report_to),
        label_names=["labels"],  # PeftModel hides the forward signature the Trainer reads
        # The head's loss is already a mean per example: the Trainer's token-count rescaling would multiply it by the
        # number of workers.
        average_tokens_across_devices=False,
    )
    tokenizer = load_tokenizer(model_path)
    # The new head and the LoRA matrices are drawn here, before the Trainer seeds anything: seed them so that a run
    # repeats (TRL builds the generative kind's adapter inside the Trainer, after its seeding).
    set_seed(cfg.train.seed)
    model = load_model(model_path, labels, resolve_precision(cfg.train.precision, use_gpu), pooling)
    lora = lora_config(cfg)
    if pooling == "MEAN":
        start_pooler_as_identity(model)
        train_pooler_in_full(lora)
    model = get_peft_model(model, lora)
    return Trainer(
        model=model,
        args=args,
        train_dataset=to_hf_dataset(train_rows),
        eval_dataset=to_hf_dataset(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=_accuracy,
        callbacks=[ProgressCallback(), *callbacks],
    )


def merge(adapter_dir: str, base_model_path: str, labels: Sequence[str]):
    """Base encoder + adapter (LoRA folded in, the trained head copied) as one plain model with id2label."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base_model_path, labels), adapter_dir).merge_and_unload()


# -- inference through vLLM's pooling runner ------------------------------------------------------------------


def pooling_params():
    from vllm import PoolingParams

    return PoolingParams(task="classify")  # softmax over the head's classes


def result(labels: Sequence[str], probs: Sequence[float]) -> dict[str, Any]:
    """vLLM's class probabilities (in id2label order) as the same result the generative kind gives."""
    if len(probs) != len(labels):
        raise RuntimeError(f"the model returned {len(probs)} classes for {len(labels)} labels")
    best = max(range(len(probs)), key=probs.__getitem__)
    return {
        "label": labels[best],
        "confidence": float(probs[best]),
        "scores": {label: float(p) for label, p in zip(labels, probs)},
    }


class HeadScorer(Scorer):
    """Serving and evaluation through vLLM's pooling runner: the head's softmax over the label set."""

    def __init__(self, fmt: PromptFormat, tokenizer):
        self.fmt, self.tokenizer = fmt, tokenizer
        self.params = [pooling_params()]

    def encode(self, text: str) -> Encoded:
        return encode(self.tokenizer, self.fmt, text)

    def parse(self, outputs: Sequence[Any]) -> dict[str, Any]:
        (output,) = outputs
        return result(self.fmt.labels, output.data.tolist())


class EncoderKind(ModelKind):
    """A sequence classification head (e.g. BERT) on the plain text, trained by the HF Trainer with LoRA."""

    name = "encoder"
    defaults: dict[str, Any] = {
        "model": "all-minilm-l6-v2",
        "target_modules": ["query", "key", "value", "dense"],
        "num_epochs": 5.0,
        "per_device_batch_size": 32,
        "learning_rate": 1e-3,  # chosen over seeds on the bundled data: README, "Model kinds"
        "evaluations": 9,
        "time_budget": "20m",  # a default run on a large data set still ends in minutes on a CPU
    }
    peft_task_type = "SEQ_CLS"  # PEFT also trains the classification head (`classifier`/`score`) in full
    runner = "pooling"
    serves_adapters = False
    label_room = 0
    pools_mean = True  # where the model allows it (mean_pooling)

    def pooling(self, model_path: str) -> Optional[str]:
        return mean_pooling(model_path) if self.pools_mean else None

    def overhead_tokens(self, fmt: PromptFormat, tokenizer) -> int:
        return len(text_token_ids(tokenizer, "", special_tokens=True))

    def training_row(self, tokenizer, fmt: PromptFormat, text: str, label: str) -> tuple[Encoded, dict[str, Any]]:
        return encode(tokenizer, fmt, text), {"label_id": fmt.labels.index(label)}

    def build_trainer(
        self, cfg, model_path: str, train_rows, eval_rows, output_dir: str, *, labels: Sequence[str], **kwargs: Any
    ):
        return build_trainer(
            cfg,
            model_path,
            train_rows,
            eval_rows,
            output_dir,
            labels=labels,
            pooling=self.pooling(model_path),
            **kwargs,
        )

    def merge(self, adapter_dir: str, base_model_path: str, labels: Sequence[str]):
        return merge(adapter_dir, base_model_path, labels)

    def scorer(self, fmt: PromptFormat, tokenizer) -> Scorer:
        return HeadScorer(fmt, tokenizer)
