"""A model's structure, found from its module tree: its stack of transformer blocks, and each block's
layers by role (attention, MLP, fused experts, MoE routers). Presets, quantization checks and
sharding read it, so that every architecture transformers builds is served without a table."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D

from lora_lab.errors import ConfigError

# rest of the block (mlp, feed_forward, OPT's fc1/fc2, BERT's intermediate/output) is its MLP.
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
# MoE routers (Mixtral's gate, Qwen2-MoE's shared_expert_gate, Granite-MoE's router.layer): fine-tuning
# recipes keep them frozen, so a preset leaves them out; name one in a list to adapt it.
_ROUTER = re.compile(r"(^|\.)router(\.|$)|(^|[._])gate$")


def is_quantized(module: torch.nn.Module) -> bool:
    """A bitsandbytes 4-bit or int8 layer."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def is_adaptable(module: torch.nn.Module) -> bool:
    """A layer PEFT's LoRA wraps: linear (plain, GPT-2's Conv1D, or bitsandbytes' quantized)."""
    return isinstance(module, (torch.nn.Linear, Conv1D)) or is_quantized(module)


def blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's stack of transformer blocks (decoder or encoder layers): the list of modules of
    one class that holds the most parameters."""
    stacks = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList)
        and len(module)
        and len({type(b) for b in module}) == 1
        and any(is_adaptable(m) for m in module.modules())
    ]
    if not stacks:
        raise ConfigError(
            "model.name_or_path",
            model.config.name_or_path,
            f"no stack of transformer blocks found in this {model.config.model_type} model "
            "(a ModuleList of layers with linear layers in them)",
        )
    return max(stacks, key=lambda s: sum(p.numel() for p in s[1].parameters()))


@dataclass
class BlockParts:
    """One block's adaptable layers by role, as paths inside the block."""

    attention: list[str]
    mlp: list[str]
    experts: list[str]  # fused 3-D expert parameters (module path + parameter name)
    routers: list[str]


def block_parts(block: torch.nn.Module) -> BlockParts:
    attention_roots = []
    for name, _ in block.named_modules():
        last = name.rsplit(".", 1)[-1]
        if name and _ATTENTION.search(last) and not any(name.startswith(r + ".") for r in attention_roots):
            attention_roots.append(name)
    parts = BlockParts([], [], [], [])
    for name, module in block.named_modules():
        in_attention = any(name == r or name.startswith(r + ".") for r in attention_roots)
        if is_adaptable(module):
            if in_attention:
                parts.attention.append(name)
            elif _ROUTER.search(name):
                parts.routers.append(name)
            else:
                parts.mlp.append(name)
        elif not in_attention and not _ROUTER.search(name):
            parts.experts += [
                f"{name}.{p}" if name else p
                for p, value in module.named_parameters(recurse=False)
                if value.ndim == 3
            ]
    return parts
