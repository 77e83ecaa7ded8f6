"""Data-parallel sharded training with PyTorch's own FSDP2 (torch.distributed.fsdp.fully_shard).

    python run_tofu.py ...                            # one process: no process group, nothing here runs
    torchrun --nproc_per_node 4 run_tofu.py ...       # 4 processes, each holding a quarter of the model

Every rank builds the same plan of optimiser steps (same seed, same data) and trains on its share of
each step's rows (train.plan_steps); the gradients of a step are summed over ranks, and every row
carries the weight 1 / (rows in the step), so a step's gradient is the same as one process's on the
whole step. Parameters, gradients and AdamW's moments are sharded per decoder layer and at the root;
the frozen reference model of kl/dpo/npo/llmu is sharded the same way. Saving gathers a full state
dict on rank 0, which alone writes files, prints tables and evaluates.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

# Evaluation on rank 0 can take hours on a large model while the other ranks have finished;
# the default 30-minute collective timeout would kill them.
TIMEOUT = timedelta(hours=12)


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank: the process group's, or before it exists torchrun's RANK (0 without torchrun)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether torchrun started this process (it sets WORLD_SIZE); a plain `python` run needs none of it."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> str:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA) and return this rank's device."""
    if not launched():
        return device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    else:  # two processes on a small CPU: one thread each instead of each taking every core
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return device


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (t itself in one process)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_true(flag: bool, device: str) -> bool:
    """Whether flag holds on every rank, so that all ranks take the same branch."""
    return bool(all_reduce_sum(torch.tensor([0.0 if flag else 1.0], device=device)).item() == 0)


def shard(model, frozen: bool = False) -> None:
    """fully_shard each decoder layer (the classes transformers lists in _no_split_modules), then
    the root. FSDP averages gradients over ranks; the loop scales each rank's loss by the number of
    ranks (train.train), so that the result is the sum of every row's weighted gradient. A frozen
    model (the reference) reshards its root after every forward too: by default FSDP2 keeps the
    root's parameters (embeddings, LM head) gathered until backward, which a frozen model never runs."""
    from torch.distributed.fsdp import fully_shard  # under torchrun only
    layers = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module)
    fully_shard(model, reshard_after_forward=True if frozen else None)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly sharded) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_state_dict(model) -> dict:
    """The full, unsharded state dict on CPU (on rank 0; empty elsewhere). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (  # under torchrun only
        StateDictOptions,
        get_model_state_dict,
    )
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule  # under torchrun only
    return isinstance(model, FSDPModule)
