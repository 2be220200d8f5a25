"""The decoder-head kind: a causal LM (SmolLM2 by default) with a sequence classification head on its last token,
the head trained in full and LoRA on the layers. No prompt and no label list: the plain text in, one softmax over the
label set out, from one forward pass; served by vLLM's pooling runner (e.g. LlamaForSequenceClassification).
Everything but the defaults is the encoder kind's (textclf.kinds.encoder): HF Trainer, merge, pooling scorer."""

from __future__ import annotations

from typing import Any

from .encoder import EncoderKind


class DecoderHeadKind(EncoderKind):
    name = "decoder-head"
    pools_mean = False  # a causal model's last token has read the whole text
    defaults: dict[str, Any] = {
        "model": "smollm2-135m-instruct",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "num_epochs": 1.0,
        "per_device_batch_size": 16,
        "learning_rate": 5e-4,
        "evaluations": 3,
        "time_budget": "20m",
    }
