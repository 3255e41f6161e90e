"""Backends (harness.backends): each stack's probe against the harness's expectation, instructlab's
data conversion, the recipe mapping, the up-front refusals, and the verdict on what a stack saved
(no checkpoint, an unloadable one) — everything that needs no stack's training run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from gate_helpers import run_cli

from harness import backends
from harness.contract.errors import UsageError
from harness.contract.model_spec import ModelSpec
from harness.contract.records import RunConfig
from harness.gate import registry
from harness.models.configs import load_config
from harness.runtime.paths import DEFAULT_DATASET

# model -> the load path instructlab-training 0.16.2's own predicates choose (issue 16's table)
INSTRUCTLAB_PATHS = {
    "gemma-3-4b-it": "extract_causal_lm",
    "gemma-3n-E4B-it": "extract_causal_lm",
    "Ministral-3-3B-Instruct-2512": "extract_causal_lm",
    "Qwen3-VL-2B-Instruct": "direct_vlm_load",
    "Llama-3.2-1B-Instruct": "causal_lm",
    "Qwen3-4B-Instruct-2507": "causal_lm",
    "gemma-3-270m": "causal_lm",
}
# TRL 1.16 builds getattr(transformers, architectures[0]): the full VLM for every VLM checkpoint.
TRL_CLASSES = {
    "gemma-3-4b-it": ("Gemma3ForConditionalGeneration", "direct_vlm_load"),
    "Qwen3-VL-2B-Instruct": ("Qwen3VLForConditionalGeneration", "direct_vlm_load"),
    "Llama-3.2-1B-Instruct": ("LlamaForCausalLM", "causal_lm"),
}


@pytest.mark.parametrize("name", sorted(INSTRUCTLAB_PATHS))
def test_instructlab_probe_matches_its_own_predicates(name):
    pytest.importorskip("instructlab.training")
    spec = registry.lookup(name)
    probe = backends.backend("instructlab").probe(spec, load_config(spec))
    assert probe.load_path == INSTRUCTLAB_PATHS[name]
    assert probe.class_name and probe.backend == "instructlab"
    if spec.expected_load_path:  # since PR #695 instructlab agrees with the harness on every registry model
        assert probe.load_path == spec.expected_load_path


@pytest.mark.parametrize("name", sorted(TRL_CLASSES))
def test_trl_probe_names_the_class_trl_builds(name):
    spec = registry.lookup(name)
    probe = backends.backend("trl").probe(spec, load_config(spec))
    assert (probe.class_name, probe.load_path) == TRL_CLASSES[name]


def test_native_probe_is_the_harness_resolver():
    spec = registry.lookup("gemma-3-4b-it")
    probe = backends.backend("native").probe(spec, load_config(spec))
    assert (probe.class_name, probe.load_path) == ("Gemma3ForCausalLM", "extract_causal_lm")


def test_dry_run_records_the_probe_and_fails_a_stack_that_will_build_the_vlm(tmp_path):
    done = run_cli(
        "--models",
        "gemma-3-4b-it,Llama-3.2-1B-Instruct",
        "--backend",
        "trl",
        "--dry-run",
        "--output-dir",
        str(tmp_path),
    )
    assert done.returncode == 1, done.stderr
    results = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/*/result.json")}
    gemma, llama = results["gemma-3-4b-it"], results["Llama-3.2-1B-Instruct"]
    assert gemma["backend"]["probe"]["class_name"] == "Gemma3ForConditionalGeneration"
    assert gemma["verdict"] == "FAIL" and "trl will build Gemma3ForConditionalGeneration" in gemma["reasons"][0]
    assert "extract_causal_lm" in gemma["reasons"][0]
    assert llama["verdict"] == "PLANNED" and llama["backend"]["probe"]["load_path"] == "causal_lm"


def test_unknown_backend_is_one_line_with_a_suggestion(tmp_path):
    done = run_cli("--models", "gemma-3-270m", "--backend", "trll", "--dry-run", "--output-dir", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: unknown backend 'trll' Did you mean trl?; valid: native, trl, instructlab, axolotl"
    ]


def test_instructlab_on_cpu_is_refused_up_front(tmp_path):
    pytest.importorskip("instructlab.training")
    done = run_cli(
        "--models",
        "gemma-3-270m",
        "--backend",
        "instructlab",
        "--weights",
        "tiny",
        "--device",
        "cpu",
        "--output-dir",
        str(tmp_path),
        "--wandb-mode",
        "disabled",
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: --backend instructlab trains only on CUDA")
    assert not list(tmp_path.glob("*/*/train.log"))  # nothing started


def test_a_missing_extra_names_its_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    with pytest.raises(UsageError, match=r"pip install -e '\.\[trl\]'  \(trl==1\.16\.0\)"):
        backends.check_usable("trl", "cpu")


def test_registry_backend_key_is_checked(tmp_path, monkeypatch):
    bad = tmp_path / "gemma-3-270m.yaml"
    bad.write_text((registry.MODELS_DIR / "gemma-3-270m.yaml").read_text() + "backend: deepspeed\n")
    with pytest.raises(UsageError, match="backend 'deepspeed' is not one of"):
        registry.load_registry_spec(bad)


def test_backend_choice_cli_over_registry_over_native():
    from harness.gate.settings import backend_of

    spec = registry.lookup("gemma-3-270m")
    assert backend_of(spec, None) == "native"
    with_key = ModelSpec(**{**spec.to_dict(), "backend": "trl"})
    assert backend_of(with_key, None) == "trl"
    assert backend_of(with_key, "native") == "native"


def test_trl_recipe_maps_the_overfit_settings(tmp_path):
    pytest.importorskip("trl")
    from harness.backends.trl_worker import recipe_options

    cfg = RunConfig(
        model={},
        weights="synthetic",
        device="cuda",
        output_dir="/tmp/x",
        dataset="d",
        lr=3e-4,
        schedule="cosine",
        warmup_steps=10,
        max_steps=400,
        epochs=60,
        seed=3,
        max_tokens_per_gpu=8192,
    )
    options = recipe_options(cfg, world_size=8)
    assert options["learning_rate"] == 3e-4 and options["warmup_steps"] == 10 and options["seed"] == 3
    assert options["lr_scheduler_type"] == "cosine_with_min_lr" and options["lr_scheduler_kwargs"] == {
        "min_lr_rate": 0.1
    }
    assert options["max_length"] == 8192 and options["per_device_train_batch_size"] == 1 and options["packing"]
    assert options["assistant_only_loss"] and options["bf16"] and not options["use_cpu"]
    import trl

    # every option is one SFTConfig takes (bf16 needs a GPU to validate: the CPU form of the same recipe)
    trl.SFTConfig(
        **{**recipe_options(dataclasses.replace(cfg, device="cpu"), world_size=8), "output_dir": str(tmp_path)}
    )


def test_instructlab_steps_follow_the_step_budget():
    from harness.backends.instructlab import effective_batch_size, steps_for

    cfg = RunConfig(
        model={},
        weights="synthetic",
        device="cuda",
        output_dir="/tmp/x",
        dataset="d",
        max_tokens_per_gpu=8192,
        max_steps=400,
        epochs=60,
    )
    batch = effective_batch_size([100] * 1000, world_size=1, cfg=cfg)
    assert batch == 82  # ~8192 tokens a step at 100 tokens a sample
    assert steps_for(1000, batch, cfg) == (13, 31)  # 31 epochs of 13 steps: the fewest reaching 400 steps
    assert steps_for(1000, 1000, cfg) == (1, 60)  # capped by the recipe's epochs


def test_instructlab_data_conversion_on_the_overfit_set(tmp_path):
    """instructlab's own process_data on the 1000-sample set, with the tiny Gemma 3 VLM checkpoint an
    external stack reads: every sample kept, labels only on assistant replies (not their end-of-turn
    marker: see below)."""
    pytest.importorskip("instructlab.training")
    from instructlab.training import data_process

    from harness.backends.stack_checkpoint import input_checkpoint

    spec = registry.lookup("gemma-3-4b-it")
    cfg = RunConfig(
        model=spec.to_dict(), weights="tiny", device="cpu", output_dir=str(tmp_path), dataset=str(DEFAULT_DATASET)
    )
    folder = input_checkpoint(cfg)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["Gemma3ForConditionalGeneration"]
    data_process.process_data(
        data_path=str(DEFAULT_DATASET),
        data_output_path=str(tmp_path / "data"),
        max_seq_len=2048,
        model_path=str(folder),
        num_cpu_procs=1,
    )
    rows = [json.loads(line) for line in (tmp_path / "data" / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 1000
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    conversations = [json.loads(line)["messages"] for line in DEFAULT_DATASET.read_text().splitlines()]
    for row, messages in zip(rows[:50], conversations):
        assert row["len"] == len(row["input_ids"]) == len(row["labels"])
        labelled = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
        for reply in (m["content"] for m in messages if m["role"] == "assistant"):
            assert reply.strip() in labelled
        assert "<start_of_turn>" not in labelled and "user" not in labelled.split(reply.strip())[-1]
        # Seen in 0.16.2: the end-of-turn marker after a reply is NOT labelled (its unmask spans cover the
        # reply only), so the stack never trains the model to stop; the generation check is what notices.
        assert "<end_of_turn>" not in labelled


# ---------------------------------------------------------------- the verdict on what a stack saved


def stack_job_config(tmp_path: Path, name: str, backend: str, max_samples: int) -> RunConfig:
    """A tiny CPU job of `backend` on the registry's model `name`, over the default dataset."""
    return RunConfig(
        model=registry.lookup(name).to_dict(),
        weights="tiny",
        device="cpu",
        output_dir=str(tmp_path),
        dataset=str(DEFAULT_DATASET),
        max_samples=max_samples,
        backend=backend,
    )


def finished_stack_job(tmp_path: Path, name: str = "Llama-3.2-1B-Instruct") -> tuple[RunConfig, object]:
    """A model folder as a TRL job that 'succeeded' leaves it: a finished report and converged losses."""
    from harness.contract.records import BackendRecord, MetricsWriter, StepMetrics, WorkerReport

    cfg = stack_job_config(tmp_path, name, "trl", max_samples=16)
    cfg.to_json(tmp_path / "job.json")
    report = WorkerReport(
        status="finished",
        world_size=1,
        vocab_size=1030,
        stop_reason="target_reached",
        backend=BackendRecord(
            "trl", observed_class="LlamaForCausalLM", observed_load_path="causal_lm", reported_final_loss=0.01
        ),
    )
    writer = MetricsWriter(cfg.metrics_path, enabled=True)
    for step, loss in enumerate([6.9, 3.0, 0.5, 0.02, 0.01, 0.01, 0.01, 0.01], start=1):
        writer.write(StepMetrics(step=step, loss=loss, grad_norm=1.0, lr=1e-3))
    return cfg, report


def judged(cfg, report):
    from harness.gate.planning import PlannedModel
    from harness.gate.settings import RunSettings
    from harness.gate.sweep import check_saved_checkpoint, collect_result
    from harness.models.plan import resolve_load_path
    from harness.runtime.launch import JobOutcome, Topology

    spec = cfg.spec
    planned = PlannedModel(spec, resolve_load_path(load_config(spec)), "trl")
    settings = RunSettings(
        weights="tiny", device="cpu", dataset=DEFAULT_DATASET, packing=True, nproc_per_node=1, timeout_per_model=300
    )
    check_saved_checkpoint(cfg, report, settings)
    outcome = JobOutcome(0, False, False, 1.0, Path(cfg.output_dir) / "train.log")
    return collect_result(planned, cfg, outcome, report, Topology(1))


def test_a_stack_that_exits_0_without_a_checkpoint_fails(tmp_path):
    cfg, report = finished_stack_job(tmp_path)
    result = judged(cfg, report)
    assert result.verdict == "FAIL"
    assert any("could not be evaluated by the harness" in r and "no checkpoint was saved" in r for r in result.reasons)
    assert result.backend.not_available  # the checks only the native trainer can make are listed, not passed


def test_a_checkpoint_the_harness_cannot_load_fails(tmp_path):
    from harness.models.weights import tiny_checkpoint

    cfg, report = finished_stack_job(tmp_path)
    cfg.checkpoint_dir.mkdir()
    source = tiny_checkpoint(cfg.spec)
    (cfg.checkpoint_dir / "config.json").write_text((source / "config.json").read_text())
    (cfg.checkpoint_dir / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    result = judged(cfg, report)
    assert result.verdict == "FAIL"
    assert any("could not be evaluated by the harness" in r for r in result.reasons), result.reasons


def test_an_untrained_checkpoint_fails_however_low_the_stack_says_its_loss_was(tmp_path):
    """The stack's own loss never decides: it claims 0.01, the harness evaluates the (untrained) saved model."""
    import shutil

    from harness.models.weights import tiny_checkpoint

    cfg, report = finished_stack_job(tmp_path)
    shutil.copytree(tiny_checkpoint(cfg.spec), cfg.checkpoint_dir)
    result = judged(cfg, report)
    assert result.verdict == "FAIL"
    assert result.evaluation.loss > 3  # random weights, evaluated by the harness
    assert any("reported a final loss of 0.0100 but the harness's evaluation" in r for r in result.reasons)
    assert any("final loss" in r for r in result.reasons)


def test_a_vlm_saved_in_the_classes_layout_is_evaluated_against_an_input_in_the_hub_layout(tmp_path):
    """A stack that saves its model's state dict writes the classes' names (`model.vision_tower.*`,
    `model.language_model.*`) where the input checkpoint has the hub's (`vision_tower.*`,
    `language_model.model.*`): the towers are matched through transformers' renames, unchanged towers
    pass, a changed one is named, and the saved model is evaluated."""
    import shutil

    from safetensors.torch import load_file, save_file

    from harness.backends.checkpoint_eval import changed_towers, evaluate_checkpoint
    from harness.contract.records import CheckpointCheck
    from harness.models.weights import tiny_checkpoint

    spec = registry.lookup("gemma-3-4b-it")
    given = tiny_checkpoint(spec)
    saved = tmp_path / "saved"
    shutil.copytree(given, saved)
    layout = {
        "language_model.model.": "model.language_model.",
        "language_model.lm_head.": "lm_head.",
        "vision_tower.": "model.vision_tower.",
        "multi_modal_projector.": "model.multi_modal_projector.",
    }
    for file in saved.glob("*.safetensors"):
        tensors = load_file(file)
        renamed = {}
        for key, tensor in tensors.items():
            old = next((prefix for prefix in layout if key.startswith(prefix)), None)
            renamed[layout[old] + key[len(old) :] if old else key] = tensor
        save_file(renamed, file, metadata={"format": "pt"})
    index = saved / "model.safetensors.index.json"
    if index.exists():
        index.unlink()  # one file: read without the index
    assert "model.vision_tower.post_layernorm.weight" in load_file(next(saved.glob("*.safetensors")))

    assert changed_towers(given, saved) == []
    cfg = stack_job_config(tmp_path, "gemma-3-4b-it", "instructlab", max_samples=8)
    check = CheckpointCheck(folder=str(saved))
    evaluate_checkpoint(cfg, saved, check, input_checkpoint=given)
    assert check.towers_changed == [] and check.saved_class == "Gemma3ForConditionalGeneration"
    assert check.load_record.load_path == "extract_causal_lm" and check.load_record.params["loaded"] > 0
    assert check.evaluation.samples == 8 and check.generation.samples > 0

    file = next(saved.glob("*.safetensors"))
    tensors = load_file(file)
    tensors["model.vision_tower.post_layernorm.weight"] += 1.0
    save_file(tensors, file, metadata={"format": "pt"})
    assert changed_towers(given, saved) == ["model.vision_tower.post_layernorm.weight"]


@pytest.mark.slow
def test_native_checkpoint_evaluation_equals_the_in_job_evaluation(tmp_path):
    """The evaluator cross-check: the native trainer saves its model (FSDP2, 2 ranks, gathered to
    rank 0); the harness's evaluation of that checkpoint, in its own process, must equal the job's
    own full-dataset evaluation of the same weights (fp32 on CPU: within 1e-4 relative)."""
    done = run_cli(
        "--models",
        "gemma-3-4b-it",
        "--weights",
        "tiny",
        "--device",
        "cpu",
        "--nproc-per-node",
        "2",
        "--max-samples",
        "16",
        "--max-steps",
        "6",
        "--save-checkpoint",
        "--output-dir",
        str(tmp_path),
        "--wandb-mode",
        "disabled",
    )
    (result_path,) = tmp_path.glob("*/gemma-3-4b-it/result.json")
    result = json.loads(result_path.read_text())
    check = result["backend"]["checkpoint"]
    assert check["error"] is None, check
    assert check["saved_class"] == "Gemma3ForCausalLM"  # the extracted text model, saved as such
    assert check["load_record"]["load_path"] == "causal_lm"
    in_job, saved = result["evaluation"], check["evaluation"]
    assert saved["samples"] == in_job["samples"] == 16 and saved["label_tokens"] == in_job["label_tokens"]
    assert saved["loss"] == pytest.approx(in_job["loss"], rel=1e-4), (saved, in_job, done.stdout[-2000:])
    assert saved["worst_sample_index"] == in_job["worst_sample_index"]
    # the FLOPs an external stack's MFU is counted with are the native trainer's for the same model
    worker = json.loads((result_path.parent / "worker.json").read_text())
    assert check["flops_per_token"] == pytest.approx(worker["flops_per_token"], rel=1e-9)


def test_an_external_stack_s_mfu_is_its_speed_times_the_saved_model_s_flops():
    """MFU for TRL and instructlab: their tokens/s per GPU (steady steps, the first left out) x the
    FLOPs per token the harness counted on the checkpoint they saved / the GPU's datasheet peak."""
    from harness.contract.records import BackendRecord, CheckpointCheck, StepMetrics, WorkerReport
    from harness.gate.sweep import stack_mfu

    metrics = [
        StepMetrics(step=1, loss=9.0, tokens_per_s_per_gpu=10.0),
        StepMetrics(step=2, loss=5.0, tokens_per_s_per_gpu=4000.0),
        StepMetrics(step=3, loss=3.0, tokens_per_s_per_gpu=6000.0),
    ]
    backend = BackendRecord("trl", checkpoint=CheckpointCheck(folder="x", flops_per_token=2.5e10))
    report = WorkerReport(gpu="NVIDIA H200", backend=backend)
    assert stack_mfu(report, metrics) == pytest.approx(5000.0 * 2.5e10 / 989e12)
    assert stack_mfu(WorkerReport(gpu=None, backend=backend), metrics) is None  # CPU: no peak to divide by
    no_checkpoint = WorkerReport(gpu="NVIDIA H200", backend=BackendRecord("trl"))
    assert stack_mfu(no_checkpoint, metrics) is None


def test_instructlab_collect_reads_what_the_stack_writes(tmp_path):
    """instructlab's files as 0.16.2 writes them (its metrics JSONL after a hyper-parameter line, each lr
    the next step's; its log line for the extraction path wrapped by rich at 80 columns, as seen on an
    H200, so unreadable; hf_format/last_epoch holding the text config, which names no architecture) ->
    metrics.jsonl with each step's own lr, the load path and class from the saved checkpoint, the
    vocabulary, the checkpoint moved where the harness evaluates it."""
    import shutil

    from harness.backends import instructlab
    from harness.backends.stack_checkpoint import input_checkpoint
    from harness.contract.records import WorkerReport, read_metrics
    from harness.runtime.launch import JobOutcome

    spec = registry.lookup("gemma-3-4b-it")
    cfg = RunConfig(
        model=spec.to_dict(),
        weights="tiny",
        device="cuda",
        output_dir=str(tmp_path),
        dataset=str(DEFAULT_DATASET),
        backend="instructlab",
    )
    input_checkpoint(cfg)
    WorkerReport(status="finished", world_size=1).to_json(cfg.worker_path)
    ckpt = instructlab.stack_dir(cfg) / "ckpt"
    lines = [{"script_params": {"learning_rate": 3e-3}}]
    lines += [
        {
            "epoch": 0,
            "step": s,
            "rank": 0,
            "lr": lr,
            "avg_loss": loss,
            "gradnorm": 1.5,
            "num_tokens_rank0": 900,
            "num_loss_counted_tokens": 300,
            "cuda_mem_allocated": 1.2,
            "overall_throughput": 8.0,
            "batch_size": 4,
        }
        for s, loss, lr in [(1, 6.9, 1e-3), (2, 4.0, 2e-3), (3, 1.0, 0.0)]
    ]
    ckpt.mkdir(parents=True)
    (ckpt / instructlab.METRICS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    wrapped = instructlab.EXTRACT_LINE.replace(" to ", " to      vlm_utils.py:327\n                    ")
    (ckpt / "full_logs_global0.log").write_text(f"[12:22:41] INFO     VLM config detected — {wrapped}\n")
    text_model = tmp_path / "text"
    from harness.models.loading import load_model

    extracted = load_model(spec, "tiny").model  # what extraction saves: Gemma3ForCausalLM, text config
    extracted.config.architectures = None
    extracted.save_pretrained(text_model)
    shutil.move(str(text_model), str(ckpt / "hf_format" / "last_epoch"))
    log = tmp_path / "train.log"
    log.write_text("")
    report = instructlab.collect(cfg, JobOutcome(0, False, False, 1.0, log))
    assert [(m.step, m.loss, m.grad_norm, m.tokens, m.label_tokens, m.lr) for m in read_metrics(cfg.metrics_path)] == [
        (1, 6.9, 1.5, 900, 300, None),
        (2, 4.0, 1.5, 900, 300, 1e-3),
        (3, 1.0, 1.5, 900, 300, 2e-3),
    ]
    # 4 samples at 8 samples/s: a 0.5 s step of 900 tokens (instructlab sums them over ranks)
    assert {(m.step_time_s, m.tokens_per_s_per_gpu) for m in read_metrics(cfg.metrics_path)} == {(0.5, 1800.0)}
    two_ranks = instructlab.read_stack_metrics(ckpt / instructlab.METRICS_FILE, world_size=2)
    assert {(m.tokens, m.tokens_per_s, m.tokens_per_s_per_gpu) for m in two_ranks} == {(900, 1800.0, 900.0)}
    assert report.vocab_size == spec_vocab(cfg)
    assert report.backend.observed_load_path == "extract_causal_lm"
    assert report.backend.observed_class == "Gemma3ForCausalLM"
    assert report.backend.towers.params == 0
    assert (cfg.checkpoint_dir / "config.json").exists()
    assert report.backend.reported_final_loss == pytest.approx((6.9 + 4.0 + 1.0) / 3)


def spec_vocab(cfg: RunConfig) -> int:
    from transformers import AutoConfig

    from harness.backends.stack_checkpoint import input_checkpoint_path

    return AutoConfig.from_pretrained(input_checkpoint_path(cfg)).text_config.vocab_size


def test_instructlab_arguments_are_ones_its_pydantic_models_take(tmp_path):
    pytest.importorskip("instructlab.training")
    import instructlab.training

    from harness.backends.instructlab_worker import arguments
    from harness.runtime.launch import Topology

    cfg = RunConfig(
        model={},
        weights="synthetic",
        device="cuda",
        output_dir=str(tmp_path),
        dataset="d",
        lr=3e-4,
        warmup_steps=10,
        seed=7,
        max_tokens_per_gpu=8192,
        max_seq_len=2048,
    )
    train_args, torch_args = arguments(
        cfg,
        tmp_path / "in",
        tmp_path / "work",
        batch=82,
        epochs=31,
        topology=Topology(8, 2, 1, "node0:29500"),
        job_index=3,
    )
    parsed = instructlab.training.TrainingArgs(**train_args)
    assert (parsed.learning_rate, parsed.warmup_steps, parsed.random_seed, parsed.num_epochs) == (3e-4, 10, 7, 31)
    assert (parsed.max_batch_len, parsed.effective_batch_size, parsed.process_data) == (8192, 82, False)
    assert parsed.keep_last_checkpoint_only and parsed.checkpoint_at_epoch and parsed.disable_flash_attn
    run = instructlab.training.TorchrunArgs(**torch_args)
    assert (run.nproc_per_node, run.nnodes, run.node_rank, run.master_addr, run.master_port) == (
        8,
        2,
        1,
        "node0",
        29503,
    )
    # instructlab refuses max_batch_len < max_seq_len (seen on an H200 with the tiny models' 1024-token budget)
    small = RunConfig(
        model={},
        weights="tiny",
        device="cuda",
        output_dir=str(tmp_path),
        dataset="d",
        max_tokens_per_gpu=1024,
        max_seq_len=2048,
    )
    train_args, _ = arguments(
        small,
        tmp_path / "in",
        tmp_path / "work",
        batch=4,
        epochs=3,
        topology=Topology(1, 1, 0, "localhost:29500"),
        job_index=0,
    )
    assert instructlab.training.TrainingArgs(**train_args).max_batch_len == 2048


def test_trl_on_gpu_is_accelerate_launch_with_an_fsdp2_config(tmp_path):
    import yaml

    from harness.backends import trl as trl_backend
    from harness.runtime.launch import Topology, launcher_name

    cfg = RunConfig(model={}, weights="synthetic", device="cuda", output_dir=str(tmp_path), dataset="d")
    prepare, launch = trl_backend.commands(cfg, Topology(8, 2, 1, "node0:29500"), job_index=2)
    assert prepare[-3:] == ["harness.backends.stack_checkpoint", "--job", str(tmp_path / "job.json")]
    assert launcher_name(launch) == "accelerate launch"
    flags = dict(zip(launch[3::2], launch[4::2]))
    assert (flags["--num_processes"], flags["--num_machines"], flags["--machine_rank"]) == ("16", "2", "1")
    assert (flags["--main_process_ip"], flags["--main_process_port"]) == ("node0", "29502")
    settings = yaml.safe_load((tmp_path / trl_backend.ACCELERATE_CONFIG).read_text())
    assert settings["distributed_type"] == "FSDP" and settings["fsdp_config"]["fsdp_version"] == 2
    assert settings["fsdp_config"]["fsdp_reshard_after_forward"] is True  # 16 ranks
    assert launch[-3:] == ["harness.backends.trl_worker", "--job", str(tmp_path / "job.json")]


def test_trl_crashing_in_its_constructor_still_records_the_class_it_built(tmp_path, monkeypatch):
    """As seen on an H200: a checkpoint whose chat template lacks {% generation %} markers makes
    SFTTrainer's constructor raise (assistant-only loss), after TRL built the model; the report
    still names the class, its towers and the error."""
    pytest.importorskip("trl")
    from harness.backends import stack_checkpoint, trl_worker
    from harness.contract.records import read_worker_report
    from harness.models.loading import load_model, tokenizer_for

    spec = registry.lookup("Llama-3.2-1B-Instruct")
    folder = tmp_path / "input"
    load_model(spec, "tiny").model.save_pretrained(folder)
    tokenizer = tokenizer_for(spec, "tiny")
    tokenizer.chat_template = tokenizer.chat_template.replace("{%- generation -%}", "").replace(
        "{%- endgeneration -%}", ""
    )
    tokenizer.save_pretrained(folder)
    monkeypatch.setattr(stack_checkpoint, "input_checkpoint_path", lambda cfg: folder)
    cfg = RunConfig(
        model=spec.to_dict(),
        weights="tiny",
        device="cpu",
        output_dir=str(tmp_path / "run"),
        dataset=str(DEFAULT_DATASET),
        backend="trl",
        max_samples=8,
    )
    Path(cfg.output_dir).mkdir()
    cfg.to_json(tmp_path / "run" / "job.json")
    assert trl_worker.main(["--job", str(tmp_path / "run" / "job.json")]) == 1
    report = read_worker_report(cfg)
    assert report.status == "error" and "chat template" in report.error
    assert (report.backend.observed_class, report.backend.observed_load_path) == ("LlamaForCausalLM", "causal_lm")
    assert report.backend.towers.params == 0 and report.vocab_size == load_model(spec, "tiny").model.config.vocab_size


def test_instructlab_saves_the_final_model_only(monkeypatch):
    """Its training script is started with --save_last in place of --checkpoint_at_epoch (one save of the
    model the verdict reads, not one per epoch), through the seam the installed version has."""
    pytest.importorskip("instructlab.training")
    import inspect

    import instructlab.training.main_ds as main_ds

    from harness.backends.instructlab_worker import final_save_only

    assert "StreamablePopen(" in inspect.getsource(main_ds.run_training)  # how run_training starts the script
    assert '"--save_last"' in inspect.getsource(main_ds)  # the script takes it
    started = []
    monkeypatch.setattr(main_ds, "StreamablePopen", lambda log, command: started.append(command) or "process")
    recorder = main_ds.StreamablePopen
    given = ["torchrun", "main_ds.py", "--num_epochs=20", "--keep_last_checkpoint_only", "--checkpoint_at_epoch"]
    with final_save_only():
        assert main_ds.StreamablePopen("full_logs_global0.log", given) == "process"
    assert started == [["torchrun", "main_ds.py", "--num_epochs=20", "--keep_last_checkpoint_only", "--save_last"]]
    assert main_ds.StreamablePopen is recorder  # put back


def test_instructlab_progress_lines_follow_its_metrics_file(tmp_path, capsys):
    """instructlab's per-step JSONL, read as it grows (a line half written is left for the next read),
    becomes the harness's progress lines: what the sweep's status display shows."""
    from harness.backends.instructlab_worker import print_new_steps

    path = tmp_path / "metrics.jsonl"
    path.write_text(
        json.dumps({"script_params": {}})
        + "\n"
        + json.dumps({"step": 1, "avg_loss": 6.9})
        + "\n"
        + json.dumps({"step": 2, "avg_loss": 5.25})
        + "\n"
        + '{"step": 3, "avg_'
    )
    offset = print_new_steps(path, 0, planned_steps=40, every=2)
    assert capsys.readouterr().out == "[progress] step 2 (budget 40) loss 5.2500\n"
    with path.open("a") as handle:
        handle.write('loss": 4.0}\n' + json.dumps({"step": 4, "avg_loss": 3.5}) + "\n")
    print_new_steps(path, offset, planned_steps=40, every=2)
    assert capsys.readouterr().out == "[progress] step 4 (budget 40) loss 3.5000\n"


def test_instructlab_failure_names_the_rank_s_own_exception(tmp_path):
    """run_training says only "Suffered a failure during distributed training"; the reason must say what
    the rank raised. The lines are those of instructlab x gemma-3n-E4B-it on one H200 (out of memory)."""
    from harness.backends.instructlab_worker import first_rank_error

    log = tmp_path / "full_logs_global0.log"
    log.write_text(
        "[rank0]:W1202 18:39:28.113000 1876 torch/distributed/fsdp/_flat_param.py:500] UserWarning: FSDP upcast\n"
        "Epoch 0:   9%|         | 1/11 [00:11<01:51, 11.15s/it][rank0]: Traceback (most recent call last):\n"
        '[rank0]:   File "/tmp/site/instructlab/training/main_ds.py", line 1410, in <module>\n'
        "[rank0]:     logits = logits.float()\n"
        "[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 7.99 GiB. GPU 0 has a total "
        "capacity of 139.80 GiB of which 6.59 GiB is free.\n"
        "[rank1]: torch.distributed.DistBackendError: NCCL communicator was aborted\n"
        "RuntimeError: Suffered a failure during distributed training. Please see the training logs\n"
    )
    assert first_rank_error(log) == (
        "rank 0: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 7.99 GiB. "
        "GPU 0 has a total capacity of 139.80 GiB of which 6.59 GiB is free."
    )
    log.write_text("RuntimeError: Suffered a failure during distributed training.\n")
    assert first_rank_error(log) is None  # nothing a rank said: run_training's own error stands
    assert first_rank_error(tmp_path / "absent.log") is None
