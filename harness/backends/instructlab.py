"""instructlab-training (the stack whose Gemma 3 fix, PR #695, started this project): its own
`run_training`, which processes the data and starts torchrun itself (FSDP through accelerate). CUDA
only: its main() sets a CUDA device at once. The probe calls the stack's own predicates
(instructlab.training.vlm_utils) on the model's config, so --dry-run says what 0.16.2 will do.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

from harness.backends import BackendTraits, Requirement, observed_load_path
from harness.contract.records import (
    BackendProbe,
    BackendRecord,
    RunConfig,
    StepMetrics,
    TowerCounts,
    WorkerReport,
    final_loss,
    read_worker_report,
    replace_metrics,
)
from harness.runtime.launch import JobOutcome, Topology

REQUIREMENT = Requirement(
    module="instructlab.training", distribution="instructlab-training", version="0.16.2", extra="instructlab"
)
TRAITS = BackendTraits(requirement=REQUIREMENT, cuda_only=True)
WORKER = "harness.backends.instructlab_worker"
RULE = (
    "instructlab.training.model.CausalLMModel: vlm_utils.is_vlm_with_causal_lm -> extract_causal_lm_from_vlm; "
    "is_vlm_for_direct_loading -> load_vlm_for_text_training; else AutoModelForCausalLM"
)
# What its log says when it takes a VLM path (vlm_utils.py); nothing is said for a plain causal LM.
EXTRACT_LINE = "loading full VLM to extract CausalLM text backbone"
DIRECT_LINE = "loading VLM directly for text-only training"
METRICS_FILE = "training_params_and_metrics_global0.jsonl"


def stack_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / "instructlab"


def probe(spec, config) -> BackendProbe:
    """instructlab's own predicates, on a folder holding just this config.json."""
    from instructlab.training import vlm_utils

    from harness.models.mappings import CAUSAL_LM, IMAGE_TEXT_TO_TEXT

    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        if vlm_utils.is_vlm_with_causal_lm(folder):
            text_type = config.get_text_config(decoder=True).model_type
            class_name, path = CAUSAL_LM.get(text_type), "extract_causal_lm"
        elif vlm_utils.is_vlm_for_direct_loading(folder):
            class_name, path = IMAGE_TEXT_TO_TEXT.get(config.model_type), "direct_vlm_load"
        else:
            class_name, path = CAUSAL_LM.get(config.model_type), "causal_lm"
    return BackendProbe("instructlab", class_name, path, RULE)


def commands(cfg: RunConfig, topology: Topology, job_index: int) -> list[list[str]]:
    job_path = Path(cfg.output_dir) / "job.json"
    shutil.rmtree(stack_dir(cfg), ignore_errors=True)  # its checkpoints and logs of an earlier attempt
    return [
        [sys.executable, "-m", "harness.backends.stack_checkpoint", "--job", str(job_path)],
        [
            cfg.stack_python or sys.executable,  # the stack's own environment (--stack), else this one
            "-m",
            WORKER,
            "--job",
            str(job_path),
            "--job-index",
            str(job_index),
            "--nproc-per-node",
            str(topology.nproc_per_node),
            "--nnodes",
            str(topology.nnodes),
            "--node-rank",
            str(topology.node_rank),
            "--rdzv-endpoint",
            topology.rdzv_endpoint or "",
        ],
    ]


def steps_for(samples: int, effective_batch_size: int, cfg: RunConfig) -> tuple[int, int]:
    """instructlab trains whole epochs and has no step budget: (steps per epoch, epochs) closest to
    the recipe's max_steps without exceeding its epochs."""
    steps_per_epoch = max(1, math.ceil(samples / effective_batch_size))
    return steps_per_epoch, max(1, min(cfg.epochs, math.ceil(cfg.max_steps / steps_per_epoch)))


def effective_batch_size(lengths: list[int], world_size: int, cfg: RunConfig) -> int:
    """Samples per optimizer step so that a step holds about max_tokens_per_gpu tokens per GPU, as the
    native trainer's steps do (instructlab packs them into max_batch_len micro-batches)."""
    mean = sum(lengths) / max(1, len(lengths))
    return max(1, min(len(lengths), round(world_size * cfg.max_tokens_per_gpu / max(1.0, mean))))


# ---------------------------------------------------------------- collect


def collect(cfg: RunConfig, outcome: JobOutcome) -> WorkerReport:
    """instructlab's files -> the report: its per-step metrics, the load path its log names, its last
    checkpoint (moved to the model's checkpoint folder)."""
    report = read_worker_report(cfg)
    record = report.backend = report.backend or BackendRecord("instructlab")
    metrics = read_stack_metrics(stack_dir(cfg) / "ckpt" / METRICS_FILE, report.world_size or 1)
    replace_metrics(cfg.metrics_path, metrics)
    report.steps = len(metrics)
    losses = [m.loss for m in metrics]
    record.reported_final_loss = final_loss(losses)
    if metrics and not all(math.isfinite(loss) for loss in losses):
        report.non_finite_step = next(m.step for m in metrics if not math.isfinite(m.loss))
    move_last_checkpoint(cfg)
    source = input_config(cfg)
    report.vocab_size = report.vocab_size or source.get_text_config(decoder=True).vocab_size
    record.observed_load_path, record.observed_class = observed_path(cfg, outcome, source)
    record.towers = saved_towers(cfg.checkpoint_dir)
    if report.status == "finished" and not outcome.clean_exit:
        report.status = "error"
    return report


def read_stack_metrics(path: Path, world_size: int = 1) -> list[StepMetrics]:
    """training_params_and_metrics_global0.jsonl: its first lines are hyper-parameters, then one line per
    step, written by rank 0. Its `num_tokens_rank0` is the step's tokens over every rank (its batch
    metrics are all-reduced with SUM before logging; padded rows count whole, flash attention being
    off); its throughput is samples per second of that step, so the step time is
    batch_size / overall_throughput."""
    if not path.exists():
        return []
    metrics, logged_lr = [], None
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "step" not in row or "avg_loss" not in row:
            continue
        tokens = row.get("num_tokens_rank0")
        throughput, samples = row.get("overall_throughput"), row.get("batch_size")
        step_time = samples / throughput if throughput and samples else None
        per_s = tokens / step_time if tokens and step_time else None
        metrics.append(
            StepMetrics(
                step=int(row["step"]),
                loss=float(row["avg_loss"]),
                epoch=row.get("epoch"),
                grad_norm=row.get("gradnorm"),
                lr=logged_lr,
                tokens=tokens,
                label_tokens=row.get("num_loss_counted_tokens"),
                step_time_s=step_time,
                tokens_per_s=per_s,
                tokens_per_s_per_gpu=per_s / world_size if per_s else None,
                peak_mem_allocated_gib=(row.get("cuda_mem_allocated") or None),
            )
        )
        # it logs get_last_lr() after the scheduler stepped: the lr of the NEXT step (step 1's is not logged)
        logged_lr = row.get("lr")
    return metrics


def move_last_checkpoint(cfg: RunConfig) -> None:
    last = stack_dir(cfg) / "ckpt" / "hf_format" / "last_epoch"
    if last.is_dir():
        shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)
        last.rename(cfg.checkpoint_dir)


def input_config(cfg: RunConfig):
    """The config of the checkpoint the stack read."""
    from transformers import AutoConfig

    from harness.backends.stack_checkpoint import input_checkpoint_path

    return AutoConfig.from_pretrained(input_checkpoint_path(cfg))


def observed_path(cfg: RunConfig, outcome: JobOutcome, source) -> tuple[str | None, str | None]:
    """The path its log names (it logs only the VLM paths) and the class it saved; for a crash before
    saving, the class its log's path implies."""
    logs = [outcome.log_path, *sorted((stack_dir(cfg) / "ckpt").glob("full_logs_global*.log"))]
    text = "\n".join(path.read_text(errors="replace") for path in logs if path.exists())
    class_name = saved_class(cfg.checkpoint_dir)
    if EXTRACT_LINE in text:
        return "extract_causal_lm", class_name or probe(cfg.spec, source).class_name
    if DIRECT_LINE in text:
        return "direct_vlm_load", class_name or probe(cfg.spec, source).class_name
    if class_name:
        return observed_load_path(source, class_name), class_name
    return None, None


def saved_class(folder: Path) -> str | None:
    """The class of the checkpoint it saved: its config's architectures, else what that config resolves
    to (a text backbone extracted from a VLM is saved with its text config, which names none)."""
    saved = folder / "config.json"
    if not saved.exists():
        return None
    architectures = json.loads(saved.read_text()).get("architectures")
    if architectures:
        return architectures[0]
    from transformers import AutoConfig

    from harness.models.plan import decide_load_path

    return decide_load_path(AutoConfig.from_pretrained(folder)).model_class  # the class alone, no refusal


def saved_towers(folder: Path) -> TowerCounts | None:
    """Tower parameters in the saved model (the stack's model is out of reach after its job)."""
    if not (folder / "config.json").exists():
        return None
    from harness.backends.checkpoint_eval import tower_keys
    from harness.models.checkpoints import read_index

    keys = tower_keys(folder)
    index = read_index(folder)
    return TowerCounts(params=index.numel(keys), trainable=0)
