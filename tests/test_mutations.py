"""Mutation tests: deliberately injected training bugs must each turn the verdict to FAIL, with a
reason that names the bug; and no false alarms (healthy seeds PASS, an unfittable dataset FAILs).

The bugs live behind SFT_HARNESS_MUTATION=NAME/MODEL (harness/testing/mutations.py), so they reach the
torchrun ranks. One CLI sweep carries one bug per model: three sweeps cover the catalogue, one on
2 ranks (the distributed bugs, and those a complete epoch or the end of warm-up must reveal: 4 steps,
1 warm-up step), one on 1 rank for the bugs the load or the preflight catches before step 1 is over
(2 steps), and one like it with padded batches (--no-packing) for the bugs of padded batches and of
gradient accumulation. CI has 2 cores: the 2-rank sweep runs beside one 1-rank CLI run at a time (the
1-rank sweeps first, then the healthy seeds and the unfittable dataset), the 1-rank runs two at a time
once it is done.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from gate_helpers import cli_command, cli_env, failure_context, read_json

from harness.runtime.paths import REPO_ROOT
from harness.testing import mutations

pytestmark = pytest.mark.slow

# mutation -> (model whose job carries it, sweep, fragments the naming reason must hold)
MUTATIONS = {
    "loss_per_rank_mean": (
        "Llama-3.2-1B-Instruct",
        "ranks2",
        ["preflight step_loss check failed", "averaged per rank"],
    ),
    "grads_not_reduced": (
        "gemma-3-4b-it",
        "ranks2",
        ["preflight grad_reduction check failed", "not reduced across ranks"],
    ),
    "micro_batch_dropped": ("Qwen2.5-0.5B-Instruct", "ranks2", ["data accounting broken", "missing"]),
    "same_batch_every_step": ("Qwen3-4B-Instruct-2507", "ranks2", ["data accounting broken", "repeated"]),
    "lr_zero_after_warmup": ("gemma-3-270m", "ranks2", ["learning rate is 0", "after warm-up"]),
    "vision_tower_trainable": ("Qwen3-VL-2B-Instruct", "ranks2", ["tower parameters were trainable"]),
    "optimizer_never_steps": (
        "gemma-3n-E4B-it",
        "ranks2",
        ["trainable parameters are unchanged", "optimizer never stepped"],
    ),
    "silent_random_load": (
        "Ministral-3-3B-Instruct-2512",
        "ranks2",
        ["parameters were loaded from the checkpoint", "left at random init"],
    ),
    "vocab_from_top_config": (
        "Qwen2.5-VL-3B-Instruct",
        "ranks2",
        ["preflight vocab check failed", "read from the wrong config"],
    ),
    "labels_not_masked": (
        "Llama-3.2-1B-Instruct",
        "rank1",
        ["preflight labels check failed", "prompt tokens labelled"],
    ),
    "eot_not_labelled": ("gemma-3-270m", "rank1", ["preflight labels check failed", "end-of-turn marker not labelled"]),
    "packed_cross_attention": (
        "Qwen2.5-0.5B-Instruct",
        "rank1",
        ["preflight packing check failed", "packed samples see each other"],
    ),
    "position_ids_not_reset": (
        "Qwen3-4B-Instruct-2507",
        "rank1",
        ["preflight packing check failed", "position ids do not restart"],
    ),
    "extracted_random_init": (
        "Ministral-3-3B-Instruct-2512",
        "rank1",
        ["preflight extraction check failed", "random init"],
    ),
    "towers_updated": ("Qwen3-VL-2B-Instruct", "rank1", ["frozen (tower) parameters changed"]),
    "generation_template_differs": (
        "gemma-3n-E4B-it",
        "rank1",
        ["generation check failed", "differs from their training text"],
    ),
    "resolver_returns_causal_lm": (
        "gemma-3-4b-it",
        "rank1",
        ["load path is causal_lm", "the registry expects extract_causal_lm"],
    ),
    "token_type_ids_dropped": (
        "Qwen2.5-VL-3B-Instruct",
        "rank1",
        ["preflight inputs check failed", "token-type inputs not passed"],
    ),
    "pads_not_masked": (
        "Qwen2.5-0.5B-Instruct",
        "padded",
        ["preflight padding check failed", "padded samples attend to their pads"],
    ),
    "loss_per_micro_batch_mean": (
        "Llama-3.2-1B-Instruct",
        "padded",
        ["preflight step_loss check failed", "averaged per micro-batch"],
    ),
}
SWEEPS = {
    # 24 samples at 512 tokens a rank: 2 steps an epoch, so 4 steps finish two epochs and pass the warm-up
    # step. Not fewer samples: with 12 the ranks' label-token counts are so even that a per-rank loss mean
    # differs from the global one by 1.5e-5 (tolerance 1e-5); with 24, by 1.6e-4.
    "ranks2": (
        "--nproc-per-node",
        "2",
        "--max-samples",
        "24",
        "--max-tokens-per-gpu",
        "512",
        "--max-steps",
        "4",
        "--warmup-steps",
        "1",
    ),
    # 8 samples, one step of them: what the packing (8 samples) and label (4) checks read; the preflight,
    # evaluation and generation check cost a third of 24 samples'.
    "rank1": ("--nproc-per-node", "1", "--max-samples", "8", "--max-steps", "2"),
    # The same with padded batches: the 8 samples make one padded micro-batch of unequal rows (the padding
    # check reads them), which the gradient-accumulation bug's setting splits into two of 4 samples.
    "padded": ("--nproc-per-node", "1", "--max-samples", "8", "--max-steps", "2", "--no-packing"),
}
# Reasons a mutation may bring beside its own: short runs miss the loss target; a rank that keeps a
# full replica is also reported as unsharded; a per-rank or per-micro-batch loss mean also scales the
# gradient; the full VLM trained as a causal LM carries trainable towers; weights left random also fail
# the extraction parity; ln(a wrong vocabulary) is not where random weights start.
SIDE_EFFECTS = {
    "any": ["final loss", "generation check failed"],
    "grads_not_reduced": ["FSDP did not shard"],
    "loss_per_rank_mean": ["preflight grad_reduction check failed"],
    "loss_per_micro_batch_mean": ["preflight grad_reduction check failed"],
    "resolver_returns_causal_lm": ["tower parameters were trainable"],
    "silent_random_load": ["preflight extraction check failed"],
    "vocab_from_top_config": ["initial loss"],
}
# No wandb: an offline run per model costs its CLI run seconds, and tracking is tests/test_tracking.py's.
BASE = ("--weights", "tiny", "--device", "cpu", "--timeout-per-model", "240", "--wandb-mode", "disabled")


def test_catalogue_is_complete():
    assert set(MUTATIONS) == set(mutations.CATALOGUE)
    assert len(MUTATIONS) >= 12


SEED_MODEL = "Ministral-3-3B-Instruct-2512"
SEEDS = (1, 2, 3, 4, 5)
# The same questions, each asked twice with different answers that share their first words (so
# nothing before the first differing token tells the two apart): no model can fit both.
CONTRADICTIONS = [
    ("Is the sky green?", "The answer is yes.", "The answer is no."),
    ("What colour is snow?", "The answer is white.", "The answer is purple."),
    ("How many legs has a cat?", "The answer is four.", "The answer is nine."),
    ("Which city is in France?", "The answer is Paris.", "The answer is Tokyo."),
]


def sweep_run(sweep: str, output) -> tuple[list[str], dict]:
    chosen = {name: model for name, (model, where, _) in MUTATIONS.items() if where == sweep}
    assert len(set(chosen.values())) == len(chosen), f"{sweep}: one mutation per model"
    spec = ",".join(f"{name}/{model}" for name, model in chosen.items())
    args = [
        "--models",
        ",".join(chosen.values()),
        *BASE,
        *SWEEPS[sweep],
        "--output-dir",
        str(output),
        "--run-id",
        sweep,
    ]
    return args, cli_env(**{mutations.ENV_VAR: spec})


def run_all(
    runs: dict[str, tuple[list[str], dict]], processes: dict[str, int], budget: int, width: int, timeout: float = 900
) -> dict[str, subprocess.CompletedProcess]:
    """CLI runs in order, each taking processes[key] ranks (1 if not named): as many at once as keep
    the ranks within `budget`, and at most `width` 1-rank runs."""
    pending, running, done = list(runs.items()), {}, {}
    started = time.monotonic()
    deadline = started + timeout
    spans = {}

    def fits(key: str) -> bool:
        ranks = sum(processes.get(k, 1) for k in running) + processes.get(key, 1)
        singles = sum(1 for k in running if processes.get(k, 1) == 1) + (processes.get(key, 1) == 1)
        return ranks <= budget and singles <= width

    while pending or running:
        while pending and fits(pending[0][0]):
            key, (args, env) = pending.pop(0)
            spans[key] = [time.monotonic() - started]
            running[key] = subprocess.Popen(
                cli_command(*args), cwd=REPO_ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        for key, process in list(running.items()):
            if process.poll() is not None:
                out, err = process.communicate()
                done[key] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
                spans[key].append(time.monotonic() - started)
                del running[key]
        if time.monotonic() > deadline:
            for process in running.values():
                process.kill()
            raise AssertionError(f"CLI runs still going after {timeout}s: {list(running)}")
        time.sleep(0.2)
    print(
        "\n".join(
            ["", "CLI run: start -> end (s)"] + [f"{key:<14} {a:6.1f} -> {b:6.1f}" for key, (a, b) in spans.items()]
        )
    )
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every CLI run of this module: the 2-rank sweep beside one 1-rank run, then 1-rank runs two at a time."""
    output = tmp_path_factory.mktemp("mutations")
    dataset = output / "contradictory.jsonl"
    dataset.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, *answers in CONTRADICTIONS
            for a in answers
        )
    )
    single = {"rank1": sweep_run("rank1", output), "padded": sweep_run("padded", output)}
    single |= {
        f"seed{seed}": (
            [
                "--models",
                SEED_MODEL,
                *BASE,
                "--nproc-per-node",
                "1",
                "--max-samples",
                "16",
                "--seed",
                str(seed),
                "--output-dir",
                str(output),
                "--run-id",
                f"seed{seed}",
            ],
            cli_env(),
        )
        for seed in SEEDS
    }
    single["contradictory"] = (
        [
            "--models",
            SEED_MODEL,
            *BASE,
            "--nproc-per-node",
            "1",
            "--dataset",
            str(dataset),
            "--output-dir",
            str(output),
            "--run-id",
            "contradictory",
        ],
        cli_env(),
    )
    for _, env in single.values():  # one intra-op thread each, or two jobs on 2 cores spin against each other
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = run_all({"ranks2": sweep_run("ranks2", output), **single}, processes={"ranks2": 2}, budget=3, width=2)
    return {"output": output, "procs": procs}


@pytest.fixture(scope="module")
def sweeps(runs) -> dict[str, dict]:
    """mutation -> the result.json of the model that carried it."""
    results = {}
    for sweep in SWEEPS:
        proc = runs["procs"][sweep]
        assert proc.returncode == 1, failure_context(proc)  # FAIL, not a crash of the CLI
        for name, (model, where, _) in MUTATIONS.items():
            if where == sweep:
                results[name] = read_json(runs["output"] / sweep / model / "result.json")
    print_table(results)
    return results


def print_table(results: dict[str, dict]) -> None:
    width = max(map(len, results))
    lines = ["", "mutation -> verdict: naming reason", "-" * 100]
    for name, result in results.items():
        fragments = MUTATIONS[name][2]
        naming = next((r for r in result["reasons"] if fragments[0] in r), "(none)")
        lines.append(f"{name:<{width}}  {result['verdict']}: {naming[:220]}")
    print("\n".join(lines), flush=True)


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutation_fails_the_verdict_with_a_naming_reason(sweeps, name):
    result = sweeps[name]
    model, _, fragments = MUTATIONS[name]
    assert result["model"] == model
    assert result["verdict"] == "FAIL"
    naming = [r for r in result["reasons"] if all(f in r for f in fragments)]
    assert naming, f"{name}: no reason holds {fragments}: {result['reasons']}"
    # Nothing else was blamed: every other reason is a known side effect of this bug.
    allowed = SIDE_EFFECTS["any"] + SIDE_EFFECTS.get(name, []) + [fragments[0]]
    stray = [r for r in result["reasons"] if not any(a in r for a in allowed)]
    assert not stray, f"{name}: unexpected reasons {stray}"
    assert result["exit"]["returncode"] == 0  # the job ran to its end: the verdict, not a crash, failed it


def test_mutations_are_off_without_the_variable(monkeypatch):
    monkeypatch.delenv(mutations.ENV_VAR, raising=False)
    mutations.bind_model("Llama-3.2-1B-Instruct")
    assert not any(mutations.active(name) for name in mutations.CATALOGUE)
    assert mutations.fingerprint_salt() == ""
    monkeypatch.setenv(mutations.ENV_VAR, "labels_not_masked/gemma-3-270m,lr_zero_after_warmup")
    assert not mutations.active("labels_not_masked") and mutations.active("lr_zero_after_warmup")
    monkeypatch.setenv(mutations.ENV_VAR, "no_such_bug")
    with pytest.raises(ValueError, match="unknown mutation 'no_such_bug'"):
        mutations.active("labels_not_masked")
    mutations.bind_model(None)


# ---------------------------------------------------------------- no false alarms


@pytest.mark.parametrize("seed", SEEDS)
def test_healthy_model_passes_for_every_seed(runs, seed):
    proc = runs["procs"][f"seed{seed}"]
    assert proc.returncode == 0, failure_context(proc)
    folder = runs["output"] / f"seed{seed}" / SEED_MODEL
    result = read_json(folder / "result.json")
    assert result["verdict"] == "PASS" and result["reasons"] == []
    checks = result["preflight"]
    assert {c["status"] for name, c in checks.items() if name != "inputs"} == {"pass"}  # extraction parity ran too
    assert checks["inputs"]["status"] == "skipped"  # the extracted text model takes no token-type inputs
    assert read_json(folder / "job.json")["seed"] == seed


def test_contradictory_dataset_is_judged_fail(runs):
    proc = runs["procs"]["contradictory"]
    assert proc.returncode == 1, failure_context(proc)
    result = read_json(runs["output"] / "contradictory" / SEED_MODEL / "result.json")
    assert result["verdict"] == "FAIL" and result["stop_reason"] == "step_budget"
    assert result["data"]["n_samples"] == 2 * len(CONTRADICTIONS)
    # The only failure is the loss: the pipeline itself (preflight, accounting) is healthy.
    reasons = [r for r in result["reasons"] if "generation check failed" not in r]  # nor can it reproduce the replies
    assert len(reasons) == 1 and "final loss" in reasons[0], result["reasons"]
    assert result["final_loss"] > 0.05
