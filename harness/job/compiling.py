"""--compile: what gets torch.compile'd before sharding, and when it runs compiled.

Scopes (job.COMPILE_SCOPES): off; pointwise, each MLP and RMSNorm (the elementwise chains around the
matmuls fuse); layers, each whole decoder layer's forward (projections, RoPE, norms, residuals, MLP
and the varlen kernel in one graph). Either compiled scope also compiles the loss chunks' softmax
work (loss.chunked_cross_entropy_sum). Only a module's `forward` is compiled, so FSDP2's hooks on
the module run eagerly around it. Only the training step runs compiled (compiled_stance): the
preflight's padded batches, the evaluation without grad and the KV-cache decode would each compile
another graph.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Callable

import torch
from torch import nn

from harness.job import distributed as dist_lib
from harness.runtime.paths import cache_dir


def checkpointed(forward):
    """forward under non-reentrant activation checkpointing while it builds a graph for backward.
    Compiled around it, the checkpoint is part of the compiled graph (its recompute replays compiled
    code); compiled inside transformers' checkpoint instead, the recompute did not replay the
    compiled graph (CheckpointError on gemma-3n, transformers 5.17)."""

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation and decoding: nothing to recompute
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


# dynamo's switch that lets a checkpointed region hold Python side effects (run once in the forward,
# not replayed by the recompute)
CHECKPOINT_SIDE_EFFECTS = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def tracing_checkpoint_side_effects(compiled):
    """compiled, traced with Python side effects allowed inside its checkpoint. With the `kernels`
    package installed (a dependency of transformers from 5.25) each attention module's forward sets
    and resets a context variable of kernels (`_ACTIVE_KERNEL_FUNCS`, which picks the kernel
    functions); dynamo refuses that mutation inside a checkpoint, the frame falls back to eager, and
    the whole layer ran uncompiled, silently. The set and reset leave the variable as it was, and
    the compiled graph has the functions it picked baked in, so the recompute needs neither. Other
    side effects would also be skipped there: the harness's forwards record no outputs through
    transformers' hooks. Tracing happens at a call, so the switch is set around each call, not for
    the whole process."""
    if not hasattr(torch._dynamo.config, CHECKPOINT_SIDE_EFFECTS):  # older torch: nothing to set
        return compiled

    @functools.wraps(compiled)
    def run(*args, **kwargs):
        with torch._dynamo.config.patch(**{CHECKPOINT_SIDE_EFFECTS: True}):
            return compiled(*args, **kwargs)

    return run


def compile_modules(lm: nn.Module, scope: str, activation_checkpointing: bool = False, backend="inductor") -> int:
    """torch.compile per module of the scope, before sharding; returns how many. layers with
    activation_checkpointing checkpoints inside each compiled layer (transformers' own checkpointing
    must then be off). Dynamic shapes: training rows are filled to the token budget (train_step), but
    the number and lengths of their samples change every step. backend: torch.compile's
    (tests trace with aot_eager: the same graphs and autograd, no code generation)."""
    if scope == "off":
        return 0
    keep_compiled_code()
    if scope == "layers":
        chosen = dist_lib.decoder_layers(lm)
        for layer in chosen:
            if activation_checkpointing:
                layer.forward = tracing_checkpoint_side_effects(
                    torch.compile(checkpointed(layer.forward), dynamic=True, backend=backend)
                )
            else:
                layer.forward = torch.compile(layer.forward, dynamic=True, backend=backend)
    elif scope == "pointwise":
        chosen = [m for m in lm.modules() if type(m).__name__.endswith(("MLP", "RMSNorm"))]
        for module in chosen:
            module.compile(dynamic=True, backend=backend)
    else:
        raise ValueError(f"compile scope {scope!r}: expected one of off, pointwise, layers")
    torch.compiler.set_stance("force_eager")  # compiled_stance lifts it around the training step
    return len(chosen)


def keep_compiled_code() -> None:
    """Inductor's caches (compiled graphs, Triton kernels) under the harness's cache folder unless
    TORCHINDUCTOR_CACHE_DIR is set: its default, /tmp/torchinductor_<user>, rarely outlives a
    machine, and a warm cache makes the next run's first step cheaper (35 s -> 13 s for a tiny
    model on CPU)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))


def compiled_stance(compiled_modules: int):
    """Around the training step: the compiled modules run compiled (everything else is eager)."""
    return torch.compiler.set_stance("default") if compiled_modules else contextlib.nullcontext()


def hoist_coefficient_clamps(lm: nn.Module) -> Callable[[], None]:
    """Gemma 3n's AltUp clamps its prediction coefficients in place (`weight.data.clamp_`) in every
    training forward. Inside a compiled layer that write lands on a weight saved for backward (and
    again in the checkpoint's recompute): autograd then refuses the backward. So each AltUp module
    gets a config without the clip and the returned function clamps the coefficients' storage,
    called before every training step (the weights change only at the optimizer step). Prediction
    coefficients: the same values as transformers'. Correction coefficients (transformers clamps
    them functionally, not in storage): the same forward values; the gradient differs only for a
    coefficient beyond the clip (+-120 on gemma-3n), which transformers masks and this does not."""
    modules = [
        m
        for m in lm.modules()
        if hasattr(m, "prediction_coefs") and getattr(getattr(m, "config", None), "altup_coef_clip", None) is not None
    ]
    if not modules:
        return lambda: None
    clip = modules[0].config.altup_coef_clip
    for module in modules:
        module.config = copy.copy(module.config)
        vars(module.config)["altup_coef_clip"] = None  # transformers 5.24's configs refuse None by assignment

    @torch.no_grad()
    def clamp() -> None:  # looked up each time: sharding replaces the parameters
        for module in modules:
            module.prediction_coefs.weight.clamp_(-clip, clip)
            module.correction_coefs.weight.clamp_(-clip, clip)

    return clamp
