"""The native backend's worker: one rank of the harness's own trainer, started by torchrun
(`python -m torch.distributed.run ... -m harness.backends.native_worker --job job.json`). It takes the
job's parts, armed with the test-only bugs and faults their variables name (harness.testing: the one
seam), prepares the caches, joins the process group, runs harness.job.train.train and writes worker.json,
whatever ends the job.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from harness.contract.records import RunConfig, WorkerReport, record_job_error, write_worker_report
from harness.job import distributed as dist_lib
from harness.job.train import JobParts, train
from harness.testing import arm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one overfit training job (started by torchrun)")
    parser.add_argument("--job", type=Path, required=True)
    cfg = RunConfig.from_json(parser.parse_args(argv).job)
    rank = int(os.environ.get("RANK", 0))  # torchrun's; the process group does not exist yet
    # Filled in by train() as the job learns it, so a crash still reports the load record and so on.
    report = WorkerReport(world_size=int(os.environ.get("WORLD_SIZE", 1)), rank=rank, config=cfg)
    try:
        # The one seam for test-only bugs and faults: the real parts when their variables are unset.
        # Before the caches: a mutation can change the tokenised data and its key.
        parts = arm(cfg.spec.name, rank, JobParts())
        parts.prepare_caches(cfg, parts.labelling)  # before init_distributed: one writer per cache entry
        ctx = dist_lib.init_distributed(cfg.device)
        dist_lib.agree_on_job(cfg.job_identity())  # every node: the same model, settings and data
        train(cfg, ctx, report, parts)
        return 0
    except Exception as exc:  # record what killed the job (and what was known), then fail the exit code
        record_job_error(report, exc)
        return 1
    finally:
        write_worker_report(cfg, report, rank)
        dist_lib.close_distributed(clean=report.status == "finished")


if __name__ == "__main__":
    sys.exit(main())
