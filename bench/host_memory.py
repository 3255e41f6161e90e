#!/usr/bin/env python3
"""Host memory of loading a checkpoint on N ranks of one node: rank 0 reads, the others get their
shards broadcast (what harness/job/train.py does), against every rank reading (what it did before).

    python bench/host_memory.py --model gemma-3-270m --nproc 1,2           # CPU, gloo, the real 270M
    python bench/host_memory.py --model /data/g4b --nproc 1 --device cuda  # a local hub-layout folder
    python bench/host_memory.py --write-synthetic gemma-3-4b-it /data/g4b  # such a folder, random weights
    python bench/host_memory.py --model /data/g4b --nproc 1,2,4 --one-gpu  # N ranks sharing GPU 0 (gloo)

Each run is `torchrun --nproc-per-node N` of this file's worker: it prepares the checkpoint folder,
joins the process group, then loads as the trainer does (load_model -> TrainableLM ->
shard_read_by_rank0), or with --every-rank-reads each rank reads it all. Meanwhile this process sums
the proportional set size (PSS: shared pages split between the processes that map them, so the
safetensors page cache is not counted once per rank) of every process under torchrun, every 50 ms.
Reported per run: the node's PSS when all ranks were ready to load (baseline), its peak while
loading, and the difference in fp32 copies of the text weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


# ---------------------------------------------------------------- the worker (one rank)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from harness.gate import registry
    from harness.job import distributed as dist_lib
    from harness.job.train import TrainableLM
    from harness.models import loading

    spec = registry.lookup(args.model)
    loading.checkpoint_folder(spec, args.weights)  # before the process group, as job_caches does
    if args.one_gpu:  # every rank on GPU 0 through gloo: an N-GPU node's host memory, from one GPU
        torch.cuda.set_device(0)
        dist.init_process_group("gloo")
        ctx = dist_lib.DistContext(dist.get_rank(), dist.get_world_size(), 0, torch.device("cuda", 0))
    else:
        ctx = dist_lib.init_distributed(args.device)
    dist.barrier()
    if ctx.is_main:
        Path(args.ready_file).write_text(str(time.time()))
        time.sleep(0.5)  # let the sampler read the baseline
    dist.barrier()
    started = time.perf_counter()
    phases = {"ready": pss_bytes(os.getpid()) / GIB}  # this rank's own PSS after each phase
    from_rank0 = not args.every_rank_reads and ctx.world_size > 1
    loaded = loading.load_model(spec, args.weights, on_meta=from_rank0 and not ctx.is_main)
    phases["read"] = pss_bytes(os.getpid()) / GIB
    model = TrainableLM(loaded.model)
    dist_lib.shard_read_by_rank0(model, ctx, read_by_rank0=from_rank0, bf16=ctx.device.type == "cuda")
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    phases["loaded"] = pss_bytes(os.getpid()) / GIB
    every_rank = [None] * ctx.world_size
    dist.all_gather_object(every_rank, {k: round(v, 2) for k, v in phases.items()})
    if ctx.is_main:
        Path(args.ready_file + ".loaded").write_text(str(time.time()))
        time.sleep(0.5)  # let the sampler read the node with the model loaded
    dist.barrier()
    if ctx.is_main:
        text_params = sum(p.numel() for p in model.parameters())
        Path(args.result_file).write_text(
            json.dumps(
                {
                    "load_s": round(time.perf_counter() - started, 2),
                    "fp32_copy_gib": text_params * 4 / GIB,
                    "params": text_params,
                    "class": type(loaded.model).__name__,
                    "load_path": loaded.record.load_path,
                    "rank_pss_gib": every_rank,
                }
            )
        )
    dist_lib.close_distributed()


# ---------------------------------------------------------------- the sampler (this process)


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


def pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(args, nproc: int, every_rank_reads: bool, scratch: Path) -> dict:
    ready, result = scratch / f"ready-{nproc}-{every_rank_reads}", scratch / f"result-{nproc}-{every_rank_reads}.json"
    command = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            __file__,
            "--worker",
            "--model",
            args.model,
            "--weights",
            args.weights,
            "--device",
            args.device,
            "--ready-file",
            str(ready),
            "--result-file",
            str(result),
        ]
        + (["--every-rank-reads"] if every_rank_reads else [])
        + (["--one-gpu"] if args.one_gpu else [])
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    samples: list[tuple[bool, bool, int]] = []
    loaded_marker = Path(str(ready) + ".loaded")
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(
                (ready.exists(), loaded_marker.exists(), sum(pss_bytes(pid) for pid in descendants(proc.pid)))
            )
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0 or not result.exists():
        raise SystemExit(f"nproc {nproc}: the worker failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    loaded = json.loads(result.read_text())
    after_ready = [pss for is_ready, _, pss in samples if is_ready]
    loaded_samples = [pss for _, is_loaded, pss in samples if is_loaded]
    if not after_ready or not loaded_samples:  # a sample slower than the workers' 0.5 s pauses
        raise SystemExit(f"nproc {nproc}: the sampler saw no node state at the ready or loaded marker")
    baseline, peak = after_ready[0], max(after_ready)
    final = loaded_samples[0]  # the model in place, the load's temporaries gone
    return {
        "nproc": nproc,
        "mode": "every rank reads" if every_rank_reads else "rank 0 reads, broadcast",
        **loaded,
        "baseline_gib": round(baseline / GIB, 2),
        "peak_gib": round(peak / GIB, 2),
        "peak_above_baseline_gib": round((peak - baseline) / GIB, 2),
        "loaded_gib": round(final / GIB, 2),
        # what the load needed beyond the loaded model (on a GPU the model is on the GPU: final == baseline)
        "transient_fp32_copies": round((peak - final) / GIB / loaded["fp32_copy_gib"], 2),
        "fp32_copies": round((peak - baseline) / GIB / loaded["fp32_copy_gib"], 2),
    }


def write_synthetic(name: str, folder: Path) -> None:
    """A full-size hub-layout checkpoint of a registry model: the class a user downloads (the VLM
    with its towers), random weights, bf16 safetensors shards + index (as the hub ships)."""
    import torch

    from harness.gate import registry
    from harness.models import loading
    from harness.models.configs import load_config
    from harness.models.plan import model_class, resolve_load_path

    config = load_config(registry.lookup(name))
    decision = resolve_load_path(config)
    class_name = decision.model_class if decision.load_path == "causal_lm" else decision.multimodal_class
    model = loading.build_on_meta(model_class(class_name), config, torch.float32)
    loading.materialize(model, "cuda" if torch.cuda.is_available() else "cpu", seed=0)
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="4GB")
    print(f"{class_name} written to {folder}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m", help="a registry name or a local hub-layout folder")
    parser.add_argument("--weights", default="real", choices=("real", "tiny"))
    parser.add_argument("--nproc", default="1,2", help="rank counts, comma separated")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--one-gpu",
        action="store_true",
        help="all ranks on GPU 0 (gloo): the host memory of an N-GPU node where only one GPU is lent",
    )
    parser.add_argument("--output", type=Path, help="write the runs as JSON here too")
    parser.add_argument("--write-synthetic", nargs=2, metavar=("MODEL", "FOLDER"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--every-rank-reads", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.write_synthetic:
        return write_synthetic(args.write_synthetic[0], Path(args.write_synthetic[1]))
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"host-memory-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    runs = []
    for nproc in [int(n) for n in args.nproc.split(",")]:
        for every_rank_reads in (False,) if nproc == 1 else (True, False):
            run = measure(args, nproc, every_rank_reads, scratch)
            print(
                f"{nproc} rank(s), {run['mode']}: node PSS {run['baseline_gib']} GiB ready -> peak {run['peak_gib']} GiB "
                f"(+{run['peak_above_baseline_gib']} GiB = {run['fp32_copies']} fp32 copies of "
                f"{run['fp32_copy_gib']:.2f} GiB; loaded {run['loaded_gib']} GiB, transient {run['transient_fp32_copies']} copies), load {run['load_s']} s; per rank {run['rank_pss_gib']}",
                flush=True,
            )
            runs.append(run)
    if args.output:
        args.output.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "weights": args.weights,
                    "device": args.device,
                    "one_gpu": args.one_gpu,
                    "runs": runs,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
