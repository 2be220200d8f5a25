import dataclasses
import importlib
import re

import pytest
import yaml

from textclf.config import ALIASES, NO_EQUIVALENT, SWITCHES, Config, _field_index, load_config, parse_args


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


# --help, field help, and the HF/TRL aliases.

ENTRY_POINTS = ("prepare", "train", "export", "evaluate", "pipeline")
# A value for each aliased key, as typed on the command line or in YAML.
ALIAS_VALUES = {
    "model": "some/model",
    "max_length": "77",
    "hf_dataset": "some/dataset",
    "hf_config": "cfg",
    "text_field": "utterance",
    "target_modules": "q_proj,v_proj",
    "num_epochs": "3",
    "per_device_batch_size": "4",
    "lr_scheduler": "linear",
    "checkpoints_to_keep": "5",
}


def _flat(text: str) -> str:
    return " ".join(text.split())


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def test_every_field_has_help():
    for name, (_, f, _) in _field_index().items():
        assert isinstance(f.metadata.get("help"), str) and f.metadata["help"].strip(), name


@pytest.mark.parametrize("step", ENTRY_POINTS)
def test_help_lists_every_key_with_type_default_and_help(step, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per key
    module = importlib.import_module(f"ray_jobs.{step}")
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    # One block per option: argparse puts a long option's help on the next lines.
    blocks = {b.split()[0]: _flat(b) for b in re.split(r"\n(?=  --)", out) if b.startswith("  --")}
    assert _flat(module.__doc__.splitlines()[0]) in _flat(out)
    for name, (section, f, _) in _field_index().items():
        block = blocks[f"--{name.replace('_', '-')}"]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert f"(default {_flat(_shown(default))}" in block and _flat(f.metadata["help"]) in block, block
        assert f"{section} keys:" in out
    for option, metavar in (
        ("--learning-rate", "FLOAT"),
        ("--use-gpu", "[BOOL]"),
        ("--labels", "LIST"),
        ("--max-train-examples", "INT"),
        ("--model", "STR"),
    ):
        assert blocks[option].startswith(f"{option} {metavar} (default"), blocks[option]
    for alias in (*ALIASES, *SWITCHES, *NO_EQUIVALENT):
        assert alias in out


def test_alias_table_is_covered():
    index = _field_index()
    assert set(ALIAS_VALUES) == set(ALIASES.values()) and set(ALIASES.values()) <= set(index)
    assert not set(ALIASES) & set(index) and not set(NO_EQUIVALENT) & set(index)


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_alias_equals_its_key_on_the_cli_and_in_yaml(alias, tmp_path):
    key = ALIASES[alias]
    value = ALIAS_VALUES[key]
    section = _field_index()[key][0]
    canonical = load_config(overrides={key: value})
    assert canonical != load_config()  # the value is not the default, so the alias must have done something
    assert parse_args([f"--{alias.replace('_', '-')}", value]) == canonical
    assert parse_args([f"--{alias}={value}"]) == canonical
    assert parse_args([f"--{section}.{alias}", value]) == canonical
    for data in ({alias: value}, {section: {alias: value}}):
        y = tmp_path / "trl.yaml"
        y.write_text(yaml.safe_dump(data))
        assert load_config(str(y)) == canonical


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_alias_and_key_with_different_values_are_refused(alias, tmp_path):
    key = ALIASES[alias]
    value = ALIAS_VALUES[key]
    other = {
        "target_modules": "k_proj",
        "max_length": "78",
        "num_epochs": "2",
        "per_device_batch_size": "2",
        "checkpoints_to_keep": "1",
    }.get(key, "other")
    assert load_config(overrides={alias: value, key: value}) == load_config(overrides={key: value})
    with pytest.raises(ValueError, match="both set"):
        load_config(overrides={alias: value, key: other})
    y = tmp_path / "trl.yaml"
    y.write_text(yaml.safe_dump({key: other, alias: value}))
    with pytest.raises(ValueError, match="both set"):
        load_config(str(y))
    # Across sources there is no conflict: the command line beats the YAML, whichever names they use.
    for in_yaml, on_cli in ((alias, key), (key, alias)):
        y.write_text(yaml.safe_dump({in_yaml: other}))
        assert load_config(str(y), {on_cli: value}) == load_config(overrides={key: value})


def test_cli_alias_conflict_exits(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--num-train-epochs", "2", "--num-epochs", "3"])
    assert e.value.code == 2 and "both set num_epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--dataset-config", "a", "--dataset-config-name", "b"])  # two aliases of one key


def test_alias_blocks_the_kinds_default():
    cfg = load_config(overrides={"model_kind": "encoder", "num_train_epochs": "2", "max_seq_length": "32"})
    assert cfg.train.num_epochs == 2.0 and cfg.model.max_length == 32


@pytest.mark.parametrize(
    "given, precision",
    [
        ({"bf16": "true"}, "bf16"),
        ({"fp16": True}, "fp16"),
        ({"bf16": False}, "fp32"),
        ({"bf16": "false", "fp16": "true"}, "fp16"),
        ({"bf16": True, "precision": "bf16"}, "bf16"),
        ({"train.bf16": True}, "bf16"),
        ({"use_peft": "true"}, "auto"),
    ],
)
def test_precision_switches_and_use_peft(given, precision):
    assert load_config(overrides=given).train.precision == precision


def test_bare_switch_flag_and_bad_switches():
    assert parse_args(["--bf16"]).train.precision == "bf16"
    for given, message in [
        ({"bf16": True, "fp16": True}, "both true"),
        ({"bf16": True, "precision": "fp32"}, "both set"),
        ({"use_peft": False}, "always trains a LoRA"),
        ({"lora.bf16": True}, "belongs to section"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config(overrides=given)


def test_trl_yaml_unknown_keys_are_listed_together(tmp_path, capsys):
    y = tmp_path / "trl.yaml"
    y.write_text(
        "model_name_or_path: some/model\nnum_train_epochs: 2\nbf16: true\nuse_peft: true\n"
        "output_dir: out/sft\nlogging_dir: logs\npush_to_hub: false\n"
    )
    with pytest.raises(ValueError, match="unknown config keys") as e:
        load_config(str(y))
    assert all(k in str(e.value) for k in ("'output_dir'", "'logging_dir'", "'push_to_hub'", "set runs_dir and name"))
    with pytest.raises(SystemExit) as e:
        parse_args(["--no-such-key", "1", "--num-epochs", "2"])
    assert e.value.code == 2 and "unknown config key 'no-such-key'" in capsys.readouterr().err
