"""torch.distributed set-up and FSDP2 sharding for one training job (torchrun starts the ranks)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str, timeout_s: int = 1800) -> DistContext:
    """NCCL on GPUs, gloo on CPU: the same code path either way (CI runs it with gloo)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but CUDA is not available here; use --device cpu")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def agree_on_job(identity: str) -> None:
    """Every rank must run the same job: a node started with other models or settings (or one that
    fell out of step in a sweep) is refused here, at the job's first collective, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    identities: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(identities, identity)
    if len(set(identities)) > 1:
        first_rank = {}
        for rank, seen in enumerate(identities):
            first_rank.setdefault(seen, rank)
        said = "; ".join(f"rank {rank} trains {seen}" for seen, rank in first_rank.items())
        raise RuntimeError(
            f"the nodes were started with different jobs ({said}): start every node with the same "
            "--models, in the same order, and the same settings"
        )


def close_distributed(clean: bool = True) -> None:
    """Leave the process group. After a clean run every rank first meets at a barrier: a rank that
    exits while a peer still reads its last gloo message makes that peer abort (SIGABRT, "a rank
    crashed") although both finished. After an error there is no barrier (the peer may never come)."""
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def all_reduce(value: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A reduced copy over every rank; the value itself where no process group runs (one process)."""
    value = value.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(value, op=op)
    return value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    return all_reduce(value, dist.ReduceOp.SUM)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: transformers names them in _no_split_modules."""
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    # by class or base class: fully_shard swaps a module's class for an FSDP<Name> subclass
    blocks = [m for m in model.modules() if any(cls.__name__ in block_names for cls in type(m).__mro__)]
    # Never shard a block nested in another block: the outer one owns its parameters.
    nested = {id(inner) for outer in blocks for inner in outer.modules() if inner is not outer}
    return [block for block in blocks if id(block) not in nested]


def shard_model(model: nn.Module, *, bf16: bool, reshard_after_forward: bool = True, mesh=None) -> int:
    """FSDP2: each decoder layer its own unit, then the root (embeddings, norm, lm_head).
    bf16 compute over fp32 master weights, fp32 gradient reduction. Returns the unit count.
    mesh: the ranks to shard over (None: all of them). The root's other entry points than forward,
    named in its FSDP_FORWARD_METHODS, gather its parameters as forward does."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else torch.float32,
        reduce_dtype=torch.float32,
    )
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for method in getattr(model, "FSDP_FORWARD_METHODS", ()):  # FSDP2's hooks run around forward only
        register_fsdp_forward_method(model, method)
    return len(layers) + 1


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds (its shards under FSDP2)."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total


def shard_read_by_rank0(
    model: nn.Module,
    ctx: DistContext,
    *,
    read_by_rank0: bool,
    bf16: bool,
    reshard_after_forward: bool = True,
    shard=shard_model,
) -> int:
    """shard (shard_model unless a test hands the job another); where rank 0 alone read a checkpoint
    (the other ranks built the model on meta), rank 0's model goes to meta first and every rank then
    receives its shard of rank 0's weights and rank 0's generation config. Returns the FSDP unit count."""
    kept = weights_to_meta(model) if read_by_rank0 and ctx.is_main else None
    units = shard(model, bf16=bf16, reshard_after_forward=reshard_after_forward)
    if read_by_rank0:
        broadcast_weights(model, kept, ctx)
        broadcast_generation_configs(model, ctx)
    return units


def weights_to_meta(model: nn.Module) -> dict[str, torch.Tensor]:
    """Rank 0, before sharding: its loaded weights set aside under every name they have (parameters
    and buffers, aliases included), the model itself left on the meta device as the other ranks
    built it (ties and requires_grad kept), so sharding copies nothing and broadcast_weights can
    free each tensor once it is sent."""
    kept = {name: tensor.detach() for name, tensor in named_tensors(model, remove_duplicate=False)}
    meta_of: dict[int, torch.Tensor] = {}  # one meta tensor per original: tied weights stay tied
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None:
                if id(param) not in meta_of:
                    meta_of[id(param)] = nn.Parameter(
                        torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                    )
                module._parameters[key] = meta_of[id(param)]
        for key, buffer in module._buffers.items():
            if buffer is not None:
                if id(buffer) not in meta_of:
                    meta_of[id(buffer)] = torch.empty_like(buffer, device="meta")
                module._buffers[key] = meta_of[id(buffer)]
    return kept


@torch.no_grad()
def broadcast_weights(model: nn.Module, kept: dict[str, torch.Tensor] | None, ctx: DistContext) -> None:
    """After shard_model on a meta model: every rank's shard of the weights rank 0 read (`kept`, from
    weights_to_meta; None on the other ranks). One tensor at a time: rank 0 sends it whole, each rank
    keeps its slice, rank 0 drops its copy. A node holds at most rank 0's one fp32 copy, shrinking,
    plus one tensor in flight, whatever its number of ranks; every rank ends with the same values a
    rank that read the checkpoint itself would have. Buffers are copied as they are."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.to_empty(device=ctx.device)
    named = named_tensors(model)
    check_same_tensors(named, kept, ctx)
    for name, tensor in named:
        if ctx.is_main:
            full = kept.pop(name).to(device=ctx.device, dtype=tensor.dtype).contiguous()
        else:
            full = torch.empty(tensor.shape, dtype=tensor.dtype, device=ctx.device)
        dist.broadcast(full, src=0)
        if isinstance(tensor, DTensor):  # this rank's slice, as FSDP2 placed it (uneven shards included)
            tensor.copy_(distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None))
        else:
            tensor.copy_(full)
        del full
    if kept is not None:
        kept.clear()  # aliases (a tied lm_head) would keep their tensors alive for the caller's lifetime
    if ctx.device.type == "cuda":
        # the largest full tensor (Gemma 3n's per-layer embedding: 9 GB) stays reserved otherwise
        torch.cuda.empty_cache()


def named_tensors(model: nn.Module, remove_duplicate: bool = True) -> list[tuple[str, torch.Tensor]]:
    return [
        *model.named_parameters(remove_duplicate=remove_duplicate),
        *model.named_buffers(remove_duplicate=remove_duplicate),
    ]


def check_same_tensors(
    built: list[tuple[str, torch.Tensor]], kept: dict[str, torch.Tensor] | None, ctx: DistContext
) -> None:
    """Before any broadcast, on every rank: each rank must have built the same tensors (names, shapes,
    dtypes, requires_grad, in the same order) and rank 0 must have read each of them, or the
    broadcasts would pair the wrong tensors (or wait forever on a rank that raised)."""
    layout = [(name, tuple(tensor.shape), str(tensor.dtype), tensor.requires_grad) for name, tensor in built]
    unread = [name for name, _ in built if name not in kept] if kept is not None else []
    layouts: list[tuple | None] = [None] * ctx.world_size
    dist.all_gather_object(layouts, (layout, unread))
    expected, unread = layouts[0]
    if unread:
        raise RuntimeError(
            f"rank 0 read no value for {len(unread)} tensors of the model it built: {unread[:5]}; this is a harness bug"
        )
    for rank, (other, _) in enumerate(layouts):
        if other != expected:
            differing = next(
                (f"{a} vs {b}" for a, b in zip(expected, other) if a != b), f"{len(expected)} vs {len(other)} tensors"
            )
            raise RuntimeError(
                f"the model rank 0 read and the one rank {rank} built on the meta device differ "
                f"(first difference: {differing}); this is a harness bug: the two must come "
                "from the same class and config"
            )


def broadcast_generation_configs(model: nn.Module, ctx: DistContext) -> None:
    """Rank 0's generation defaults (from_pretrained read the checkpoint's generation_config.json;
    a meta build did not): generate() fills unset options from them, so every rank must decode alike."""
    holders = [module for module in model.modules() if getattr(module, "generation_config", None) is not None]
    configs = [module.generation_config if ctx.is_main else None for module in holders]
    dist.broadcast_object_list(configs, src=0)
    for module, config in zip(holders, configs):
        module.generation_config = config


def cap_gpu_memory(device: torch.device, cap_gib: float | None) -> int | None:
    """The bytes this rank may allocate on its GPU (None on CPU): the GPU's, or cap_gib where given,
    enforced by the caching allocator (an allocation past it raises out-of-memory as a smaller card would)."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    if cap_gib is None:
        return total
    cap = min(int(cap_gib * 1024**3), total)
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    return cap
