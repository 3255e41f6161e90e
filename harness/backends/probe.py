"""A backend's probe run inside a stack's own environment (--stack, --stack-python): the class and load
path THAT version of the stack (or of transformers) would take. The gate starts it with the
environment's interpreter and reads the one JSON line it prints.

    <env>/bin/python -m harness.backends.probe --backend trl --model '{"name": ...}'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from harness.contract.errors import UsageError
from harness.contract.model_spec import ModelSpec
from harness.contract.records import BackendProbe
from harness.runtime.launch import job_environment

ANSWER_PREFIX = "probe: "
PROBE_TIMEOUT_S = 600.0  # the stack's imports on a cold file cache, a hub config download


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--model", required=True, help="the ModelSpec, as JSON")
    args = parser.parse_args(argv)
    from harness import backends
    from harness.models.configs import load_config  # transformers: the environment's own

    spec = ModelSpec(**json.loads(args.model))
    probe = backends.backend(args.backend).probe(spec, load_config(spec))
    print(ANSWER_PREFIX + json.dumps(probe.to_dict()), flush=True)
    return 0


def probe_in(python: str, backend_name: str, spec: ModelSpec, where: str) -> BackendProbe:
    """The probe run with `python` (an environment of the stack's own); a probe that cannot run there is
    a usage error naming `where` (the --stack spec) and its last line."""
    command = [python, "-m", "harness.backends.probe", "--backend", backend_name, "--model", json.dumps(spec.to_dict())]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=job_environment())
    except (OSError, subprocess.TimeoutExpired) as error:
        raise UsageError(f"{where}: the {backend_name} probe for {spec.name} could not run: {error}") from error
    answers = [line[len(ANSWER_PREFIX) :] for line in done.stdout.splitlines() if line.startswith(ANSWER_PREFIX)]
    if done.returncode != 0 or not answers:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        raise UsageError(
            f"{where}: the {backend_name} probe for {spec.name} failed in that environment: "
            f"{lines[-1] if lines else f'exit code {done.returncode}'}"
        )
    return BackendProbe.from_dict(json.loads(answers[-1]))


if __name__ == "__main__":
    sys.exit(main())
