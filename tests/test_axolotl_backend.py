"""The axolotl backend (harness.backends.axolotl) without axolotl installed (it is never installed here: its
exact pins need an environment of its own): the probe's replica of axolotl's load rule, through the CLI too;
the recipe as axolotl's YAML; the launch commands; collect() on the files axolotl and the harness's plugin
leave; the up-front refusals on CPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import backends
from harness.backends import axolotl
from harness.contract.errors import UsageError
from harness.contract.records import RunConfig, read_metrics
from harness.gate import registry
from harness.models.configs import load_config
from harness.models.mappings import IMAGE_TEXT_TO_TEXT
from harness.runtime.launch import JobOutcome, Topology
from harness.runtime.paths import DEFAULT_DATASET, REPO_ROOT

NOT_INSTALLED = pytest.mark.skipif(importlib.util.find_spec("axolotl") is not None, reason="axolotl is installed here")
# axolotl loads every config in the image-text-to-text mapping through AutoModelForImageTextToText: the full VLM
AXOLOTL_CLASSES = {
    "gemma-3-4b-it": ("Gemma3ForConditionalGeneration", "direct_vlm_load"),
    "gemma-3n-E4B-it": ("Gemma3nForConditionalGeneration", "direct_vlm_load"),
    "Qwen3-VL-2B-Instruct": ("Qwen3VLForConditionalGeneration", "direct_vlm_load"),
    "Ministral-3-3B-Instruct-2512": ("Mistral3ForConditionalGeneration", "direct_vlm_load"),
    "Llama-3.2-1B-Instruct": ("LlamaForCausalLM", "causal_lm"),
    "gemma-3-270m": ("Gemma3ForCausalLM", "causal_lm"),
}


def job(tmp_path: Path, name: str = "gemma-3-4b-it", **settings) -> RunConfig:
    spec = registry.lookup(name)
    options = dict(
        model=spec.to_dict(),
        weights="tiny",
        device="cuda",
        output_dir=str(tmp_path / spec.folder_name),
        dataset=str(DEFAULT_DATASET),
        backend="axolotl",
        max_samples=32,
    )
    return RunConfig(**{**options, **settings})


# ---------------------------------------------------------------- probe


@pytest.mark.parametrize("name", sorted(AXOLOTL_CLASSES))
def test_probe_names_the_class_axolotl_loads(name):
    spec = registry.lookup(name)
    probe = backends.backend("axolotl").probe(spec, load_config(spec))
    assert (probe.class_name, probe.load_path) == AXOLOTL_CLASSES[name]
    assert probe.backend == "axolotl" and "_set_auto_model_loader" in probe.rule
    if importlib.util.find_spec("axolotl") is None:
        assert probe.rule.endswith(axolotl.REPLICA_NOTE)


def test_probe_replica_follows_the_image_text_to_text_mapping():
    """Every registry model: a config in the mapping is the VLM loaded directly, any other the causal LM."""
    for spec in registry.all_specs():
        config = load_config(spec)
        probe = axolotl.replica_probe(spec, config)
        vlm = config.model_type in IMAGE_TEXT_TO_TEXT
        assert probe.load_path == ("direct_vlm_load" if vlm else "causal_lm"), spec.name


@NOT_INSTALLED
def test_probe_says_when_axolotls_own_seam_is_missing(monkeypatch):
    """axolotl importable but its loader's seam gone (a later release): the replica, saying why."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "axolotl" else real(name, *a))
    spec = registry.lookup("gemma-3-4b-it")
    probe = axolotl.probe(spec, load_config(spec))
    assert probe.class_name == "Gemma3ForConditionalGeneration" and probe.load_path == "direct_vlm_load"
    assert "replicated (axolotl's own code: ModuleNotFoundError" in probe.rule


def test_dry_run_through_the_cli_names_the_class(tmp_path, capsys):
    """The probe in a stack environment (here the harness's own interpreter, where axolotl is absent: the
    replica): gemma-3-4b-it FAILs naming the VLM class it will build."""
    from harness.gate import cli

    argv = ["--backend", "axolotl", "--models", "gemma-3-4b-it", "--dry-run", "--stack-python", sys.executable]
    assert cli.main([*argv, "--output-dir", str(tmp_path)]) == 1
    assert (
        "FAIL: axolotl will build Gemma3ForConditionalGeneration (load path direct_vlm_load) for a text-only run; "
        "the registry expects extract_causal_lm" in capsys.readouterr().out
    )
    (path,) = tmp_path.glob("*/*/result.json")
    result = json.loads(path.read_text())
    assert result["verdict"] == "FAIL" and result["classes"]["model"] == "Gemma3ForConditionalGeneration"
    assert result["backend"]["probe"]["load_path"] == "direct_vlm_load"


def test_a_text_model_is_planned():
    from harness.gate.planning import PlannedModel, planned_result
    from harness.models.plan import resolve_load_path

    spec = registry.lookup("Llama-3.2-1B-Instruct")
    config = load_config(spec)
    probe = axolotl.probe(spec, config)
    result = planned_result(PlannedModel(spec, resolve_load_path(config), "axolotl", probe))
    assert result.verdict == "PLANNED" and result.load_path == "causal_lm"
    assert result.classes["model"] == "LlamaForCausalLM"


def test_dry_run_in_the_harness_environment_runs_the_replica():
    from harness.gate.planning import plan_models

    (planned,) = plan_models("gemma-3-4b-it", "axolotl")
    assert planned.probe.class_name == "Gemma3ForConditionalGeneration"
    assert planned.mismatch_reason.startswith("axolotl will build Gemma3ForConditionalGeneration")


# ---------------------------------------------------------------- refusals


@NOT_INSTALLED
def test_without_axolotl_the_refusal_names_the_stack_spec():
    with pytest.raises(UsageError) as refused:
        backends.check_usable("axolotl", "cuda")
    message = str(refused.value)
    assert "--stack axolotl==0.21.0" in message and "pip install" not in message


@NOT_INSTALLED
def test_training_on_cpu_is_refused_up_front(tmp_path, capsys):
    """One line, exit 2, before any job: on CPU, CUDA only (first: no install helps a CPU machine); on a
    GPU machine without the stack, the line names --stack."""
    from harness.gate import cli

    argv = ["--backend", "axolotl", "--models", "Llama-3.2-1B-Instruct", "--weights", "tiny", "--device", "cpu"]
    assert cli.main([*argv, "--output-dir", str(tmp_path), "--wandb-mode", "disabled"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --backend axolotl trains only on CUDA")
    assert not list(tmp_path.glob("*/*/train.log"))  # nothing started
    with pytest.raises(UsageError, match=r"^--backend axolotl needs axolotl.*--stack axolotl==0.21.0"):
        backends.check_usable("axolotl", "cuda")  # the harness's environment, which lacks it


# ---------------------------------------------------------------- the recipe as axolotl's YAML


def test_recipe_yaml_maps_the_overfit_recipe(tmp_path):
    cfg = job(tmp_path, lr=3e-4, warmup_steps=4, max_steps=120, epochs=30, seed=7, max_tokens_per_gpu=4096)
    options = axolotl.recipe_yaml(cfg, tmp_path / "input", tmp_path / "out")
    assert options["base_model"] == str(tmp_path / "input") and options["output_dir"] == str(tmp_path / "out")
    assert options["chat_template"] == "tokenizer_default"
    assert options["eot_tokens"] == ["<end_of_turn>"]  # not its default eos_token (<eos>: never in Gemma's chat)
    (dataset,) = options["datasets"]
    assert dataset["type"] == "chat_template" and dataset["field_messages"] == "messages"
    assert dataset["path"] == str(axolotl.stack_dir(cfg) / axolotl.DATA_FILE) and dataset["ds_type"] == "json"
    assert dataset["roles"]["assistant"] == ["assistant"] and dataset["roles_to_train"] == ["assistant"]
    assert options["sample_packing"] is True and options["micro_batch_size"] == 1 and options["sequence_len"] == 4096
    assert options["learning_rate"] == 3e-4 and options["warmup_steps"] == 4
    assert options["lr_scheduler"] == "constant_with_warmup" and "cosine_min_lr_ratio" not in options
    assert options["num_epochs"] == 30 and "max_steps" not in options  # its max_steps would replace the epochs
    assert options["seed"] == 7 and options["optimizer"] == "adamw_torch"
    assert (options["adam_beta1"], options["adam_beta2"], options["weight_decay"]) == (0.9, 0.95, 0.0)
    assert options["bf16"] is True and options["logging_steps"] == 1
    assert options["save_strategy"] == "no"  # only the final model, which axolotl saves to output_dir itself
    assert options["freeze_mm_modules"] is True and options["ddp_find_unused_parameters"] is False
    assert options["plugins"] == [axolotl.PLUGIN]
    assert "gradient_checkpointing" not in options  # axolotl's default unless --activation-checkpointing
    record = axolotl.recipe_record(options, cfg)
    assert record["max_steps"] == 120 and "base_model" not in record and "path" not in record["datasets"][0]
    assert yaml.safe_load(yaml.safe_dump(options)) == options


def test_recipe_yaml_for_a_text_model_without_packing_on_cosine(tmp_path):
    cfg = job(
        tmp_path,
        "Llama-3.2-1B-Instruct",
        packing=False,
        schedule="cosine",
        max_seq_len=1024,
        max_tokens_per_gpu=4096,
        device="cpu",
        activation_checkpointing=True,
    )
    options = axolotl.recipe_yaml(cfg, tmp_path / "input", tmp_path / "out")
    assert options["eot_tokens"] == ["<|eot_id|>"]
    assert options["sample_packing"] is False and options["micro_batch_size"] == 4 and options["sequence_len"] == 1024
    assert options["lr_scheduler"] == "cosine" and options["cosine_min_lr_ratio"] == 0.1
    assert "freeze_mm_modules" not in options  # a text-only model has no towers to freeze
    assert options["bf16"] is False and options["gradient_checkpointing"] is True


# ---------------------------------------------------------------- launch


def test_commands_prepare_the_checkpoint_then_launch_axolotl(tmp_path):
    cfg = job(tmp_path, stack_python="/envs/axolotl/bin/python", max_samples=5)
    Path(cfg.output_dir).mkdir(parents=True)
    prepare, launch = axolotl.commands(cfg, Topology(8, 2, 1, "node0:29500"), 3)
    assert prepare[:3] == [sys.executable, "-m", "harness.backends.stack_checkpoint"]
    work = axolotl.stack_dir(cfg)
    assert launch[:3] == ["env", "AXOLOTL_DO_NOT_TRACK=1", f"{axolotl.JOB_ENV}={Path(cfg.output_dir) / 'job.json'}"]
    assert launch[3:6] == ["/envs/axolotl/bin/python", "-m", "accelerate.commands.launch"]
    assert launch[-3:] == ["-m", "axolotl.cli.train", str(work / axolotl.CONFIG_FILE)]
    flags = dict(zip(launch[6:-3:2], launch[7:-3:2]))
    assert flags["--num_processes"] == "16" and flags["--num_machines"] == "2" and flags["--machine_rank"] == "1"
    assert flags["--main_process_ip"] == "node0" and flags["--main_process_port"] == "29503"
    assert "distributed_type: MULTI_GPU" in Path(flags["--config_file"]).read_text()
    written = yaml.safe_load((work / axolotl.CONFIG_FILE).read_text())
    assert written["output_dir"] == str(cfg.checkpoint_dir) and written["plugins"] == [axolotl.PLUGIN]
    lines = (work / axolotl.DATA_FILE).read_text().splitlines()
    assert len(lines) == 5 and "messages" in json.loads(lines[0])


def test_the_gate_side_imports_neither_torch_nor_axolotl():
    code = (
        "import sys, harness.backends.axolotl; "
        "print(sorted(m for m in ('torch', 'transformers', 'axolotl', 'harness.backends.axolotl_worker') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------- collect


def log_entry(step: int, loss: float, **extra) -> dict:
    return {
        "epoch": float(step),
        "grad_norm": 1.0 / step,
        "learning_rate": 1e-4,
        "loss": loss,
        "step": step,
        "tokens/total": 2000 * step,
        "tokens/trainable": 900 * step,
        "tokens/train_per_sec_per_gpu": 500.0,
        "memory/max_allocated (GiB)": 3.5,
        **extra,
    }


def fabricate_run(cfg: RunConfig, losses: list[float], architecture: str | None) -> None:
    """What axolotl and the harness's plugin leave: trainer_state.json, the saved model's config.json."""
    work = axolotl.stack_dir(cfg)
    work.mkdir(parents=True)
    history = [log_entry(i + 1, loss, elapsed_s=10.0 + i, step_time_s=1.0) for i, loss in enumerate(losses)]
    history.append({"epoch": float(len(losses)), "step": len(losses), "train_loss": 1.0, "train_runtime": 9.0})
    (work / axolotl.STATE_FILE).write_text(json.dumps({"global_step": len(losses), "log_history": history}))
    cfg.checkpoint_dir.mkdir(parents=True)
    if architecture:
        (cfg.checkpoint_dir / "config.json").write_text(json.dumps({"architectures": [architecture]}))


def test_collect_turns_the_trainer_state_into_metrics_and_the_record(tmp_path):
    cfg = job(tmp_path)
    losses = [6.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125]
    fabricate_run(cfg, losses, "Gemma3ForConditionalGeneration")
    outcome = JobOutcome(0, False, False, 12.0, Path(cfg.output_dir) / "train.log")
    report = axolotl.collect(cfg, outcome)  # no worker.json: the plugin never ran
    steps = read_metrics(cfg.metrics_path)
    assert [m.step for m in steps] == list(range(1, 8)) and [m.loss for m in steps] == losses
    first, second = steps[0], steps[1]
    assert first.tokens == 2000 and first.label_tokens == 900 and second.tokens == 2000
    assert second.grad_norm == 0.5 and second.lr == 1e-4 and second.epoch == 2
    assert second.tokens_per_s_per_gpu == 500.0 and second.peak_mem_allocated_gib == 3.5
    assert second.elapsed_s == 11.0 and second.step_time_s == 1.0
    record = report.backend
    assert report.steps == 7 and record.reported_final_loss == pytest.approx(sum(losses[-5:]) / 5)
    assert record.observed_class == "Gemma3ForConditionalGeneration"  # the saved config's architectures[0]
    assert record.observed_load_path == "direct_vlm_load"
    assert record.unmapped == axolotl.UNMAPPED and report.non_finite_step is None


def test_collect_keeps_the_plugins_record_and_names_a_crash(tmp_path):
    from harness.contract.records import BackendRecord, WorkerReport

    cfg = job(tmp_path)
    fabricate_run(cfg, [5.0, float("nan")], None)
    plugin = WorkerReport(
        rank=0,
        world_size=2,
        backend=BackendRecord(
            "axolotl", version="0.21.0", observed_class="Gemma3ForConditionalGeneration", observed_load_path="x"
        ),
    )
    plugin.to_json(cfg.worker_path)
    log = Path(cfg.output_dir) / "train.log"
    log.write_text(
        "[rank1]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 7.99 GiB\n"
        "subprocess.CalledProcessError: Command '...' returned non-zero exit status 1.\n"
    )
    report = axolotl.collect(cfg, JobOutcome(1, False, False, 5.0, log))
    assert report.status == "error" and report.error.startswith("OutOfMemoryError: CUDA out of memory")
    assert report.out_of_memory
    assert report.backend.observed_class == "Gemma3ForConditionalGeneration"
    assert report.backend.observed_load_path == "x"  # what the plugin saw is kept
    assert report.non_finite_step == 2
    assert read_metrics(cfg.metrics_path)[0].tokens_per_s == 1000.0  # per GPU x 2 ranks
