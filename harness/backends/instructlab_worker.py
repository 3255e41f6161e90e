"""One instructlab-training job: its data processing (on CPU, its own chat-template rendering and
masking), then its `run_training`, which starts torchrun on this node's GPUs. Records the recipe as
instructlab's options; instructlab.collect reads what the stack wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from harness.contract.records import (
    PROGRESS_PREFIX,
    BackendRecord,
    DataStats,
    RunConfig,
    Timings,
    WorkerReport,
    record_job_error,
    write_worker_report,
)
from harness.runtime.launch import Topology

UNMAPPED = [
    "step budget: instructlab trains whole epochs; epochs = the fewest that reach max_steps "
    "(at most the recipe's epochs)",
    "stop rule: none (no early stop at the target); the harness evaluates the last epoch's checkpoint",
    "token budget: effective_batch_size = samples per step for ~max_tokens_per_gpu tokens per GPU; "
    "max_batch_len = max(max_tokens_per_gpu, max_seq_len) (instructlab refuses a batch shorter than a sample)",
    "schedule: instructlab's default cosine decay to 0 at the last step (TrainingArgs has no scheduler field), "
    "not the recipe's; warm-up steps mapped. Its logged lr is the next step's (logged after the scheduler steps): "
    "metrics.jsonl shifts it back one step",
    "sharding: FSDP1 through accelerate (HYBRID_SHARD), not FSDP2; flash attention off (disable_flash_attn)",
    "gradient clipping, betas: instructlab's defaults; weight decay mapped",
    "--gpu-memory-gib: not applied (instructlab's own processes allocate)",
    "saves: the final model only (its training script's --save_last in place of --checkpoint_at_epoch, which "
    "TrainingArgs cannot ask for), under hf_format/last_epoch",
    "tokens: its counts, so tokens/s and MFU, include the padding of each micro-batch (flash attention off)",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one instructlab-training job")
    parser.add_argument("--job", type=Path, required=True)
    parser.add_argument("--job-index", type=int, default=0)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--rdzv-endpoint", default="")
    args = parser.parse_args(argv)
    topology = Topology(args.nproc_per_node, args.nnodes, args.node_rank, args.rdzv_endpoint or None)
    cfg = RunConfig.from_json(args.job)
    report = WorkerReport(rank=0, config=cfg, backend=BackendRecord("instructlab", unmapped=list(UNMAPPED)))
    try:
        train_with_instructlab(cfg, report, topology, args.job_index)
        return 0
    except Exception as exc:
        record_job_error(report, exc)
        return 1
    finally:
        report.to_json(cfg.worker_path)


def train_with_instructlab(cfg: RunConfig, report: WorkerReport, topology: Topology, job_index: int) -> None:
    import instructlab.training
    import torch
    from instructlab.training import data_process

    from harness.backends import instructlab as backend
    from harness.backends.stack_checkpoint import input_checkpoint_path
    from harness.contract.dataset_file import load_chat_dataset

    started = time.monotonic()
    folder = input_checkpoint_path(cfg)
    work = backend.stack_dir(cfg)
    work.mkdir(parents=True, exist_ok=True)
    report.backend.version = getattr(instructlab.training, "__version__", None) or installed_version()
    conversations = load_chat_dataset(cfg.dataset)[: cfg.max_samples]
    messages_path = work / "messages.jsonl"
    messages_path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    data_process.process_data(
        data_path=str(messages_path),
        data_output_path=str(work / "data"),
        max_seq_len=cfg.max_seq_len,
        model_path=str(folder),
        num_cpu_procs=2,
    )
    lengths = [json.loads(line)["len"] for line in (work / "data" / "data.jsonl").read_text().splitlines() if line]
    report.data = DataStats(
        n_samples=len(lengths), n_dropped_too_long=len(conversations) - len(lengths), total_tokens=sum(lengths)
    )
    world = topology.nnodes * topology.nproc_per_node
    batch = backend.effective_batch_size(lengths, world, cfg)
    steps_per_epoch, epochs = backend.steps_for(len(lengths), batch, cfg)
    report.world_size, report.steps_per_epoch, report.planned_steps = world, steps_per_epoch, steps_per_epoch * epochs
    report.device, report.gpu = "cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    train_args, torch_args = arguments(cfg, folder, work, batch, epochs, topology, job_index)
    report.backend.recipe = train_args
    write_worker_report(cfg, report, 0)
    prepared = time.monotonic()
    os.environ["PATH"] = os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    )  # its `torchrun`
    os.environ["COLUMNS"] = "400"  # rich wraps its log lines at 80 columns off a terminal; collect reads them
    with (
        following_progress(work / "ckpt" / backend.METRICS_FILE, report.planned_steps, cfg.log_every),
        final_save_only(),
    ):
        try:
            instructlab.training.run_training(
                torch_args=instructlab.training.TorchrunArgs(**torch_args),
                train_args=instructlab.training.TrainingArgs(**train_args),
            )
        except Exception as exc:  # it says only "Suffered a failure during distributed training"
            cause = first_rank_error(work / "ckpt" / f"full_logs_global{topology.node_rank}.log")
            if cause is None:
                raise
            raise RuntimeError(f"instructlab's training failed: {cause}") from exc
    report.status, report.stop_reason = "finished", "step_budget"
    report.time_s = Timings(
        load=prepared - started, train=time.monotonic() - prepared, total=time.monotonic() - started, started_at=started
    )


@contextmanager
def final_save_only():
    """instructlab saves the model at every epoch (about 35 s for a 4B model on an H200, and a converged
    run takes ~20 epochs) while the verdict reads only the last. TrainingArgs cannot ask for the final save
    alone; the training script run_training launches can (--save_last, in 0.15.0 through 0.16.x): its
    command is rewritten where run_training starts it. A version without that seam keeps per-epoch saves."""
    import instructlab.training.main_ds as main_ds  # here: only inside the stack's environment

    start = getattr(main_ds, "StreamablePopen", None)
    if start is None:
        print("[instructlab] no StreamablePopen in its main_ds: it saves every epoch", flush=True)
        yield
        return

    def started_saving_once(log_file, command, *args, **kwargs):
        return start(log_file, saving_only_the_final_model(command), *args, **kwargs)

    main_ds.StreamablePopen = started_saving_once
    try:
        yield
    finally:
        main_ds.StreamablePopen = start


def saving_only_the_final_model(command: list[str]) -> list[str]:
    """The training script's command with its per-epoch save replaced by one save after the last step."""
    if "--checkpoint_at_epoch" not in command:
        return list(command)
    return [arg for arg in command if arg != "--checkpoint_at_epoch"] + ["--save_last"]


# torchrun prefixes each line of a worker's output with [rankN]:, the exception's last line included.
RANK_ERROR = re.compile(r"^\[rank(\d+)\]: ((?:\w+\.)*\w*(?:Error|Exception)\b.*)$")


def first_rank_error(log_path: Path, limit: int = 300) -> str | None:
    """The first exception a training rank raised, from the stack's log: "rank N: Type: message"."""
    if not log_path.exists():
        return None
    for line in log_path.read_text(errors="replace").splitlines():
        match = RANK_ERROR.match(line.strip())
        if match:
            return f"rank {match.group(1)}: {match.group(2)}"[:limit]
    return None


@contextmanager
def following_progress(metrics_path: Path, planned_steps: int, every: int, poll_s: float = 2.0):
    """instructlab prints its step metrics as wrapped rich text; its JSONL is read as it grows instead,
    and every `every`-th step becomes the harness's progress line (the sweep's status display)."""
    done = threading.Event()

    def follow() -> None:
        offset = 0
        while not done.wait(poll_s):
            offset = print_new_steps(metrics_path, offset, planned_steps, every)
        print_new_steps(metrics_path, offset, planned_steps, every)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    try:
        yield
    finally:
        done.set()
        follower.join(timeout=10)


def print_new_steps(path: Path, offset: int, planned_steps: int, every: int) -> int:
    """Progress lines for the complete lines after `offset`; the new offset."""
    if not path.exists():
        return offset
    with path.open("rb") as handle:
        handle.seek(offset)
        chunk = handle.read()
    complete = chunk[: chunk.rfind(b"\n") + 1]
    for line in complete.decode(errors="replace").splitlines():
        row = json.loads(line) if line.strip().startswith("{") else {}
        if "step" in row and "avg_loss" in row and int(row["step"]) % max(1, every) == 0:
            print(
                f"{PROGRESS_PREFIX}step {row['step']} (budget {planned_steps}) loss {float(row['avg_loss']):.4f}",
                flush=True,
            )
    return offset + len(complete)


def arguments(
    cfg: RunConfig, folder: Path, work: Path, batch: int, epochs: int, topology: Topology, job_index: int
) -> tuple[dict, dict]:
    """The recipe as instructlab's TrainingArgs, the sweep's topology as its TorchrunArgs."""
    train_args = dict(
        model_path=str(folder),
        data_path=str(work / "messages.jsonl"),
        data_output_dir=str(work / "data"),
        ckpt_output_dir=str(work / "ckpt"),
        max_seq_len=cfg.max_seq_len,
        max_batch_len=max(cfg.max_tokens_per_gpu, cfg.max_seq_len),
        num_epochs=epochs,
        effective_batch_size=batch,
        learning_rate=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        random_seed=cfg.seed,
        adamw_weight_decay=cfg.weight_decay,
        process_data=False,
        save_samples=0,
        checkpoint_at_epoch=True,
        keep_last_checkpoint_only=True,
        accelerate_full_state_at_epoch=False,
        disable_flash_attn=True,
        distributed_backend="fsdp",
    )
    torch_args = dict(
        nproc_per_node=topology.nproc_per_node, nnodes=topology.nnodes, node_rank=topology.node_rank, rdzv_id=job_index
    )
    if topology.nnodes > 1:  # model k of the sweep meets at port + k, as the native jobs do
        host, _, port = topology.rdzv_endpoint.rpartition(":")
        torch_args.update(master_addr=host, master_port=int(port or 29500) + job_index)
    return train_args, torch_args


def installed_version() -> str | None:
    from harness.backends import installed_version as version
    from harness.backends.instructlab import REQUIREMENT

    return version(REQUIREMENT)


if __name__ == "__main__":
    raise SystemExit(main())
