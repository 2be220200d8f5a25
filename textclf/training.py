"""Building the TRL `SFTTrainer` with a PEFT LoRA adapter. No Ray here: the Ray Train worker and the
single-process benchmark both call `build_trainer`, so they train exactly the same way.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from .config import Config
from .plan import TrainPlan, plan_training

log = logging.getLogger(__name__)


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """auto: bf16 on GPUs that have it (fp16 on older ones), fp32 on CPUs without native bf16 matmuls, where bf16
    autocast is far slower (bench/results/MEASUREMENTS.md)."""
    import torch

    if precision != "auto":
        return precision
    if use_gpu and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def lora_config(cfg: Config):
    """The adapter; its PEFT task type is the kind's (SEQ_CLS also trains the classification head in full)."""
    from peft import LoraConfig, TaskType

    from .kinds import get_kind

    return LoraConfig(
        r=cfg.lora.lora_r,
        lora_alpha=cfg.lora.lora_alpha,
        lora_dropout=cfg.lora.lora_dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type=TaskType[get_kind(cfg.model.model_kind).peft_task_type],
    )


def trainer_arguments(
    cfg: Config, output_dir: str, use_gpu: bool, plan: TrainPlan, has_eval: bool = True, report_to: Sequence[str] = ()
) -> dict[str, Any]:
    """The HF training arguments every kind shares (TRL's SFTConfig extends TrainingArguments); steps and cadence
    come from the plan (textclf.plan)."""
    t = cfg.train
    precision = resolve_precision(t.precision, use_gpu)
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=max(
            32, t.per_device_batch_size * 2
        ),  # no gradients: larger batches share the prefix more
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=plan.warmup_steps,
        max_steps=plan.steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=plan.eval_steps,
        save_strategy="steps",
        save_steps=plan.save_steps,
        save_total_limit=t.checkpoints_to_keep,  # local copies; Ray Train keeps its own
        logging_steps=plan.logging_steps,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not use_gpu,
        gradient_checkpointing=t.gradient_checkpointing,
        report_to=list(report_to),
        run_name=cfg.run.name,
        seed=t.seed,
        disable_tqdm=True,  # ProgressCallback prints one line per log step instead
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        save_only_model=False,  # optimizer and scheduler state, so a resumed run continues its schedule
    )


def sft_config(
    cfg: Config, output_dir: str, use_gpu: bool, plan: TrainPlan, has_eval: bool = True, report_to: Sequence[str] = ()
):
    from trl import SFTConfig

    return SFTConfig(
        **trainer_arguments(cfg, output_dir, use_gpu, plan, has_eval, report_to),
        max_length=cfg.model.max_length,
        completion_only_loss=True,  # loss on the label tokens only
    )


def to_hf_dataset(rows: Sequence[dict[str, Any]]):
    """Pre-tokenized rows (input_ids, completion_mask) as TRL takes them: it then skips its own tokenization."""
    import datasets

    return datasets.Dataset.from_dict(
        {
            "input_ids": [list(r["input_ids"]) for r in rows],
            "completion_mask": [list(r["completion_mask"]) for r in rows],
        }
    )


class ProgressCallback(TrainerCallback):
    """One line per logging step: step, loss and time left (tqdm bars garble multi-worker logs)."""

    def __init__(self, printer=print):
        self.printer = printer
        self.start: Optional[float] = None
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()
        self.first_step = state.global_step  # a resumed run starts past 0
        if state.is_world_process_zero:
            self.printer(
                f"[train] start: world_size {args.world_size}, {torch.get_num_threads()} threads, "
                f"step {state.global_step}/{state.max_steps}, "
                f"{args.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps} "
                f"examples per step",
                flush=True,
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or self.start is None:
            return
        done = state.global_step - self.first_step
        elapsed = time.time() - self.start
        parts = [f"step {state.global_step}/{state.max_steps}"]
        for key in (
            "loss",
            "eval_loss",
            "mean_token_accuracy",
            "eval_mean_token_accuracy",
            "eval_accuracy",
            "learning_rate",
        ):
            if key in logs:
                parts.append(f"{key} {logs[key]:.4g}")
        parts.append(f"elapsed {elapsed:.0f}s")
        if done:
            parts.append(f"left ~{(state.max_steps - state.global_step) * elapsed / done:.0f}s")
        self.printer("[train] " + ", ".join(parts), flush=True)


class StepTimes(TrainerCallback):
    """Wall seconds of each optimizer step: forward, backward (with DDP's all-reduce) and the update, without the
    batch loading before it or the evaluations, logging and checkpoints after it."""

    def __init__(self):
        self.times: list[float] = []
        self._began: Optional[float] = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._began is not None:
            self.times.append(time.perf_counter() - self._began)

    def median(self) -> Optional[float]:
        """The median step (the first one, which warms up allocators and kernels, left out when there are more)."""
        times = sorted(self.times[1:] or self.times)
        return times[len(times) // 2] if times else None


def training_step(trainer, inputs) -> None:
    """One forward and backward pass of the trainer's model over prepared inputs, counting label tokens as train()
    does; gradients accumulate on the model."""
    labels = inputs.get("labels")
    n_items = (labels != -100).sum() if labels is not None and labels.dim() > 1 else None
    trainer.training_step(trainer.model, inputs, n_items)


def measure_step_seconds(trainer, steps: int = 2) -> float:
    """Seconds per optimizer step on this worker, from forward and backward passes over real training batches before
    training starts (one untimed first); gradients are dropped and the weights stay as they were."""
    model = trainer.model
    model.train()
    if not hasattr(trainer, "current_gradient_accumulation_steps"):  # set by train() in the Trainer
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    loader = iter(trainer.get_train_dataloader())
    times = []
    for i in range(steps + 1):
        try:
            inputs = trainer._prepare_inputs(next(loader))
        except StopIteration:
            break
        start = time.perf_counter()
        training_step(trainer, inputs)
        if i:
            times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    for store in getattr(trainer, "_metrics", {}).values():  # TRL's running token accuracy: not a training step
        store.clear()
    times = sorted(times) or [0.0]
    return times[len(times) // 2] * trainer.args.gradient_accumulation_steps


class PlanCallback(TrainerCallback):
    """Keeps the run's plan, and the training settings it was made from, inside each checkpoint: a restarted attempt
    on the same settings continues the same schedule instead of planning anew from another measured step time."""

    FILE = "textclf_plan.json"

    def __init__(self, settings: dict[str, Any], plan: Optional[TrainPlan] = None):
        self.settings, self.plan = settings, plan

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.plan is not None and folder.is_dir():
            (folder / self.FILE).write_text(json.dumps({"plan": self.plan.to_dict(), "settings": self.settings}))

    def saved_plan(self, checkpoint_dir: str) -> Optional[TrainPlan]:
        """The checkpoint's plan if it was made from these settings (a resume on other settings plans anew)."""
        path = Path(checkpoint_dir) / self.FILE
        saved = json.loads(path.read_text()) if path.exists() else {}
        return TrainPlan.from_dict(saved["plan"]) if saved.get("settings") == self.settings else None


def all_ranks_max(value: float) -> float:
    """The largest value over the DDP ranks, so every rank plans the same number of steps."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class PrefixSharingSFTTrainer(SFTTrainer):
    """SFTTrainer that runs the prompt prefix shared by a whole batch once, and the rows' own tokens without padding.

    Every prompt starts with the same instruction and label list (most of a row's tokens). Under causal attention
    those positions do not depend on what follows, so their keys and values are computed once; the rows' own tokens
    attend to them. The rows' own tokens are packed into one sequence with an attention mask that lets each token
    see the prefix and the earlier tokens of its own row, so no padding is computed. Gradients flow through the cache
    into the adapter, so loss and gradients equal the plain forward's (tests/test_training_unit.py); the speed-ups
    are in bench/results/MEASUREMENTS.md. Falls back to the plain SFTTrainer loss when the batch shares no useful
    prefix, when gradient checkpointing is on (it cannot keep a cache), or with an attention implementation that
    takes no explicit mask (flash attention).
    """

    min_shared_prefix = 8

    def _shared_prefix_length(self, inputs) -> int:
        ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels")
        if labels is None or mask is None or ids.size(0) < 2 or self.args.gradient_checkpointing:
            return 0
        same = (ids == ids[:1]).all(0) & (mask == 1).all(0)
        shared = int(same.long().cumprod(0).sum())
        has_label = labels != -100
        if not has_label.any(1).all():
            return 0
        # The first label token is predicted from the position before it, which must stay in the row's own part.
        first_label = int(has_label.float().argmax(1).min())
        shared = min(shared, first_label - 1)
        return shared if shared >= self.min_shared_prefix else 0

    def _packed_rows(self, inputs, shared: int):
        """The rows' tokens after the prefix as one sequence (1, n): ids, labels, positions, and the additive
        attention mask (1, 1, n, shared + n). None where the layout does not allow it."""
        impl = getattr(self.accelerator.unwrap_model(self.model).config, "_attn_implementation", "sdpa")
        mask = inputs["attention_mask"][:, shared:].bool()
        if impl not in ("sdpa", "eager") or not (mask[:, 1:] <= mask[:, :-1]).all():  # right padding only
            return None
        ids, labels = inputs["input_ids"][:, shared:][mask], inputs["labels"][:, shared:][mask]
        lengths = mask.sum(1)
        row = torch.repeat_interleave(torch.arange(len(lengths), device=ids.device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        positions = shared + torch.arange(len(ids), device=ids.device) - starts[row]
        # Across a row boundary the last token of one row "predicts" the next row's first token, which is a prompt
        # token (label -100: _shared_prefix_length keeps one prompt token per row after the prefix), so no loss
        # leaks from one row into the next.
        own = (row[:, None] == row[None, :]) & torch.ones(
            len(ids), len(ids), dtype=torch.bool, device=ids.device
        ).tril()
        allowed = torch.cat([torch.ones(len(ids), shared, dtype=torch.bool, device=ids.device), own], dim=1)
        dtype = next(self.model.parameters()).dtype
        attend = torch.zeros(allowed.shape, dtype=dtype, device=ids.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
        return ids[None], labels[None], positions[None], attend[None, None]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        shared = self._shared_prefix_length(inputs)
        packed = self._packed_rows(inputs, shared) if shared and not return_outputs else None
        if packed is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ids, labels, positions, attend = packed
        # The prefix runs on the unwrapped model: DDP sees one forward per step (the rows'), and autograd sums
        # both paths' gradients into each parameter before its all-reduce hook fires.
        cache = self.accelerator.unwrap_model(model)(input_ids=inputs["input_ids"][:1, :shared], use_cache=True)
        # fused_lm_head: TRL's LM head projects only the label positions (see score_label_positions_only) instead of
        # building logits over the whole vocabulary for every position.
        out = model(
            input_ids=ids,
            attention_mask=attend,
            past_key_values=cache.past_key_values,
            position_ids=positions,
            labels=labels,
            use_cache=False,
            fused_lm_head=True,
            num_items_in_batch=num_items_in_batch,
        )
        loss = out.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: DDP averages the gradients
        # the token accuracy TRL logs, from the fused head's top-1 hits
        n_valid = self.accelerator.gather_for_metrics(out.label_mask.sum()).sum()
        n_hits = self.accelerator.gather_for_metrics(out.is_top1.sum()).sum()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["mean_token_accuracy"].append((n_hits / n_valid.clamp(min=1)).item())
        return loss


def score_label_positions_only() -> None:
    """Project only the label-carrying positions through the LM head on CPUs too.

    TRL's fused LM head skips positions without a label only where it expects Triton (CUDA, XPU); elsewhere it
    projects all of them to keep tile shapes fixed for compilers, which eager CPU training does not need; with the
    loss on a few label tokens of a row, projecting only those is much cheaper for the same loss. The projection
    itself stays plain torch on CPU: the kernel module makes that choice with its own check.
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None or getattr(original, "_textclf", False):
        return  # another TRL version, or already applied

    def use_compact(device):
        return device.type == "cpu" or original(device)

    use_compact._textclf = True
    trl_utils._use_triton = use_compact


def load_base_model(model_path: str, precision: str):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)


def build_trainer(
    cfg: Config,
    model_path: str,
    train_rows: Sequence[dict[str, Any]],
    eval_rows: Optional[Sequence[dict[str, Any]]],
    output_dir: str,
    use_gpu: bool = False,
    callbacks: Sequence[Any] = (),
    report_to: Sequence[str] = (),
    plan: Optional[TrainPlan] = None,
):
    from transformers import AutoTokenizer

    score_label_positions_only()
    plan = plan or plan_training(cfg.train, len(train_rows), len(eval_rows or []))
    args = sft_config(cfg, output_dir, use_gpu, plan, bool(eval_rows), report_to)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_base_model(model_path, resolve_precision(cfg.train.precision, use_gpu))
    trainer_cls = PrefixSharingSFTTrainer if cfg.train.share_prompt_prefix else SFTTrainer
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=to_hf_dataset(train_rows),
        eval_dataset=to_hf_dataset(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
        callbacks=[ProgressCallback(), *callbacks],
    )
