import pytest

from textclf.config import Config, load_config, parse_args


def test_defaults_run_and_roundtrip():
    cfg = load_config()
    assert cfg.lora.lora_r == 16 and cfg.lora.lora_alpha == 32
    assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_yaml_then_cli_overrides(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("train:\n  learning_rate: 0.0002\n  num_workers: 3\nmodel: some/model\nlabels: [a, b]\n")
    cfg = parse_args(["--config", str(y), "--num-workers", "4", "--train.max_steps=7", "--use-gpu"])
    assert cfg.train.learning_rate == 2e-4  # from YAML
    assert cfg.train.num_workers == 4  # CLI beats YAML
    assert cfg.train.max_steps == 7 and cfg.train.use_gpu is True
    assert cfg.model.model == "some/model" and cfg.data.labels == ["a", "b"]


def test_comma_list_and_none():
    cfg = load_config(overrides={"target_modules": "q_proj,v_proj", "test_file": "none"})
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.data.test_file is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"no_such_key": 1}, "unknown config key"),
        ({"num_workers": "two"}, "expected int"),
        ({"use_gpu": "maybe"}, "expected true or false"),
        ({"precision": "fp8"}, "precision"),
        ({"test_size": 1.5}, "between 0 and 1"),
        ({"eval_steps": 20, "save_steps": 30}, "multiple of"),
        ({"instruction": "no placeholder"}, "{labels}"),
        ({"lora.learning_rate": 1}, "belongs to section"),
    ],
)
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_config(overrides=overrides)


def test_cli_error_exits(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--num-workers", "x"])
    assert e.value.code == 2
    assert "num-workers" in capsys.readouterr().err
