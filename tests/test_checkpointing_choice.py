"""The auto choice of activation checkpointing from the memory estimate (full-size models on meta)."""

from __future__ import annotations

import pytest

from harness.contract.records import RunConfig, WorkerReport, read_worker_report
from harness.gate import registry
from harness.models import loading, plan

H200_BYTES = 143771 * 2**20


def estimate(name: str, world: int, tokens: int) -> float:
    lm = loading.load_model(registry.lookup(name), "synthetic", on_meta=True).model
    n_params = sum(p.numel() for p in lm.parameters())
    return plan.estimated_training_bytes(
        lm.config.get_text_config(decoder=True), n_params, world, tokens, checkpointing=False
    )


@pytest.mark.parametrize(
    "name,world,tokens,needs_checkpointing",
    [
        # measured on H200: gemma-3-4b-it without checkpointing peaked at 116.2 GiB on 1 GPU at 8k tokens
        ("gemma-3-4b-it", 1, 8192, False),
        ("gemma-3-4b-it", 2, 8192, False),
        ("gemma-3-4b-it", 1, 16384, True),
        # measured: gemma-3n-E4B-it without checkpointing ran out of memory on 4x H200 at 8k tokens
        ("gemma-3n-E4B-it", 4, 8192, True),
        ("gemma-3n-E4B-it", 1, 4096, True),
    ],
)
def test_checkpointing_where_memory_needs_it(name, world, tokens, needs_checkpointing):
    assert (estimate(name, world, tokens) > plan.MEMORY_HEADROOM * H200_BYTES) == needs_checkpointing


def test_an_80_gib_card_checkpoints_the_4b_and_warns_that_3n_needs_two():
    """--gpu-memory-gib 80: gemma-3-4b-it switches checkpointing on and fits (61.7 GiB measured on an
    H200 with it); gemma-3n-E4B-it does not fit one 80 GiB GPU even with it (its fp32 states alone
    are ~102 GiB), which the log says, and fits two."""
    cap = 80 * 2**30

    def plan_for(name, world):
        lm = loading.load_model(registry.lookup(name), "synthetic", on_meta=True).model
        n_params, text = sum(p.numel() for p in lm.parameters()), lm.config.get_text_config(decoder=True)
        use_ac = plan.wants_activation_checkpointing(None, n_params, text, world, 8192, cap)
        return use_ac, plan.memory_warning(text, n_params, world, 8192, use_ac, cap)

    assert plan_for("gemma-3-4b-it", 1) == (True, None)
    use_ac, warning = plan_for("gemma-3n-E4B-it", 1)
    assert use_ac and "> 80.0 GiB: expect out-of-memory" in warning
    assert plan_for("gemma-3n-E4B-it", 2) == (True, None)


def test_the_memory_cap_reaches_the_run_settings_and_is_nothing_on_cpu():
    from harness.gate import options
    from harness.job import distributed

    assert options.parse(["--models", "x", "--gpu-memory-gib", "80"]).training["gpu_memory_gib"] == 80.0
    import torch

    assert distributed.cap_gpu_memory(torch.device("cpu"), 80.0) is None


@pytest.mark.gpu
def test_the_cap_limits_allocations_on_a_gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from harness.job import distributed

    device = torch.device("cuda", 0)
    assert distributed.cap_gpu_memory(device, 1.0) == 2**30
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    distributed.cap_gpu_memory(device, None)  # the GPU's own size again for the rest of the session
    torch.cuda.set_per_process_memory_fraction(1.0, device)


def test_estimate_grows_with_tokens_and_shrinks_with_ranks():
    assert estimate("gemma-3-4b-it", 1, 8192) > estimate("gemma-3-4b-it", 1, 4096) > estimate("gemma-3-4b-it", 2, 4096)


@pytest.mark.parametrize(
    "asked,chosen,error,retry",
    [
        (None, False, "OutOfMemoryError: CUDA out of memory", True),  # auto chose off and ran out: retry
        (False, False, "OutOfMemoryError: CUDA out of memory", False),  # the user asked for off: their call
        (None, True, "OutOfMemoryError: CUDA out of memory", False),  # already on: nothing to gain
        (None, False, "RuntimeError: something else", False),
        (None, False, None, False),
    ],
)
def test_out_of_memory_retry_only_after_an_auto_off_choice(tmp_path, asked, chosen, error, retry):
    from harness.gate.sweep import out_of_memory_without_checkpointing

    cfg = RunConfig(
        model=registry.lookup("gemma-3-4b-it").to_dict(),
        weights="synthetic",
        device="cuda",
        output_dir=str(tmp_path),
        dataset="unused.jsonl",
        activation_checkpointing=asked,
    )
    WorkerReport(status="error" if error else "finished", error=error, activation_checkpointing=chosen).to_json(
        cfg.worker_path
    )
    assert bool(out_of_memory_without_checkpointing(cfg, read_worker_report(cfg))) == retry


def test_out_of_memory_of_another_rank_is_read_from_its_report(tmp_path):
    """Rank 1 ran out first: torchrun ended rank 0 before it wrote worker.json; rank 1 left its own."""
    from harness.gate.sweep import out_of_memory_without_checkpointing

    cfg = RunConfig(
        model=registry.lookup("gemma-3-4b-it").to_dict(),
        weights="synthetic",
        device="cuda",
        output_dir=str(tmp_path),
        dataset="unused.jsonl",
    )
    WorkerReport(
        status="error", rank=1, error="OutOfMemoryError: CUDA out of memory.", activation_checkpointing=False
    ).to_json(cfg.rank_error_path(1))
    assert "CUDA out of memory" in out_of_memory_without_checkpointing(cfg, read_worker_report(cfg))
    WorkerReport(
        status="error", rank=1, error="OutOfMemoryError: CUDA out of memory.", activation_checkpointing=True
    ).to_json(cfg.rank_error_path(1))
    assert out_of_memory_without_checkpointing(cfg, read_worker_report(cfg)) is None


H100_BYTES = 81559 * 2**20  # what an "80 GB" H100 reports


def card_config(name: str):
    from pathlib import Path

    from harness.gate.settings import RunSettings, run_config_for
    from harness.runtime.paths import DEFAULT_DATASET

    settings = RunSettings(weights="synthetic", device="cuda", dataset=DEFAULT_DATASET, packing=True, nproc_per_node=1)
    return run_config_for(registry.lookup(name), settings, Path("unused"))


def test_a_model_no_plan_fits_on_these_gpus_is_refused_with_the_count_that_fits():
    """gemma-3n-E4B-it on one 80 GB H100 ran out of memory in its first steps (a healthy model failed):
    the plan refuses it up front and names the GPU count that fits; gemma-3-4b-it (63.7 GiB measured
    with checkpointing under an 80 GiB cap) and gemma-3n on two such GPUs run."""
    from harness.job.caches import capacity_refusal

    refusal = capacity_refusal(card_config("gemma-3n-E4B-it"), 1, H100_BYTES)
    assert refusal is not None and refusal.startswith("not run: it needs an estimated 122 GiB per GPU on 1 GPU(s)")
    assert "activation checkpointing on" in refusal and "2 such GPUs would fit it" in refusal
    assert capacity_refusal(card_config("gemma-3n-E4B-it"), 2, H100_BYTES) is None
    assert capacity_refusal(card_config("gemma-3-4b-it"), 1, H100_BYTES) is None


def test_a_refused_model_is_not_run_and_no_job_starts(tmp_path):
    from harness.gate.planning import PlannedModel
    from harness.gate.settings import RunSettings
    from harness.gate.sweep import SweepContext, run_sweep
    from harness.models.configs import load_config
    from harness.models.plan import resolve_load_path
    from harness.runtime.paths import DEFAULT_DATASET

    spec = registry.lookup("gemma-3n-E4B-it")
    why = "not run: it needs an estimated 122 GiB per GPU on 1 GPU(s) of 80 GiB"
    planned = PlannedModel(spec, resolve_load_path(load_config(spec)), "native", refusal=why)
    settings = RunSettings(weights="synthetic", device="cuda", dataset=DEFAULT_DATASET, packing=True, nproc_per_node=1)
    swept = run_sweep([planned], SweepContext(settings, tmp_path, 0.0))
    [result] = swept.results
    assert result.verdict == "NOT RUN" and result.reasons == [why] and swept.stop is None
    assert (tmp_path / spec.folder_name / "result.json").exists()
    assert (
        not (tmp_path / spec.folder_name / "train.log").exists()
        and not (tmp_path / spec.folder_name / "job.json").exists()
    )


def test_the_gate_asks_for_the_fit_of_native_full_size_jobs_on_the_gpus_it_sees(monkeypatch):
    """cli.gpu_fit_refusal: the visible GPU's memory, capped by --gpu-memory-gib, over every rank of every
    node; tiny weights and other stacks are not planned by the native trainer's estimate."""
    import dataclasses
    import types

    import torch

    from harness.gate import cli
    from harness.gate.planning import PlannedModel
    from harness.gate.settings import RunSettings
    from harness.runtime.paths import DEFAULT_DATASET

    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(total_memory=H200_BYTES)
    )
    spec = registry.lookup("gemma-3n-E4B-it")
    item = PlannedModel(spec, None, "native")
    settings = RunSettings(weights="synthetic", device="cuda", dataset=DEFAULT_DATASET, packing=True, nproc_per_node=1)
    cfg = card_config("gemma-3n-E4B-it")
    assert cli.gpu_fit_refusal(item, cfg, settings) is None  # 122 GiB estimated, 140 GiB seen
    capped = dataclasses.replace(cfg, gpu_memory_gib=80.0)
    assert "2 such GPUs would fit it" in cli.gpu_fit_refusal(item, capped, settings)
    assert cli.gpu_fit_refusal(item, capped, dataclasses.replace(settings, nnodes=2)) is None  # 2 ranks in all
    assert cli.gpu_fit_refusal(item, capped, dataclasses.replace(settings, weights="tiny")) is None
    assert cli.gpu_fit_refusal(dataclasses.replace(item, backend="trl"), capped, settings) is None
