"""A healthy run's verdict input, for the verdict tests to break one condition at a time."""

import math

from harness import backends
from harness.contract.records import GenerationCheck
from harness.gate.verdict import VerdictInput

LN_1024 = math.log(1024)


def healthy(**overrides) -> VerdictInput:
    values = dict(
        clean_exit=True,
        exit_detail="",
        load_path="extract_causal_lm",
        expected_load_path="extract_causal_lm",
        weights="tiny",
        vocab_size=1024,
        losses=[LN_1024, 3.0, 1.0, 0.04, 0.03, 0.02, 0.02, 0.01],
        grad_norms=[1.0] * 8,
        loss_threshold=0.05,
        stop_reason="target_reached",
        preflight={
            "labels": {"status": "pass", "detail": "ok"},
            "extraction": {"status": "skipped", "detail": "no VLM"},
        },
        lrs=[1e-3] * 8,
        warmup_steps=5,
        trainable_params_changed=True,
        params_loaded=100,
        params_total=100,
        generation=GenerationCheck(
            samples=32, exact_matches=30, exact_match_rate=30 / 32, token_accuracy=0.98, expected_tokens=500
        ),
    )
    values.update(overrides)
    traits = backends.traits(values.get("backend", "native"))  # as the sweep fills them
    values.setdefault("judged_from_checkpoint", traits.judged_from_checkpoint)
    values.setdefault("warmup_starts_at_zero", traits.warmup_starts_at_zero)
    return VerdictInput(**values)
