"""The config system: every shipped file loads, experiments compose, overrides apply, and mistakes get
messages that name the file, the key and what was expected."""
import json
from pathlib import Path

import pytest

from fdmobilenet.config import (CONFIG_DIR, FAMILIES, ConfigError, ExperimentConfig, dump_yaml, from_dict,
                                load_experiment, load_family, load_model_ref, read_yaml, to_dict)

SHIPPED = sorted(p for p in CONFIG_DIR.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


def test_configs_are_shipped():
    assert {p.parent.name for p in SHIPPED} >= {"data", "model", "optim", "sched"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_shipped_file_loads(path):
    family = path.parent.name
    if family == "experiments":
        assert isinstance(load_experiment(str(path)), ExperimentConfig)
        return
    cfg = load_family(family, str(path))
    assert isinstance(cfg, FAMILIES[family])
    assert cfg.name == path.stem  # the name that runs and checkpoints record is the file's
    assert load_family(family, path.stem) == cfg  # and the bare name finds the same file


def test_model_configs_are_the_papers_widths():
    assert {load_family("model", w).width_mult for w in ("1x-FDMobileNet-224", "0.5x-FDMobileNet-224",
                                                        "0.25x-FDMobileNet-224")} == {1.0, 0.5, 0.25}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_unknown_key_names_file_key_and_near_match(tmp_path):
    path = write(tmp_path / "m.yaml", "name: m\nwidht_mult: 0.5\n")
    with pytest.raises(ConfigError) as e:
        load_family("model", str(path))
    message = str(e.value)
    assert message.startswith(f"{path}: unknown key 'model.widht_mult' (did you mean 'width_mult'?)")
    assert "valid keys for model: name, arch, width_mult, input_size, dropout" in message


@pytest.mark.parametrize("family, text, expected", [
    ("optim", "lr: fast", "key 'optim.lr': expected a number (float), got 'fast' (str)"),
    ("optim", "epochs: 1.5", "key 'optim.epochs': expected an integer, got 1.5 (float)"),
    ("optim", "nesterov: 1", "key 'optim.nesterov': expected true or false, got 1 (int)"),
    ("data", "hflip: yes", "key 'data.hflip': expected true or false, got 'yes' (str)"),
    ("data", "scale: [0.08]", "key 'data.scale': expected a list of 2 floats, got [0.08]"),
    ("data", "mean: 0.5", "key 'data.mean': expected a list of 3 floats, got 0.5"),
    ("sched", "type: linear", "key 'sched.type': expected one of step, cosine, got 'linear'"),
])
def test_wrong_type_names_file_key_expected_and_value(tmp_path, family, text, expected):
    path = write(tmp_path / f"{family}.yaml", text + "\n")
    with pytest.raises(ConfigError) as e:
        load_family(family, str(path))
    assert str(e.value) == f"{path}: {expected}"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: no-such-model .*give a path"):
        load_family("model", "no-such-model")
    bad = write(tmp_path / "bad.yaml", "name: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid YAML/JSON"):
        load_family("model", str(bad))
    listed = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match=f"{listed}: section 'optim' must be a mapping"):
        load_family("optim", str(listed))


def test_json_file_loads(tmp_path):
    # json.dump writes 4e-05 without a dot, which YAML 1.1 would read as a string.
    path = tmp_path / "optim.json"
    path.write_text(json.dumps({"name": "SGD-json", "lr": 0.2, "weight_decay": 4e-05, "nesterov": False}))
    cfg = load_family("optim", str(path))
    assert (cfg.name, cfg.lr, cfg.weight_decay, cfg.nesterov) == ("SGD-json", 0.2, 4e-05, False)


def test_experiment_composes_families(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "model.yaml", "name: half\nwidth_mult: 0.5\n")
    exp_path = write(tmp_path / "exp.yaml", "\n".join([
        "data: imagenet-conservative",     # a bare name from configs/data/
        "model: sub/model.yaml",          # a path relative to the experiment file
        "optim: {lr: 0.4, batch_size: 1024, base_batch_size: 256}",   # inline
        "sched: " + str(CONFIG_DIR / "sched" / "Cosine.yaml"),        # an absolute path
        "train: {label: composed, compile: off}",  # 'off', not YAML 1.1's False
    ]) + "\n")
    exp = load_experiment(str(exp_path))
    assert exp.data == load_family("data", "imagenet-conservative")
    assert (exp.model.name, exp.model.width_mult) == ("half", 0.5)
    assert (exp.optim.lr, exp.optim.batch_size, exp.optim.momentum) == (0.4, 1024, 0.9)
    assert exp.sched.type == "cosine"
    assert (exp.train.label, exp.train.compile) == ("composed", "off")
    # The authors' --data/--model/--optim/--sched flags replace whole sections; overrides come last.
    exp = load_experiment(str(exp_path), model="0.25x-FDMobileNet-224", overrides=["model.dropout=0.2"])
    assert (exp.model.width_mult, exp.model.dropout, exp.optim.lr) == (0.25, 0.2, 0.4)


def test_experiment_errors(tmp_path):
    typo = write(tmp_path / "typo.yaml", "optimizer: SGD-120\n")
    with pytest.raises(ConfigError, match=f"{typo}: unknown section 'optimizer' \\(did you mean 'optim'\\?\\)"):
        load_experiment(str(typo))
    missing = write(tmp_path / "missing.yaml", "data: no-such-data\n")
    with pytest.raises(ConfigError, match="config file not found: no-such-data"):
        load_experiment(str(missing))
    inline = write(tmp_path / "inline.yaml", "train: {labl: x}\n")
    with pytest.raises(ConfigError, match=f"{inline}: unknown key 'train.labl' \\(did you mean 'label'\\?\\)"):
        load_experiment(str(inline))


def test_overrides():
    exp = load_experiment(overrides=["optim.lr=0.2", "data.scale=[0.08,1.0]", "optim.weight_decay=4e-5",
                                     "data.color_jitter=[0.4, 0.4, 0.4, 0.1]", "train.label=my run",
                                     "train.compile=off", "optim.nesterov=false"])
    assert exp.optim.lr == 0.2 and exp.data.scale == (0.08, 1.0) and exp.optim.weight_decay == 4e-5
    assert exp.data.color_jitter == (0.4, 0.4, 0.4, 0.1)
    assert (exp.train.label, exp.train.compile, exp.optim.nesterov) == ("my run", "off", False)
    assert load_experiment(overrides=["data.color_jitter=null"]).data.color_jitter is None


@pytest.mark.parametrize("item, expected", [
    ("optim.lr", "expected section.key=value, e.g. optim.lr=0.2"),
    ("lr=0.2", "expected section.key=value, e.g. optim.lr=0.2"),
    ("optimizer.lr=0.2", "unknown section 'optimizer'; valid: data, model, optim, sched, train"),
    ("optim.lrr=0.2", "unknown key 'optim.lrr' (did you mean 'lr'?)"),
    ("optim.lr=fast", "key 'optim.lr': expected a number (float), got 'fast' (str)"),
    ("data.scale=[0.08]", "key 'data.scale': expected a list of 2 floats, got [0.08]"),
    ("optim.lr=[0.1", "the value is not valid YAML"),
    ("train.amp=fp8", "key 'train.amp': expected one of auto, bf16, fp16, off, got 'fp8'"),
])
def test_bad_overrides(item, expected):
    with pytest.raises(ConfigError) as e:
        load_experiment(overrides=[item])
    assert str(e.value).startswith(f"command-line override '{item}': ")
    assert expected in str(e.value)


def test_round_trips(tmp_path):
    exp = load_experiment(data="imagenet-aggressive-colorjitter", optim="SGD-90-nesterov",
                          overrides=["data.scale=[0.08, 1.0]"])
    assert from_dict(to_dict(exp)) == exp
    assert from_dict(read_yaml(write(tmp_path / "dump.yaml", dump_yaml(exp)))) == exp
    # to_dict is plain data: it survives JSON (checkpoints, logs).
    assert from_dict(json.loads(json.dumps(to_dict(exp)))) == exp


def test_model_ref_is_a_width_or_a_config():
    assert load_model_ref("0.25") == load_family("model", "0.25x-FDMobileNet-224")
    assert load_model_ref("1").name == "1x-FDMobileNet-224"
    assert load_model_ref(str(CONFIG_DIR / "model" / "0.5x-FDMobileNet-224.yaml")).width_mult == 0.5
    with pytest.raises(ConfigError, match="must be positive"):
        load_model_ref("-1")
    with pytest.raises(ConfigError, match="config file not found: 0.3x"):
        load_model_ref("0.3x")


def test_a_mistyped_family_name_lists_the_nearest_names():
    with pytest.raises(ConfigError) as e:
        load_experiment(data="imagenet-agressive")
    assert str(e.value).startswith("config file not found: imagenet-agressive (")
    assert "; nearest names: imagenet-aggressive, " in str(e.value)   # the nearest first


def test_an_invalid_choice_lists_the_valid_ones_whatever_its_type():
    # YAML reads `false` as a boolean: the message is about the choice, not about the type
    with pytest.raises(ConfigError, match=r"key 'train.compile': expected one of auto, on, off, got False$"):
        load_experiment(overrides=["train.compile=false"])


def test_a_runs_own_config_file_is_an_experiment(tmp_path):
    """{label}.config.yaml (RunLogger.write_config: the resolved config plus a `run` section of metadata)
    loads back as the same experiment."""
    from fdmobilenet.logs import RunLogger
    exp = load_experiment("demo", overrides=["optim.lr=0.3", "data.scale=[0.5, 1.0]"])
    path = RunLogger(str(tmp_path), "r", enabled=True).write_config(to_dict(exp), {"git_commit": "abc"})
    assert "git_commit: abc" in path.read_text()
    assert load_experiment(str(path)) == exp
