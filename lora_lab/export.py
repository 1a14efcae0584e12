"""Merge a run's adapter into its base model and save a standard transformers model directory.

    python -m lora_lab.export outputs/2026-11-23/10-00-00 [--out DIR] [--device cpu] [--tolerance 1e-3]

A 4-bit or 8-bit base is dequantized to the run's compute dtype first (for LoftQ runs, its LoftQ
backbone), so the merged model reproduces what the adapter model computed. The saved directory is
loaded back with transformers and its outputs on a batch of the task's eval data are compared with the
adapter model's; the largest difference is printed, and above the tolerance nothing is saved.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import bitsandbytes as bnb
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

from lora_lab.errors import exit_on_config_error
from lora_lab.loftq import dequantized_weight
from lora_lab.models import is_conv1d, resolve_compute_dtype
from lora_lab.runs import load_run
from lora_lab.tasks import load_rows, read_record

# An eval row as one text to compare logits on, by format (classification rows are text pairs).
EVAL_TEXT = {
    "sft": lambda row: row["prompt"] + row["response"],
    "lm": lambda row: row["text"],
    "chat": lambda row: "\n".join(turn["content"] for turn in row["messages"]),
}


def eval_batch(run, tokenizer, recorded: dict | None, size: int = 8) -> dict[str, torch.Tensor]:
    """The first `size` eval rows of the run's data, read as it trained (`recorded`: its run dir's
    data record: the eval split, the labels)."""
    _, rows = load_rows(run.task, recorded)
    rows = rows[:size]
    if run.task.format == "cls":
        texts = [r["text"] for r in rows]
        pairs = [r["text_pair"] for r in rows] if rows[0]["text_pair"] is not None else None
        return tokenizer(
            texts, pairs, padding=True, truncation=True, max_length=run.task.max_length, return_tensors="pt"
        )
    texts = [EVAL_TEXT[run.task.format](r) for r in rows]
    return tokenizer(
        texts, padding=True, truncation=True, max_length=run.task.max_length, return_tensors="pt"
    )


class MergeMismatch(RuntimeError):
    """The merged model does not reproduce the adapter model within the tolerance."""


QUANTIZED_LAYERS = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
# The default tolerance, relative to the logit scale: fp32 merges agree far closer; in bf16 or fp16 the
# merged weights round to the dtype, so a few of its units of rounding.
TOLERANCE = 1e-3
TOLERANCE_ROUNDING_UNITS = 8


def default_tolerance(dtype: torch.dtype) -> float:
    return max(TOLERANCE, TOLERANCE_ROUNDING_UNITS * torch.finfo(dtype).eps)


def full_precision_layer(quantized, weight: torch.Tensor, dtype: torch.dtype) -> torch.nn.Module:
    """The layer class a quantized layer replaced at loading, holding `weight` (out, in): a Linear, or
    GPT-2's Conv1D, which stores (in, out) (so that transformers loads the saved model)."""
    conv1d = is_conv1d(quantized)
    if conv1d:
        layer = Conv1D(quantized.out_features, quantized.in_features)
    else:
        layer = torch.nn.Linear(
            quantized.in_features, quantized.out_features, bias=quantized.bias is not None
        )
    layer.to(device=weight.device, dtype=dtype)
    layer.weight.data.copy_(weight.T if conv1d else weight)
    if quantized.bias is not None:
        layer.bias.data.copy_(quantized.bias)
    return layer


def merged_weight(lora_layer) -> torch.Tensor:
    """dequantize(Q) + s B A; with DoRA each output row then takes its trained magnitude m (m V / ||V||)."""
    weight = dequantized_weight(lora_layer.base_layer) + lora_layer.get_delta_weight("default").float()
    if lora_layer.use_dora["default"]:
        magnitude = lora_layer.lora_magnitude_vector["default"].weight.float()
        weight *= (magnitude / weight.norm(dim=1)).view(-1, 1)
    return weight


def merge(model, dtype: torch.dtype):
    """The adapter folded into its base: merged_weight for quantized layers (PEFT's own 4-bit merge
    would quantize W' again), PEFT's merge for full-precision ones; quantized layers without an
    adapter are dequantized."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), QUANTIZED_LAYERS):
            model.set_submodule(name, full_precision_layer(module.base_layer, merged_weight(module), dtype))
    merged = model.merge_and_unload()
    for name, module in list(merged.named_modules()):
        if isinstance(module, QUANTIZED_LAYERS):
            merged.set_submodule(name, full_precision_layer(module, dequantized_weight(module), dtype))
    quantizer = getattr(merged, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(merged)
    return merged


def save_checked(
    merged, tokenizer, out: Path, kind: str, batch, reference: torch.Tensor, tolerance: float
) -> float:
    """Save the merged model, load it back as a user would and compare it with the adapter model's
    logits; move it to `out` only when within the tolerance. Returns the max |difference|."""
    staging = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    auto_cls = AutoModelForSequenceClassification if kind == "seq_cls" else AutoModelForCausalLM
    dtype = next(merged.parameters()).dtype
    reloaded = auto_cls.from_pretrained(staging, dtype=dtype, device_map={"": reference.device.type})
    difference = float((reloaded(**batch).logits.float() - reference).abs().max())
    scale = float(reference.abs().max())
    if difference > tolerance * max(scale, 1.0):
        shutil.rmtree(staging)
        raise MergeMismatch(
            f"the saved merged model differs from the adapter model by {difference:.3g} "
            f"(logit scale {scale:.3g}, tolerance {tolerance:.3g} of it); nothing saved"
        )
    out.mkdir(parents=True, exist_ok=True)
    for file in staging.iterdir():
        os.replace(file, out / file.name)
    staging.rmdir()
    return difference


@torch.no_grad()
def export(run_dir: Path, out: Path, device: str, tolerance: float | None) -> float:
    """Write the merged model to `out`; return the max |logits difference| between it (loaded back)
    and the adapter model. Tolerance None: default_tolerance of the compute dtype."""
    model, tokenizer, run = load_run(run_dir, device)
    dtype = resolve_compute_dtype(run.quant.compute_dtype, next(model.parameters()).device.type)
    batch = eval_batch(run, tokenizer, read_record(run_dir)).to(next(model.parameters()).device)
    reference = model(**batch).logits.float()
    merged = merge(model, dtype)
    tolerance = default_tolerance(dtype) if tolerance is None else tolerance
    return save_checked(merged, tokenizer, out, run.model.kind, batch, reference, tolerance)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lora_lab.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: <run_dir>/merged")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help=f"max logits difference, relative to the logit scale (default: {TOLERANCE:g}, "
        f"or {TOLERANCE_ROUNDING_UNITS} units of rounding of a 16-bit compute dtype)",
    )
    args = parser.parse_args()
    out = args.out or args.run_dir / "merged"
    try:
        with exit_on_config_error():
            difference = export(args.run_dir, out, args.device, args.tolerance)
    except MergeMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(
        f"merged model saved to {out}; max |logits(adapter) - logits(saved merged)| on an eval batch: {difference:.3g}"
    )


if __name__ == "__main__":
    main()
