"""The interface every model kind implements (see textclf/kinds/__init__.py for the registry)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from ..prompts import Encoded, PromptFormat


class Scorer:
    """Serving's view of one classifier: its engine params, how a text becomes prompt tokens, how an engine output
    becomes {"label", "confidence", "scores"}."""

    params: Any

    def encode(self, text: str) -> Encoded:
        raise NotImplementedError

    def parse(self, output: Any) -> dict[str, Any]:
        raise NotImplementedError


class ModelKind:
    name: str = ""
    defaults: dict[str, Any] = {}  # config values that differ from the dataclass defaults; a given value wins
    peft_task_type: str = "CAUSAL_LM"  # PEFT's TaskType name
    runner: str = "generate"  # vLLM's runner: "generate" (answer tokens) or "pooling" (a classification head)
    serves_adapters: bool = True  # vLLM can serve base + LoRA adapter (no LoRA for classification heads)
    label_room: int = 0  # engine context beyond the prompt's max_length, for the answer's tokens

    # -- data --------------------------------------------------------------------------------------------------
    def training_columns(self, tokenizer, fmt: PromptFormat, texts: Sequence[str], labels: Sequence[str]) -> dict:
        """The tokenized training rows' columns: at least input_ids, n_tokens and truncated."""
        raise NotImplementedError

    def encode(self, tokenizer, fmt: PromptFormat, text: str) -> Encoded:
        """A text's tokens at inference."""
        raise NotImplementedError

    # -- training and export -----------------------------------------------------------------------------------
    def build_trainer(self, cfg, model_path: str, train_rows, eval_rows, output_dir: str, *, labels: Sequence[str],
                      use_gpu: bool = False, callbacks: Sequence[Any] = (), report_to: Sequence[str] = ()):
        raise NotImplementedError

    def merge(self, adapter_dir: str, base_model_path: str, labels: Sequence[str]):
        """Base model + adapter as one plain model (save_pretrained follows)."""
        raise NotImplementedError

    # -- inference ---------------------------------------------------------------------------------------------
    def batch_classifier(self) -> type:
        """The evaluation job's Ray Data stage class (textclf.inference.BatchClassifier's constructor)."""
        raise NotImplementedError

    def scorer(self, fmt: PromptFormat, tokenizer) -> Scorer:
        raise NotImplementedError

    def check_servable(self, meta: dict[str, Any], folder: Optional[str] = None) -> None:
        """Refuse what vLLM cannot serve for this kind (an adapter, when serves_adapters is false)."""
        if meta.get("kind") == "adapter" and not self.serves_adapters:
            raise ValueError(f"{folder or 'this classifier'}: a {self.name} classifier is served merged (vLLM has no "
                             f"LoRA for its head): run `python -m ray_jobs.export` first")
