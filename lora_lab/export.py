"""Merge a run's adapter into its base model and save a standard transformers model directory.

    python -m lora_lab.export outputs/2026-11-23/10-00-00 [--out DIR] [--dtype bfloat16]

A 4-bit or 8-bit base is dequantized to the compute dtype first, so the merged model reproduces what
the adapter model computed; the outputs of both on a batch of the task's eval data are compared and
the largest difference printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bitsandbytes as bnb
import torch

from lora_lab.config import exit_on_config_error
from lora_lab.loftq import dequantized_weight
from lora_lab.models import resolve_compute_dtype
from lora_lab.runs import load_run
from lora_lab.tasks import load_rows


def eval_batch(run, tokenizer, size: int = 8) -> dict[str, torch.Tensor]:
    _, rows = load_rows(run.task)
    rows = rows[:size]
    if run.task.format == "cls":
        texts = [r["text"] for r in rows]
        pairs = [r["text_pair"] for r in rows] if rows[0]["text_pair"] is not None else None
        return tokenizer(
            texts, pairs, padding=True, truncation=True, max_length=run.task.max_length, return_tensors="pt"
        )
    texts = [
        r.get("prompt", "") + r.get("response", "") if run.task.format == "sft" else r["text"] for r in rows
    ]
    return tokenizer(
        texts, padding=True, truncation=True, max_length=run.task.max_length, return_tensors="pt"
    )


class MergeMismatch(RuntimeError):
    """The merged model does not reproduce the adapter model within the tolerance."""


def merge(model, dtype: torch.dtype):
    """The adapter folded into its base: W' = dequantize(Q) + s B A for quantized layers (PEFT's own
    4-bit merge would quantize W' again), PEFT's merge for full-precision ones."""
    for name, module in list(model.named_modules()):
        base = getattr(module, "base_layer", None)
        if hasattr(module, "lora_A") and isinstance(base, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            weight = dequantized_weight(base) + module.get_delta_weight("default").float()
            linear = torch.nn.Linear(
                base.in_features,
                base.out_features,
                bias=base.bias is not None,
                device=weight.device,
                dtype=dtype,
            )
            linear.weight.data.copy_(weight)
            if base.bias is not None:
                linear.bias.data.copy_(base.bias)
            model.set_submodule(name, linear)
    merged = model.merge_and_unload()
    quantizer = getattr(merged, "hf_quantizer", None)
    if any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules()):
        merged.dequantize(dtype=dtype)  # quantized layers that had no adapter; drops the quantization config
    elif quantizer is not None:
        quantizer.remove_quantization_config(merged)
    return merged


@torch.no_grad()
def export(run_dir: Path, out: Path, device: str, tolerance: float) -> float:
    """Write the merged model to `out`; return the max |logits difference| (raises above tolerance)."""
    model, tokenizer, run = load_run(run_dir, device)
    dtype = resolve_compute_dtype(run.quant.compute_dtype, next(model.parameters()).device.type)
    batch = eval_batch(run, tokenizer).to(next(model.parameters()).device)
    reference = model(**batch).logits.float()
    merged = merge(model, dtype)
    difference = float((merged(**batch).logits.float() - reference).abs().max())
    scale = float(reference.abs().max())
    if difference > tolerance * max(scale, 1.0):
        raise MergeMismatch(
            f"merged model differs from the adapter model by {difference:.3g} (logit scale {scale:.3g}); nothing saved"
        )
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return difference


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
        "--tolerance", type=float, default=1e-3, help="max logits difference, relative to the logit scale"
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
        f"merged model saved to {out}; max |logits(adapter) - logits(merged)| on an eval batch: {difference:.3g}"
    )


if __name__ == "__main__":
    main()
