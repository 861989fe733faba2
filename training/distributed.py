"""Multi-process training under torchrun: DDP, or FSDP2 (`fully_shard`) for models that do not fit.

    torchrun --nproc_per_node=N train.py --config ...            # DDP
    torchrun --nproc_per_node=N train.py --config ... --fsdp true  # FSDP, bf16 on CUDA

Nothing here launches processes: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK. On CPU the gloo
backend runs the same code, which is how the tests check that N processes train exactly like
one process with the same global batch.
"""

import os

import torch
import torch.distributed as dist


class Context:
    """rank, world size and device of this process; rank 0 logs, writes and evaluates."""

    def __init__(self, rank=0, world=1, device=torch.device("cpu")):
        self.rank, self.world, self.device = rank, world, device

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        """Every rank leaves together, right after training (rank 0 then evaluates alone): a rank
        that tore its group down while another still used it once ended in gloo's C++ terminate
        (SIGABRT) in CI."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def setup(device_name):
    """Join the process group when torchrun started this process; else a one-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context(device=torch.device(device_name))
    if device_name == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local_rank)
    else:
        dist.init_process_group("gloo")
        device = torch.device(device_name)
    return Context(dist.get_rank(), world, device)


def wrap(model, context, fsdp=False):
    """DDP, or FSDP2 with each ViT and LLM block its own shard group (bf16 compute on CUDA,
    fp32 gradient reduction)."""
    if context.world == 1:
        return model
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel
        ids = [context.device.index] if context.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy()
    if context.device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in list(model.vit.layers) + list(model.llm.layers):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def unwrap(model):
    """The SparseCut inside DDP or torch.compile (FSDP2 shards the module in place)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def full_state(model, optimizer, fsdp):
    """Full (unsharded) model and optimizer state dicts on every rank, on the CPU."""
    if not fsdp:
        return unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options))


def load_optimizer(model, optimizer, state, fsdp):
    """Restore a full optimizer state dict saved by full_state (sharding it again under FSDP)."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
