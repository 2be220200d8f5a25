"""Building the TRL `SFTTrainer` with a PEFT LoRA adapter. No Ray here: the Ray Train worker and the
single-process benchmark both call `build_trainer`, so they train exactly the same way.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from .config import Config

log = logging.getLogger(__name__)


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """auto: bf16 on GPUs that have it (fp16 on older ones), fp32 on CPUs, where bf16 autocast was measured
    ~50x slower on these machines."""
    import torch

    if precision != "auto":
        return precision
    if use_gpu and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def lora_config(cfg: Config):
    """SEQ_CLS (the encoder kind): PEFT also trains the classification head (`classifier`/`score`) in full."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=cfg.lora.lora_r,
        lora_alpha=cfg.lora.lora_alpha,
        lora_dropout=cfg.lora.lora_dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type=TaskType.SEQ_CLS if cfg.model.model_kind == "encoder" else TaskType.CAUSAL_LM,
    )


def trainer_arguments(cfg: Config, output_dir: str, use_gpu: bool, has_eval: bool = True,
                      report_to: Sequence[str] = ()) -> dict[str, Any]:
    """The HF training arguments both kinds share (TRL's SFTConfig extends TrainingArguments)."""
    t = cfg.train
    precision = resolve_precision(t.precision, use_gpu)
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=max(32, t.per_device_batch_size * 2),  # no gradients: larger batches share the prefix more
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.checkpoints_to_keep,  # local copies; Ray Train keeps its own
        logging_steps=t.logging_steps,
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


def sft_config(cfg: Config, output_dir: str, use_gpu: bool, has_eval: bool = True, report_to: Sequence[str] = ()):
    from trl import SFTConfig

    return SFTConfig(
        **trainer_arguments(cfg, output_dir, use_gpu, has_eval, report_to),
        max_length=cfg.model.max_length,
        completion_only_loss=True,  # loss on the label tokens only
    )


def to_hf_dataset(rows: Sequence[dict[str, Any]]):
    """Pre-tokenized rows (input_ids, completion_mask) as TRL takes them: it then skips its own tokenization."""
    import datasets

    return datasets.Dataset.from_dict(
        {"input_ids": [list(r["input_ids"]) for r in rows], "completion_mask": [list(r["completion_mask"]) for r in rows]}
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
            self.printer(f"[train] start: world_size {args.world_size}, {torch.get_num_threads()} threads, step {state.global_step}/{state.max_steps}, "
                         f"{args.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps} "
                         f"examples per step", flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or self.start is None:
            return
        done = state.global_step - self.first_step
        elapsed = time.time() - self.start
        parts = [f"step {state.global_step}/{state.max_steps}"]
        for key in ("loss", "eval_loss", "mean_token_accuracy", "eval_mean_token_accuracy", "eval_accuracy", "learning_rate"):
            if key in logs:
                parts.append(f"{key} {logs[key]:.4g}")
        parts.append(f"elapsed {elapsed:.0f}s")
        if done:
            parts.append(f"left ~{(state.max_steps - state.global_step) * elapsed / done:.0f}s")
        self.printer("[train] " + ", ".join(parts), flush=True)


class LengthBuckets(torch.utils.data.Sampler):
    """Row indices in batches of rows of similar length, the batches in random order.

    A batch is padded to its longest row, and on a CPU a padding token costs what a real one does. In random batches
    of 16 from the bundled task the rows' own tokens (after the shared prompt prefix) were padded to 1.5x their
    number. Here each random window of `window_batches` batches is sorted by length and cut into batches, and all
    batches are then shuffled. Unlike transformers' LengthGroupedSampler, which walks each ~700-row window from its
    longest to its shortest rows, the order of the batches stays random. A partial batch goes last, so that the
    data loader's batch boundaries fall where the sampler's do. The order depends only on the seed and the epoch, so
    a run resumed from a checkpoint skips exactly the batches it had trained on.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, window_batches: int = 8):
        self.lengths, self.batch_size, self.window = list(lengths), batch_size, batch_size * window_batches
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:  # the data loader calls it at each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        batches = []
        for i in range(0, len(perm), self.window):
            window = sorted(perm[i:i + self.window], key=self.lengths.__getitem__)
            batches += [window[j:j + self.batch_size] for j in range(0, len(window), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        order = [full[k] for k in torch.randperm(len(full), generator=g).tolist()]
        order += [b for b in batches if len(b) < self.batch_size]
        return iter([i for b in order for i in b])


class BucketingSFTTrainer(SFTTrainer):
    """SFTTrainer that samples training batches with LengthBuckets when `group_by_length` is set."""

    group_by_length = False

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if not self.group_by_length or dataset is None or "input_ids" not in getattr(dataset, "column_names", ()):
            return super()._get_train_sampler(train_dataset)
        return LengthBuckets([len(ids) for ids in dataset["input_ids"]], self.args.train_batch_size, self.args.seed)


class PrefixSharingSFTTrainer(BucketingSFTTrainer):
    """SFTTrainer that runs the prompt prefix shared by a whole batch once instead of once per row.

    Every prompt starts with the same instruction and label list (~60 of ~77 tokens here). Under causal attention
    those positions do not depend on what follows, so their keys and values are computed for one row and repeated
    across the batch; the rows' own tokens attend to them. Gradients flow through the repeated cache into the
    adapter, so loss and gradients equal the plain forward's (measured: loss 4.462278 vs 4.462276, same gradient
    sum) while a CPU step took 2.8x less time. Falls back to the plain SFTTrainer loss when the batch shares no
    useful prefix or when gradient checkpointing is on (it cannot keep a cache).
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        shared = self._shared_prefix_length(inputs)
        if shared == 0 or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        batch, length = ids.shape
        # The prefix runs on the unwrapped model: DDP sees one forward per step (the rows'), and autograd sums
        # both paths' gradients into each parameter before its all-reduce hook fires.
        prefix = self.accelerator.unwrap_model(model)(input_ids=ids[:1, :shared], use_cache=True)
        cache = prefix.past_key_values
        cache.batch_repeat_interleave(batch)
        positions = torch.arange(shared, length, device=ids.device).expand(batch, -1)
        # fused_lm_head: TRL's LM head projects only the label positions (see score_label_positions_only) instead of
        # building logits over the whole vocabulary for every position of every row.
        out = model(
            input_ids=ids[:, shared:],
            attention_mask=mask,
            past_key_values=cache,
            position_ids=positions,
            labels=labels[:, shared:],
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
    projects all of them to keep tile shapes fixed for compilers, which eager CPU training does not need. With the
    loss on a few label tokens of a ~75-token row, projecting only those made a CPU step 1.65x faster with the same
    loss (measured: 10 steps, identical loss 2.439). The projection itself stays plain torch on CPU: the kernel
    module makes that choice with its own check.
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
):
    from transformers import AutoTokenizer

    score_label_positions_only()
    args = sft_config(cfg, output_dir, use_gpu, bool(eval_rows), report_to)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_base_model(model_path, resolve_precision(cfg.train.precision, use_gpu))
    if eval_rows and cfg.train.group_by_length:  # the eval loss does not depend on the order: batch by length too
        eval_rows = sorted(eval_rows, key=lambda r: len(r["input_ids"]))
    trainer_cls = PrefixSharingSFTTrainer if cfg.train.share_prompt_prefix else BucketingSFTTrainer
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=to_hf_dataset(train_rows),
        eval_dataset=to_hf_dataset(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
        callbacks=[ProgressCallback(), *callbacks],
    )
    trainer.group_by_length = cfg.train.group_by_length
    return trainer
