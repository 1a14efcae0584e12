"""train.distributed=fsdp: FSDP2 over 2 processes (gloo on CPU) trains what one process trains with the
same global batch, each rank holding half of the base, killed and resumed to the same adapter,
exported with one process; QLoRA sharded too; the refusals; the CUDA path (make test-gpu)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import cli, compose, read_metrics, start_cli, train_run
from test_lifecycle import SMALL, assert_same_adapter, export_cli, with_config

from lora_lab.errors import ConfigError
from lora_lab.validate import validate

# Dropout off: the two runs must draw nothing at random that differs between 1 and 2 processes.
COMMON = [*SMALL, "train.device=cpu", "adapter.dropout=0"]


def torchrun(port: int, overrides: list[str], run_dir: Path) -> list[str]:
    """The arguments of `python -m torch.distributed.run` for a 2-process FSDP run (new interpreters)."""
    return [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "lora_lab.train",
        *overrides,
        "train.batch_size=8",  # x 2 ranks: the single process's 16
        "train.distributed=fsdp",
        f"hydra.run.dir={run_dir}",
    ]


def fsdp_run(port: int, overrides: list[str], run_dir: Path) -> dict:
    result = cli(torchrun(port, overrides, run_dir), cwd=run_dir.parent, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return read_metrics(run_dir)


def base_bytes_of_the_tiny_model() -> int:
    """The frozen base's bytes as transformers loads the checkpoint: every weight but the adapter's."""
    from transformers import AutoModelForCausalLM

    from lora_lab.models import build_tiny_model

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(validate(compose(SMALL)).model.tiny))
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kill_with_ranks(proc) -> None:
    """SIGKILL torchrun and its ranks, which it starts in sessions of their own."""
    ranks = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for pid in ranks:
        os.kill(int(pid), signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_fsdp_matches_one_process_halves_the_base_resumes_and_exports(tmp_path):
    schedule = [*COMMON, "train.max_steps=60", "train.save_steps=10", "train.eval_steps=60"]
    single = train_run([*schedule, "train.batch_size=16"], tmp_path / "single")
    sharded = fsdp_run(29541, schedule, tmp_path / "fsdp")
    assert sharded["train/steps"] == 60 and sharded["train/tokens"] == single["train/tokens"]
    assert sharded["eval/loss"] == pytest.approx(single["eval/loss"], rel=1e-4)
    assert_same_adapter(tmp_path / "single", tmp_path / "fsdp", atol=1e-5)
    # measured from the ranks' DTensor shards, against the checkpoint's own count
    full = base_bytes_of_the_tiny_model()
    assert single["memory/base_param_bytes_per_rank"] == full
    assert sharded["memory/base_param_bytes_per_rank"] == pytest.approx(full / 2, rel=0.01)
    assert (tmp_path / "fsdp" / "checkpoints" / "checkpoint-60" / "sharded_state" / ".metadata").exists()

    killed = tmp_path / "killed"
    proc = start_cli(torchrun(29542, schedule, killed), tmp_path, tmp_path / "killed.log", new_session=True)
    marker = killed / "checkpoints" / "checkpoint-20" / "checkpoint_complete"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    kill_with_ranks(proc)
    assert marker.exists() and not (killed / "metrics.json").exists()  # killed mid-training
    resumed = fsdp_run(29543, [*schedule, "train.resume=true"], killed)
    assert resumed["train/steps"] == 60
    assert_same_adapter(tmp_path / "fsdp", killed)

    # adapter/ is a plain PEFT adapter: one process exports it
    result, difference = export_cli(with_config(tmp_path / "fsdp", schedule), tmp_path / "merged")
    assert result.returncode == 0, result.stderr[-3000:]
    assert difference < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("init", [[], ["adapter.init=loftq", "adapter.r=4"]], ids=["qlora", "loftq"])
def test_qlora_under_fsdp_matches_one_process(tmp_path, init):
    """The 4-bit weights, stored as the compute dtype, shard; their quantization state stays with
    each layer, so the gathered weights dequantize as one process's do; LoftQ's backbone too."""
    schedule = [*COMMON, "quant=nf4", *init, "train.max_steps=10", "train.eval_steps=10"]
    single = train_run([*schedule, "train.batch_size=16"], tmp_path / "single")
    sharded = fsdp_run(29547 if init else 29544, schedule, tmp_path / "fsdp")
    assert sharded["eval/loss"] == pytest.approx(single["eval/loss"], rel=1e-4)
    assert_same_adapter(tmp_path / "single", tmp_path / "fsdp", atol=5e-5)
    assert sharded["memory/base_param_bytes_per_rank"] == single["memory/base_param_bytes_per_rank"] / 2


def load_and_shard_4bit(rank: int, port: int, out: Path) -> None:
    """A rank of a 2-process gloo group: the tiny model loaded 4-bit as a sharded run loads it, what
    the rank held before sharding, and its 4-bit layers' weights dequantized whole after it."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from lora_lab.models import load_model
    from lora_lab.sharding import shard

    os.environ |= {"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.distributed.init_process_group("gloo")
    run = validate(compose([*COMMON, "quant=nf4"]))
    model, _ = load_model(run.model, run.quant, [], "cpu", sharded=True)
    held = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
    shard(model, "cpu", torch.float32, checkpointing=False)
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            packed = module.weight.full_tensor()
            weights[name] = bnbf.dequantize_4bit(packed, module.quant_state)
    torch.save({"held": held, "weights": weights}, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_only_rank_0_loads_a_4bit_base_and_every_rank_gets_its_layers(tmp_path):
    """QLoRA's base is read and quantized by rank 0 alone; rank 1 builds it on `meta` and holds no
    weight until its shards arrive, with the quantization state, which dequantizes them exactly
    as one process's load does."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from lora_lab.models import load_model

    run = validate(compose([*COMMON, "quant=nf4"]))
    # (one process builds the tiny model's files, which the ranks then read)
    single, _ = load_model(run.model, run.quant, [], "cpu", sharded=True)  # stored as FSDP stores it
    torch.multiprocessing.spawn(load_and_shard_4bit, args=(29548, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    expected = {
        name: bnbf.dequantize_4bit(module.weight, module.weight.quant_state)
        for name, module in single.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }
    assert ranks[0]["held"] == sum(p.numel() * p.element_size() for p in single.parameters())
    assert ranks[1]["held"] == 0
    for held in ranks:
        assert held["weights"].keys() == expected.keys() and len(expected) == 14
        for name, weight in expected.items():
            assert torch.equal(held["weights"][name], weight), name


@pytest.mark.slow
def test_a_submitit_job_of_two_tasks_is_one_fsdp_run(tmp_path):
    """hydra/launcher=submitit_local with tasks_per_node=2 as submitit_slurm runs a job (conf/hydra/launcher/
    fsdp_slurm.yaml): the tasks join one torch.distributed run, each holding half of the base."""
    result = cli(
        [
            "-m",
            "lora_lab.train",
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.tasks_per_node=2",
            *COMMON,
            "train.max_steps=10",
            "train.eval_steps=10",
            "train.distributed=fsdp",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    metrics = read_metrics(tmp_path / "sweep" / "0")
    assert metrics["memory/base_param_bytes_per_rank"] == base_bytes_of_the_tiny_model() / 2


@pytest.mark.slow
def test_the_training_benchmark_shards_under_torchrun(tmp_path):
    """`torchrun ... -m lora_lab.bench train --distributed fsdp`, the GPU row's command, on the CPU shape."""
    out = tmp_path / "bench.json"
    args = ["train", "--shape", "cpu-small", "--quant", "nf4", "--batch", "2", "--seq", "64", "--steps", "3"]
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29545"]
    result = cli(
        [*launch, "-m", "lora_lab.bench", *args, "--distributed", "fsdp", "--out", str(out)],
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = json.loads(out.read_text())["results"]
    assert row["recipe"] == "lora_lab fsdp" and row["tokens_per_second"] > 0
    assert "2 processes (fsdp)" in result.stdout


def test_fsdp_refusals_name_the_key_and_what_is_valid(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"train.distributed='zero3'.*valid values are ddp, fsdp"):
        validate(compose(["train.distributed=zero3"]))
    result = cli(["-m", "lora_lab.train", "train.distributed=fsdp"], cwd=tmp_path, env={"WORLD_SIZE": None})
    assert result.returncode == 2
    [line] = [line for line in (result.stdout + result.stderr).splitlines() if "train.distributed" in line]
    assert "WORLD_SIZE=1" in line and "torchrun --nproc_per_node N" in line
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"quant='int8'.*quant=nf4, fp4 or none"):
        validate(compose(["train.distributed=fsdp", "quant=int8"]))
    from lora_lab.sharding import block_stack

    no_blocks = torch.nn.Sequential(torch.nn.Linear(4, 4))
    no_blocks.config = SimpleNamespace(name_or_path="toy", model_type="toy")
    with pytest.raises(ConfigError, match=r"train.distributed='fsdp'.*no stack of transformer blocks.*ddp"):
        block_stack(no_blocks)


def one_step_on_cuda(overrides: list[str], sharded: bool) -> tuple[float, dict]:
    """The loss of one training batch and the adapter's gradients, on CUDA: the tiny model loaded as
    a run loads it, sharded (a process group of one, NCCL) or not."""
    from lora_lab.adapters import attach_adapter
    from lora_lab.models import load_model
    from lora_lab.sharding import shard

    run = validate(compose(overrides))
    model, tokenizer = load_model(run.model, run.quant, [], "cuda", sharded=sharded)
    torch.manual_seed(0)  # the same LoRA initialisation for both models
    model = attach_adapter(model, run.adapter, "causal_lm")
    if sharded:
        shard(model, "cuda", torch.bfloat16, checkpointing=True)
    batch = tokenizer(["sort 3 1 2 : 1 2 3", "sort 9 7 8 : 7 8 9"], return_tensors="pt").to("cuda")
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = {
        name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float().cpu()
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    return float(loss), grads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make test-gpu)")
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_a_sharded_step_on_cuda_matches_the_unsharded_one(quant, monkeypatch):
    """The CUDA path of train.distributed=fsdp as far as one GPU takes it: bitsandbytes' CUDA kernels
    on 4-bit weights stored as bf16 and gathered by FSDP, a full-precision base loaded into CPU memory
    and sharded onto the GPU, bf16 mixed precision, the composable activation checkpoint."""
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29546",
        "RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        monkeypatch.setenv(key, value)
    overrides = [f"quant={quant}", "quant.compute_dtype=bfloat16", "adapter.dropout=0"]
    torch.distributed.init_process_group("nccl")
    try:
        loss, grads = one_step_on_cuda(overrides, sharded=False)
        sharded_loss, sharded_grads = one_step_on_cuda(overrides, sharded=True)
    finally:
        torch.distributed.destroy_process_group()
    assert sharded_loss == pytest.approx(loss, rel=1e-2)
    assert grads.keys() == sharded_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(sharded_grads[name], grad, rtol=0.05, atol=1e-3), name
