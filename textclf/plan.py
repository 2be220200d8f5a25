"""What a run will do, decided from the data before it does it: max_length from the texts' token lengths, the number
of steps from the data size (or a time budget and a measured step time), the evaluation and checkpoint cadence and
the warm-up from the steps, and the estimate printed before training. No Ray, no torch."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

WARMUP_SHARE = 0.05  # of the steps, when warmup_steps is none
PROGRESS_LINES = 20  # progress lines over a run, when logging_steps is none
EVAL_COST = 1 / 3  # a forward pass without gradients, against a training step's forward and backward


def parse_duration(text: str) -> float:
    """Seconds in "20m", "1h30m", "90s", "1.5h" (a bare number is seconds)."""
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms])", "", s).strip():
        raise ValueError(f"time budget {text!r}: expected a duration such as 20m, 1h30m or 90s")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def text_lengths(tokenizer, texts: Sequence[str]) -> list[int]:
    """Each text's own tokens (no special tokens), as the prompt will hold it."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and backend.padding is None and backend.truncation is None:
        return [len(e.ids) for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def fit_max_length(overhead: int, lengths: Sequence[int], cap: int, limit: Optional[int] = None) -> dict[str, Any]:
    """max_length = the tokens around the text (prompt, answer, special tokens) + the longest text up to `cap`,
    rounded up to 8 and kept within the model's own limit. Returns it with the figures that decided it."""
    ordered = sorted(lengths) or [0]
    longest = ordered[-1]
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    text_budget = min(longest, cap)
    max_length = 8 * math.ceil((overhead + text_budget) / 8)
    if limit:
        max_length = min(max_length, limit)
        text_budget = max_length - overhead
    if text_budget < 1:
        raise ValueError(
            f"the prompt and answer take {overhead} tokens, the model's limit is {limit}: no room for text"
        )
    return {
        "max_length": max_length,
        "overhead_tokens": overhead,
        "text_tokens_p99": p99,
        "text_tokens_max": longest,
        "text_token_budget": text_budget,
        "texts_cut": sum(n > text_budget for n in lengths),
    }


def model_limit(tokenizer, config_max_positions: Optional[int] = None) -> Optional[int]:
    """The model's longest input, where the tokenizer or config says (tokenizers without one report ~1e30)."""
    limits = [
        n
        for n in (getattr(tokenizer, "model_max_length", None), config_max_positions)
        if isinstance(n, int) and 0 < n < 1_000_000
    ]
    return min(limits) if limits else None


@dataclass
class TrainPlan:
    rows: int
    validation_rows: int
    examples_per_step: int
    steps: int
    eval_steps: int
    save_steps: int
    warmup_steps: int
    logging_steps: int
    evaluations: int
    limited_by: str  # what set the steps: num_epochs, max_steps or the time budget
    step_s: Optional[float] = None  # measured before training
    eval_s: Optional[float] = None  # one evaluation, estimated from step_s
    budget_s: Optional[float] = None

    @property
    def estimate_s(self) -> Optional[float]:
        if self.step_s is None:
            return None
        return self.steps * self.step_s + self.evaluations * (self.eval_s or 0.0)

    @property
    def epochs(self) -> float:
        return self.steps * self.examples_per_step / max(1, self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "estimate_s": self.estimate_s, "epochs": round(self.epochs, 3)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainPlan":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def describe(self) -> str:
        text = (
            f"{self.steps} steps x {self.examples_per_step} rows ({self.epochs:.2f} epochs of {self.rows}; set by "
            f"{self.limited_by}), {self.evaluations} evaluation(s) of {self.validation_rows} validation rows every "
            f"{self.eval_steps} steps, checkpoints every {self.save_steps}, warm-up {self.warmup_steps}"
        )
        if self.step_s is not None:
            text += (
                f"; measured {self.step_s:.2f} s/step, estimated {self.estimate_s / 60:.1f} min "
                f"(training {self.steps * self.step_s / 60:.1f} + evaluations "
                f"{self.evaluations * (self.eval_s or 0) / 60:.1f})"
            )
        if self.budget_s is not None:
            text += f", time budget {self.budget_s / 60:.1f} min"
        return text


def apply_plan(args, plan: TrainPlan) -> None:
    """Set a built trainer's arguments to the plan (before train(), which builds the schedule from them)."""
    args.max_steps, args.eval_steps, args.save_steps = plan.steps, plan.eval_steps, plan.save_steps
    args.warmup_steps, args.logging_steps = plan.warmup_steps, plan.logging_steps


def plan_training(t, rows: int, validation_rows: int, world_size: int = 1, step_s: Optional[float] = None) -> TrainPlan:
    """Steps, cadence and warm-up for a TrainConfig `t` on `rows` training rows. With a time budget and a measured
    step time, the steps that fit the budget (evaluations included) cap the data-size steps."""
    per_step = t.per_device_batch_size * world_size * t.gradient_accumulation_steps
    if t.max_steps and t.max_steps > 0:
        steps, limited_by = t.max_steps, "max_steps"
    else:
        steps, limited_by = max(1, math.ceil(t.num_epochs * rows / per_step)), "num_epochs"
    evaluations = t.evaluations
    eval_s = None
    if step_s is not None:
        eval_s = EVAL_COST * step_s * validation_rows / (t.per_device_batch_size * world_size)
    budget = parse_duration(t.time_budget) if t.time_budget else None
    if budget is not None and step_s:
        fit = int((budget - evaluations * (eval_s or 0.0)) / step_s)
        if fit < steps:
            steps, limited_by = max(evaluations, fit), "the time budget"
    if t.eval_steps:
        eval_steps = t.eval_steps
        evaluations = max(1, steps // eval_steps)
    else:
        # the last evaluation lands on the final step, where the schedule has ended
        eval_steps = max(1, steps // evaluations)
        steps = eval_steps * evaluations
    save_steps = t.save_steps or eval_steps
    warmup = t.warmup_steps if t.warmup_steps is not None else max(1, round(WARMUP_SHARE * steps))
    logging = t.logging_steps or max(1, steps // PROGRESS_LINES)
    return TrainPlan(
        rows=rows,
        validation_rows=validation_rows,
        examples_per_step=per_step,
        steps=steps,
        eval_steps=eval_steps,
        save_steps=save_steps,
        warmup_steps=warmup,
        logging_steps=logging,
        evaluations=evaluations,
        limited_by=limited_by,
        step_s=step_s,
        eval_s=eval_s,
        budget_s=budget,
    )
