"""The config system: presets with base chains, typed dotted overrides, errors that name the key, and a
dump that loads back to the same config."""

from __future__ import annotations

import pytest
import yaml

from infra.config import ConfigError, JobConfig, dump_config, flat_params, load_config, redact_url

PRESETS = ["demo", "mmdit-2b", "mmdit-8b"]


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------


def test_no_preset_gives_the_schema_defaults():
    assert load_config() == JobConfig()


def test_preset_values_override_the_defaults():
    cfg = load_config("demo")
    assert (cfg.model.depth, cfg.model.head_dim, cfg.model.in_channels, cfg.data.latent_size) == (4, 32, 1, 8)
    assert cfg.sample.prompts[3] == "a handwritten digit 3"
    assert cfg.data.url == JobConfig().data.url  # a key the preset does not set keeps its default


def test_mmdit_8b_extends_mmdit_2b_changing_only_depth_and_name():
    small, large = load_config("mmdit-2b").model_dump(), load_config("mmdit-8b").model_dump()
    assert (large["model"]["depth"], small["model"]["depth"], large["name"]) == (38, 24, "mmdit-8b")
    for cfg in (small, large):
        cfg["model"].pop("depth")
        cfg.pop("name")
    assert large == small


def test_preset_may_be_given_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nmodel:\n  depth: 3\n")
    cfg = load_config(path)
    assert (cfg.name, cfg.model.depth) == ("mine", 3)


def test_a_base_chain_merges_sections_key_by_key(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  depth: 5\n  head_dim: 16\noptim:\n  lr: 0.5\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel:\n  depth: 7\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\noptim:\n  warmup_steps: 9\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.model.depth, cfg.model.head_dim, cfg.optim.lr, cfg.optim.warmup_steps) == (7, 16, 0.5, 9)


def test_a_base_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")


def test_unknown_preset_is_an_error_listing_the_presets():
    with pytest.raises(ConfigError, match=r"preset 'mmdit-3b' not found.*'demo'.*'mmdit-2b'.*'mmdit-8b'"):
        load_config("mmdit-3b")


# --------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------


def test_dotted_overrides_are_parsed_to_the_field_types():
    cfg = load_config("mmdit-2b", [
        "model.depth=12", "optim.lr=3.0e-4", "optim.eps=1e-6", "train.compile=true", "flow.timestep_sampler=mode",
        "optim.betas=[0.8, 0.95]", "sample.prompts=[a cat, a dog]", "train.val_timesteps=[0.5]", "name=run 7",
    ])
    assert cfg.model.depth == 12 and type(cfg.model.depth) is int
    assert cfg.optim.lr == 3.0e-4 and cfg.optim.eps == 1e-6 and type(cfg.optim.eps) is float
    assert cfg.train.compile is True
    assert cfg.flow.timestep_sampler == "mode"
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.sample.prompts == ["a cat", "a dog"]
    assert cfg.train.val_timesteps == [0.5]
    assert cfg.name == "run 7"


def test_later_overrides_win_and_the_preset_is_untouched():
    cfg = load_config("demo", ["model.depth=2", "model.depth=6"])
    assert cfg.model.depth == 6
    assert load_config("demo").model.depth == 4


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(ConfigError, match=r"'model.depth' is not of the form section.key=value"):
        load_config("demo", ["model.depth"])


def test_override_into_a_value_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"'depth' is a value, not a section"):
        load_config("demo", ["model.depth.inner=3"])


# --------------------------------------------------------------------------------------------------
# Errors that say what and where
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key, suggestion", [
    ("model.dpeth=3", "model.dpeth", "model.depth"),
    ("optim.warmup_step=10", "optim.warmup_step", "optim.warmup_steps"),
    ("flow.logit_men=0.5", "flow.logit_men", "flow.logit_mean"),
    ("modle.depth=3", "modle", "model"),
    ("train.lr=1e-3", "train.lr", "optim.lr"),
])
def test_a_key_typo_names_the_key_and_suggests_the_valid_one(override, key, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    message = str(err.value)
    assert f"unknown config key '{key}'" in message and f"override '{override}'" in message
    assert "did you mean" in message and suggestion in message.split("did you mean", 1)[1]


def test_a_key_typo_in_a_preset_file_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model:\n  patch_sise: 2\n")
    with pytest.raises(ConfigError, match=rf"{path}.*unknown config key 'model.patch_sise'.*model\.patch_size"):
        load_config(path)


@pytest.mark.parametrize("override, key", [
    ("model.depth=0", "model.depth"),
    ("model.depth=two", "model.depth"),
    ("optim.lr=-1", "optim.lr"),
    ("flow.timestep_sampler=lognormal", "flow.timestep_sampler"),
    ("flow.text_dropout=1.5", "flow.text_dropout"),
    ("train.precision=fp8", "train.precision"),
    ("train.val_timesteps=[0.5, 1.5]", "train.val_timesteps"),
])
def test_a_bad_value_names_its_key_and_the_value(override, key):
    value = override.split("=", 1)[1]
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    message = str(err.value)
    assert key in message, message
    assert value.strip("[]").split(",")[-1].strip() in message, message


def test_mode_scale_outside_the_monotone_range_names_the_key():
    with pytest.raises(ConfigError, match=r"flow\.mode_scale=3\.0 is outside \[-1, 1\.75"):
        load_config("demo", ["flow.timestep_sampler=mode", "flow.mode_scale=3.0"])


def test_latent_size_not_divisible_by_the_patch_names_both_keys():
    with pytest.raises(ConfigError, match=r"data\.latent_size=9.*model\.patch_size=2"):
        load_config("demo", ["data.latent_size=9"])


def test_a_grid_larger_than_the_positional_table_names_pos_embed_max_size():
    with pytest.raises(ConfigError, match=r"data\.latent_size=18 gives a 9-patch grid.*model\.pos_embed_max_size=8"):
        load_config("demo", ["data.latent_size=18"])


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [depth: 3\n")
    with pytest.raises(ConfigError, match=rf"{path} is not valid YAML"):
        load_config(path)


# --------------------------------------------------------------------------------------------------
# Dump and reload
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_dumped_config_loads_back_to_an_equal_config(preset, tmp_path):
    cfg = load_config(preset, ["optim.betas=[0.8, 0.95]", "train.seed=17", "sample.prompts=[x, 'y: z']"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_dump_holds_every_key_resolved():
    dumped = yaml.safe_load(dump_config(load_config("mmdit-8b")))
    assert "base" not in dumped
    assert dumped["model"]["depth"] == 38 and dumped["model"]["context_dim"] == 4096
    assert set(dumped) == set(JobConfig.model_fields)


# --------------------------------------------------------------------------------------------------
# Credentials: never in what is recorded
# --------------------------------------------------------------------------------------------------

# One password in each kind of URL the config holds.
URL_OVERRIDES = {
    "mlflow.tracking_uri": "http://alice:TRACKING-PW@mlflow.example:5000",
    "run.s3_endpoint": "http://key:ENDPOINT-PW@s3.example:9000",
    "run.storage_path": "s3://bob:STORAGE-PW@bucket/runs",
    "data.url": "https://carol:DATA-PW@data.example/ds/manifest.json",
    "data.storage_options.endpoint_url": "http://dave:OPTIONS-PW@s3.example:9000",
}


def test_a_password_in_any_url_is_redacted_from_dumps_and_params_but_kept_for_the_job():
    cfg = load_config("demo", [f"{key}={value}" for key, value in URL_OVERRIDES.items()])
    recorded = dump_config(cfg) + "\n".join(flat_params(cfg).values())
    for password in ("TRACKING-PW", "ENDPOINT-PW", "STORAGE-PW", "DATA-PW", "OPTIONS-PW"):
        assert password not in recorded, password
    assert flat_params(cfg)["mlflow.tracking_uri"] == "http://***@mlflow.example:5000"
    assert yaml.safe_load(dump_config(cfg))["data"]["storage_options"]["endpoint_url"] == "http://***@s3.example:9000"
    assert cfg.mlflow.tracking_uri == URL_OVERRIDES["mlflow.tracking_uri"]  # the running job keeps it


def test_urls_without_user_info_are_recorded_unchanged():
    assert redact_url("s3://bucket/a@b/c") == "s3://bucket/a@b/c"
    assert redact_url("file:///data/x@y") == "file:///data/x@y"
    assert redact_url("see http://u:p@h/x and s3://k@b/y") == "see http://***@h/x and s3://***@b/y"


def test_a_derived_sweep_preset_replaces_a_space_entry_whole(tmp_path):
    """tune.space entries are whole distributions: a preset turning its base's `choice` into a `grid` must not
    end up with both (an invalid spec), and the base's other entries stay."""
    (tmp_path / "a.yaml").write_text(
        "tune:\n  space:\n    flow.logit_mean: {choice: [0.0, 1.0]}\n    flow.logit_std: {uniform: [0.5, 1.5]}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntune:\n  space:\n    flow.logit_mean: {grid: [0.5]}\n")
    space = load_config(tmp_path / "b.yaml").tune.space
    assert space == {"flow.logit_mean": {"grid": [0.5]}, "flow.logit_std": {"uniform": [0.5, 1.5]}}
