"""The encoder kind: a sequence classification head (e.g. BERT) on plain text, no prompt and no chat template.

Training: `AutoModelForSequenceClassification` with a PEFT LoRA adapter (the head trained in full), run by the HF
`Trainer` with the same arguments, callbacks and checkpoints as the generative kind (`textclf.training`).
Inference: vLLM's pooling runner (`classify`), offline in the evaluation job and through `AsyncLLM.encode` in Serve.
Label ids are the positions in the classifier's label set (`PromptFormat.labels`, the one list every kind and
step uses); the exported config.json carries them as id2label, so vLLM's class i is `labels[i]`.
No Ray here.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from .config import Config
from .inference import BatchClassifier, bind_engine_threads, engine_kwargs
from .prompts import Encoded, PromptFormat, token_ids
from .training import ProgressCallback, lora_config, resolve_precision, trainer_arguments


def encode(tokenizer, fmt: PromptFormat, text: str) -> Encoded:
    """[CLS] text [SEP] token ids, cut to fmt.max_length (keeping the final [SEP]) and flagged when cut."""
    ids = token_ids(tokenizer, text, special_tokens=True)
    truncated = len(ids) > fmt.max_length
    if truncated:
        tail = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None and ids[-1] == tokenizer.sep_token_id else []
        ids = ids[: fmt.max_length - len(tail)] + tail
    return Encoded(input_ids=ids, prompt_length=len(ids), truncated=truncated)


def label_maps(labels: Sequence[str]) -> dict[str, Any]:
    """The head's id2label / label2id: class i is labels[i]."""
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}}


def load_model(model_path: str, labels: Sequence[str], precision: str = "fp32"):
    import torch
    from transformers import AutoModelForSequenceClassification

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return AutoModelForSequenceClassification.from_pretrained(model_path, dtype=dtype, **label_maps(labels))


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
    cfg: Config,
    model_path: str,
    train_rows: Sequence[dict[str, Any]],
    eval_rows: Optional[Sequence[dict[str, Any]]],
    output_dir: str,
    use_gpu: bool = False,
    callbacks: Sequence[Any] = (),
    report_to: Sequence[str] = (),
    labels: Optional[Sequence[str]] = None,
):
    """The encoder counterpart of `textclf.training.build_trainer` (same arguments, plus the label set)."""
    from peft import get_peft_model
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    if not labels:
        raise ValueError("the encoder kind needs the label set")
    args = TrainingArguments(
        **trainer_arguments(cfg, output_dir, use_gpu, bool(eval_rows), report_to),
        label_names=["labels"],  # PeftModel hides the forward signature the Trainer reads
        # The head's loss is already a mean per example: the Trainer's token-count rescaling would multiply it by the
        # number of workers (measured: a 10-class start at 4.6 = 2 x ln 10 on 2 workers).
        average_tokens_across_devices=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # The new head and the LoRA matrices are drawn here, before the Trainer seeds anything: seed them so that a run
    # repeats (TRL builds the generative kind's adapter inside the Trainer, after its seeding).
    set_seed(cfg.train.seed)
    model = get_peft_model(load_model(model_path, labels, resolve_precision(cfg.train.precision, use_gpu)),
                           lora_config(cfg))
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
    return {"label": labels[best], "confidence": float(probs[best]),
            "scores": {label: float(p) for label, p in zip(labels, probs)}}


class EncoderBatchClassifier(BatchClassifier):
    """`BatchClassifier` for the encoder kind: `LLM(runner="pooling").classify()` on the merged model."""

    def __init__(self, model_dir: str, meta: dict[str, Any], engine_options: dict[str, Any],
                 adapter_dir: Optional[str] = None, cpu_threads_bind: Optional[str] = "all"):
        from transformers import AutoTokenizer
        from vllm import LLM

        if adapter_dir:
            raise ValueError("the encoder kind is evaluated merged (vLLM has no LoRA for classification heads)")
        bind_engine_threads(cpu_threads_bind)
        self.fmt = PromptFormat.from_dict(meta["prompt"])
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.llm = LLM(**engine_kwargs(model_dir, self.fmt.max_length, runner="pooling", **engine_options))

    def classify(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        encoded = [encode(self.tokenizer, self.fmt, t) for t in texts]
        outputs = self.llm.classify([{"prompt_token_ids": e.input_ids} for e in encoded], use_tqdm=False)
        return [{**result(self.fmt.labels, out.outputs.probs), "truncated": e.truncated}
                for e, out in zip(encoded, outputs)]
