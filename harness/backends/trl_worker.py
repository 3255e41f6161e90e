"""One TRL SFTTrainer job, every rank (started by accelerate launch or torchrun; see backends/trl.py).

What a team's TRL script does, with the overfit recipe mapped onto SFTConfig (recipe_options), plus
what the gate needs to observe: the class TRL built and the towers it carries (written before the
first step, so a crash still reports them), TRL's per-step logs as metrics.jsonl, and the model TRL
saves. It decides nothing: the sweep judges, from the harness's own evaluation of that checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from harness.contract.records import (
    PROGRESS_PREFIX,
    BackendRecord,
    DataStats,
    MetricsWriter,
    RunConfig,
    StepMetrics,
    Timings,
    WorkerReport,
    record_job_error,
    write_worker_report,
)

# Stop once every TRL loss of the last two epochs (at least `patience` steps) is below the threshold
# and their mean below half of it: TRL's loss is a figure of each step's batch only, and the harness's
# full-dataset evaluation of the saved model must land below the threshold too. (Measured on tiny Llama,
# 32 samples in 3 packed rows: a 5-step mean below 0.7x the threshold stopped at an evaluation of 0.0511.)
STOP_MARGIN = 0.5
STOP_EPOCHS = 2


def target_reached(recent: deque, threshold: float) -> bool:
    """The stacks' stop rule (TRL, axolotl): a full window of step losses, each below the threshold and
    their mean below STOP_MARGIN of it (the harness's evaluation of the saved model then decides)."""
    return (
        len(recent) == recent.maxlen and max(recent) < threshold and sum(recent) / len(recent) < STOP_MARGIN * threshold
    )


def follow_logged_loss(watcher, state, control, loss: float, log_every: int, threshold: float) -> None:
    """What the stacks' callbacks (TRL, axolotl) do with each logged step loss: the progress line every
    `log_every` steps, then the stop rules. A non-finite loss ends training (stop_reason non_finite); a
    window below the target ends it (target_reached). `watcher` keeps stop_reason, non_finite_step and
    `recent`, the window."""
    if state.is_world_process_zero and state.global_step % max(1, log_every) == 0:
        print(f"{PROGRESS_PREFIX}step {state.global_step} (budget {state.max_steps}) loss {loss:.4f}", flush=True)
    if not math.isfinite(loss):
        watcher.stop_reason, watcher.non_finite_step = "non_finite", state.global_step
        control.should_training_stop = True
        return
    watcher.recent.append(loss)
    if target_reached(watcher.recent, threshold):
        watcher.stop_reason = "target_reached"
        control.should_training_stop = True


# What the recipe cannot say in SFTConfig's terms (also in README's backend section).
UNMAPPED = [
    "token budget: TRL packs samples (best-fit decreasing) into rows of max_length = max_tokens_per_gpu tokens, "
    "one row per GPU per step, instead of the harness's token-budget micro-batches",
    "samples longer than max_seq_len: TRL truncates them to max_length instead of dropping them",
    "warm-up: transformers' linear warm-up starts at lr 0 (the harness's at lr/(warmup+1))",
    "stop rule: TRL's logged loss ends training (every step of the last two epochs below the threshold, their mean "
    "below half of it); the harness then evaluates the saved model on every sample",
    "activation checkpointing: TRL's gradient_checkpointing (its default, on) unless --activation-checkpointing on/off",
    "betas (0.9, 0.95), weight decay and grad clipping as the harness's; TRL's AdamW is torch's (not fused)",
]


def recipe_options(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The harness's overfit recipe as SFTConfig keyword arguments."""
    cosine = cfg.schedule == "cosine"
    options = dict(
        output_dir=str(Path(cfg.output_dir) / "trl"),
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine_with_min_lr" if cosine else "constant_with_warmup",
        lr_scheduler_kwargs={"min_lr_rate": 0.1} if cosine else None,  # the harness's cosine ends at 10%
        warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,  # lowered to epochs x steps-per-epoch once TRL has packed the data
        per_device_train_batch_size=1 if cfg.packing else max(1, cfg.max_tokens_per_gpu // cfg.max_seq_len),
        gradient_accumulation_steps=1,
        packing=cfg.packing,
        packing_strategy="bfd",
        padding_free=cfg.packing,
        max_length=cfg.max_tokens_per_gpu if cfg.packing else cfg.max_seq_len,
        assistant_only_loss=True,  # needs {% generation %} markers (the harness's templates carry them); TRL
        # patches a few known templates and refuses the rest (Gemma's own among them)
        seed=cfg.seed,
        data_seed=cfg.seed,
        weight_decay=cfg.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=cfg.grad_clip,
        logging_steps=1,
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=cfg.device == "cuda",
        use_cpu=cfg.device != "cuda",
        model_init_kwargs={"dtype": "float32"},  # fp32 master weights, bf16 compute: as the native trainer
    )
    if cfg.activation_checkpointing is not None:
        options["gradient_checkpointing"] = cfg.activation_checkpointing
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one TRL SFTTrainer job (started by accelerate launch or torchrun)")
    parser.add_argument("--job", type=Path, required=True)
    cfg = RunConfig.from_json(parser.parse_args(argv).job)
    rank = int(os.environ.get("RANK", 0))
    report = WorkerReport(
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        rank=rank,
        config=cfg,
        backend=BackendRecord("trl", unmapped=list(UNMAPPED)),
    )
    try:
        train_with_trl(cfg, report)
        return 0
    except Exception as exc:  # what killed the job, and what was observed before
        record_job_error(report, exc)
        return 1
    finally:
        write_worker_report(cfg, report, rank)


def train_with_trl(cfg: RunConfig, report: WorkerReport) -> None:
    import torch
    import trl
    from transformers import AutoConfig, AutoTokenizer

    from harness.backends.stack_checkpoint import input_checkpoint_path
    from harness.contract.dataset_file import load_chat_dataset
    from harness.job.distributed import cap_gpu_memory
    from harness.testing.external import arm_trl  # test-only: bugs injected through TRL's own seams

    started = time.monotonic()
    # The one read of SFT_HARNESS_MUTATION: unset (always, outside tests), every seam below is unchanged.
    bugs = arm_trl(cfg.spec.name, cfg.spec.chat_family)
    folder = input_checkpoint_path(cfg)
    record = report.backend
    record.version = trl.__version__
    conversations = load_chat_dataset(cfg.dataset)[: cfg.max_samples]
    options = bugs.options(recipe_options(cfg, report.world_size))
    record.recipe = {k: v for k, v in options.items() if k != "output_dir"}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    callback = HarnessCallback(cfg, report.world_size, started)
    report.data = DataStats(n_samples=len(conversations))
    # this rank's GPU (accelerate has not picked it yet here): the cap must land on it, not on GPU 0
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cfg.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    report.device = device.type
    report.gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    cap_gpu_memory(device, cfg.gpu_memory_gib)
    with recording_the_model_trl_builds(cfg, report, AutoConfig.from_pretrained(folder)):
        trainer = bugs.trainer(
            trl.SFTTrainer(
                model=str(folder),
                args=trl.SFTConfig(**options),
                train_dataset=dataset_of(conversations),
                processing_class=tokenizer,
                callbacks=[callback],
            )
        )

    steps_per_epoch = math.ceil(
        len(trainer.train_dataset) / (report.world_size * options["per_device_train_batch_size"])
    )
    trainer.args.max_steps = min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    report.steps_per_epoch, report.planned_steps = steps_per_epoch, trainer.args.max_steps
    callback.watch_epochs(steps_per_epoch)
    load_done = time.monotonic()
    trainer.train()
    train_done = time.monotonic()
    bugs.before_save(trainer)
    trainer.save_model(str(cfg.checkpoint_dir))  # every rank: FSDP gathers the full state dict for rank 0
    saved = time.monotonic()

    report.status = "finished"
    report.stop_reason = callback.stop_reason or "step_budget"
    report.non_finite_step = callback.non_finite_step
    report.steps = trainer.state.global_step
    record.reported_final_loss = callback.final_loss
    report.time_s = Timings(
        load=load_done - started,
        first_step=callback.first_step_s,
        train=train_done - load_done,
        total=saved - started,
        started_at=started,
    )


@contextmanager
def recording_the_model_trl_builds(cfg: RunConfig, report: WorkerReport, source_config):
    """Notes the class TRL's own create_model_from_path returns, its towers and vocabulary, and writes
    the report at once: a crash later in SFTTrainer's constructor (its chat-template check, its data
    processing) or in training still leaves what TRL built."""
    from trl.trainer import sft_trainer

    from harness.backends import observed_load_path
    from harness.models import loading

    create = sft_trainer.create_model_from_path

    def create_and_record(*args, **kwargs):
        model = create(*args, **kwargs)
        record = report.backend
        record.observed_class = type(model).__name__
        record.observed_load_path = observed_load_path(source_config, record.observed_class)
        record.towers = loading.tower_counts(model)
        report.vocab_size = model.config.get_text_config(decoder=True).vocab_size
        write_worker_report(cfg, report, report.rank)
        return model

    sft_trainer.create_model_from_path = create_and_record
    try:
        yield
    finally:
        sft_trainer.create_model_from_path = create


def dataset_of(conversations: list[list[dict]]):
    from datasets import Dataset

    return Dataset.from_list([{"messages": messages} for messages in conversations])


class HarnessCallback(TrainerCallback):
    """TRL's logs -> metrics.jsonl (rank 0), progress lines, and the stop rule (every rank decides
    alike: the logged loss is already gathered over ranks)."""

    def __init__(self, cfg: RunConfig, world_size: int, started: float):
        self.cfg, self.world_size, self.started = cfg, world_size, started
        self.writer = None
        self.recent = deque(maxlen=cfg.patience)
        self.losses: list[float] = []
        self.last_time, self.last_tokens = None, 0
        self.stop_reason, self.non_finite_step, self.first_step_s = None, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.writer = MetricsWriter(self.cfg.metrics_path, enabled=state.is_world_process_zero)
        self.last_time = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        import torch

        now = time.monotonic()
        step_time, self.last_time = now - self.last_time, now
        self.first_step_s = self.first_step_s or now - self.started
        tokens = int(logs.get("num_tokens", 0)) - self.last_tokens if "num_tokens" in logs else None
        self.last_tokens = int(logs.get("num_tokens", self.last_tokens))
        loss = float(logs["loss"])
        cuda = torch.cuda.is_available() and self.cfg.device == "cuda"
        metrics = StepMetrics(
            step=state.global_step,
            loss=loss,
            epoch=int(state.epoch or 0),
            grad_norm=float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
            lr=float(logs["learning_rate"]) if "learning_rate" in logs else None,
            tokens=tokens,
            step_time_s=step_time,
            tokens_per_s=tokens / step_time if tokens and step_time > 0 else None,
            tokens_per_s_per_gpu=tokens / step_time / self.world_size if tokens and step_time > 0 else None,
            peak_mem_allocated_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            peak_mem_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
            elapsed_s=now - self.started,
        )
        self.writer.write(metrics)
        self.losses.append(loss)
        follow_logged_loss(self, state, control, loss, self.cfg.log_every, self.cfg.loss_threshold)

    def watch_epochs(self, steps_per_epoch: int) -> None:
        """The stop window spans STOP_EPOCHS epochs (every packed row seen twice), at least `patience` steps."""
        self.recent = deque(self.recent, maxlen=max(self.cfg.patience, STOP_EPOCHS * steps_per_epoch))

    @property
    def final_loss(self) -> float | None:
        from harness.contract.records import final_loss

        return final_loss(self.losses)


if __name__ == "__main__":
    raise SystemExit(main())
