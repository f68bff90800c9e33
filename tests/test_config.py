"""The config system: every shipped file loads and holds the values its name and the paper say, experiments
compose, overrides apply, and mistakes get messages that name the file, the key and what was expected."""
import dataclasses
import json
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import yaml

from fdmobilenet.config import (CONFIG_DIR, FAMILIES, ConfigError, ExperimentConfig, ResolutionRamp, SchedConfig,
                                TrainConfig, build, choices, from_dict, load_experiment, load_family, load_model_ref,
                                read_yaml, resolve_path, to_dict)

SHIPPED = sorted(p for p in CONFIG_DIR.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


def test_configs_are_shipped():
    assert {p.parent.name for p in SHIPPED} >= {"data", "model", "optim", "sched"}


@pytest.mark.slow
def test_an_installed_copy_resolves_config_names(tmp_path):
    """``pip install`` (not editable) of a clean copy of this checkout into a fresh venv; run from another
    folder after the copy is deleted, the installed package finds every shipped config by its name."""
    repo = Path(__file__).resolve().parent.parent
    src = tmp_path / "src"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        if os.path.lexists(repo / name):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, src / name, follow_symlinks=False)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    venv_site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                    check=True, capture_output=True, text=True).stdout.strip())
    # torch, pyyaml and pip come from this interpreter's site-packages, after the venv's own
    (venv_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--ignore-installed", str(src)], check=True, env=env, cwd=tmp_path)
    shutil.rmtree(src)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import json, fdmobilenet.config as c\n"
             "shipped = sorted(str(p.relative_to(c.CONFIG_DIR)) for p in c.CONFIG_DIR.rglob('*.yaml'))\n"
             "print(json.dumps({'module': c.__file__, 'shipped': shipped,\n"
             "                  'exp': c.to_dict(c.load_experiment('1x-FDMobileNet-224', optim='SGD-120',\n"
             "                                                     data='imagenet-aggressive-colorjitter'))}))\n")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=env, cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert Path(got["module"]).is_relative_to(venv_site)
    assert got["shipped"] == [str(p.relative_to(CONFIG_DIR)) for p in SHIPPED]
    assert got["exp"] == to_dict(load_experiment("1x-FDMobileNet-224", optim="SGD-120",
                                                 data="imagenet-aggressive-colorjitter"))


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


# ------------------------------------------------------------------------------------ shipped values, pinned
# Every value that makes a shipped file what its name says, from the paper (Qin et al. 2018) and the authors'
# configs: a changed value, or two files swapped, fails below. Absolute values, not the dataclass defaults
# (a changed default must fail here too).
IMAGENET = dict(root="data/imagenet", layout="folder", num_classes="auto", loader="dali", crop_size=224,
                ratio=(0.75, 4 / 3), hflip=True, val_resize=256, val_crop=224, mean=(0.485, 0.456, 0.406),
                std=(0.229, 0.224, 0.225))
AUTO_LOADER = dict(num_threads="auto", prefetch_queue_depth="auto", hw_decoder_load="auto")  # pipelines.defaults
IMAGENET.update(AUTO_LOADER)
JITTER = dict(color_jitter=(0.1, 0.1, 0.1, 0.1))
IMAGENET.update(train_res=None)   # the paper's files: crop_size (224) every epoch
AGGRESSIVE = dict(IMAGENET, train_crop="random_resized", scale=(0.36, 1.0), color_jitter=None)
LESS = dict(AGGRESSIVE, scale=(0.64, 1.0))
MORE = dict(AGGRESSIVE, scale=(0.08, 1.0))
CONSERVATIVE = dict(IMAGENET, train_crop="random", train_resize=256, color_jitter=None)
PAPER_SGD = dict(lr=0.1, momentum=0.9, weight_decay=4e-5, nesterov=True, epochs=120, batch_size=256,
                 base_batch_size=256, warmup_epochs=0.0, label_smoothing=0.0, no_wd_bn_bias=False, ema_decay=0.0)
PINNED = {
    "data/imagenet-aggressive": AGGRESSIVE,
    "data/imagenet-aggressive-colorjitter": dict(AGGRESSIVE, **JITTER),
    "data/imagenet-less-aggressive": LESS,
    "data/imagenet-less-aggressive-colorjitter": dict(LESS, **JITTER),
    "data/imagenet-more-aggressive": MORE,
    "data/imagenet-more-aggressive-colorjitter": dict(MORE, **JITTER),
    "data/imagenet-conservative": CONSERVATIVE,
    "data/imagenet-conservative-colorjitter": dict(CONSERVATIVE, **JITTER),
    # the fast recipe: FFCV's 160 -> 192 px ramp at the end of 32 epochs, tested at the paper's 224
    "data/imagenet-aggressive-fast": dict(AGGRESSIVE, crop_size=192,
                                          train_res=ResolutionRamp(start_res=160, ramp_start=24, ramp_end=28)),
    "data/digits-demo": dict(root="data/digits", layout="folder", num_classes=10, loader="dali",
                             train_crop="random_resized", crop_size=64, scale=(0.6, 1.0), ratio=(0.8, 1.25),
                             hflip=False, color_jitter=None, val_resize=72, val_crop=64, mean=(0.3094,) * 3,
                             std=(0.3489,) * 3, **dict(AUTO_LOADER, num_threads=2)),
    "model/1x-FDMobileNet-224": dict(width_mult=1.0, dropout=0.0),
    "model/0.5x-FDMobileNet-224": dict(width_mult=0.5, dropout=0.0),
    "model/0.25x-FDMobileNet-224": dict(width_mult=0.25, dropout=0.0),
    "optim/SGD-120-nesterov": PAPER_SGD,
    "optim/SGD-120": dict(PAPER_SGD, nesterov=False),
    "optim/SGD-90-nesterov": dict(PAPER_SGD, epochs=90),
    "optim/SGD-120-nesterov-bs1024": dict(PAPER_SGD, batch_size=1024, warmup_epochs=5.0),
    "optim/SGD-32-nesterov-bs1024": dict(PAPER_SGD, epochs=32, batch_size=1024, warmup_epochs=2.0,
                                         label_smoothing=0.1, no_wd_bn_bias=True),
    "sched/StepLR-30-0.1": dict(type="step", step_size=30, gamma=0.1),
    "sched/Cosine": dict(type="cosine", min_lr=0.0),
}
FAMILY_FILES = [p for p in SHIPPED if p.parent.name != "experiments"]


def test_every_shipped_family_file_is_pinned():
    assert sorted(f"{p.parent.name}/{p.stem}" for p in FAMILY_FILES) == sorted(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_shipped_file_values(name):
    family, stem = name.split("/")
    cfg = load_family(family, stem)
    got = {key: getattr(cfg, key) for key in PINNED[name]}
    assert got == PINNED[name], f"configs/{name}.yaml: " + ", ".join(
        f"{key} is {got[key]!r}, expected {value!r}" for key, value in PINNED[name].items() if got[key] != value)


def test_values_named_in_the_file_names():
    """What a name promises: the width of 'Wx-FDMobileNet-224'; the epochs, momentum kind and batch of
    'SGD-E[-nesterov][-bsB]'; the step and factor of 'StepLR-S-G'."""
    for path in CONFIG_DIR.glob("model/*.yaml"):
        width = re.fullmatch(r"([\d.]+)x-FDMobileNet-224", path.stem)
        assert width and load_family("model", str(path)).width_mult == float(width.group(1)), path
    for path in CONFIG_DIR.glob("optim/*.yaml"):
        m = re.fullmatch(r"SGD-(\d+)(-nesterov)?(?:-bs(\d+))?", path.stem)
        cfg = load_family("optim", str(path))
        assert m and (cfg.epochs, cfg.nesterov, cfg.batch_size) == (int(m.group(1)), bool(m.group(2)),
                                                                   int(m.group(3) or 256)), path
    for path in CONFIG_DIR.glob("sched/StepLR-*.yaml"):
        step, gamma = path.stem.split("-")[1:]
        assert (load_family("sched", str(path)).step_size, load_family("sched", str(path)).gamma) == \
            (int(step), float(gamma)), path


def assert_composes(exp, data: str, model: str, optim: str, sched: str) -> None:
    """Experiment ``exp`` is these four family files, each as load_family reads it."""
    assert (exp.data, exp.model, exp.optim, exp.sched) == (
        load_family("data", data), load_family("model", model), load_family("optim", optim),
        load_family("sched", sched))


@pytest.mark.parametrize("width", ["1x", "0.5x", "0.25x"])
def test_paper_experiments_compose_the_paper_recipe(width):
    exp = load_experiment(f"{width}-FDMobileNet-224")
    assert_composes(exp, "imagenet-aggressive", f"{width}-FDMobileNet-224", "SGD-120-nesterov", "StepLR-30-0.1")
    assert (exp.train.label, exp.train.output_dir, exp.train.print_freq) == (f"{width}-FDMobileNet-224",
                                                                           "checkpoints", 100)


def test_the_papers_experiments_have_imagenets_1000_classes_on_its_tree(tmp_path):
    """data.num_classes auto counts the train split's class folders: ImageNet's tree (1,000 WordNet-id
    folders) gives the paper's 1000, through an experiment file and through the authors' four flags alike, and
    the header says where the number came from."""
    from pipelines.splits import resolve_classes
    for k in range(1000):
        (tmp_path / "train" / f"n{k:08d}").mkdir(parents=True)
    for width in ("1x", "0.5x", "0.25x"):
        for exp in (load_experiment(f"{width}-FDMobileNet-224", overrides=[f"data.root={tmp_path}"]),
                    load_experiment(data="imagenet-aggressive", model=f"{width}-FDMobileNet-224",
                                    optim="SGD-120-nesterov", sched="StepLR-30-0.1",
                                    overrides=[f"data.root={tmp_path}"])):
            data, classes = resolve_classes(exp.data)
            assert data == dataclasses.replace(exp.data, num_classes=1000)
            assert str(classes) == f"1000 classes (class folders in {tmp_path / 'train'})"
            assert classes.names == [f"n{k:08d}" for k in range(1000)]


@pytest.mark.parametrize("width", ["1x", "0.5x", "0.25x"])
def test_fast_experiments_compose_the_fast_recipe_and_say_it_is_unmeasured(width):
    exp = load_experiment(f"{width}-FDMobileNet-fast")
    assert_composes(exp, "imagenet-aggressive-fast", f"{width}-FDMobileNet-224", "SGD-32-nesterov-bs1024", "Cosine")
    assert exp.train.label == f"{width}-FDMobileNet-fast"
    assert "ImageNet accuracy\n# has NOT been measured" in (CONFIG_DIR / "experiments" /
                                                             f"{width}-FDMobileNet-fast.yaml").read_text()


RAMP = "data.train_res={start_res: %s, ramp_start: %s, ramp_end: %s}"


def test_the_training_resolution_of_each_epoch():
    """data.crop_size every epoch without data.train_res (every paper file); with it, start_res up to epoch
    ramp_start (counted from 1), then linear to crop_size at ramp_end, rounded to the nearest multiple of 32."""
    for width in ("1x", "0.5x", "0.25x"):
        paper = load_experiment(f"{width}-FDMobileNet-224").data
        assert [paper.train_size(e) for e in range(120)] == [224] * 120
    assert [load_experiment("demo", overrides=["data.crop_size=32"]).data.train_size(e) for e in range(3)] == [32] * 3
    fast = load_experiment("1x-FDMobileNet-fast")
    assert [fast.data.train_size(e) for e in range(fast.optim.epochs)] == [160] * 25 + [192] * 7
    ramp = load_experiment(overrides=["data.train_res={start_res: 128, ramp_start: 2, ramp_end: 6}"]).data
    # epoch 3: 152 -> 160, epoch 4: 176 (a half) -> 192, epoch 5: 200 -> 192
    assert [ramp.train_size(e) for e in range(8)] == [128, 128, 160, 192, 192, 224, 224, 224]
    down = load_experiment(overrides=["data.crop_size=128", "data.train_res={start_res: 256, ramp_start: 1, "
                                                            "ramp_end: 2}"]).data
    assert [down.train_size(e) for e in range(3)] == [256, 128, 128]
    half = load_experiment(overrides=["data.crop_size=160", RAMP % (128, 1, 3)]).data
    assert [half.train_size(e) for e in range(3)] == [128, 160, 160]       # 144 is 4.5 x 32: halves go up
    assert load_experiment("1x-FDMobileNet-fast", overrides=["data.train_res=null"]).data.train_size(0) == 192


@pytest.mark.parametrize("words, expected", [
    ([RAMP % (150, 2, 6)], "command-line override '%s': key 'data.train_res': start_res must be a positive "
                           "multiple of 32 (the network's stride), got 150" % (RAMP % (150, 2, 6))),
    ([RAMP % (0, 2, 6)], "start_res must be a positive multiple of 32 (the network's stride), got 0"),
    ([RAMP % (160, 6, 6)], "key 'data.train_res': expected 1 <= ramp_start < ramp_end (epochs, counted from 1), "
                           "got ramp_start 6, ramp_end 6"),
    ([RAMP % (160, 0, 6)], "expected 1 <= ramp_start < ramp_end (epochs, counted from 1), got ramp_start 0"),
    (["data.train_res=160"], "key 'data.train_res': expected a mapping like {start_res: 160, ramp_start: 24, "
                             "ramp_end: 28} (or null: one size, data.crop_size, every epoch), got 160 (int)"),
    (["data.train_res={start_res: 160, ramp_start: 2}"], "key 'data.train_res': missing ramp_end; expected a mapping"),
    (["data.train_res={start: 160, ramp_start: 2, ramp_end: 3}"],
     "key 'data.train_res': unknown key 'start' (did you mean 'start_res'?); expected a mapping"),
    ([RAMP % ("160.5", 2, 6)], "key 'data.train_res.start_res': expected an integer, got 160.5 (float)"),
    ([RAMP % (160, 2, 6), "data.crop_size=200"],
     "data.train_res ramps to data.crop_size, which must then be a positive multiple of 32, got 200"),
    ([RAMP % (160, 2, 6), "data.train_crop=random"],
     "data.train_res needs data.train_crop=random_resized (its crop is relative to the image)"),
])
def test_a_bad_resolution_ramp_is_one_line_naming_the_key(words, expected):
    with pytest.raises(ConfigError) as e:
        load_experiment(overrides=words)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_a_resolution_ramp_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path / "data.yaml", "crop_size: 192\ntrain_res:\n  start_res: 160\n  ramp_start: 9\n"
                                         "  ramp_end: 3\n")
    with pytest.raises(ConfigError, match=f"^{path}: key 'data.train_res': expected 1 <= ramp_start < ramp_end"):
        load_family("data", str(path))


def test_demo_experiment():
    exp = load_experiment("demo")
    assert exp.data == load_family("data", "digits-demo")
    assert (exp.model.width_mult, exp.model.dropout) == (0.25, 0.0)
    assert {key: getattr(exp.optim, key) for key in PAPER_SGD} == dict(
        PAPER_SGD, lr=0.2, epochs=20, batch_size=64, base_batch_size=64, warmup_epochs=1.0)
    assert (exp.sched.type, exp.sched.min_lr) == ("cosine", 0.0)
    assert (exp.train.label, exp.train.output_dir, exp.train.print_freq) == ("demo", "checkpoints", 10)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_unknown_key_names_file_key_and_near_match(tmp_path):
    path = write(tmp_path / "m.yaml", "name: m\nwidht_mult: 0.5\n")
    with pytest.raises(ConfigError) as e:
        load_family("model", str(path))
    message = str(e.value)
    assert message.startswith(f"{path}: unknown key 'model.widht_mult' (did you mean 'width_mult'?)")
    assert message.endswith("; valid keys for model: name, width_mult, dropout")


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


def test_an_experiment_may_extend_a_shipped_one_named_as_its_base(tmp_path):
    """base: a shipped experiment (or a path beside the file): a section given by name replaces the base's, an
    inline mapping changes only the keys it names, the overrides still come last."""
    mine = write(tmp_path / "mine.yaml", "base: 0.25x-FDMobileNet-224\nsched: Cosine\n"
                                         "optim: {batch_size: 32, epochs: 30}\ntrain: {label: mine}\n")
    exp, paper = load_experiment(str(mine), overrides=["optim.lr=0.2"]), load_experiment("0.25x-FDMobileNet-224")
    assert (exp.data, exp.model) == (paper.data, paper.model)
    assert exp.optim == dataclasses.replace(paper.optim, batch_size=32, epochs=30, lr=0.2)
    assert exp.sched == load_family("sched", "Cosine")
    assert exp.train == dataclasses.replace(paper.train, label="mine")
    write(tmp_path / "leaf.yaml", "base: mine.yaml\ndata: {crop_size: 160}\n")    # relative to leaf.yaml
    leaf = load_experiment(str(tmp_path / "leaf.yaml"))
    assert (leaf.data.crop_size, leaf.data.val_crop, leaf.optim.batch_size, leaf.model) == (160, 224, 32, paper.model)


def test_an_experiments_base_errors_name_the_file(tmp_path):
    typo = write(tmp_path / "typo.yaml", "base: 0.25x-FDMobileNet-22\n")
    with pytest.raises(ConfigError) as e:
        load_experiment(str(typo))
    assert str(e.value).startswith(f"{typo}: key 'base': config file not found: 0.25x-FDMobileNet-22 (")
    assert "nearest names: 0.25x-FDMobileNet-224" in str(e.value)
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b.yaml: key 'base': the base chain loops \(.*a.yaml -> .*b.yaml -> "
                                          r".*a.yaml\); a file cannot be its own base"):
        load_experiment(str(tmp_path / "a.yaml"))


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


@pytest.mark.parametrize("data", ["imagenet-aggressive-colorjitter", "imagenet-aggressive-fast"])
def test_round_trips(tmp_path, data):
    exp = load_experiment(data=data, optim="SGD-90-nesterov", overrides=["data.scale=[0.08, 1.0]"])
    assert from_dict(to_dict(exp)) == exp
    assert from_dict(read_yaml(write(tmp_path / "dump.yaml", yaml.safe_dump(to_dict(exp), sort_keys=False)))) == exp
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


@pytest.mark.parametrize("item, what", [("model.width_mult=0", "a width multiplier"),
                                        ("model.width_mult=-0.5", "a width multiplier"),
                                        ("model.width_mult=.inf", "a width multiplier"),
                                        ("data.num_classes=0", "a class count")])
def test_a_width_or_class_count_that_is_not_positive_never_reaches_the_model(tmp_path, item, what):
    """The model takes any number; the config refuses what would build a degenerate network, from an override,
    a family file and a stored config alike."""
    key, value = item.split("=")
    with pytest.raises(ConfigError) as e:
        load_experiment(overrides=[item])
    assert str(e.value).startswith(f"command-line override '{item}': key '{key}': {what} must be positive, got ")
    section, name = key.split(".")
    path = write(tmp_path / f"{section}.yaml", f"{name}: {value}\n")
    with pytest.raises(ConfigError, match=f"^{path}: key '{key}': {what} must be positive"):
        load_family(section, str(path))
    with pytest.raises(ConfigError, match=f"key '{key}': {what} must be positive"):
        from_dict({section: {name: yaml.safe_load(value)}})
    assert load_experiment(overrides=["data.num_classes=auto", "model.width_mult=0.25"]).model.width_mult == 0.25


# ------------------------------------------------------------------------------------------ composition
def test_a_colorjitter_variant_is_its_base_plus_color_jitter():
    for base in ("imagenet-aggressive", "imagenet-less-aggressive", "imagenet-more-aggressive",
                 "imagenet-conservative"):
        variant = load_family("data", f"{base}-colorjitter")
        assert variant == dataclasses.replace(load_family("data", base), name=f"{base}-colorjitter",
                                              color_jitter=(0.1, 0.1, 0.1, 0.1))


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.parent.name != "experiments"],
                         ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_a_shipped_file_states_only_what_differs_from_its_base_or_the_defaults(path, tmp_path):
    """Every key but the name changes something: without it the file would load differently (a default
    changed in the dataclass is not silently overridden by a file that restates the old one)."""
    family = path.parent.name
    raw = read_yaml(path)
    if "base" in raw:
        raw["base"] = str(resolve_path(raw["base"], family, path.parent))
    for key in set(raw) - {"name", "base"}:
        without = write(tmp_path / f"without-{key}.yaml", yaml.safe_dump({k: v for k, v in raw.items() if k != key}))
        assert load_family(family, str(without)) != load_family(family, str(path)), \
            f"{path.name} restates {family}.{key}: {raw[key]!r} is already its base's or the default"


def test_a_base_is_resolved_beside_the_file_and_its_errors_name_their_own_file(tmp_path):
    write(tmp_path / "root.yaml", "name: root\nlr: 0.4\nepochs: 10\n")
    write(tmp_path / "mid.yaml", "base: root.yaml\nname: mid\nepochs: 20\n")    # relative to mid.yaml
    leaf = write(tmp_path / "leaf.yaml", f"base: {tmp_path / 'mid.yaml'}\nname: leaf\nnesterov: false\n")
    cfg = load_family("optim", str(leaf))
    assert (cfg.name, cfg.lr, cfg.epochs, cfg.nesterov, cfg.momentum) == ("leaf", 0.4, 20, False, 0.9)
    write(tmp_path / "root.yaml", "lr: fast\n")
    with pytest.raises(ConfigError) as e:
        load_family("optim", str(leaf))
    assert str(e.value) == f"{tmp_path / 'root.yaml'}: key 'optim.lr': expected a number (float), got 'fast' (str)"


def test_an_inline_section_may_name_a_base(tmp_path):
    exp = load_experiment(str(write(tmp_path / "exp.yaml", "optim: {base: SGD-120, lr: 0.05}\n")))
    assert exp.optim == dataclasses.replace(load_family("optim", "SGD-120"), lr=0.05)


def test_an_unknown_base_gets_the_nearest_names(tmp_path):
    path = write(tmp_path / "d.yaml", "base: imagenet-agressive\nname: d\n")
    with pytest.raises(ConfigError) as e:
        load_family("data", str(path))
    assert str(e.value).startswith(f"{path}: key 'data.base': config file not found: imagenet-agressive (")
    assert "; nearest names: imagenet-aggressive, " in str(e.value)
    path = write(tmp_path / "d.yaml", "base: [imagenet-aggressive]\n")
    with pytest.raises(ConfigError, match=r"key 'data.base': expected the name or path of a data file, got \["):
        load_family("data", str(path))


@pytest.mark.parametrize("files", [{"a": "b.yaml", "b": "c.yaml", "c": "a.yaml"}, {"a": "a.yaml"}])
def test_a_base_chain_that_loops_is_an_error_naming_the_loop(tmp_path, files):
    for name, base in files.items():
        write(tmp_path / f"{name}.yaml", f"base: {base}\nname: {name}\n")
    with pytest.raises(ConfigError) as e:
        load_family("sched", str(tmp_path / "a.yaml"))
    loop = " -> ".join(str(tmp_path / f"{n}.yaml") for n in [*files, "a"])
    last = tmp_path / f"{list(files)[-1]}.yaml"
    assert str(e.value) == (f"{last}: key 'sched.base': the base chain loops ({loop}); "
                            f"a file cannot be its own base")


# ----------------------------------------------------------------------------------------------- schema
def test_choices_live_in_the_schema():
    assert choices(TrainConfig, "compile_backend") == ("inductor", "aot_eager", "eager")
    assert choices(SchedConfig, "type") == ("step", "cosine")
    with pytest.raises(ConfigError, match="key 'data.loader': expected one of dali, torchvision, synthetic, "
                                          "got 'nvidia'"):
        load_experiment(overrides=["data.loader=nvidia"])


@dataclasses.dataclass
class Knobs:
    """The loader knobs that take a number or 'auto' (DataConfig's num_threads, prefetch_queue_depth,
    hw_decoder_load where pipelines resolve 'auto')."""
    threads: int | Literal["auto"] = "auto"
    load: float | Literal["auto"] = "auto"


@pytest.mark.parametrize("mapping, expected", [
    ({"threads": 8, "load": 1}, Knobs(8, 1.0)),          # an int is a number: 1 -> 1.0, as for a float field
    ({"threads": "auto", "load": 0.99}, Knobs("auto", 0.99)),
    ({}, Knobs("auto", "auto")),
])
def test_a_number_or_auto_takes_the_first_member_that_fits(mapping, expected):
    got = build(Knobs, mapping, "k.yaml", "data")
    assert got == expected and type(got.load) is type(expected.load)


@pytest.mark.parametrize("mapping, expected", [
    ({"threads": "fast"}, "key 'data.threads': expected an integer or 'auto', got 'fast' (str)"),
    ({"threads": 2.5}, "key 'data.threads': expected an integer or 'auto', got 2.5 (float)"),
    ({"threads": True}, "key 'data.threads': expected an integer or 'auto', got True (bool)"),
    ({"load": "most"}, "key 'data.load': expected a number (float) or 'auto', got 'most' (str)"),
])
def test_a_number_or_auto_names_both_in_its_error(mapping, expected):
    with pytest.raises(ConfigError) as e:
        build(Knobs, mapping, "k.yaml", "data")
    assert str(e.value) == f"k.yaml: {expected}"


# --------------------------------------------------------------------------------------------- messages
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
