"""The speed switches of a training run: Liger kernels, the fused linear cross-entropy loss, and
whether activation checkpointing is needed. Shared by training and `python -m lora_lab.bench`."""

from __future__ import annotations

import importlib.util
import math
import sys

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.trainer_utils import unwrap_peft_model

from lora_lab.data import IGNORE_INDEX, batch_to
from lora_lab.errors import ConfigError

# Architectures whose training logits are exactly lm_head(decoder output): no soft-capping or
# logit scaling that a fused loss would skip.
PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
# The fused loss works through the tokens in chunks whose logits are about the size of the hidden
# states (PyTorch's aspect-ratio rule), but never fewer rows than this: at hidden 256 and a 128k
# vocabulary the rule gives 8-row chunks, which trained 5x slower on CPU than 256-row chunks; those
# beat the unfused loss 1.9x (bench shape cpu-128k-vocab).
MIN_CHUNK_ROWS = 256


def use_liger(setting: bool | str, model, model_kind: str, device: str) -> bool:
    """Liger's kernels are Triton kernels (CUDA only) that replace a causal LM's forward: they fit
    the architectures Liger lists, and no classifier."""
    if setting is False:
        return False
    if model_kind != "causal_lm":
        obstacle = "they apply to causal-LM tasks only (Liger replaces the causal LM's forward)"
    elif device != "cuda":
        obstacle = "they need a CUDA device"
    elif importlib.util.find_spec("liger_kernel") is None:
        obstacle = "they need liger-kernel (pip install 'lora_lab[gpu]')"
    else:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        model_type = unwrap_peft_model(model).config.model_type
        if model_type in MODEL_TYPE_TO_APPLY_LIGER_FN:
            return True
        obstacle = f"liger-kernel has no kernels for model type {model_type!r}"
    if setting is True:
        raise ConfigError(
            "train.liger", setting, f"Liger's kernels cannot run here: {obstacle}; use auto or false"
        )
    return False


def apply_liger(model) -> None:
    """Liger's kernels on this model instance only. Liger also swaps names in the architecture's
    transformers module (its RMSNorm and MLP classes, the RoPE function), which every later model of
    the process would pick up: a sweep's next trial with liger off would still run them, on CPU
    tensors too. Those names are put back. RoPE is left out, since attention looks it up in that
    module at every call; RMSNorm, SwiGLU and the fused loss are patched on the instance."""
    from transformers.integrations.liger import apply_liger_kernel

    module = vars(sys.modules[type(unwrap_peft_model(model)).__module__])
    before = dict(module)
    try:
        apply_liger_kernel(model, {"rope": False})
    finally:
        module.update(before)


def use_fused_loss(setting: bool | str, model, model_kind: str, liger: bool) -> bool:
    """PyTorch's chunked linear cross-entropy, where it computes exactly the model's own loss.
    Liger, when on, fuses the loss with its own kernel instead."""
    if setting is False or liger:
        return False
    base = unwrap_peft_model(model)
    head = base.get_output_embeddings() if model_kind == "causal_lm" else None
    if model_kind != "causal_lm":
        obstacle = "it applies to causal-LM tasks only"
    elif base.config.model_type not in PLAIN_HEAD_MODEL_TYPES:
        obstacle = (
            f"model type {base.config.model_type!r} may transform its logits; "
            f"supported: {', '.join(PLAIN_HEAD_MODEL_TYPES)}"
        )
    elif type(head) is not torch.nn.Linear:  # an adapted, trainable-copy or quantized head
        head_type = f"{type(head).__module__}.{type(head).__qualname__}"
        obstacle = f"the output head is a {head_type}, not a plain torch.nn.Linear"
    elif not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        obstacle = f"torch {torch.__version__} has no chunked linear_cross_entropy (torch>=2.13 has)"
    else:
        return True
    if setting is True:
        raise ConfigError("train.fused_loss", setting, f"{obstacle}; use auto or false")
    return False


def fuse_causal_lm_loss(model) -> None:
    """Train without materialising the logits: in training mode with labels, the causal LM's forward
    returns the loss from torch's chunked linear cross-entropy over the decoder's output, which never
    holds the (tokens x vocabulary) logits at once (GiBs for a 128k vocabulary). The loss is the
    model's own: labels shifted by one, IGNORE_INDEX skipped, summed over num_items_in_batch when the
    Trainer passes it (gradient accumulation), else averaged. Evaluation keeps the plain forward,
    whose logits the metrics need. The forward is replaced on the instance, so PEFT, DDP and
    torch.compile still call it through their own wrappers."""
    base = unwrap_peft_model(model)
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    plain_forward = base.forward

    def forward(input_ids=None, labels=None, num_items_in_batch=None, logits_to_keep=0, **kwargs):
        if not (base.training and labels is not None and torch.is_grad_enabled()):
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return plain_forward(input_ids=input_ids, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
        hidden = decoder(input_ids=input_ids, **kwargs).last_hidden_state
        device_type = hidden.device.type
        dtype = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else head.weight.dtype
        )
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        rows, width = hidden.shape[:-1].numel(), hidden.shape[-1]
        chunk_rows = max(MIN_CHUNK_ROWS, rows * width // head.weight.shape[0])
        loss = F.linear_cross_entropy(
            hidden.reshape(rows, width).to(dtype),
            head.weight.to(dtype),
            targets.reshape(-1).to(hidden.device),
            linear_bias=None if head.bias is None else head.bias.to(dtype),
            reduction="mean" if num_items_in_batch is None else "sum",
            ignore_index=IGNORE_INDEX,
            options=torch.nn.LinearCrossEntropyOptions(chunking_method=None, batch_chunk_size=chunk_rows),
        )
        if num_items_in_batch is not None:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        return CausalLMOutputWithPast(loss=loss)

    base.forward = forward


def apply_speed_switches(
    model, liger: bool | str, fused_loss: bool | str, model_kind: str, device: str
) -> dict[str, bool]:
    """Turn on the kernels the settings and the machine allow; returns what is on. Applied before
    the checkpointing probe, so that it measures the step that will run."""
    on = {"liger": use_liger(liger, model, model_kind, device)}
    on["fused_loss"] = use_fused_loss(fused_loss, model, model_kind, on["liger"])
    if on["liger"]:
        apply_liger(model)
    if on["fused_loss"]:
        fuse_causal_lm_loss(model)
    return on


def checkpointing_needed(model, batch: dict, device: str, compute_dtype: torch.dtype) -> bool:
    """Measure instead of guessing: on CUDA, run one forward/backward of the batch (the longest the
    run will see) without activation checkpointing; it is needed if that runs out of memory or peaks
    above 85% of the device (the optimizer and allocator need the rest). On CPU memory is not the
    constraint: off. Call it after the other switches: a fused loss changes what a step needs."""
    if device != "cuda":
        return False
    batch = batch_to(batch, model.device)
    was_training = model.training
    model.train()
    torch.cuda.reset_peak_memory_stats()
    try:
        with torch.autocast("cuda", dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            model(**batch).loss.backward()
        peak = torch.cuda.max_memory_allocated()
    except torch.cuda.OutOfMemoryError:
        peak = math.inf
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return peak > 0.85 * torch.cuda.get_device_properties(model.device).total_memory
