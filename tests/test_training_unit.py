"""The generative trainer's speed-up, without Ray: the shared-prefix, packed-rows loss must equal the plain
SFTTrainer's, gradients included, on a small random-weight Llama with SmolLM2's tokenizer and rows of different
lengths (so the plain path pads them)."""

import pytest
import torch

from textclf.config import load_config


@pytest.fixture(scope="module")
def tiny_llama():
    from textclf.models import resolve_model

    return resolve_model("tiny-random-llama")


def test_shared_prefix_loss_and_gradients_equal_the_plain_loss(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from textclf.prompts import PromptFormat
    from textclf.training import build_trainer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    fmt = PromptFormat(labels=("banking", "travel", "work"))
    texts = ["what is my balance", "book me a flight to paris next week please", "schedule a meeting", "hi"]
    rows = []
    for i, t in enumerate(texts * 2):
        enc = fmt.encode(tok, t, fmt.labels[i % 3])
        rows.append({"input_ids": enc.input_ids, "completion_mask": enc.completion_mask})

    def loss_and_grads(share: bool):
        cfg = load_config(
            overrides={
                "share_prompt_prefix": str(share).lower(),
                "lora_dropout": "0",
                "per_device_batch_size": "8",
                "max_steps": "1",
            }
        )
        trainer = build_trainer(cfg, tiny_llama, rows, None, str(tmp_path / f"out-{share}"))
        torch.manual_seed(0)
        for n, p in trainer.model.named_parameters():  # non-zero adapters, so both LoRA matrices get gradients
            if "lora_" in n:
                torch.nn.init.normal_(p, std=0.02)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        return loss.item(), grads, trainer

    shared_loss, shared_grads, trainer = loss_and_grads(True)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    shared = trainer._shared_prefix_length(batch)
    assert shared > 8 and trainer._packed_rows(batch, shared) is not None  # the fast path ran
    assert (batch["attention_mask"] == 0).any()  # and there was padding to skip
    plain_loss, plain_grads, _ = loss_and_grads(False)
    assert shared_loss == pytest.approx(plain_loss, rel=1e-4)
    assert shared_grads.keys() == plain_grads.keys() and shared_grads
    for n in plain_grads:
        torch.testing.assert_close(shared_grads[n], plain_grads[n], rtol=1e-3, atol=1e-6)


def test_step_times_records_each_optimizer_step(tiny_llama, tmp_path):
    """StepTimes: one time per optimizer step, and a median that leaves out the first (warm-up) step."""
    from transformers import AutoTokenizer

    from textclf.prompts import PromptFormat
    from textclf.training import StepTimes, build_trainer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    fmt = PromptFormat(labels=("banking", "travel"))
    rows = []
    for i, t in enumerate(["what is my balance", "book a flight", "transfer money", "hotel in rome"] * 2):
        enc = fmt.encode(tok, t, fmt.labels[i % 2])
        rows.append({"input_ids": enc.input_ids, "completion_mask": enc.completion_mask})
    cfg = load_config(overrides={"per_device_batch_size": "2", "max_steps": "4"})
    timer = StepTimes()
    trainer = build_trainer(cfg, tiny_llama, rows, None, str(tmp_path / "out"), callbacks=[timer])
    trainer.train()
    assert len(timer.times) == trainer.state.max_steps >= 2 and all(t > 0 for t in timer.times)
    later = sorted(timer.times[1:])
    assert timer.median() == later[len(later) // 2]
    assert StepTimes().median() is None
