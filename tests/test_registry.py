from pathlib import Path

import pytest

from harness.contract.errors import UsageError
from harness.contract.model_spec import LOAD_PATHS
from harness.gate import registry
from harness.models.configs import load_config

REQUIRED = {
    "gemma-3-4b-it",
    "gemma-3n-E4B-it",
    "gemma-3-270m",
    "Ministral-3-3B-Instruct-2512",
    "Qwen3-VL-2B-Instruct",
    "Llama-3.2-1B-Instruct",
    "Qwen3-4B-Instruct-2507",
}


def test_registry_holds_the_required_models_with_shipped_configs():
    specs = {spec.name: spec for spec in registry.all_specs()}
    assert REQUIRED <= set(specs)
    for spec in specs.values():
        assert spec.hf_id and "/" in spec.hf_id
        assert spec.expected_load_path in LOAD_PATHS
        assert 0 < spec.loss_threshold < 1
        assert spec.architecture_file, f"{spec.name} has no shipped architecture config"


def test_local_folder_with_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    spec = registry.lookup(str(tmp_path))
    assert spec.source == "local" and spec.expected_load_path is None
    assert load_config(spec).model_type == "llama"


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
        load_config(registry.lookup(str(tmp_path)))


def run_config(models: str, *extra: str, weights: str = "synthetic"):
    from harness.gate import options
    from harness.gate.settings import run_config_for, settings_of_command

    argv = ["--models", models, "--weights", weights, "--device", "cpu", "--nproc-per-node", "1", *extra]
    command = options.parse(argv)
    return run_config_for(registry.lookup(models), settings_of_command(command), Path("unused"))


def test_registry_train_section_overrides_mode_defaults_and_the_cli_overrides_both():
    # gemma-3n's YAML lengthens only its synthetic step budget; the other modes and models keep the defaults
    assert run_config("gemma-3n-E4B-it").max_steps == 600
    assert run_config("gemma-3-4b-it").max_steps == 400
    assert run_config("gemma-3n-E4B-it", weights="tiny").max_steps == 4000
    assert run_config("gemma-3n-E4B-it", "--max-steps", "7").max_steps == 7
    assert run_config("gemma-3n-E4B-it").lr == 1.5e-4
    assert run_config("gemma-3n-E4B-it", "--lr", "2e-4").lr == 2e-4


@pytest.mark.parametrize(
    "ranks, nodes, lr",
    [("1", "1", 1.5e-4), ("2", "1", 1.5e-4 * 2**0.5), ("4", "1", 3e-4), ("8", "1", 3e-4), ("1", "2", 1.5e-4 * 2**0.5)],
)
def test_the_synthetic_peak_lr_grows_with_the_global_batch_up_to_3e4(ranks, nodes, lr):
    extra = ("--nnodes", nodes, "--rdzv-endpoint", "node0:29500") if nodes != "1" else ()
    config = run_config("gemma-3-4b-it", "--nproc-per-node", ranks, *extra)
    assert config.lr == pytest.approx(lr)
    assert run_config("gemma-3-4b-it", "--nproc-per-node", ranks, *extra, weights="tiny").lr == 3e-3  # tiny: its own


@pytest.mark.parametrize(
    "train, says",
    [
        (
            {"synthetic": {"max_step": 600}},
            "train.synthetic: unknown setting 'max_step'; valid: max_samples, max_seq_len",
        ),
        (
            {"synthetc": {"max_steps": 600}},
            "train: 'synthetc' is not a weights mode; valid: all, real, synthetic, tiny",
        ),
        ({"all": {"lr": "fast"}}, "train.all.lr: 'fast' is not a valid float"),
        ({"tiny": {"max_steps": 1.5}}, "train.tiny.max_steps: 1.5 is not a valid int"),
    ],
)
def test_a_bad_train_key_is_refused_when_the_registry_loads(tmp_path, monkeypatch, train, says):
    import yaml

    (tmp_path / "toy.yaml").write_text(yaml.safe_dump({"name": "toy", "hf_id": "org/toy", "train": train}))
    monkeypatch.setattr(registry, "MODELS_DIR", tmp_path)
    with pytest.raises(UsageError) as error:
        registry.lookup("toy")
    assert says in str(error.value) and "toy.yaml" in str(error.value)


def test_a_bad_train_key_exits_2_with_its_name(tmp_path):
    """The CLI as a user runs it, with a registry holding a misspelt key (a copy of the shipped one)."""
    import shutil
    import subprocess
    import sys

    from harness.runtime.paths import REPO_ROOT

    checkout = tmp_path / "checkout"
    shutil.copytree(REPO_ROOT / "configs", checkout / "configs")
    shutil.copytree(REPO_ROOT / "harness", checkout / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "run_validation.py", checkout)
    yaml_file = checkout / "configs" / "models" / "gemma-3n-E4B-it.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("max_steps: 600", "max_stesp: 600"))
    proc = subprocess.run(
        [sys.executable, "run_validation.py", "--models", "gemma-3n-E4B-it", "--dry-run"],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "unknown setting 'max_stesp'" in proc.stderr and "max_steps" in proc.stderr
