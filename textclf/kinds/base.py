"""The interface every model kind implements (see textclf/kinds/__init__.py for the registry)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional, Sequence

from ..plan import fit_max_length, model_limit, text_lengths
from ..prompts import Encoded, PromptFormat


class Scorer:
    """Serving's view of one classifier: its engine params, how a text becomes prompt tokens, how the engine's outputs
    become {"label", "confidence", "scores"}."""

    params: list  # the engine requests one text takes (one params each, on the same prompt); parse gets their outputs

    def encode(self, text: str) -> Encoded:
        raise NotImplementedError

    def parse(self, outputs: Sequence[Any]) -> dict[str, Any]:
        raise NotImplementedError


class ModelKind:
    name: str = ""
    defaults: dict[str, Any] = {}  # config values that differ from the dataclass defaults; a given value wins
    peft_task_type: str = "CAUSAL_LM"  # PEFT's TaskType name
    runner: str = "generate"  # vLLM's runner: "generate" (answer tokens) or "pooling" (a classification head)
    serves_adapters: bool = True  # vLLM can serve base + LoRA adapter (no LoRA for classification heads)
    label_room: int = 0  # engine context beyond the prompt's max_length, for the answer's tokens

    # -- data --------------------------------------------------------------------------------------------------
    def fit_format(self, fmt: PromptFormat, tokenizer, texts: Sequence[str], model_cfg) -> tuple[PromptFormat, dict]:
        """The format fitted to the training texts: the kind's answers, and max_length from the texts' token lengths
        unless the configuration gives one. Returns it with the figures that decided it."""
        fmt = self.fit_answers(fmt, tokenizer, model_cfg)
        if model_cfg.max_length:
            return replace(fmt, max_length=model_cfg.max_length), {"max_length": model_cfg.max_length, "given": True}
        info = fit_max_length(
            self.overhead_tokens(fmt, tokenizer),
            text_lengths(tokenizer, texts),
            model_cfg.max_text_tokens,
            model_limit(tokenizer),
        )
        return replace(fmt, max_length=info["max_length"]), info

    def fit_answers(self, fmt: PromptFormat, tokenizer, model_cfg) -> PromptFormat:
        return fmt

    def overhead_tokens(self, fmt: PromptFormat, tokenizer) -> int:
        """Tokens an input holds besides the text."""
        raise NotImplementedError

    def training_row(self, tokenizer, fmt: PromptFormat, text: str, label: str) -> tuple[Encoded, dict[str, Any]]:
        """A training row's tokens, and the kind's own columns for it (a completion mask, a label id)."""
        raise NotImplementedError

    # -- training and export -----------------------------------------------------------------------------------
    def build_trainer(
        self, cfg, model_path: str, train_rows, eval_rows, output_dir: str, *, labels: Sequence[str], **kwargs: Any
    ):
        """The HF trainer for this kind; kwargs: use_gpu, callbacks, report_to, plan (as textclf.training has)."""
        raise NotImplementedError

    def merge(self, adapter_dir: str, base_model_path: str, labels: Sequence[str]):
        """Base model + adapter as one plain model (save_pretrained follows)."""
        raise NotImplementedError

    def pooling(self, model_path: str) -> Optional[str]:
        """The sequence pooling (vLLM's seq_pooling_type) the trained head reads on this model; None: the model's
        own. Saved in classifier.json as "pooling" and given to every engine that serves it."""
        return None

    # -- inference ---------------------------------------------------------------------------------------------
    def scorer(self, fmt: PromptFormat, tokenizer) -> Scorer:
        raise NotImplementedError

    def check_servable(self, meta: dict[str, Any], folder: Optional[str] = None) -> None:
        """Refuse what vLLM cannot serve for this kind (an adapter, when serves_adapters is false)."""
        if meta.get("kind") == "adapter" and not self.serves_adapters:
            raise ValueError(
                f"{folder or 'this classifier'}: a {self.name} classifier is served merged (vLLM has no "
                f"LoRA for its head): run `python -m ray_jobs.export` first"
            )
