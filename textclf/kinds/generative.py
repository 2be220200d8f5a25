"""The generative kind: a causal LM fine-tuned (TRL SFT + LoRA) to answer with the label after a prompt that lists
the label set; scored from the label tokens (textclf.inference) by vLLM's generate runner."""

from __future__ import annotations

from typing import Any, Sequence

from ..inference import parse_output, sampling_params, scoring_plan
from ..prompts import Encoded, PromptFormat, fit_answers
from .base import ModelKind, Scorer


class GenerativeScorer(Scorer):
    def __init__(self, fmt: PromptFormat, tokenizer):
        self.fmt, self.tokenizer = fmt, tokenizer
        self.plan = scoring_plan(fmt, tokenizer)
        self.params = sampling_params(self.plan, max(len(x) for x in fmt.label_token_ids(tokenizer)) + 1)

    def encode(self, text: str) -> Encoded:
        return self.fmt.encode(self.tokenizer, text)

    def parse(self, outputs: Sequence[Any]) -> dict[str, Any]:
        return parse_output(self.plan, outputs)


class GenerativeKind(ModelKind):
    name = "generative"
    defaults: dict[str, Any] = {}  # the dataclass defaults are this kind's
    peft_task_type = "CAUSAL_LM"
    runner = "generate"
    serves_adapters = True
    label_room = 32

    def fit_answers(self, fmt: PromptFormat, tokenizer, model_cfg) -> PromptFormat:
        return fit_answers(fmt, tokenizer, model_cfg.label_list_tokens)

    def fit_format(self, fmt: PromptFormat, tokenizer, texts: Sequence[str], model_cfg) -> tuple[PromptFormat, dict]:
        fmt, info = super().fit_format(fmt, tokenizer, texts, model_cfg)
        return fmt, {
            **info,
            "answers": "label codes" if fmt.answers else "label names",
            "labels_listed": fmt.list_labels,
        }

    def overhead_tokens(self, fmt: PromptFormat, tokenizer) -> int:
        # the prompt around the text, the longest answer, and room for tokens merging across the text's edges
        return len(fmt._ids(tokenizer, fmt.prompt(tokenizer, ""))) + fmt._longest_completion(tokenizer) + 2

    def training_row(self, tokenizer, fmt: PromptFormat, text: str, label: str) -> tuple[Encoded, dict[str, Any]]:
        e = fmt.encode(tokenizer, text, label)
        return e, {"completion_mask": e.completion_mask}

    def build_trainer(
        self, cfg, model_path: str, train_rows, eval_rows, output_dir: str, *, labels: Sequence[str], **kwargs: Any
    ):
        from ..training import build_trainer

        return build_trainer(cfg, model_path, train_rows, eval_rows, output_dir, **kwargs)

    def merge(self, adapter_dir: str, base_model_path: str, labels: Sequence[str]):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float32)
        return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()

    def scorer(self, fmt: PromptFormat, tokenizer) -> Scorer:
        return GenerativeScorer(fmt, tokenizer)
