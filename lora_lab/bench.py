"""Benchmarks (not tests): measured figures for docs/benchmarks.md.

    python -m lora_lab.bench train --shape llama-8b --quant nf4 --batch 4 --seq 2048
    python -m lora_lab.bench train --shape llama-1b --quant none --batch 8 --workload varlen
    torchrun --nproc_per_node 8 -m lora_lab.bench train --shape llama-8b --quant nf4 --distributed fsdp
    python -m lora_lab.bench loftq --shape llama-8b --rank 16 --iters 1 5

`train` runs, in one process on the same random-init model (real shapes, saved and loaded through
the real loading code, nothing downloaded), the plain HF + PEFT + bitsandbytes recipe
(`prepare_model_for_kbit_training`, LoRA r=16 on all linear layers, gradient checkpointing, sdpa,
fused AdamW) and lora_lab's training step, and reports tokens/s, peak memory, MFU and the ratio.
`--workload varlen` draws example lengths from a long-tailed distribution and compares padded
batches with lora_lab's padding-free packing.

`train --distributed fsdp`, under `torchrun --nproc_per_node N`, shards lora_lab's model over the N
processes as train.distributed=fsdp does (lora_lab/sharding.py) and reports the busiest rank's peak
memory and base bytes, and the tokens/s of all ranks together.

`loftq` times LoftQ initialisation of every adapted matrix of a model shape (random weights made
on the device, nothing downloaded) with lora_lab's randomized and exact SVD, and PEFT's
`loftq_init` on the same matrices (CUDA only; one layer, scaled to the model's depth, because a
full 8B model takes PEFT about 24 minutes), and reports the relative error ||W - Q - sBA|| / ||W||.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import tempfile
import time
from datetime import date
from typing import Any

import torch
import torch.distributed as dist

from lora_lab.data import batch_collator, batch_to, skips_cross_example_attention
from lora_lab.errors import ConfigError, exit_on_config_error
from lora_lab.loftq import QuantSpec, loftq_layer
from lora_lab.models import resolve_compute_dtype
from lora_lab.sharding import base_param_bytes, shard
from lora_lab.speed import checkpointing_needed

# Real model shapes (random weights are made on the device; nothing is downloaded).
LLAMA_CONFIGS = {
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "cpu-small": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    ),
}
# Llama 3's 128k vocabulary on the small body: the output head dominates, as in the 1B model.
LLAMA_CONFIGS["cpu-128k-vocab"] = {**LLAMA_CONFIGS["cpu-small"], "vocab_size": 128256}


def layer_matrices(shape: str) -> tuple[list[tuple[int, int]], int]:
    """The (out, in) shapes of one decoder layer's adapted (all-linear) matrices, and the depth."""
    c = LLAMA_CONFIGS[shape]
    d, inter = c["hidden_size"], c["intermediate_size"]
    kv = d * c["num_key_value_heads"] // c["num_attention_heads"]
    return [(d, d), (kv, d), (kv, d), (d, d), (inter, d), (inter, d), (d, inter)], c["num_hidden_layers"]


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

    matrices, depth = layer_matrices(shape)
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
        for out_features, in_features in matrices:
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


def save_random_llama(shape: str, directory: str, device: str) -> str:
    """A random-init Llama of the given shape, saved in bf16 like a real checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_lab.models import byte_level_tokenizer

    config = LlamaConfig(**LLAMA_CONFIGS[shape], max_position_embeddings=8192)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)  # the loader wants one; token ids are random anyway
    del model
    return directory


def flops_per_token(config, attention_span: float, checkpointing: bool) -> float:
    """Matmul FLOPs per trained token with a frozen base. The linear layers: a forward and the
    backward's input gradients (about one more forward; frozen weights need no weight gradients),
    and with checkpointing one more forward of the decoder layers (transformers does not recompute
    the output head). Causal attention over a span of n tokens: 2 * layers * n * hidden forward,
    twice that backward (both of its operands are activations), once more with checkpointing."""
    d, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    decoder = 2 * layers * (2 * d * d + 2 * d * kv + 3 * d * inter)
    head = 2 * d * config.vocab_size
    attention = 2 * layers * attention_span * d
    recompute = decoder + attention if checkpointing else 0
    return 2 * (decoder + head) + 3 * attention + recompute


def varlen_lengths(count: int, max_len: int, generator: torch.Generator) -> list[int]:
    """Long-tailed example lengths (log-normal, median ~300 tokens) as in instruction data."""
    lengths = torch.empty(count).log_normal_(mean=5.7, std=0.8, generator=generator)
    return [int(min(max(n, 16), max_len)) for n in lengths.tolist()]


def _batches(workload: str, batch: int, seq: int, steps: int, vocab: int, collator, device: str):
    """(batch, example lengths) for each step. varlen examples go through `collator`: lora_lab's
    training collator (packed or padded), so that the bench times the batches training builds;
    fixed-length batches need none."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        if workload == "fixed":
            ids = torch.randint(0, vocab, (batch, seq), generator=generator)
            yield {"input_ids": ids.to(device), "labels": ids.to(device)}, [seq] * batch
            continue
        lengths = varlen_lengths(batch, seq, generator)
        features = []
        for n in lengths:
            ids = torch.randint(0, vocab, (n,), generator=generator).tolist()
            features.append({"input_ids": ids, "attention_mask": [1] * n, "labels": ids})
        collated = collator(features)
        yield batch_to(collated, device), lengths


def peer_model(path: str, quant: str, device: str):
    """The plain recipe, as the HF / PEFT docs give it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.bfloat16, "attn_implementation": "sdpa", "device_map": {"": device}}
    if quant != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    if quant != "none":
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        enable_checkpointing(model)
    return get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    )


def lora_lab_model(
    path: str,
    quant: str,
    device: str,
    attn: str,
    liger: bool | str,
    fused_loss: bool | str,
    sharded: bool = False,
):
    """lora_lab's own path: frozen base kept in the compute dtype, no fp32 upcasts, and the speed
    switches as training applies them (by default liger where installed on CUDA, else the fused loss).
    `sharded`: loaded to be sharded with FSDP, as train.distributed=fsdp loads it."""
    from lora_lab.adapters import attach_adapter
    from lora_lab.config import AdapterConfig, ModelConfig, QuantConfig
    from lora_lab.models import load_model
    from lora_lab.speed import apply_speed_switches

    model, _ = load_model(
        ModelConfig(name="bench", name_or_path=path, attn_implementation=attn),
        QuantConfig(name=quant),
        [],
        device,
        sharded,
    )
    model = attach_adapter(
        model, AdapterConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear"), "causal_lm"
    )
    return model, apply_speed_switches(model, liger, fused_loss, "causal_lm", device)


def enable_checkpointing(model) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def time_training(model, batches, device: str, warmup: int) -> tuple[float, float, float]:
    """Of fwd + bwd + fused AdamW steps: tokens per second over the timed steps, peak GiB, and the
    mean causal-attention span of a token (its example's length), for the FLOP count."""
    model.train()  # checkpointing and the fused loss act in training mode only
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens, squares, start = 0, 0, 0.0
    for step, (batch, lengths) in enumerate(batches):
        if step == warmup:
            _sync(device)
            start, tokens, squares = time.perf_counter(), 0, 0
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += sum(lengths)
        squares += sum(n * n for n in lengths)
    _sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return tokens / (time.perf_counter() - start), peak, squares / tokens


NO_KERNELS = {"liger": False, "fused_loss": False}


def train_recipes(distributed: str, workload: str, tokenizer, attn: str) -> list[tuple[str, Any]]:
    """The recipes a `bench train` row compares, each with its collator (None: batches made whole)."""
    from transformers import DataCollatorWithFlattening

    if distributed == "fsdp":  # the plain recipe has no sharding to compare with
        return [
            ("lora_lab fsdp", None if workload == "fixed" else batch_collator("sft", tokenizer, True, attn))
        ]
    if workload == "fixed":  # equal lengths, made as batches: no collator
        return [("peer", None), ("lora_lab", None)]
    recipes = [
        ("lora_lab padded", batch_collator("sft", tokenizer, False, attn)),
        ("lora_lab packed", batch_collator("sft", tokenizer, True, attn)),
    ]
    if not skips_cross_example_attention(attn):  # what one row would cost this kernel
        recipes.append(("lora_lab packed, one row", DataCollatorWithFlattening()))
    return recipes


def decide_checkpointing(model, checkpointing: str, one_batch, device: str) -> bool:
    """on / off as asked; auto measured on a first batch (`one_batch()` makes it), as training measures
    its longest. Turned on in the model when chosen."""
    if checkpointing == "auto":
        first, _ = next(one_batch())
        uses_checkpointing = checkpointing_needed(model, first, device, torch.bfloat16)
    else:
        uses_checkpointing = checkpointing == "on"
    if uses_checkpointing:
        enable_checkpointing(model)
    return uses_checkpointing


def bench_train(
    shape: str,
    quant: str,
    batch: int,
    seq: int,
    steps: int,
    workload: str,
    checkpointing: str,
    attn: str,
    peak_tflops: float,
    liger: bool | str = "auto",
    fused_loss: bool | str = "auto",
    distributed: str = "ddp",
) -> list[dict]:
    import gc

    from transformers import AutoConfig, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    with shared_directory() as directory:
        path = save_random_llama(shape, directory, device) if rank() == 0 else directory
        if dist.is_initialized():
            dist.barrier()  # the ranks load what rank 0 saved
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        for name, collator in train_recipes(distributed, workload, tokenizer, attn):
            if name == "peer":
                model, kernels, uses_checkpointing = peer_model(path, quant, device), NO_KERNELS, True
            elif distributed == "fsdp":
                model, kernels = lora_lab_model(path, quant, device, attn, liger, fused_loss, sharded=True)
                # as training decides: the probe would step the whole model on one GPU
                uses_checkpointing = checkpointing == "on" or (checkpointing == "auto" and device == "cuda")
                shard(model, device, resolve_compute_dtype("auto", device), uses_checkpointing)
            else:
                model, kernels = lora_lab_model(path, quant, device, attn, liger, fused_loss)
                uses_checkpointing = decide_checkpointing(
                    model,
                    checkpointing,
                    functools.partial(_batches, workload, batch, seq, 1, config.vocab_size, collator, device),
                    device,
                )
            batches = _batches(workload, batch, seq, steps, config.vocab_size, collator, device)
            tokens_per_second, peak, span = time_training(model, batches, device, warmup=min(2, steps - 1))
            # the ranks train on batches of their own: their tokens add up, the busiest rank's memory counts
            tokens_per_second = across_ranks(tokens_per_second, dist.ReduceOp.SUM, device)
            peak = across_ranks(peak, dist.ReduceOp.MAX, device)
            base_bytes = across_ranks(base_param_bytes(model), dist.ReduceOp.MAX, device)
            mfu = (
                tokens_per_second
                / world_size()
                * flops_per_token(config, span, uses_checkpointing)
                / (peak_tflops * 1e12)
                if device == "cuda"
                else None
            )
            rows.append(
                {
                    "recipe": name,
                    "tokens_per_second": tokens_per_second,
                    "peak_gib": peak,
                    "base_gib_per_rank": base_bytes / 2**30,
                    "mfu": mfu,
                    "checkpointing": uses_checkpointing,
                    **kernels,
                }
            )
            del model
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    for row in rows:
        row["ratio"] = row["tokens_per_second"] / rows[0]["tokens_per_second"]
    return rows


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def shared_directory():
    """A temporary directory, the same one on every rank of a torchrun (rank 0 makes it)."""
    if not dist.is_initialized():
        return tempfile.TemporaryDirectory()
    made = tempfile.TemporaryDirectory() if rank() == 0 else None
    name = [made.name if made else None]
    dist.broadcast_object_list(name)
    return made or contextlib.nullcontext(name[0])


def across_ranks(value: float, op, device: str) -> float:
    """`value` reduced over the ranks of a torchrun (itself in one process)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op)
    return float(tensor)


# --liger / --fused-loss: the values train.liger / train.fused_loss take
SWITCH = {"auto": "auto", "true": True, "false": False}


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lora_lab.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="bench", required=True)
    loftq = sub.add_parser("loftq", help="LoftQ initialisation time and error vs PEFT's loftq_init")
    loftq.add_argument("--shape", choices=sorted(LLAMA_CONFIGS), default="llama-8b")
    loftq.add_argument("--rank", type=int, default=16)
    loftq.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    loftq.add_argument(
        "--layers", type=int, default=None, help="time this many layers and scale to the model's depth"
    )
    loftq.add_argument("--out", default=None, help="also write the results as JSON here")
    train = sub.add_parser("train", help="training throughput and memory: the plain recipe vs lora_lab")
    train.add_argument("--shape", choices=sorted(LLAMA_CONFIGS), default="llama-8b")
    train.add_argument("--quant", choices=["none", "nf4", "fp4"], default="nf4")
    train.add_argument("--batch", type=int, default=4)
    train.add_argument("--seq", type=int, default=2048)
    train.add_argument("--steps", type=int, default=8)
    train.add_argument("--workload", choices=["fixed", "varlen"], default="fixed")
    train.add_argument(
        "--checkpointing",
        choices=["auto", "on", "off"],
        default="auto",
        help="lora_lab's side: auto measures one step as training does (the peer always checkpoints)",
    )
    train.add_argument(
        "--attn",
        default="sdpa",
        help="lora_lab's attention: sdpa, flex_attention (packed block masks), flash_attention_2",
    )
    for name in ("liger", "fused-loss"):
        train.add_argument(
            f"--{name}", choices=SWITCH, default="auto", help=f"lora_lab's train.{name.replace('-', '_')}"
        )
    train.add_argument(
        "--distributed",
        choices=["ddp", "fsdp"],
        default="ddp",
        help="fsdp: lora_lab's model sharded over the processes of a torchrun, as train.distributed=fsdp",
    )
    train.add_argument("--peak-tflops", type=float, default=790.0, help="the GPU's dense bf16 peak, for MFU")
    train.add_argument("--out", default=None)
    args = parser.parse_args()
    with exit_on_config_error():
        run_benchmark(args)


def start_processes(distributed: str) -> None:
    """--distributed fsdp: the process group of the torchrun this runs under, on this rank's GPU."""
    if distributed != "fsdp":
        return
    if world_size() < 2:
        raise ConfigError(
            "--distributed",
            distributed,
            f"FSDP shards across processes and this is one (WORLD_SIZE={world_size()}): run it under "
            "torchrun --nproc_per_node N (N >= 2)",
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def run_benchmark(args: argparse.Namespace) -> None:
    if args.bench == "train":
        start_processes(args.distributed)
        rows = bench_train(
            args.shape,
            args.quant,
            args.batch,
            args.seq,
            args.steps,
            args.workload,
            args.checkpointing,
            args.attn,
            args.peak_tflops,
            SWITCH[args.liger],
            SWITCH[args.fused_loss],
            args.distributed,
        )
        if rank() != 0:
            return
        processes = f", {world_size()} processes ({args.distributed})" if dist.is_initialized() else ""
        print(
            f"# training, {args.shape} {args.quant}, batch {args.batch} x seq {args.seq} ({args.workload}){processes}, on {machine()}, {date.today()}"
        )
        print(
            "| recipe | tokens/s | peak GiB | base GiB per rank | MFU | ratio | checkpointing | liger | fused loss |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(
                f"| {r['recipe']} | {r['tokens_per_second']:,.0f} | {r['peak_gib']:.1f} | {r['base_gib_per_rank']:.2f} "
                f"| {mfu} | {r['ratio']:.2f}x "
                + "".join(f"| {'on' if r[k] else 'off'} " for k in ("checkpointing", "liger", "fused_loss"))
                + "|"
            )
        if args.out:
            with open(args.out, "w") as f:
                json.dump(
                    {"machine": machine(), "date": str(date.today()), "args": vars(args), "results": rows},
                    f,
                    indent=2,
                )
        return

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
