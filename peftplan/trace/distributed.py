"""The FSDP2 step on fake tensors: PyTorch's own `fully_shard` over a fake process group, one process.

`torch.distributed` is initialised with the "fake" backend (torch.testing._internal.distributed.fake_pg): every
collective returns at once without moving data, so rank 0 allocates exactly what it would on a real cluster — its
parameter, gradient and optimizer-state shards, the all-gather buffers of the units in flight, the reduce-scatter
inputs — while the tensors themselves are fake. The device mesh is made outside the FakeTensorMode (building it
reads rank lists with `.tolist()`, which fake tensors cannot answer). Units as transformers' FSDP recipes wrap
them: one per decoder block, then the root (embeddings, final norm, head); `fsdp-grad-op` keeps units unsharded
after forward (`reshard_after_forward=False`); `fsdp-hybrid` shards over the GPUs of a node (a 2-D mesh).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

from peftplan.errors import PlanError
from peftplan.plan import Plan

FSDP = ("fsdp", "fsdp-grad-op", "fsdp-hybrid")


def fake_world(plan: Plan):
    """Initialise (or re-initialise) a fake process group of `plan.gpus` ranks; return the device mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if plan.strategy not in FSDP:
        raise PlanError(f"the distributed trace runs FSDP (got --strategy {plan.strategy})")
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=0, world_size=plan.gpus, store=FakeStore())
    if plan.strategy == "fsdp-hybrid":
        return init_device_mesh("cpu", (plan.nodes, plan.gpus // plan.nodes), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh("cpu", (plan.gpus,))


def shard(model, plan: Plan, mesh, blocks) -> None:
    """fully_shard every block, then the root, as the FSDP recipes of transformers/accelerate wrap them."""
    from torch.distributed.fsdp import fully_shard

    reshard = plan.strategy != "fsdp-grad-op"
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)


@contextmanager
def storage_resizes(counter):
    """Follow FSDP2's buffers in the counter, in the category "communication".

    FSDP2 frees an unsharded parameter by `storage.resize_(0)` and re-allocates it by resizing back
    (_fsdp_param.py alloc_storage/free_storage): no op the dispatch mode sees, so each resize is reported. The
    unsharded parameters, the flat all-gather output (`foreach_all_gather`, _fsdp_collectives.py) and the flat
    reduce-scatter input (`foreach_reduce`) are tagged "communication"; the reduce-scatter output, which becomes
    the sharded gradients, "gradients".
    """
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    saved = (_fsdp_param.alloc_storage, _fsdp_param.free_storage, _fsdp_param_group.alloc_storage,
             _fsdp_param_group.foreach_all_gather, _fsdp_param_group.foreach_reduce)

    def alloc(tensor):
        saved[0](tensor)
        counter.resized(tensor)
        counter.reclassify(tensor, "communication")

    def free(tensor):
        saved[1](tensor)
        counter.resized(tensor)

    def all_gather(*args, **kwargs):
        result = saved[3](*args, **kwargs)
        if result is not None:
            counter.reclassify(result.all_gather_output, "communication")
        return result

    def reduce(fsdp_params, unsharded_grads, *args, **kwargs):
        out = saved[4](fsdp_params, unsharded_grads, *args, **kwargs)
        counter.reclassify(out[0], "communication")
        for p in fsdp_params:
            if p.sharded_param.grad is not None:
                counter.reclassify(p.sharded_param.grad, "gradients")
        return out

    (_fsdp_param.alloc_storage, _fsdp_param.free_storage, _fsdp_param_group.alloc_storage,
     _fsdp_param_group.foreach_all_gather, _fsdp_param_group.foreach_reduce) = alloc, free, alloc, all_gather, reduce
    bnb = sys.modules.get("bitsandbytes.nn.modules")
    fix = getattr(bnb, "fix_4bit_weight_quant_state_from_module", None)
    if fix is not None:
        bnb.fix_4bit_weight_quant_state_from_module = _fix_4bit_fake
    try:
        yield
    finally:
        if fix is not None:
            bnb.fix_4bit_weight_quant_state_from_module = fix
        (_fsdp_param.alloc_storage, _fsdp_param.free_storage, _fsdp_param_group.alloc_storage,
         _fsdp_param_group.foreach_all_gather, _fsdp_param_group.foreach_reduce) = saved


def _fix_4bit_fake(module) -> None:
    """bitsandbytes' own recovery of a Linear4bit's quant_state after FSDP replaced its weight
    (nn/modules.py `fix_4bit_weight_quant_state_from_module`), less the re-wrap in `Params4bit`, which a fake
    tensor cannot take: the state is attached to FSDP's unsharded Parameter, as to our fake NF4 weights."""
    if getattr(module.weight, "quant_state", None) is None:
        module.weight.quant_state = module.quant_state


def close() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
