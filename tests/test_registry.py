from pathlib import Path

import pytest

from harness import registry
from harness.registry import UsageError

REQUIRED = {
    "gemma-3-4b-it", "gemma-3n-E4B-it", "gemma-3-270m", "Ministral-3-3B-Instruct-2512",
    "Qwen3-VL-2B-Instruct", "Llama-3.2-1B-Instruct", "Qwen3-4B-Instruct-2507",
}


def test_registry_holds_the_required_models_with_shipped_configs():
    specs = {spec.name: spec for spec in registry.all_specs()}
    assert REQUIRED <= set(specs)
    for spec in specs.values():
        assert spec.hf_id and "/" in spec.hf_id
        assert spec.expected_load_path in registry.LOAD_PATHS
        assert 0 < spec.loss_threshold < 1
        assert spec.architecture_file, f"{spec.name} has no shipped architecture config"


def test_local_folder_with_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    spec = registry.lookup(str(tmp_path))
    assert spec.source == "local" and spec.expected_load_path is None
    assert registry.load_config(spec).model_type == "llama"


def test_local_folder_without_config_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        registry.lookup(str(tmp_path))


def test_unknown_name_lists_registry():
    with pytest.raises(UsageError, match="gemma-3-4b-it"):
        registry.lookup("no-such-model")


def test_hub_id_is_accepted_unchecked():
    spec = registry.lookup("some-org/some-model")
    assert (spec.source, spec.hf_id, spec.expected_load_path) == ("hub", "some-org/some-model", None)
    assert spec.folder_name == "some-org--some-model"


def test_bad_yaml_key_is_reported(tmp_path, monkeypatch):
    (tmp_path / "x.yaml").write_text("name: x\nhf_id: a/b\nexpected_load_path: causal_lm\nbogus: 1\n")
    with pytest.raises(UsageError, match="bogus"):
        registry.load_registry_spec(tmp_path / "x.yaml")


def test_unknown_model_type_in_config_is_usage_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "foo_bar_lm"}')
    with pytest.raises(UsageError, match="foo_bar_lm"):
        registry.load_config(registry.lookup(str(tmp_path)))


def run_config(models: str, *extra: str, weights: str = "synthetic"):
    from harness.cli import build_parser, plan_models
    from harness.sweep import run_config_for

    args = build_parser().parse_args(["--models", models, "--weights", weights, "--device", "cpu", *extra])
    return run_config_for(plan_models(models)[0], args, Path("unused"))


def test_registry_train_section_overrides_mode_defaults_and_the_cli_overrides_both():
    # gemma-3n's YAML lengthens only its synthetic step budget; the other modes and models keep the defaults
    assert run_config("gemma-3n-E4B-it").max_steps == 600
    assert run_config("gemma-3-4b-it").max_steps == 400
    assert run_config("gemma-3n-E4B-it", weights="tiny").max_steps == 4000
    assert run_config("gemma-3n-E4B-it", "--max-steps", "7").max_steps == 7
    assert run_config("gemma-3n-E4B-it").lr == 3e-4
