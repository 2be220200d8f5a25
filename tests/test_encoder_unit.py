"""The encoder kind's pieces that need no Ray and no engine: per-kind defaults, tokenization and truncation, label ids,
the mapping of vLLM's class probabilities, the serving plan."""

import json

import numpy as np
import pytest

from textclf.config import load_config
from textclf.prompts import PromptFormat

LABELS = ("banking", "travel", "work")


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import AutoTokenizer

    from textclf.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2"))


def test_kind_defaults_and_overrides():
    gen = load_config()
    assert gen.model.model_kind == "generative" and gen.model.model == "smollm2-135m-instruct"
    assert "q_proj" in gen.lora.target_modules
    enc = load_config(overrides={"model-kind": "encoder"})
    assert enc.model.model == "all-minilm-l6-v2" and enc.lora.target_modules == ["query", "key", "value", "dense"]
    assert enc.model.max_length is None and enc.train.num_epochs == 5.0 and enc.train.time_budget == "20m"
    given = load_config(
        overrides={
            "model.model_kind": "encoder",
            "model": "some/bert",
            "max-steps": "7",
            "target_modules": "query,value",
        }
    )
    assert given.model.model == "some/bert" and given.train.max_steps == 7
    assert given.lora.target_modules == ["query", "value"]


def test_kind_from_yaml_and_bad_kind(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  model_kind: encoder\ntrain:\n  learning_rate: 0.01\n")
    cfg = load_config(str(f))
    assert cfg.model.model == "all-minilm-l6-v2" and cfg.train.learning_rate == 0.01
    with pytest.raises(ValueError, match="model_kind"):
        load_config(overrides={"model_kind": "seq2seq"})


def test_encode_plain_text_and_truncation(bert_tokenizer):
    from textclf.kinds.encoder import encode

    fmt = PromptFormat(labels=LABELS, max_length=8)
    short = encode(bert_tokenizer, fmt, "Hello world")
    assert short.input_ids[0] == bert_tokenizer.cls_token_id and short.input_ids[-1] == bert_tokenizer.sep_token_id
    assert not short.truncated and bert_tokenizer.decode(short.input_ids[1:-1]) == "hello world"
    cut = encode(bert_tokenizer, fmt, "one two three four five six seven eight nine ten")
    assert cut.truncated and len(cut.input_ids) == 8 and cut.input_ids[-1] == bert_tokenizer.sep_token_id


def test_tokenize_stage_gives_label_ids_from_the_format(bert_tokenizer):
    from ray_jobs.prepare import Tokenize

    fmt = PromptFormat(labels=LABELS, max_length=64)
    stage = Tokenize("all-minilm-l6-v2", None, fmt.to_dict(), kind="encoder")
    out = stage({"text": np.array(["book a flight", "what is my balance"]), "label": np.array(["travel", "banking"])})
    assert out["label_id"].tolist() == [1, 0]
    assert "completion_mask" not in out and out["truncated"].tolist() == [False, False]
    assert out["n_tokens"].tolist() == [len(x) for x in out["input_ids"]]


def test_label_maps_and_result():
    from textclf.kinds.encoder import label_maps, result

    maps = label_maps(LABELS)
    assert maps["num_labels"] == 3 and maps["id2label"][2] == "work" and maps["label2id"]["travel"] == 1
    r = result(LABELS, [0.1, 0.7, 0.2])
    assert (
        r["label"] == "travel"
        and r["confidence"] == 0.7
        and r["scores"] == {"banking": 0.1, "travel": 0.7, "work": 0.2}
    )
    with pytest.raises(RuntimeError, match="2 classes for 3 labels"):
        result(LABELS, [0.5, 0.5])


def _exported(folder, kind, **extra):
    folder.mkdir(parents=True)
    fmt = PromptFormat(labels=LABELS, max_length=64)
    meta = {
        "kind": kind,
        "model_kind": "encoder",
        "base_model": "all-minilm-l6-v2",
        "labels": list(LABELS),
        "prompt": fmt.to_dict(),
        **extra,
    }
    (folder / "classifier.json").write_text(json.dumps(meta))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 16}))


def test_serving_plan_for_an_encoder(tmp_path):
    from textclf.serving import ServeConfig, resolve_plan

    _exported(tmp_path / "run" / "merged", "merged", pooling="MEAN")
    plan = resolve_plan(ServeConfig(run=str(tmp_path / "run")))
    assert plan.runner == "pooling" and plan.max_model_len == 64 and not plan.enable_lora
    assert plan.pooling == "MEAN"  # the head's pooling reaches the engine (engine_kwargs' pooler_config)
    _exported(tmp_path / "only_adapter" / "adapter", "adapter")
    with pytest.raises(ValueError, match="served merged"):
        resolve_plan(ServeConfig(run=str(tmp_path / "only_adapter")))
    with pytest.raises(ValueError, match="encoder classifier"):
        resolve_plan(ServeConfig(adapters={"a": str(tmp_path / "only_adapter")}))


def test_trainer_initialization_follows_the_seed(tmp_path):
    """The new head and the LoRA matrices are drawn before the HF Trainer seeds: a rerun with the same seed must
    start from the same weights, and another seed from others."""
    import torch

    from textclf.kinds.encoder import build_trainer
    from textclf.models import resolve_model

    rows = [{"input_ids": [101, 7592, 102], "label_id": 0}, {"input_ids": [101, 2147, 102], "label_id": 2}]

    def start(seed: int, before: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(before)  # the RNG state left by whatever ran before must not matter
        cfg = load_config(None, {"model_kind": "encoder", "seed": str(seed)})
        trainer = build_trainer(
            cfg, resolve_model(cfg.model.model), rows, None, str(tmp_path / f"s{seed}"), labels=list(LABELS)
        )
        return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}

    a, b, c = start(1, before=5), start(1, before=6), start(2, before=5)
    assert any("classifier" in k for k in a) and any("lora_A" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_special_tokens_written_in_a_text_stay_text(bert_tokenizer):
    """[SEP] or [CLS] in a text are its characters, not the encoder's separators; ordinary texts are unchanged."""
    from textclf.kinds.encoder import encode

    tok = bert_tokenizer
    fmt = PromptFormat(("a", "b"), max_length=64)
    ids = encode(tok, fmt, "hi [SEP] there [CLS]").input_ids
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.sep_token_id not in ids[1:-1] and tok.cls_token_id not in ids[1:-1]
    assert encode(tok, fmt, "what is my balance").input_ids == tok("what is my balance")["input_ids"]


def test_a_bert_head_reads_the_mean_of_the_unpadded_tokens(bert_tokenizer):
    """The encoder kind's pooler: dense + tanh on the mean of the text's own token states (what vLLM's BertPooler
    computes with seq_pooling_type MEAN), the same for a text alone and padded in a batch; the decoder-head kind keeps
    its model's last-token head."""
    import torch

    from textclf.kinds import get_kind
    from textclf.kinds.encoder import load_model
    from textclf.models import resolve_model

    path = resolve_model("all-minilm-l6-v2")
    assert get_kind("encoder").pooling(path) == "MEAN" and get_kind("decoder-head").pooling(path) is None
    torch.manual_seed(0)
    model = load_model(path, LABELS, pooling="MEAN").eval()
    texts = ["hi", "book a flight to rome for two people next friday"]
    batch = bert_tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        together = model(**batch).logits
        alone = torch.cat([model(**bert_tokenizer([t], return_tensors="pt")).logits for t in texts])
        one = bert_tokenizer([texts[0]], return_tensors="pt")
        states = model.bert(**one).last_hidden_state
        by_hand = model.classifier(torch.tanh(model.bert.pooler.dense(states.mean(1))))
    assert torch.allclose(together, alone, atol=1e-5) and torch.allclose(alone[:1], by_hand, atol=1e-5)
    cls = load_model(path, LABELS).eval()  # the same weights with BERT's own first-token pooler answer otherwise
    cls.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(cls(**batch).logits, together, atol=1e-3)
    assert "bert.pooler.dense.weight" in model.state_dict()  # names unchanged: checkpoints and LoRA targets hold


def test_the_mean_head_starts_from_an_identity_pooler_trained_in_full_and_merges(tmp_path, bert_tokenizer):
    """Training starts with the pooler's dense layer as the identity, trains it in full (no LoRA on it) and saves it
    with the adapter: the merge, which starts from the base model's pooler, must answer as the trained model does."""
    import torch

    from textclf.kinds.encoder import build_trainer, merge, pool_mean
    from textclf.models import resolve_model

    cfg = load_config(None, {"model_kind": "encoder"})
    path = resolve_model(cfg.model.model)
    rows = [{"input_ids": [101, 7592, 102], "label_id": 0}]
    model = build_trainer(cfg, path, rows, None, str(tmp_path / "t"), labels=list(LABELS), pooling="MEAN").model
    trained = dict(model.named_parameters())
    pooler = [k for k, p in trained.items() if ".pooler." in k and p.requires_grad]
    assert pooler and not any("lora" in k for k in pooler)
    weight = next(p for k, p in trained.items() if k in pooler and k.endswith("dense.weight"))
    assert torch.equal(weight, torch.eye(weight.shape[0]))
    with torch.no_grad():  # stands in for training: move every trained weight
        for p in trained.values():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "adapter")
    merged = merge(str(tmp_path / "adapter"), path, list(LABELS))
    pool_mean(merged)
    batch = bert_tokenizer(["hi", "book a flight to rome for two"], padding=True, return_tensors="pt")
    model.eval(), merged.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, merged(**batch).logits, atol=1e-4)
