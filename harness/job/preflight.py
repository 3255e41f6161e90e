"""Preflight: cheap checks on the first step's data, inside the job, before the loop trusts anything.

Each check returns {"status": "pass" | "fail" | "skipped", "detail": ...}; the trainer records them
in worker.json["preflight"] and the verdict names every failed one.

- packing: the packed loss of a few samples equals their padded loss (samples alone in a row).
  Catches packed samples attending across boundaries and position ids not reset.
- padding (--no-packing only): each of a few samples padded together with others gives the same
  first-layer outputs at its labelled tokens as the sample alone. Catches an attention mask that
  does not match the padding (left pads left unmasked).
- labels: the labelled tokens of a few samples decode to the assistant replies + end-of-turn
  markers, nothing else. Catches labels not masked and end-of-turn not labelled.
- extraction: extract_causal_lm with real/tiny weights: the extracted model's logits equal the full
  VLM's on one prompt (rank 0, CPU, when the VLM is small enough). Catches weights left random.
- step_loss: the loss train_step reports for step 1 equals sum(per-token losses of every rank's
  micro-batches) / (label tokens counted in those batches, all ranks). Catches a per-rank mean and a
  mean of per-micro-batch means (and says which one the reported loss is).
- grad_reduction: the grad norm train_step reports for step 1 (data split over the ranks) equals
  the norm of the same step's gradient with ALL of its micro-batches run on rank 0 (the other
  ranks run empty ones). Under a correct reduction both are the norm of the summed gradient; if
  gradients do not cross ranks, the first is rank 0's own share and the second the whole: they
  differ. Comparing full parameters across ranks would prove nothing under FSDP2, since every
  full_tensor() is gathered from the same shards.
- inputs: the token-type inputs the VLM class takes (token_type_ids, mm_token_type_ids) reached its
  backbone in step 1. Catches a trainer that feeds input_ids/labels only (TRL #5807).
- vocab: the vocabulary size the loss rules use equals the LM head's rows. Catches a vocabulary
  size read from a VLM's top-level config instead of text_config (verl #1013).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from harness.job import data as data_lib
from harness.job import distributed as dist_lib
from harness.models import loading
from harness.models.tokenizers import END_OF_TURN_MARKERS

# Relative tolerances: (bf16 on GPU, fp32 on CPU).
PACKING_TOL = {
    "cuda": 5e-2,
    "cpu": 1e-4,
}  # relative L2; bf16: the FINAL states of healthy gemma-3-4b-it differed by 2e-2 on H200
STEP_LOSS_TOL = {"cuda": 1e-3, "cpu": 1e-5}
GRAD_NORM_TOL = {"cuda": 5e-3, "cpu": 1e-4}
LOGITS_TOL = 1e-4  # fp32 on CPU, relative to the largest reference logit (at least 1)
PACKING_SAMPLES = 8  # at most this many samples of each rank's first micro-batch
LABEL_SAMPLES = 4
PARITY_MAX_PARAMS = 600_000_000  # the full VLM is loaded on rank 0's CPU: only when small
PARITY_PROMPT_TOKENS = 64


def result(ok: bool, detail: str, **values) -> dict:
    return {"status": "pass" if ok else "fail", "detail": detail, **values}


def skipped(detail: str) -> dict:
    return {"status": "skipped", "detail": detail}


def tolerance(table: dict, device: torch.device) -> float:
    return table["cuda" if device.type == "cuda" else "cpu"]


# ---------------------------------------------------------------- (a) packed vs padded


@torch.no_grad()
def packing_check(model, step_plan, dataset, ctx, pad_id: int, packing: bool, pack=data_lib.pack_samples) -> dict:
    """Every rank runs its first micro-batch's first samples packed, then padded, and compares each
    sample's output of the FIRST decoder layer (relative L2).
    Not the loss: near a random init every loss sits close to ln(vocab) whatever the model attends to.
    Not the final states: a deep random Gemma 3n blows rounding up to O(1) by its last layer (1.24 on
    4x H200 with correct attention; bench/packing_noise.py on CPU: first layer 2e-3, last 0.96 in bf16).
    A leak between packed samples, or positions that do not restart, changes the first layer's output
    at once (0.93 for either test mutation on the tiny CPU models)."""
    if not packing:
        return skipped("packing is off: nothing to compare")
    members = step_plan.for_rank(ctx.rank)[0][:PACKING_SAMPLES]
    samples = [dataset.samples[i] for i in members]
    was_training = model.training
    model.eval()
    packed = _per_sample_first_layer(model, samples, True, pad_id, ctx.device, pack)
    padded = _per_sample_first_layer(model, samples, False, pad_id, ctx.device, pack)
    model.train(was_training)
    worst = max((float((a - b).norm() / b.norm().clamp(min=1e-12)) for a, b in zip(packed, padded)), default=0.0)
    worst = float(dist_lib.all_reduce(torch.tensor(worst, dtype=torch.float64, device=ctx.device), dist.ReduceOp.MAX))
    compared = int(dist_lib.all_reduce(torch.tensor(float(len(samples)), device=ctx.device)))
    tol = tolerance(PACKING_TOL, ctx.device)
    detail = (
        f"packed vs padded first-layer outputs of {compared} samples: worst relative L2 difference {worst:.2e} "
        f"(tolerance {tol:.0e})"
    )
    if worst > tol:
        detail += ": packed samples see each other or their position ids do not restart at 0"
    return result(worst <= tol, detail, worst_rel_diff=worst, samples=compared)


def _per_sample_first_layer(model, samples, packing: bool, pad_id: int, device, pack) -> list[torch.Tensor]:
    """Each sample's [tokens, features] output of the first decoder layer (fp32), cut out of the
    packed row or its padded row."""
    out = _first_layer(model, data_lib.collate_micro_batch(samples, packing, pad_id, pack), device)
    if not samples:
        return []
    lengths = [s.num_tokens for s in samples]
    if packing:
        return list(out.reshape(-1, out.shape[-1]).split(lengths))
    return [row[:n] for row, n in zip(out, lengths)]


def _first_layer(model, batch: dict, device) -> torch.Tensor:
    """The [B, T, features] output of the first decoder layer (fp32) for a collated batch. Gemma 3n's
    layers output [altup copies, B, T, H]: the copies become features."""
    inputs = data_lib.device_inputs(batch, device)
    captured = []

    def keep_first(_module, _args, out):  # the first layer to run (a VLM's vision blocks never do)
        if not captured:
            captured.append(out[0] if isinstance(out, tuple) else out)

    handles = [layer.register_forward_hook(keep_first) for layer in dist_lib.decoder_layers(model)]
    try:
        model.hidden_states(inputs["input_ids"], inputs["position_ids"], inputs.get("attention_mask"))
    finally:
        for handle in handles:
            handle.remove()
    out = captured[0].float().movedim(-3, 0).movedim(-2, 1)  # [B, T, *features]
    return out.reshape(out.shape[0], out.shape[1], -1)


@torch.no_grad()
def padding_check(model, step_plan, dataset, ctx, pad_id: int, pad=data_lib.pad_samples) -> dict:
    """With --no-packing: every rank runs its first micro-batch's first samples padded together (by
    `pad`, as the step pads them), then each alone (a batch of one has nothing to pad), and compares
    each sample's output of the first decoder layer at its labelled tokens (relative L2). The labelled
    tokens are found by the labels, which travel with their tokens: where the padding went, and what
    the attention mask says, does not matter to the cut. Pads a real token attends to, or an attention
    mask that does not match the padding side, change the first layer's output at once. Every rank
    runs as many forwards as the rank with the most samples (FSDP's gathers are collective)."""
    members = step_plan.for_rank(ctx.rank)[0][:PACKING_SAMPLES]
    samples = [dataset.samples[i] for i in members]
    most = int(dist_lib.all_reduce(torch.tensor(float(len(samples)), device=ctx.device), dist.ReduceOp.MAX))
    was_training = model.training
    model.eval()
    together = _labelled_first_layer(model, samples, pad_id, ctx.device, pad)
    alone = [_labelled_first_layer(model, samples[i : i + 1], pad_id, ctx.device, pad) for i in range(most)]
    model.train(was_training)
    worst = max((float((a - b[0]).norm() / b[0].norm().clamp(min=1e-12)) for a, b in zip(together, alone)), default=0.0)
    worst = float(dist_lib.all_reduce(torch.tensor(worst, dtype=torch.float64, device=ctx.device), dist.ReduceOp.MAX))
    compared = int(dist_lib.all_reduce(torch.tensor(float(len(samples)), device=ctx.device)))
    tol = tolerance(PACKING_TOL, ctx.device)
    detail = (
        f"padded together vs alone, first-layer outputs at the labelled tokens of {compared} samples: worst "
        f"relative L2 difference {worst:.2e} (tolerance {tol:.0e})"
    )
    if worst > tol:
        detail += ": padded samples attend to their pads (an attention mask that does not match the padding)"
    return result(worst <= tol, detail, worst_rel_diff=worst, samples=compared)


def _labelled_first_layer(model, samples, pad_id: int, device, pad) -> list[torch.Tensor]:
    """Each sample's [labelled tokens, features] first-layer output, from its row of the padded batch
    (a one-token dummy batch runs when there are no samples, and gives none)."""
    batch = data_lib.collate_micro_batch(samples, False, pad_id, pad=pad)
    out = _first_layer(model, batch, device)
    labelled = batch["shift_labels"].to(out.device) != data_lib.IGNORE_INDEX
    return [row[mask] for row, mask in zip(out, labelled)][: len(samples)]


# ---------------------------------------------------------------- (b) labels


def end_of_turn_marker(spec, tokenizer) -> str | None:
    """The family's end-of-turn text: from the registry's chat family, else the first known marker
    the tokenizer holds as a token of its own."""
    if spec.chat_family in END_OF_TURN_MARKERS:
        return END_OF_TURN_MARKERS[spec.chat_family]
    vocab = tokenizer.get_vocab()
    return next((m for m in END_OF_TURN_MARKERS.values() if m in vocab), tokenizer.eos_token)


def _squash(text: str) -> str:
    return "".join(text.split())


def label_check(conversations, dataset, tokenizer, marker: str | None) -> dict:
    """The labelled token ids of the first samples, decoded, are the assistant replies each followed
    by the end-of-turn marker (whitespace aside: tokens at a span's edge may carry a newline)."""
    if not marker:
        return skipped("no end-of-turn marker known for this tokenizer")
    dropped = set(dataset.dropped_indices)
    kept = [i for i in range(len(conversations)) if i not in dropped][: len(dataset.samples)]
    for position, index in enumerate(kept[:LABEL_SAMPLES]):
        labelled = [t for t in dataset.samples[position].shift_labels if t != data_lib.IGNORE_INDEX]
        decoded = tokenizer.decode(labelled, skip_special_tokens=False)
        expected = "".join(m["content"].strip() + marker for m in conversations[index] if m["role"] == "assistant")
        if _squash(decoded) != _squash(expected):
            why = (
                "end-of-turn marker not labelled"
                if _squash(decoded) == _squash(expected.replace(marker, ""))
                else ("prompt tokens labelled" if len(_squash(decoded)) > len(_squash(expected)) else "labels differ")
            )
            return result(
                False,
                f"sample {index}: labelled tokens decode to {decoded[:120]!r}, expected the assistant "
                f"replies + {marker!r}: {expected[:120]!r} ({why})",
                sample=index,
            )
    n = min(LABEL_SAMPLES, len(kept))
    return result(True, f"the labelled tokens of {n} samples are exactly their assistant replies + {marker!r}")


# ---------------------------------------------------------------- (c) extraction parity


@torch.no_grad()
def extraction_parity(spec, weights: str, loaded, prompt_ids: list[int]) -> dict:
    """Rank 0, before sharding: logits of the extracted text model vs the full VLM from the same checkpoint."""
    record = loaded.record
    if record.load_path != "extract_causal_lm":
        return skipped(f"load path {record.load_path}: nothing was extracted")
    if weights == "synthetic":
        return skipped("synthetic weights: random by design, nothing to compare with")
    total = record.params.get("checkpoint_total") or 0
    if total > PARITY_MAX_PARAMS:
        return skipped(
            f"the full VLM has {total:,} parameters, above the {PARITY_MAX_PARAMS:,} loaded on CPU for this check"
        )
    try:
        from transformers import AutoModelForImageTextToText

        folder, _ = loading.checkpoint_folder(spec, weights)
        vlm = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    except Exception as exc:  # e.g. Gemma 3n's VLM class needs timm
        return skipped(f"the full VLM could not be built here ({type(exc).__name__}: {str(exc)[:200]})")
    ids = torch.tensor([prompt_ids[:PARITY_PROMPT_TOKENS]])
    model = loaded.model
    was_training = model.training
    model.eval()
    vlm.eval()
    try:
        ours = model(input_ids=ids, use_cache=False).logits.float()
        reference = vlm(input_ids=ids, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    scale = max(1.0, float(reference.abs().max()))
    diff = float((ours - reference).abs().max()) / scale
    detail = (
        f"extracted vs full-VLM logits on a {ids.shape[1]}-token prompt: max relative difference {diff:.2e} "
        f"(tolerance {LOGITS_TOL:.0e})"
    )
    if diff > LOGITS_TOL:
        detail += ": the extracted weights are not the checkpoint's (left at random init?)"
    return result(diff <= LOGITS_TOL, detail, max_rel_diff=diff)


# ---------------------------------------------------------------- (d) and (e): the first step


@torch.no_grad()
def step_loss_reference(
    model, step_plan, dataset, ctx, pad_id: int, packing: bool, pack=data_lib.pack_samples, pad=data_lib.pad_samples
) -> dict:
    """Per-token losses of this rank's micro-batches of the step, summed over ranks, over the label
    tokens counted in those batches (not the plan's count) on all ranks. Beside it, what two wrong
    normalisations would report, so a failed check can say which one the trainer made: the mean of the
    ranks' own means (a rank with no label tokens: 0) and the mean of the micro-batches' own means (over
    the micro-batches that hold label tokens, every rank's)."""
    was_training = model.training
    model.eval()
    # token-loss sum, label tokens, sum of the micro-batches' means, micro-batches with label tokens
    totals = torch.zeros(4, dtype=torch.float64, device=ctx.device)
    for batch in data_lib.rank_micro_batches(step_plan, ctx.rank, dataset.samples, packing, pad_id, pack, pad):
        inputs = data_lib.device_inputs(batch, ctx.device)
        loss_sum = model.token_losses(**inputs).double().sum()
        label_tokens = int((inputs["shift_labels"] != data_lib.IGNORE_INDEX).sum())
        totals[0] += loss_sum
        totals[1] += label_tokens
        if label_tokens:
            totals[2] += loss_sum / label_tokens
            totals[3] += 1
    model.train(was_training)
    rank_mean = totals[0] / totals[1].clamp(min=1)
    totals = dist_lib.all_reduce(totals)
    return {
        "loss": float(totals[0] / totals[1].clamp(min=1)),
        "label_tokens": int(totals[1]),
        "per_rank_mean": float(dist_lib.all_reduce(rank_mean)) / ctx.world_size,
        "per_micro_batch_mean": float(totals[2] / totals[3].clamp(min=1)),
    }


def grad_norm_reference(
    model, step_plan, dataset, ctx, pad_id: int, packing: bool, pack=data_lib.pack_samples, pad=data_lib.pad_samples
) -> float:
    """The step's gradient with every rank's micro-batches run on rank 0; its norm; then the
    gradients are cleared. The other ranks run the same micro-batches with a zero weight, so the
    collectives match (not one-token dummies: their backward is NaN in Gemma 3n's attention)."""
    everything = [members for rank_bins in step_plan.micro_batches for members in rank_bins if members]
    # FSDP2 divides the reduced gradient by the world size: scale by it, over the step's label tokens.
    weight = ctx.world_size / max(step_plan.global_label_tokens, 1) if ctx.rank == 0 else 0.0
    for members in everything:
        batch = data_lib.collate_micro_batch([dataset.samples[i] for i in members], packing, pad_id, pack, pad)
        inputs = data_lib.device_inputs(batch, ctx.device)
        (model(**inputs) * weight).backward()
    squares = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for param in model.parameters():
        if param.grad is not None:
            local = param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad
            squares += local.double().pow(2).sum()
            param.grad = None
    return math.sqrt(float(dist_lib.all_reduce(squares)))


@torch.no_grad()
def mean_entropy(
    model, step_plan, dataset, ctx, pad_id: int, packing: bool, pack=data_lib.pack_samples, pad=data_lib.pad_samples
) -> float:
    """Mean predictive entropy (nats) at the labelled tokens of every rank's micro-batches of the
    step: near ln(vocab) for random weights, far below for a pretrained model (harness.gate.verdict)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for batch in data_lib.rank_micro_batches(step_plan, ctx.rank, dataset.samples, packing, pad_id, pack, pad):
        inputs = data_lib.device_inputs(batch, ctx.device)
        totals[0] += model.token_entropy(**inputs).double().sum()
        totals[1] += int((inputs["shift_labels"] != data_lib.IGNORE_INDEX).sum())
    model.train(was_training)
    totals = dist_lib.all_reduce(totals)
    return float(totals[0] / totals[1].clamp(min=1))


def first_step_reference(
    model, step_plan, dataset, ctx, pad_id: int, packing: bool, pack=data_lib.pack_samples, pad=data_lib.pad_samples
) -> dict:
    """Run before the first train_step, on the same parameters and micro-batches (packed by `pack`, as
    the step packs them)."""
    with backbone_inputs_seen(model) as seen:
        reference = step_loss_reference(model, step_plan, dataset, ctx, pad_id, packing, pack, pad)
    reference["inputs"] = forward_inputs_check(model, seen)
    reference["entropy"] = mean_entropy(model, step_plan, dataset, ctx, pad_id, packing, pack, pad)
    reference["grad_norm"] = grad_norm_reference(model, step_plan, dataset, ctx, pad_id, packing, pack, pad)
    return reference


def first_step_checks(reference: dict, loss: float, grad_norm: float, device: torch.device, world_size: int) -> dict:
    loss_tol, norm_tol = tolerance(STEP_LOSS_TOL, device), tolerance(GRAD_NORM_TOL, device)
    loss_diff = abs(loss - reference["loss"]) / max(abs(reference["loss"]), 1e-12)
    loss_detail = (
        f"train_step reported {loss:.6f} for step 1; per-token losses summed over ranks / "
        f"{reference['label_tokens']} global label tokens give {reference['loss']:.6f} "
        f"(relative difference {loss_diff:.1e}, tolerance {loss_tol:.0e})"
    )
    if not loss_diff <= loss_tol:
        loss_detail += ": the step loss is not normalised by the global label-token count" + wrong_normalisation(
            loss, reference, loss_tol
        )
    norm_diff = abs(grad_norm - reference["grad_norm"]) / max(abs(reference["grad_norm"]), 1e-12)
    norm_detail = (
        f"step-1 grad norm {grad_norm:.6f} with the data split over {world_size} rank(s), "
        f"{reference['grad_norm']:.6f} with all of it on rank 0 (relative difference {norm_diff:.1e}, "
        f"tolerance {norm_tol:.0e})"
    )
    if not norm_diff <= norm_tol:
        norm_detail += ": gradients are not reduced across ranks (or not normalised like the loss)"
    return {
        "step_loss": result(loss_diff <= loss_tol, loss_detail, reported=loss, recomputed=reference["loss"]),
        "grad_reduction": result(
            norm_diff <= norm_tol, norm_detail, reported=grad_norm, reference=reference["grad_norm"]
        ),
        "inputs": reference["inputs"],
    }


def wrong_normalisation(loss: float, reference: dict, tol: float) -> str:
    """Which wrong normalisation of step_loss_reference the reported loss matches, in words."""
    candidates = [
        ("per_rank_mean", "the mean of the ranks' own means: averaged per rank"),
        ("per_micro_batch_mean", "the mean of the micro-batches' own means: averaged per micro-batch"),
    ]
    for key, words in candidates:
        value = reference.get(key)
        if value is not None and abs(loss - value) <= tol * max(abs(value), 1e-12):
            return f" ({words}, {value:.6f})"
    return " (averaged per rank or per micro-batch?)"


# ---------------------------------------------------------------- (f) and (g): what the model is fed, its vocabulary


@contextlib.contextmanager
def backbone_inputs_seen(model):
    """The names of the (non-None) inputs that reach the text backbone's forward while inside."""
    seen: set[str] = set()

    def record(_module, _args, kwargs):
        seen.update(name for name, value in kwargs.items() if value is not None)

    handle = loading.text_backbone(model.lm).register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def forward_inputs_check(model, seen: set[str]) -> dict:
    """The token-type inputs the VLM class takes (Gemma 3: token_type_ids; Qwen-VL, GLM-4V, Molmo2:
    mm_token_type_ids; 0 = text) reached its backbone in the first step's batches. Catches a trainer
    that feeds input_ids/labels only (TRL #5807: Gemma 3 then raises in training, or treats text as
    image tokens where the mask is built from them)."""
    needed = loading.token_type_inputs(model.lm)
    if not needed:
        return skipped(f"{type(model.lm).__name__} takes no token-type inputs")
    missing = [name for name in needed if name not in seen]
    detail = (
        f"{type(model.lm).__name__}.forward takes {', '.join(needed)}; the first step's batches passed "
        f"{', '.join(sorted(seen)) or 'nothing'} to its backbone"
    )
    if missing:
        detail += f": token-type inputs not passed ({', '.join(missing)}; zeros mark text tokens)"
    return result(not missing, detail, missing=missing)


def vocab_check(vocab_size: int | None, model) -> dict:
    """The vocabulary size the loss rules use (ln(vocab) for the initial loss) is the LM head's row
    count, i.e. the text config's. A VLM's top-level config has none of its own, or a stale one
    (verl #1013 read it there)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        return skipped(f"{type(model).__name__} has no output embeddings to compare with")
    rows = int(head.weight.shape[0])
    text_vocab = getattr(model.config.get_text_config(decoder=True), "vocab_size", None)
    detail = (
        f"vocabulary size {vocab_size:,} used for the loss rules; the LM head has {rows:,} output rows "
        f"(text_config.vocab_size {text_vocab:,})"
        if vocab_size is not None and text_vocab is not None
        else f"vocabulary size {vocab_size} used for the loss rules; the LM head has {rows:,} output rows"
    )
    ok = vocab_size == rows
    if not ok:
        detail += ": the vocabulary size was read from the wrong config (the top-level config instead of text_config?)"
    return result(ok, detail, vocab_size=vocab_size, head_rows=rows)
