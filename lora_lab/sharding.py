"""Sharded training (train.distributed=fsdp): FSDP2's `fully_shard` on each transformer block and on
the root, so that each rank holds 1/N of the base, of the adapter and of its optimizer state; the
sharded checkpoint (each rank its part, through torch.distributed.checkpoint); the adapter gathered
whole to be saved as a plain PEFT adapter; and what each rank holds of the base.

The model is sharded here rather than by accelerate's FSDP plugin: accelerate turns FSDP on only for
GPU-like devices, and one path, the same on CPU (gloo) and GPU, is one path tested."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.distributed.checkpoint as dcp
from peft import get_peft_model_state_dict
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from lora_lab.errors import ConfigError
from lora_lab.structure import blocks

# A checkpoint's folder of the ranks' parts of the adapter's and the optimizer's state.
SHARDED_STATE = "sharded_state"
# The checkpoint holds what training changes: the frozen base is the base model's files.
_TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True)


def block_stack(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's transformer blocks, the units FSDP shards."""
    try:
        return blocks(model)[1]
    except ConfigError as e:
        raise ConfigError(
            "train.distributed",
            "fsdp",
            f"FSDP shards the model block by block, and {e.valid}; use train.distributed=ddp",
        ) from None


def shard(model: torch.nn.Module, device: str, compute_dtype: torch.dtype, checkpointing: bool) -> None:
    """Shard `model` in place over all processes: each block a unit, then the root (embeddings, final
    norm, head). Parameters are gathered in the compute dtype; gradients are reduced in fp32. With
    `checkpointing`, each block recomputes its activations through torch.distributed's composable
    checkpoint, which FSDP2 composes with and which, unlike the checkpoint wrapper module, leaves
    the parameters' names (and so the saved adapter's) as they are. Only rank 0 holds the weights
    (models.load_device), 4-bit or not, the others a model on `meta`: they receive their shards."""
    stack = block_stack(model)
    share_quant_states(model, device)
    # rank 0's whole weights, the adapter's included, for the others' shards
    full = weights(model) if torch.distributed.get_rank() == 0 else {}
    mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in stack:
        if checkpointing:
            checkpoint(block)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    receive_from_rank0(model, full, device)
    # generate (exact match) calls the inner model's forward, past the root's gathering hook
    register_fsdp_forward_method(model, "generate")
    # Already distributed: accelerate (under the Trainer) must not wrap it in DDP, which refuses
    # sharded parameters. This is accelerate's own mark of a model it has prepared.
    model._is_accelerate_prepared = True


def share_quant_states(model: torch.nn.Module, device: str) -> None:
    """Every rank's 4-bit layers as rank 0 quantized them (LoftQ's backbone included): the packed
    weight's shape, which the others' layers on `meta` lack (they hold the unquantized shape), and
    the quantization state. The state stays whole on every rank, beside the layer (bitsandbytes
    gives it back to the gathered weight in each forward): it is small (with double quantization
    1/31 of a 4096 x 4096 layer's 4-bit bytes, more of a tiny layer's), and its nested statistics
    span the whole tensor."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    if not layers:
        return
    rank0 = torch.distributed.get_rank() == 0
    shared = [
        {
            name: (m.weight.shape, m.weight.dtype, m.weight.quant_state.as_dict(packed=True))
            for name, m in layers.items()
        }
        if rank0
        else None
    ]
    torch.distributed.broadcast_object_list(shared, src=0)
    for name, module in layers.items():
        shape, storage, state = shared[0][name]
        quant_state = bnbf.QuantState.from_dict(state, device=torch.device(device))
        if not rank0:
            module.weight = bnb.nn.Params4bit(
                torch.empty(shape, dtype=storage, device="meta"),
                requires_grad=False,
                blocksize=quant_state.blocksize,
                compress_statistics=quant_state.nested,
                quant_type=quant_state.quant_type,
                quant_storage=storage,
                module=module,
                bnb_quantized=True,
            )
        module.weight.quant_state = module.quant_state = quant_state  # on the device the layer computes on


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers as its state dict names them, without the 4-bit layers'
    quantization state, which bitsandbytes adds to it and share_quant_states sends."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    return {key: value for key, value in model.state_dict().items() if key in names}


def receive_from_rank0(model: torch.nn.Module, full: dict[str, torch.Tensor], device: str) -> None:
    """Each rank's shards of rank 0's weights (`full`, empty elsewhere), and rank 0's buffers, which
    the state dict lacks (rotary frequencies) and a model built on `meta` has no values for."""
    if torch.distributed.get_rank() != 0:
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, src=0)


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def local_bytes(tensor: torch.Tensor) -> int:
    """The bytes this process holds of a tensor: its local shard of a DTensor."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def base_param_bytes(model: torch.nn.Module) -> int:
    """The bytes of the frozen base weights on this process: under FSDP its shards, else all."""
    for module in model.modules():
        # after a forward the root keeps its parameters gathered (FSDP2's default for the root):
        # resharded, as they are between steps
        if isinstance(module, FSDPModule):
            module.reshard()
    return sum(local_bytes(p) for p in model.parameters() if not p.requires_grad)


def full_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's entries of the model's state, each gathered whole from the ranks' shards and
    keyed as in the model's state (for PEFT's save_pretrained). PEFT itself selects them (trained or
    not: an init_from adapter evaluated only is frozen); the base is never gathered. A collective:
    every rank calls it."""
    state = model.state_dict(keep_vars=True)  # the parameters themselves, to be recognised below
    adapter = {id(value) for value in get_peft_model_state_dict(model, state_dict=state).values()}
    return {
        key: (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
        for key, value in state.items()
        if id(value) in adapter
    }


def save_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path) -> None:
    """Each rank writes its part of the adapter's and the optimizer's state. A collective."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_TRAINED_ONLY)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint / SHARDED_STATE)


def load_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path) -> None:
    """Each rank reads its part of what `save_sharded_state` wrote, into the sharded model and
    optimizer. A collective."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_TRAINED_ONLY)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=checkpoint / SHARDED_STATE)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        # the frozen base is left out on purpose; dcp.load has checked that every trained key was there
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
