"""The harness inside axolotl's processes (every rank): an axolotl plugin, named in the YAML the harness writes
(`plugins: [harness.backends.axolotl_worker.HarnessPlugin]`), which axolotl imports and calls at its own seams.
It decides nothing; it observes what axolotl does and applies two parts of the recipe axolotl's config cannot:

    post_model_load       the class axolotl built, its towers, the vocabulary -> worker.json at once (a crash
                          later still leaves them)
    post_trainer_create   the towers after freeze_mm_modules; the steps axolotl planned for num_epochs, capped at
                          the recipe's max_steps; the data axolotl kept
    a TrainerCallback     progress lines, trainer_state.json at each log (metrics.jsonl is written from it by
                          harness.backends.axolotl.collect), the stop rule TRL's run uses
    post_train            finished, once the final model is saved

The job (RunConfig) comes from the SFT_HARNESS_JOB environment variable the launch command sets.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
from collections import deque
from pathlib import Path

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

from harness.backends.axolotl import JOB_ENV, STATE_FILE, UNMAPPED, stack_dir
from harness.backends.trl_worker import STOP_EPOCHS, follow_logged_loss
from harness.contract.records import (
    BackendRecord,
    DataStats,
    RunConfig,
    Timings,
    WorkerReport,
    write_worker_report,
)


class HarnessPlugin(BasePlugin):
    def __init__(self):
        super().__init__()
        self.job = RunConfig.from_json(Path(os.environ[JOB_ENV]))
        self.rank = int(os.environ.get("RANK", 0))
        self.started = time.monotonic()
        self.report = WorkerReport(
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            rank=self.rank,
            config=self.job,
            backend=BackendRecord("axolotl", version=axolotl_version(), unmapped=list(UNMAPPED)),
        )
        self.callback: HarnessCallback | None = None
        self.loaded_at: float | None = None
        self.trained_at: float | None = None
        previous = sys.excepthook

        def record_crash(kind, value, tb):  # axolotl's CLI lets the exception end the process: keep its words
            self.report.status, self.report.error = "error", f"{kind.__name__}: {value}"
            self.report.traceback = "".join(traceback.format_exception(kind, value, tb))
            self.write()
            previous(kind, value, tb)

        sys.excepthook = record_crash
        self.write()

    def write(self) -> None:
        write_worker_report(self.job, self.report, self.rank)

    def post_model_load(self, cfg, model):
        from transformers import AutoConfig

        from harness.backends import observed_load_path
        from harness.models import loading

        record = self.report.backend
        record.observed_class = type(model).__name__
        record.observed_load_path = observed_load_path(
            AutoConfig.from_pretrained(cfg.base_model), record.observed_class
        )
        record.towers = loading.tower_counts(model)
        self.report.vocab_size = model.config.get_text_config(decoder=True).vocab_size
        self.loaded_at = time.monotonic()
        self.write()

    def post_trainer_create(self, cfg, trainer):
        import torch

        from harness.models import loading

        report = self.report
        report.backend.towers = loading.tower_counts(trainer.model)  # after freeze_mm_modules
        planned = int(trainer.args.max_steps)  # axolotl's steps for num_epochs (the YAML gives no max_steps)
        epochs = max(1, int(cfg.num_epochs or 1))
        report.steps_per_epoch = max(1, math.ceil(planned / epochs)) if planned > 0 else None
        trainer.args.max_steps = min(planned, self.job.max_steps) if planned > 0 else self.job.max_steps
        report.planned_steps = trainer.args.max_steps
        kept = len(trainer.train_dataset) if trainer.train_dataset is not None else 0
        report.data = DataStats(
            n_samples=kept,
            n_dropped_too_long=max(0, read_samples(cfg) - kept),
            total_tokens=int(cfg.total_num_tokens or 0),
            total_label_tokens=int(cfg.total_supervised_tokens or 0),
        )
        cuda = torch.cuda.is_available() and self.job.device == "cuda"
        report.device = "cuda" if cuda else "cpu"
        report.gpu = torch.cuda.get_device_name(torch.cuda.current_device()) if cuda else None
        report.activation_checkpointing = bool(cfg.gradient_checkpointing)
        report.attention = cfg.attn_implementation
        if self.callback is not None:
            self.callback.watch_epochs(report.steps_per_epoch or 1)
        self.write()

    def add_callbacks_post_trainer(self, cfg, trainer):
        self.callback = HarnessCallback(self.job, self.report, self.started)
        return [self.callback]

    def post_train(self, cfg, model):
        """Called after trainer.train() and again once the model and tokenizer are saved."""
        now = time.monotonic()
        report = self.report
        if self.trained_at is None:
            self.trained_at = now
        saved = any(Path(cfg.output_dir).glob("*.safetensors"))
        if saved:
            report.status = "finished"
        callback = self.callback
        if callback is not None:
            report.stop_reason = callback.stop_reason or "step_budget"
            report.non_finite_step = callback.non_finite_step
            report.steps = callback.steps
        load = (self.loaded_at or self.started) - self.started
        report.time_s = Timings(
            load=load,
            first_step=callback.first_step_s if callback else None,
            train=self.trained_at - (self.loaded_at or self.started),
            total=now - self.started,
            started_at=self.started,
        )
        self.write()


class HarnessCallback(TrainerCallback):
    """axolotl's logs -> progress lines and trainer_state.json (rank 0), and the stop rule (every rank decides
    alike: the logged loss is already averaged over ranks)."""

    def __init__(self, job: RunConfig, report: WorkerReport, started: float):
        self.job, self.report, self.started = job, report, started
        self.recent: deque[float] = deque(maxlen=job.patience)
        self.stop_reason: str | None = None
        self.non_finite_step: int | None = None
        self.first_step_s: float | None = None
        self.last_time: float | None = None
        self.steps = 0

    def watch_epochs(self, steps_per_epoch: int) -> None:
        """The stop window spans STOP_EPOCHS epochs, at least `patience` steps."""
        self.recent = deque(self.recent, maxlen=max(self.job.patience, STOP_EPOCHS * steps_per_epoch))

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        now = time.monotonic()
        if logs and "loss" in logs and state.log_history and state.log_history[-1].get("step") == state.global_step:
            # the entry trainer_state.json keeps for this step: the times the metrics need
            state.log_history[-1].update(elapsed_s=now - self.started, step_time_s=now - (self.last_time or now))
        self.last_time = now
        if state.is_world_process_zero:
            state.save_to_json(str(stack_dir(self.job) / STATE_FILE))
        if not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        self.steps = state.global_step
        self.first_step_s = self.first_step_s or now - self.started
        follow_logged_loss(self, state, control, loss, self.job.log_every, self.job.loss_threshold)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            state.save_to_json(str(stack_dir(self.job) / STATE_FILE))


def read_samples(cfg) -> int:
    """The conversations axolotl was given (the harness's JSONL, one line each)."""
    datasets = cfg.datasets or []
    path = Path(datasets[0]["path"]) if datasets else None
    if path is None or not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def axolotl_version() -> str | None:
    from harness.backends import installed_version
    from harness.backends.axolotl import REQUIREMENT

    return installed_version(REQUIREMENT)
