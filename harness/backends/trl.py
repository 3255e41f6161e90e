"""TRL's SFTTrainer, given the checkpoint folder as users give a hub id (TRL builds the model itself).

Launch: `accelerate launch` with an FSDP2 config on GPUs (one node or several); on CPU accelerate
has no multi-process launcher of its own (its --cpu path is mpirun), so torchrun starts the ranks and
accelerate runs them as MULTI_CPU (gloo DDP), as it does for any torchrun-started script.
The worker (harness.backends.trl_worker) records what TRL built, its per-step logs and its saved model.
"""

from __future__ import annotations

import sys
from pathlib import Path

from harness.backends import BackendTraits, Requirement
from harness.contract.records import BackendProbe, RunConfig, WorkerReport, read_worker_report
from harness.runtime.launch import JobOutcome, Topology, accelerate_launch_command, torchrun_command

REQUIREMENT = Requirement(module="trl", distribution="trl", version="1.16.0", extra="trl")
TRAITS = BackendTraits(requirement=REQUIREMENT)
WORKER = "harness.backends.trl_worker"
ACCELERATE_CONFIG = "accelerate_fsdp2.yaml"
# The rule of trl/trainer/utils.py create_model_from_path (TRL 1.16), which a model id goes through.
RULE = (
    "trl.trainer.utils.create_model_from_path: getattr(transformers, config.architectures[0]), "
    "else AutoModelForCausalLM"
)


def probe(spec, config) -> BackendProbe:
    """The class TRL will build for a checkpoint with this config, and the load path that means."""
    import transformers
    from transformers.models.auto import modeling_auto

    from harness.backends import observed_load_path

    architectures = getattr(config, "architectures", None) or [saved_class_name(config)]
    class_name = architectures[0] if getattr(transformers, architectures[0], None) is not None else None
    if class_name is None:
        class_name = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    return BackendProbe("trl", class_name, observed_load_path(config, class_name), RULE)


def saved_class_name(config) -> str:
    """The class the harness writes into an input checkpoint for this config (harness.backends.stack_checkpoint)."""
    from harness.models.plan import resolve_load_path

    decision = resolve_load_path(config)
    return decision.model_class if decision.load_path == "causal_lm" else decision.multimodal_class


def commands(cfg: RunConfig, topology: Topology, job_index: int) -> list[list[str]]:
    job_path = Path(cfg.output_dir) / "job.json"
    prepare = [sys.executable, "-m", "harness.backends.stack_checkpoint", "--job", str(job_path)]
    if cfg.device != "cuda":
        return [prepare, torchrun_command(job_path, topology, job_index, module=WORKER, python=cfg.stack_python)]
    config_path = Path(cfg.output_dir) / ACCELERATE_CONFIG
    config_path.write_text(accelerate_fsdp2_config(cfg, topology))
    target = ["-m", WORKER, "--job", str(job_path)]
    return [prepare, accelerate_launch_command(config_path, topology, job_index, target, cfg.stack_python)]


def accelerate_fsdp2_config(cfg: RunConfig, topology: Topology) -> str:
    """TRL's own trl/accelerate_configs/fsdp2.yaml, with the run's resharding choice; activation
    checkpointing is TRL's gradient_checkpointing option (SFTConfig), not FSDP's."""
    reshard = (
        cfg.reshard_after_forward
        if cfg.reshard_after_forward is not None
        else topology.nproc_per_node * topology.nnodes > 1
    )
    return "\n".join(
        [
            "compute_environment: LOCAL_MACHINE",
            "distributed_type: FSDP",
            "mixed_precision: bf16",
            "fsdp_config:",
            "  fsdp_version: 2",
            "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP",
            "  fsdp_cpu_ram_efficient_loading: true",
            "  fsdp_offload_params: false",
            f"  fsdp_reshard_after_forward: {'true' if reshard else 'false'}",
            "  fsdp_state_dict_type: FULL_STATE_DICT",
            "  fsdp_activation_checkpointing: false",
            "rdzv_backend: static",
            "same_network: true",
            "use_cpu: false",
            "",
        ]
    )


def collect(cfg: RunConfig, outcome: JobOutcome) -> WorkerReport:
    """The worker ran inside TRL's processes: its report and metrics.jsonl are what TRL did."""
    return read_worker_report(cfg)
