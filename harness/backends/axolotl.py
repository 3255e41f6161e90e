"""axolotl (axolotl-ai-cloud/axolotl): its own CLI (`axolotl train config.yaml`, i.e. `accelerate launch -m
axolotl.cli.train config.yaml`) on a YAML config the harness writes from the overfit recipe (recipe_yaml).

axolotl pins transformers, trl and accelerate exactly (0.21.0: transformers 5.20.1, trl 1.14.1; 0.19.0:
5.16.1, 1.9.0) and 0.20+ needs Python 3.12, so it is gated only from an environment of its own
(`--stack axolotl==0.21.0`). CUDA only here: its documentation requires an NVIDIA or AMD GPU and its CI trains
on GPUs only. On CPU one process does train (seen with 0.19.0), but with several ranks normalize_config gives
each rank device_map {"": LOCAL_RANK}, an accelerator index, and the job stops ("Cannot access accelerator
device when none is available"); its index dependencies (xformers, bitsandbytes, triton, imported
unconditionally) are GPU builds besides.

The probe asks axolotl's own code which class it will load where axolotl is importable (inside its
environment), and applies the same rule, replicated, where it is not (the harness's environment, CPU tests).
The harness's plugin (harness.backends.axolotl_worker.HarnessPlugin, named in the YAML's `plugins:`) runs in
axolotl's processes: it notes the class axolotl built, caps the steps, applies the stop rule and keeps
trainer_state.json; collect() turns that into metrics.jsonl and the job's report.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.backends import BackendTraits, Requirement, observed_load_path
from harness.contract.records import (
    BackendProbe,
    BackendRecord,
    RunConfig,
    StepMetrics,
    WorkerReport,
    final_loss,
    read_worker_report,
    replace_metrics,
)
from harness.runtime.launch import JobOutcome, Topology, accelerate_launch_command


@dataclass(frozen=True)
class StackOnlyRequirement(Requirement):
    """A stack whose exact pins cannot share the harness's environment: there is no extra to install
    (pyproject.toml names none); it is gated with --stack, in an environment of its own."""

    @property
    def install_command(self) -> str:
        return (
            f"gate it in an environment of its own: --stack {self.distribution}=={self.version} "
            f"(its exact pins conflict with the harness's; axolotl 0.20+ needs Python 3.12+)"
        )


REQUIREMENT = StackOnlyRequirement(module="axolotl", distribution="axolotl", version="0.21.0", extra="axolotl")
TRAITS = BackendTraits(requirement=REQUIREMENT, cuda_only=True, probe_needs_stack=False)  # its rule, replicated
PLUGIN = "harness.backends.axolotl_worker.HarnessPlugin"
JOB_ENV = "SFT_HARNESS_JOB"  # the plugin finds the job (RunConfig) through it, in every rank
CONFIG_FILE = "axolotl.yaml"
ACCELERATE_CONFIG = "accelerate.yaml"
DATA_FILE = "data.jsonl"
STATE_FILE = "trainer_state.json"  # the plugin's copy of the HF Trainer state (log_history), kept at each log
# axolotl/loaders/constants.py: MULTIMODAL_AUTO_MODEL_MAPPING = transformers' image-text-to-text names + these
MULTIMODAL_EXTRA = ("lfm2-vl", "voxtral")
RULE = (
    "axolotl.utils.config.normalize_config + loaders.model.ModelLoader._set_auto_model_loader: a model-support "
    "profile's class; else AutoModelForImageTextToText if is_multimodal (model_type in loaders.constants."
    "MULTIMODAL_AUTO_MODEL_MAPPING, i.e. transformers' image-text-to-text mapping); else AutoModelForCausalLM"
)
REPLICA_NOTE = "; replicated (axolotl is not importable here)"
COSINE_MIN_LR_RATIO = 0.1  # the harness's cosine ends at 10% of the peak


def stack_dir(cfg: RunConfig) -> Path:
    """axolotl's working folder: its YAML, the data it reads, its prepared data, the plugin's trainer state."""
    return Path(cfg.output_dir) / "axolotl"


# ---------------------------------------------------------------- probe


def probe(spec, config) -> BackendProbe:
    """The class axolotl will load for a checkpoint with this config (no `model_type:` override in the
    YAML), and the load path that means."""
    if importlib.util.find_spec("axolotl") is None:
        return replica_probe(spec, config)
    try:
        class_name = own_class_name(spec, config)
    except (ImportError, AttributeError) as error:  # a later axolotl moved its seam: say so, keep the rule
        probe_ = replica_probe(spec, config)
        probe_.rule = f"{RULE}; replicated (axolotl's own code: {type(error).__name__}: {error})"
        return probe_
    return BackendProbe("axolotl", class_name, observed_load_path(config, class_name), RULE)


def own_class_name(spec, config) -> str | None:
    """axolotl's own code: its multimodal test (normalize_config's expression, over its own mapping and
    model-support registry) and its ModelLoader._set_auto_model_loader on that."""
    from types import SimpleNamespace

    import transformers
    from axolotl.loaders.constants import MULTIMODAL_AUTO_MODEL_MAPPING
    from axolotl.loaders.model import ModelLoader
    from axolotl.model_support import get_model_support, resolve_model_support
    from axolotl.utils.dict import DictDefault

    support = get_model_support(config.model_type)
    resolved = resolve_model_support(support) if support is not None else None
    multimodal = bool(
        (resolved is not None and resolved.is_multimodal)
        or config.model_type in MULTIMODAL_AUTO_MODEL_MAPPING
        or named_pixtral(spec)
    )
    loader = SimpleNamespace(
        model_config=config,
        cfg=DictDefault({"is_multimodal": multimodal}),
        auto_model_loader=transformers.AutoModelForCausalLM,
    )
    ModelLoader._set_auto_model_loader(loader)
    return class_of_loader(loader.auto_model_loader, config)


def class_of_loader(loader, config) -> str | None:
    """The class an auto class builds for this config (its mapping), or the class itself."""
    mapping = getattr(loader, "_model_mapping", None)
    if mapping is None:
        return loader.__name__
    try:
        return mapping[type(config)].__name__
    except (KeyError, ValueError):
        return None


def replica_probe(spec, config) -> BackendProbe:
    """The same rule without axolotl: model-support profiles (exotic model types only) are not consulted."""
    from harness.models.mappings import CAUSAL_LM, IMAGE_TEXT_TO_TEXT

    if loads_multimodal(spec, config):
        class_name = IMAGE_TEXT_TO_TEXT.get(config.model_type)
    else:
        class_name = CAUSAL_LM.get(config.model_type)
    return BackendProbe("axolotl", class_name, observed_load_path(config, class_name), RULE + REPLICA_NOTE)


def loads_multimodal(spec, config) -> bool:
    """axolotl's is_multimodal (normalize_config) without its model-support profiles."""
    from harness.models.mappings import IMAGE_TEXT_TO_TEXT

    model_type = getattr(config, "model_type", None)
    return model_type in IMAGE_TEXT_TO_TEXT or model_type in MULTIMODAL_EXTRA or named_pixtral(spec)


def named_pixtral(spec) -> bool:
    """normalize_config's `"pixtral" in cfg.base_model.lower()`: the input checkpoint's folder carries the name."""
    return "pixtral" in spec.folder_name.lower()


# ---------------------------------------------------------------- the recipe as axolotl's YAML

UNMAPPED = [
    "step budget: axolotl's max_steps replaces num_epochs instead of capping it, so the YAML gives num_epochs and the "
    "harness's plugin lowers the steps axolotl planned for them to at most max_steps (post_trainer_create)",
    "stop rule: the harness's plugin ends training on axolotl's logged loss (every step of the last two epochs below "
    "the threshold, their mean below half of it), as for TRL; the harness then evaluates the saved model",
    "token budget: packing (axolotl's multipack, rows unpadded) into micro_batch_size=1 row of sequence_len = "
    "max_tokens_per_gpu tokens per GPU per step; without packing micro_batch_size = max_tokens_per_gpu // max_seq_len "
    "rows of sequence_len = max_seq_len",
    "samples longer than sequence_len: axolotl drops them (excess_length_strategy drop); with packing that limit is "
    "the token budget, not max_seq_len",
    "precision: bf16 on CUDA loads the weights in bf16 (axolotl's torch_dtype follows bf16) and AdamW updates bf16 "
    "weights; the native trainer keeps fp32 master weights",
    "warm-up: transformers' linear warm-up starts at lr 0 (the harness's at lr/(warmup+1))",
    "sharding: DDP through accelerate (axolotl's default without fsdp_config/deepspeed): every rank holds the whole "
    "model and its optimizer state; the native trainer and TRL use FSDP2",
    "attention: sdpa (packed rows separated by position_ids), not the harness's varlen flash kernel",
    "activation checkpointing: axolotl's gradient_checkpointing (off by default) unless --activation-checkpointing",
    "--gpu-memory-gib: not applied (axolotl's own processes allocate)",
    "a VLM loads its processor too (axolotl's load_processor for every multimodal config): the input checkpoint must "
    "hold one (a hub checkpoint does; the harness's tiny and synthetic ones do not, and axolotl stops with OSError)",
]


def end_of_turn(cfg: RunConfig) -> str | None:
    """The family's end-of-turn marker (the harness's own, as its evaluation uses), else the tokenizer's."""
    from harness.models.tokenizers import END_OF_TURN_MARKERS

    family = cfg.spec.chat_family
    if family in END_OF_TURN_MARKERS:
        return END_OF_TURN_MARKERS[family]
    from harness.job.preflight import end_of_turn_marker
    from harness.models import loading

    return end_of_turn_marker(cfg.spec, loading.tokenizer_for(cfg.spec, cfg.weights))


def model_loads_multimodal(cfg: RunConfig) -> bool:
    from harness.models.configs import load_config

    return loads_multimodal(cfg.spec, load_config(cfg.spec))


def recipe_yaml(
    cfg: RunConfig,
    input_checkpoint: Path | str,
    output_dir: Path | str,
    *,
    eot_token: str | None = None,
    multimodal: bool | None = None,
) -> dict[str, Any]:
    """The harness's overfit recipe as axolotl's config. `eot_token` (the chat family's end-of-turn marker) and
    `multimodal` (axolotl will load the VLM) default to what the model's registry entry and config say."""
    work = stack_dir(cfg)
    eot_token = eot_token if eot_token is not None else end_of_turn(cfg)
    multimodal = model_loads_multimodal(cfg) if multimodal is None else multimodal
    cuda = cfg.device == "cuda"
    if cfg.packing:
        micro_batch_size, sequence_len = 1, cfg.max_tokens_per_gpu
    else:
        micro_batch_size, sequence_len = max(1, cfg.max_tokens_per_gpu // cfg.max_seq_len), cfg.max_seq_len
    cosine = cfg.schedule == "cosine"
    options: dict[str, Any] = {
        "base_model": str(input_checkpoint),  # the hub-layout checkpoint (harness.backends.stack_checkpoint)
        "trust_remote_code": False,
        # the tokenizer's own template: the checkpoint's, or the harness's family template it was given
        "chat_template": "tokenizer_default",
        "eot_tokens": [eot_token] if eot_token else None,  # its default (eos_token) misses Gemma's <end_of_turn>
        "datasets": [
            {
                "path": str(work / DATA_FILE),
                "ds_type": "json",
                "type": "chat_template",
                "field_messages": "messages",
                "message_property_mappings": {"role": "role", "content": "content"},
                "roles": {"system": ["system"], "user": ["user"], "assistant": ["assistant"]},
                "roles_to_train": ["assistant"],
                "train_on_eos": "turn",
            }
        ],
        "dataset_prepared_path": str(work / "prepared"),
        "val_set_size": 0.0,
        "train_on_inputs": False,
        "sequence_len": sequence_len,
        "micro_batch_size": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "sample_packing": cfg.packing,
        "pad_to_sequence_len": False,  # a packed row holds what fits, unpadded (the native trainer's rows too)
        "attn_implementation": "sdpa",
        "learning_rate": cfg.lr,
        "lr_scheduler": "cosine" if cosine else "constant_with_warmup",
        "cosine_min_lr_ratio": COSINE_MIN_LR_RATIO if cosine else None,
        "warmup_steps": cfg.warmup_steps,
        "num_epochs": cfg.epochs,  # max_steps: the plugin caps axolotl's plan (see UNMAPPED)
        "seed": cfg.seed,
        "optimizer": "adamw_torch",
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.grad_clip,
        "bf16": cuda,
        "fp16": False,
        "tf32": False,
        "gradient_checkpointing": cfg.activation_checkpointing,
        "output_dir": str(output_dir),
        "save_strategy": "no",  # no checkpoint-N folders: axolotl saves the final model to output_dir itself
        "logging_steps": 1,
        "freeze_mm_modules": True if multimodal else None,  # the towers frozen: text-only DDP needs no unused search
        "ddp_find_unused_parameters": False,
        "use_tensorboard": False,
        "plugins": [PLUGIN],
    }
    return {key: value for key, value in options.items() if value is not None}


def recipe_record(options: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """BackendRecord.recipe: the YAML's training options (paths left out) and the cap the plugin applies."""
    paths = ("base_model", "output_dir", "dataset_prepared_path")
    record = {key: value for key, value in options.items() if key not in paths}
    record["datasets"] = [{k: v for k, v in d.items() if k != "path"} for d in options.get("datasets", [])]
    record["max_steps"] = cfg.max_steps  # applied by the harness's plugin: min(max_steps, epochs x steps per epoch)
    return record


# ---------------------------------------------------------------- launch


def commands(cfg: RunConfig, topology: Topology, job_index: int) -> list[list[str]]:
    """The input checkpoint (this interpreter), then axolotl's own CLI through accelerate launch, as
    `axolotl train` runs it, with the stack's interpreter."""
    import yaml

    from harness.backends.stack_checkpoint import input_checkpoint_path
    from harness.contract.dataset_file import load_chat_dataset

    job_path = Path(cfg.output_dir) / "job.json"
    work = stack_dir(cfg)
    shutil.rmtree(work, ignore_errors=True)  # an earlier attempt's prepared data and trainer state
    work.mkdir(parents=True)
    conversations = load_chat_dataset(cfg.dataset)[: cfg.max_samples]
    (work / DATA_FILE).write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    options = recipe_yaml(cfg, input_checkpoint_path(cfg), cfg.checkpoint_dir)
    (work / CONFIG_FILE).write_text(yaml.safe_dump(options, sort_keys=False))
    (work / ACCELERATE_CONFIG).write_text(accelerate_config(topology))
    prepare = [sys.executable, "-m", "harness.backends.stack_checkpoint", "--job", str(job_path)]
    return [prepare, launch_command(cfg, topology, job_index)]


def launch_command(cfg: RunConfig, topology: Topology, job_index: int) -> list[str]:
    """What `axolotl train` runs: accelerate launch of axolotl.cli.train, in the stack's environment."""
    work = stack_dir(cfg)
    target = ["-m", "axolotl.cli.train", str(work / CONFIG_FILE)]
    launch = accelerate_launch_command(work / ACCELERATE_CONFIG, topology, job_index, target, cfg.stack_python)
    # its telemetry is on unless AXOLOTL_DO_NOT_TRACK is set; the plugin finds the job through JOB_ENV
    return ["env", "AXOLOTL_DO_NOT_TRACK=1", f"{JOB_ENV}={Path(cfg.output_dir) / 'job.json'}", *launch]


def accelerate_config(topology: Topology) -> str:
    """DDP (axolotl's default without fsdp_config or deepspeed); its own mixed precision comes from the YAML."""
    several = topology.nproc_per_node * topology.nnodes > 1
    return "\n".join(
        [
            "compute_environment: LOCAL_MACHINE",
            f"distributed_type: {'MULTI_GPU' if several else 'NO'}",
            "mixed_precision: 'no'",
            "rdzv_backend: static",
            "same_network: true",
            "use_cpu: false",
            "",
        ]
    )


# ---------------------------------------------------------------- collect


def collect(cfg: RunConfig, outcome: JobOutcome) -> WorkerReport:
    """The plugin's report (what axolotl built, its plan) with axolotl's log_history as metrics.jsonl, its
    final model in cfg.checkpoint_dir (the YAML's output_dir) and the class that model was saved as."""
    report = read_worker_report(cfg)
    record = report.backend = report.backend or BackendRecord("axolotl")
    record.unmapped = record.unmapped or list(UNMAPPED)
    written = stack_dir(cfg) / CONFIG_FILE
    if not record.recipe and written.exists():
        import yaml

        record.recipe = recipe_record(yaml.safe_load(written.read_text()), cfg)
    metrics = read_log_history(trainer_state_path(cfg), report.world_size or 1)
    replace_metrics(cfg.metrics_path, metrics)
    report.steps = metrics[-1].step if metrics else report.steps
    losses = [m.loss for m in metrics]
    record.reported_final_loss = final_loss(losses)
    if metrics and not all(math.isfinite(loss) for loss in losses):
        report.non_finite_step = next(m.step for m in metrics if not math.isfinite(m.loss))
    saved = saved_class(cfg.checkpoint_dir)
    if record.observed_class is None and saved is not None:  # the plugin did not run: the saved model says
        record.observed_class = saved
        record.observed_load_path = observed_load_path(input_config(cfg), saved)
    if not outcome.clean_exit:
        if report.status in ("started", "finished"):
            report.status = "error"
        report.error = report.error or first_error(outcome.log_path)
    return report


def trainer_state_path(cfg: RunConfig) -> Path:
    """The plugin's copy, else the newest checkpoint-N's (a YAML that saves checkpoints)."""
    ours = stack_dir(cfg) / STATE_FILE
    if ours.exists():
        return ours
    steps = sorted(cfg.checkpoint_dir.glob("checkpoint-*/" + STATE_FILE), key=lambda p: checkpoint_step(p.parent))
    return steps[-1] if steps else ours


def checkpoint_step(folder: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
    return int(match.group(1)) if match else -1


# What axolotl adds to each log entry (its token and memory callbacks): cumulative counts, rate, GiB.
TOKENS_TOTAL, TOKENS_TRAINABLE = "tokens/total", "tokens/trainable"
TOKENS_PER_S_PER_GPU = "tokens/train_per_sec_per_gpu"
MEMORY_ALLOCATED, MEMORY_RESERVED = "memory/max_allocated (GiB)", "memory/device_reserved (GiB)"


def read_log_history(path: Path, world_size: int = 1) -> list[StepMetrics]:
    """trainer_state.json's log_history: one entry per step (logging_steps 1) with loss, grad_norm, learning_rate
    (the lr the step applied: transformers reads it before the scheduler steps), epoch (fractional), axolotl's
    cumulative token counts and memory, and the plugin's elapsed_s / step_time_s; the run's summary entry
    (train_loss, no loss) is skipped."""
    if not path.exists():
        return []
    history = json.loads(path.read_text()).get("log_history", [])
    metrics, before = [], {TOKENS_TOTAL: 0, TOKENS_TRAINABLE: 0}
    for entry in history:
        if "loss" not in entry or "step" not in entry:
            continue
        counted = {}
        for key in before:
            if entry.get(key) is not None:
                counted[key], before[key] = int(entry[key]) - before[key], int(entry[key])
        per_gpu = entry.get(TOKENS_PER_S_PER_GPU)
        metrics.append(
            StepMetrics(
                step=int(entry["step"]),
                loss=float(entry["loss"]),
                epoch=int(entry["epoch"]) if entry.get("epoch") is not None else None,
                grad_norm=float(entry["grad_norm"]) if entry.get("grad_norm") is not None else None,
                lr=float(entry["learning_rate"]) if entry.get("learning_rate") is not None else None,
                tokens=counted.get(TOKENS_TOTAL),
                label_tokens=counted.get(TOKENS_TRAINABLE),
                step_time_s=entry.get("step_time_s"),
                tokens_per_s=per_gpu * world_size if per_gpu else None,
                tokens_per_s_per_gpu=per_gpu or None,
                peak_mem_allocated_gib=entry.get(MEMORY_ALLOCATED) or None,
                peak_mem_reserved_gib=entry.get(MEMORY_RESERVED) or None,
                elapsed_s=entry.get("elapsed_s"),
            )
        )
    return metrics


def saved_class(folder: Path) -> str | None:
    """The class of the model axolotl saved: its config.json's architectures[0]."""
    saved = folder / "config.json"
    if not saved.exists():
        return None
    return (json.loads(saved.read_text()).get("architectures") or [None])[0]


def input_config(cfg: RunConfig):
    """The config of the checkpoint axolotl read (the registry's config where it was never written)."""
    from transformers import AutoConfig

    from harness.backends.stack_checkpoint import input_checkpoint_path
    from harness.models.configs import load_config

    folder = input_checkpoint_path(cfg)
    return AutoConfig.from_pretrained(folder) if (folder / "config.json").exists() else load_config(cfg.spec)


# An exception's line in the log (the ranks' output may carry a [rankN]: prefix), its module path dropped so
# that torch.OutOfMemoryError reads as the gate's OutOfMemoryError.
ERROR_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?(?:\w+\.)*(\w*(?:Error|Exception)\b(?::.*)?)$")
LAUNCHER_ERRORS = ("CalledProcessError", "ChildFailedError")  # accelerate launch's own, after a rank failed


def first_error(log_path: Path, limit: int = 300) -> str | None:
    """The first exception line a rank printed (axolotl's CLI prints its traceback and exits non-zero), not
    the launcher's report of it."""
    if not Path(log_path).exists():
        return None
    for line in Path(log_path).read_text(errors="replace").splitlines():
        match = ERROR_LINE.match(line.strip())
        if match and not match.group(1).startswith(LAUNCHER_ERRORS):
            return match.group(1)[:limit]
    return None
