"""The generative trainer's speed-ups, without Ray: length-bucketed batches, and the shared-prefix loss (which must
equal the plain SFTTrainer's, gradients included) on a small random-weight Llama with SmolLM2's tokenizer."""
import random

import pytest
import torch

from textclf.config import load_config
from textclf.training import LengthBuckets


def _batches(sampler, bs):
    idx = list(sampler)
    return [idx[i:i + bs] for i in range(0, len(idx), bs)]


def test_length_buckets_cover_every_row_once_with_less_padding():
    rng = random.Random(0)
    lengths = [rng.randint(74, 112) for _ in range(1000)]
    bs = 16
    batches = _batches(LengthBuckets(lengths, bs, seed=1), bs)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(len(b) == bs for b in batches[:-1]) and len(batches[-1]) == 1000 % bs  # the partial batch last

    def padded(bs_list):
        return sum(len(b) * max(lengths[i] for i in b) for b in bs_list)

    perm = list(range(1000))
    rng.shuffle(perm)
    random_batches = [perm[i:i + bs] for i in range(0, 1000, bs)]
    assert padded(batches) < 0.9 * padded(random_batches)
    # batch order is random, not a sweep from long to short rows
    maxima = [max(lengths[i] for i in b) for b in batches[:-1]]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_length_buckets_order_depends_on_seed_and_epoch_only():
    lengths = list(range(100))
    a, b = LengthBuckets(lengths, 8, seed=3), LengthBuckets(lengths, 8, seed=3)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(123)  # the global RNG does not matter: a resumed run sees the same order
    assert list(b) == first
    b.set_epoch(1)
    assert list(b) != first
    assert list(LengthBuckets(lengths, 8, seed=4)) != first


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
        cfg = load_config(overrides={"share_prompt_prefix": str(share).lower(), "lora_dropout": "0",
                                     "per_device_batch_size": "8", "max_steps": "1"})
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
    assert trainer._shared_prefix_length(trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))) > 8
    plain_loss, plain_grads, _ = loss_and_grads(False)
    assert shared_loss == pytest.approx(plain_loss, rel=1e-4)
    assert shared_grads.keys() == plain_grads.keys() and shared_grads
    for n in plain_grads:
        torch.testing.assert_close(shared_grads[n], plain_grads[n], rtol=1e-3, atol=1e-6)
