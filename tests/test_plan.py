"""The run's plan from the data: durations, max_length from token lengths, steps and cadence from the data size or a
time budget (textclf/plan.py), and the prompt format fitted by each model kind."""

import json
import math
from types import SimpleNamespace

import pytest

from textclf.config import PROJECT_ROOT, load_config
from textclf.kinds import get_kind
from textclf.plan import fit_max_length, parse_duration, plan_training
from textclf.prompts import PromptFormat


def test_durations():
    assert parse_duration("20m") == 1200 and parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    assert parse_duration("1.5h") == 5400 and parse_duration("45") == 45
    for bad in ("soon", "20x", "m", "20m later"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)
    with pytest.raises(ValueError, match="duration"):
        load_config(overrides={"time_budget": "twenty minutes"})


def test_max_length_from_the_texts():
    info = fit_max_length(40, [5, 10, 12, 300], cap=64)
    assert info["max_length"] == 104 and info["text_token_budget"] == 64 and info["texts_cut"] == 1
    assert fit_max_length(40, [5, 10, 12], cap=64)["max_length"] == 56  # 40 + 12, rounded up to 8
    assert fit_max_length(40, [900], cap=1000, limit=512)["max_length"] == 512
    with pytest.raises(ValueError, match="no room"):
        fit_max_length(600, [5], cap=64, limit=512)


def test_steps_and_cadence_from_the_data():
    t = load_config().train  # the generative defaults: 0.75 epochs, 2 evaluations
    plan = plan_training(t, rows=3000, validation_rows=300)
    assert (plan.steps, plan.eval_steps, plan.save_steps, plan.evaluations) == (140, 70, 70, 2)
    assert plan.warmup_steps == 7 and plan.limited_by == "num_epochs" and plan.estimate_s is None
    big = plan_training(t, rows=15000, validation_rows=3000)
    assert big.steps == 2 * math.floor(math.ceil(0.75 * 15000 / 16) / 2) and big.eval_steps == big.steps // 2
    enc = load_config(overrides={"model_kind": "encoder"}).train
    e = plan_training(enc, rows=3000, validation_rows=300, world_size=2)
    assert e.examples_per_step == 64 and e.evaluations == 9 and e.steps % 9 == 0


def test_a_time_budget_caps_the_steps_with_the_evaluations_counted():
    t = load_config(overrides={"model_kind": "encoder", "time_budget": "20m"}).train
    free = plan_training(t, rows=15000, validation_rows=3000, step_s=0.1)
    assert free.limited_by == "num_epochs" and free.estimate_s < 1200
    tight = plan_training(t, rows=15000, validation_rows=3000, step_s=1.0)
    assert tight.limited_by == "the time budget" and tight.steps < free.steps
    assert tight.estimate_s <= 1200 and tight.steps % tight.evaluations == 0
    given = plan_training(load_config(overrides={"max_steps": "50", "eval_steps": "10"}).train, 3000, 300)
    assert (given.steps, given.eval_steps, given.evaluations, given.save_steps) == (50, 10, 5, 10)
    assert json.loads(json.dumps(given.to_dict()))["steps"] == 50


def _labels(n, style):
    if style == "shared":
        return [f"account {w} {i}" for i, w in enumerate(["open", "close", "freeze"] * (n // 3 + 1))][:n]
    if style == "long":
        return [f"a very long label name that goes on and on about topic number {i} and more" for i in range(n)]
    return [f"catégorie {i} ünïcode 日本語" for i in range(n)]


@pytest.mark.parametrize("n", [2, 150, 500])
@pytest.mark.parametrize("style", ["shared", "long", "unicode"])
def test_any_label_set_fits_and_every_label_is_scored_in_one_step(tokenizer, n, style):
    from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS

    from textclf.inference import parse_output, sampling_params, scoring_plan

    labels = _labels(n, style)
    texts = ["what is my balance", "book me a table for two tonight " * 3]
    cfg = load_config(overrides={"max_text_tokens": "32"}).model
    fmt, info = get_kind("generative").fit_format(PromptFormat(labels=tuple(labels)), tokenizer, texts, cfg)
    assert not info.get("given") and fmt.max_length == info["max_length"]
    if n > 2:
        assert not fmt.list_labels  # the prompt does not grow with the label count
    for text in texts + ["x " * 500]:
        for label in (labels[0], labels[-1]):
            enc = fmt.encode(tokenizer, text, label)
            assert len(enc.input_ids) <= fmt.max_length
    plan = scoring_plan(fmt, tokenizer)
    assert plan.one_step and len(set(plan.first_token_ids)) == n
    # vLLM takes at most MAX_LOGPROB_TOKEN_IDS ids per request: one request per chunk, each answering its own ids
    requests = sampling_params(plan)
    chunks = [p.logprob_token_ids for p in requests]
    assert all(len(c) <= MAX_LOGPROB_TOKEN_IDS for c in chunks) and sum(chunks, []) == list(plan.first_token_ids)
    assert len(requests) == -(-n // MAX_LOGPROB_TOKEN_IDS)
    rank = {t: i for i, t in enumerate(plan.first_token_ids)}
    outputs = [SimpleNamespace(logprobs=[{t: SimpleNamespace(logprob=-0.1 * rank[t]) for t in c}]) for c in chunks]
    result = parse_output(plan, outputs)
    assert set(result["scores"]) == set(labels) and result["label"] == labels[0]
    assert abs(sum(result["scores"].values()) - 1) < 1e-6


def test_the_bundled_task_keeps_its_label_names_listed(tokenizer):
    texts = [json.loads(line)["text"] for line in (PROJECT_ROOT / "data/clinc150/train.jsonl").open()]
    labels = sorted({json.loads(line)["label"] for line in (PROJECT_ROOT / "data/clinc150/train.jsonl").open()})
    fmt, info = get_kind("generative").fit_format(
        PromptFormat(labels=tuple(labels)), tokenizer, texts, load_config().model
    )
    assert fmt.answers is None and fmt.list_labels and info["texts_cut"] == 0
    assert info["max_length"] < 256


def test_the_encoder_fits_max_length_to_its_texts():
    from transformers import AutoTokenizer

    from textclf.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2"))
    cfg = load_config(overrides={"model_kind": "encoder"}).model
    long_texts = ["this is a rather long support ticket about a broken card " * 30, "short"]
    fmt, info = get_kind("encoder").fit_format(PromptFormat(labels=("a", "b")), tok, long_texts, cfg)
    assert info["overhead_tokens"] == 2 and info["texts_cut"] == 1 and fmt.max_length == 256 + 8
    given = load_config(overrides={"model_kind": "encoder", "max_length": "48"}).model
    assert get_kind("encoder").fit_format(PromptFormat(labels=("a", "b")), tok, long_texts, given)[0].max_length == 48


def test_the_step_probe_measures_without_training(tmp_path):
    """The time budget's step time is measured on real batches before training; the weights must not move."""
    from transformers import AutoTokenizer

    from textclf.models import resolve_model
    from textclf.training import measure_step_seconds

    cfg = load_config(overrides={"model_kind": "encoder", "per_device_batch_size": "4"})
    kind, path = get_kind("encoder"), resolve_model("all-minilm-l6-v2")
    tok = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in (PROJECT_ROOT / "data/clinc150/train.jsonl").open()][:32]
    labels = sorted({r["label"] for r in rows})
    fmt, _ = kind.fit_format(PromptFormat(labels=tuple(labels)), tok, [r["text"] for r in rows], cfg.model)
    train = [
        {"input_ids": e.input_ids, **extra}
        for e, extra in (kind.training_row(tok, fmt, r["text"], r["label"]) for r in rows)
    ]
    trainer = kind.build_trainer(cfg, path, train, train[:8], str(tmp_path), labels=labels)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    seconds = measure_step_seconds(trainer)
    assert 0 < seconds < 60
    after = dict(trainer.model.named_parameters())
    assert all(bool((after[k] == v).all()) for k, v in before.items())
    assert all(p.grad is None for p in trainer.model.parameters())


def test_a_checkpoint_keeps_its_plan_for_a_restart_on_the_same_settings(tmp_path):
    from types import SimpleNamespace as NS

    from textclf.training import PlanCallback

    t = load_config().train
    plan = plan_training(t, rows=3000, validation_rows=300, step_s=1.5)
    settings = {"max_steps": -1, "time_budget": "20m"}
    (tmp_path / "checkpoint-70").mkdir()
    PlanCallback(settings, plan).on_save(NS(output_dir=str(tmp_path)), NS(global_step=70), None)
    assert PlanCallback(settings).saved_plan(str(tmp_path / "checkpoint-70")) == plan
    assert PlanCallback({**settings, "max_steps": 200}).saved_plan(str(tmp_path / "checkpoint-70")) is None
    assert PlanCallback(settings).saved_plan(str(tmp_path)) is None  # a checkpoint from before plans were kept
