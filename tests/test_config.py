"""facelab.config: composing conf/ with overrides, and the errors that guide a user to a fix."""

import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from facelab.config import ConfigError, compose, conf_dir, groups, save_config, to_dotlist

DEFAULT_CHOICES = {
    "method": "specular",
    "data": "synthetic",
    "face_model": "ict-face-lite",
    "renderer": "auto",
    "trainer": "cpu",
    "logger": "wandb",
}
SWEEP_DIR = conf_dir() / "sweep"


def _group_choice_pairs():
    return [(group, choice) for group, choices in groups().items() for choice in choices]


def test_defaults_select_the_cpu_friendly_choices_and_fill_run_name():
    cfg = compose()
    assert dict(cfg.choices) == DEFAULT_CHOICES
    assert cfg.method.name == "specular"
    assert cfg.face_model.name == "ict-face-lite"
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.max_steps == 400
    assert cfg.seed == 0 and cfg.run.root == "runs"
    assert re.fullmatch(r"specular-\d{8}-\d{6}", cfg.run.name)


def test_groups_lists_each_folder_sorted_and_leaves_out_sweeps():
    found = groups()
    assert set(found) == set(DEFAULT_CHOICES)
    assert found["method"] == ["cest", "gcn", "inversefacenet", "multilevel", "specular"]
    assert "sweep" not in found


def test_group_override_selects_that_file_and_names_the_run_after_it():
    cfg = compose(["method=cest"])
    assert cfg.choices.method == "cest"
    assert cfg.method.name == "cest"
    assert "Conditional Estimation" in cfg.method.paper
    assert cfg.run.name.startswith("cest-")


def test_group_selection_applies_before_values_wherever_it_stands():
    cfg = compose(["trainer.max_steps=7", "trainer=gpu"])
    assert cfg.trainer.accelerator == "gpu"
    assert cfg.trainer.max_steps == 7


def test_dotlist_values_are_parsed_as_yaml():
    cfg = compose(["trainer.max_steps=50", "method.optimizer.lr=1e-5", "run.root=null"])
    assert cfg.trainer.max_steps == 50 and isinstance(cfg.trainer.max_steps, int)
    assert cfg.method.optimizer.lr == pytest.approx(1e-5)
    assert cfg.run.root is None


def test_plus_adds_a_new_nested_key():
    cfg = compose(["+foo.bar=1"])
    assert cfg.foo.bar == 1


def test_plus_on_an_existing_key_says_to_drop_the_plus():
    with pytest.raises(ConfigError, match=r"exists already; set it with seed="):
        compose(["+seed=1"])


def test_tilde_deletes_a_key_and_a_whole_group():
    cfg = compose(["~run.name", "~logger"])
    assert "name" not in cfg.run
    assert "logger" not in cfg and "logger" not in cfg.choices


def test_typo_in_a_leaf_key_names_the_nearest_key_then_all_valid_keys():
    with pytest.raises(ConfigError) as error:
        compose(["trainer.max_step=5"])
    message = str(error.value)
    assert "trainer.max_step'" in message
    assert "did you mean 'trainer.max_steps'" in message
    listed = message.split("valid keys under 'trainer': ")[1].split(", ")
    assert listed[0] == "trainer.max_steps"
    assert set(listed) == {f"trainer.{key}" for key in compose().trainer}


def test_typo_in_an_intermediate_key_reports_at_that_level():
    with pytest.raises(ConfigError, match=r"unknown key 'trainr'; did you mean 'trainer'") as error:
        compose(["trainr.max_steps=1"])
    assert "valid keys at the top level" in str(error.value)


def test_unknown_group_choice_lists_valid_choices_nearest_first():
    with pytest.raises(ConfigError) as error:
        compose(["method=specualr"])
    listed = str(error.value).split("valid choices: ")[1].split(", ")
    assert listed[0] == "specular"
    assert sorted(listed) == groups()["method"]


@pytest.mark.parametrize("override", ["trainer.max_steps", "", "+foo", "~seed=1", "a..b=1"])
def test_malformed_override_shows_the_accepted_forms(override):
    with pytest.raises(ConfigError, match=r"malformed.*group=choice.*key\.path=value.*~key\.path"):
        compose([override])


def test_setting_below_a_plain_value_is_refused():
    with pytest.raises(ConfigError, match=r"'seed' is a value"):
        compose(["seed.x=1"])
    with pytest.raises(ConfigError, match=r"'seed' is a value"):
        compose(["+seed.x=1"])


def test_result_is_struct_mode_so_attribute_typos_raise():
    cfg = compose()
    with pytest.raises(ConfigAttributeError):
        _ = cfg.trainer.nonexistent
    with pytest.raises(ConfigAttributeError):
        cfg.trainer.nonexistent = 1


def test_save_config_writes_yaml_that_loads_back_equal(tmp_path):
    cfg = compose(["method=gcn", "data=identities", "trainer.max_steps=12"])
    path = save_config(cfg, tmp_path / "run" / "nested")
    assert path == tmp_path / "run" / "nested" / "config.yaml"
    assert OmegaConf.load(path) == cfg


def test_to_dotlist_round_trips_through_compose():
    cfg = compose(["method=inversefacenet", "data=clips", "logger.tags=[a, 'b c', '1']"])
    again = compose(to_dotlist(cfg))
    assert again == cfg
    assert list(again.logger.tags) == ["a", "b c", "1"]


@pytest.mark.parametrize(("group", "choice"), _group_choice_pairs())
def test_every_choice_composes_and_names_itself(group, choice):
    cfg = compose([f"{group}={choice}"])
    assert cfg.choices[group] == choice
    self_name = {"method": "name", "data": "kind", "face_model": "name", "renderer": "backend"}
    if group in self_name:
        assert cfg[group][self_name[group]] == choice


def test_grouped_data_sets_carry_a_group_size_and_the_others_do_not():
    for kind, has_group in [("clips", True), ("identities", True), ("images", False)]:
        assert ("group_size" in compose([f"data={kind}"]).data) == has_group


@pytest.mark.parametrize("sweep_file", sorted(SWEEP_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_sweep_parameters_are_valid_override_keys(sweep_file):
    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["method"] in {"grid", "random", "bayes"}
    assert "${args_no_hyphens}" in sweep["command"]
    fixed = [arg for arg in sweep["command"][3:] if not arg.startswith("${")]
    samples = {}
    for name, spec in sweep["parameters"].items():  # one sample each: first value, or the min
        sample = spec["values"][0] if "values" in spec else spec.get("value")
        samples[name] = spec.get("min", sample)
    # The agent writes each value with Python's str() (1e-05 for a small float).
    cfg = compose(fixed + [f"{name}={value}" for name, value in samples.items()])
    for name, value in samples.items():
        assert OmegaConf.select(cfg, name) == value


def test_conf_dir_follows_facelab_conf_and_fails_clearly_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("FACELAB_CONF", str(tmp_path))
    assert conf_dir() == tmp_path
    monkeypatch.setenv("FACELAB_CONF", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=r"absent.*does not exist.*FACELAB_CONF"):
        conf_dir()


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_primary_body_merges_over_group_files_and_interpolations_resolve(tmp_path):
    root = _write(tmp_path, {
        "train.yaml": "defaults: {model: small}\nwidth: 4\nmodel: {depth: 3}\n",
        "model/small.yaml": "depth: 1\nchannels: ${width}\n",
    })
    cfg = compose(["width=8"], conf_root=root)
    assert cfg.model == {"depth": 3, "channels": 8}
    assert "run" not in cfg


def test_unresolvable_interpolation_is_a_config_error(tmp_path):
    root = _write(tmp_path, {"train.yaml": "a: ${missing.key}\n"})
    with pytest.raises(ConfigError, match=r"interpolation.*missing"):
        compose(conf_root=root)


def test_unknown_primary_config_lists_the_available_ones(tmp_path):
    root = _write(tmp_path, {"train.yaml": "a: 1\n", "debug.yaml": "a: 2\n"})
    with pytest.raises(ConfigError, match=r"available: debug, train"):
        compose(config_name="trian", conf_root=root)


def test_trainer_profiles_switch_between_the_cpu_default_and_the_paper_settings():
    cpu = compose(["method=specular"])
    assert cpu.method.backbone == "resnet18" and cpu.data.image_size < 224 and cpu.face_model.name == "ict-face-lite"
    paper = compose(["method=specular", "trainer=gpu"])
    assert paper.method.backbone == "resnet50" and paper.method.optimizer.lr == 5e-5
    assert paper.data.image_size == 224 and paper.data.batch_size == 32 and paper.face_model.name == "ict-face"
    assert paper.choices["face_model"] == "ict-face"
    # a choice on the command line beats a profile's defaults; a value beats its global block
    mine = compose(["trainer=gpu", "face_model=ict-face-lite", "method.backbone=resnet34"])
    assert mine.face_model.name == "ict-face-lite" and mine.method.backbone == "resnet34"
    # a profile's global keys that a method lacks are skipped, not added
    other = compose(["method=cest"])
    assert "backbone" not in other.method
    assert "global" not in cpu.trainer and "defaults" not in paper.trainer
