"""Benchmarks (not tests): measured figures for docs/benchmarks.md.

    python -m lora_lab.bench loftq --shape llama-8b --rank 16 --iters 1 5

`loftq` times LoftQ initialisation of every adapted matrix of a model shape (random weights made
on the device, nothing downloaded) with lora_lab's randomized and exact SVD, and PEFT's
`loftq_init` on the same matrices (CUDA only; one layer, scaled to the model's depth, because a
full 8B model takes PEFT about 24 minutes), and reports the relative error ||W - Q - sBA|| / ||W||.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from datetime import date

import torch

from lora_lab.loftq import QuantSpec, loftq_layer

# Adapted matrices (all-linear) of one decoder layer, (out, in), and the number of layers.
SHAPES = {
    "llama-8b": (
        {
            "q": (4096, 4096),
            "k": (1024, 4096),
            "v": (1024, 4096),
            "o": (4096, 4096),
            "gate": (14336, 4096),
            "up": (14336, 4096),
            "down": (4096, 14336),
        },
        32,
    ),
    "llama-1b": (
        {
            "q": (2048, 2048),
            "k": (512, 2048),
            "v": (512, 2048),
            "o": (2048, 2048),
            "gate": (8192, 2048),
            "up": (8192, 2048),
            "down": (2048, 8192),
        },
        16,
    ),
    "cpu-small": (
        {
            "q": (512, 512),
            "k": (128, 512),
            "v": (128, 512),
            "o": (512, 512),
            "gate": (1536, 512),
            "up": (1536, 512),
            "down": (512, 1536),
        },
        2,
    ),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


def relative_error(weight: torch.Tensor, dequantized: torch.Tensor, delta: torch.Tensor) -> float:
    weight = weight.float()
    return float((weight - dequantized.float() - delta.float()).norm() / weight.norm())


def bench_loftq(shape: str, rank: int, iterations: int, device: str, layers: int | None) -> dict:
    import bitsandbytes.functional as bnbf

    matrices, depth = SHAPES[shape]
    measured_layers = depth if layers is None else min(layers, depth)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    spec = QuantSpec()
    generator = torch.Generator(device=device).manual_seed(0)
    totals = {"randomized": 0.0, "exact": 0.0, "peft": 0.0}
    worst_gap = 0.0  # randomized vs exact error, relative, over all matrices
    errors = {"randomized": [], "exact": [], "peft": []}
    warmup = torch.randn(256, 256, device=device).to(dtype)
    loftq_layer(warmup, spec, rank, 1, "randomized")  # kernels and allocator, outside the timings
    for layer in range(measured_layers):
        for out_features, in_features in matrices.values():
            weight = (torch.randn(out_features, in_features, generator=generator, device=device) * 0.02).to(
                dtype
            )
            results = {}
            for svd in ("randomized", "exact"):
                init, seconds = _timed(
                    functools.partial(loftq_layer, weight, spec, rank, iterations, svd), device
                )
                totals[svd] += seconds
                delta = init.left @ init.right
                results[svd] = relative_error(
                    weight, bnbf.dequantize_4bit(init.packed_weight, init.quant_state), delta
                )
                errors[svd].append(results[svd])
            worst_gap = max(worst_gap, (results["randomized"] - results["exact"]) / results["exact"])
            if device == "cuda" and layer == 0:
                from peft.utils.loftq_utils import loftq_init

                (dequantized, lora_a, lora_b), seconds = _timed(
                    functools.partial(loftq_init, weight, num_bits=4, reduced_rank=rank, num_iter=iterations),
                    device,
                )
                totals["peft"] += seconds * depth  # one layer, scaled to the model's depth
                errors["peft"].append(relative_error(weight, dequantized, lora_b @ lora_a))
    scale = depth / measured_layers
    return {
        "shape": shape,
        "rank": rank,
        "iterations": iterations,
        "device": device,
        "seconds_randomized": totals["randomized"] * scale,
        "seconds_exact": totals["exact"] * scale,
        "seconds_peft": totals["peft"] if errors["peft"] else None,
        "mean_rel_err_randomized": sum(errors["randomized"]) / len(errors["randomized"]),
        "mean_rel_err_exact": sum(errors["exact"]) / len(errors["exact"]),
        "mean_rel_err_peft": sum(errors["peft"]) / len(errors["peft"]) if errors["peft"] else None,
        "worst_randomized_vs_exact": worst_gap,
        "layers_measured": measured_layers,
    }


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lora_lab.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="bench", required=True)
    loftq = sub.add_parser("loftq", help="LoftQ initialisation time and error vs PEFT's loftq_init")
    loftq.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    loftq.add_argument("--rank", type=int, default=16)
    loftq.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    loftq.add_argument(
        "--layers", type=int, default=None, help="time this many layers and scale to the model's depth"
    )
    loftq.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [bench_loftq(args.shape, args.rank, n, device, args.layers) for n in args.iters]
    print(f"# LoftQ init, {args.shape}, r={args.rank}, on {machine()}, {date.today()}")
    print(
        "| iters | lora_lab randomized s | lora_lab exact s | PEFT loftq_init s | err randomized | err exact | err PEFT | worst rand/exact gap |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        peft_s = f"{r['seconds_peft']:.1f}" if r["seconds_peft"] is not None else "n/a (CUDA only)"
        peft_e = f"{r['mean_rel_err_peft']:.5f}" if r["mean_rel_err_peft"] is not None else "n/a"
        print(
            f"| {r['iterations']} | {r['seconds_randomized']:.2f} | {r['seconds_exact']:.2f} | {peft_s} | "
            f"{r['mean_rel_err_randomized']:.5f} | {r['mean_rel_err_exact']:.5f} | {peft_e} | {100 * r['worst_randomized_vs_exact']:.2f}% |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine(), "date": str(date.today()), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
