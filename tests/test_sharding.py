"""train.distributed=fsdp: FSDP2 over 2 processes (gloo on CPU) trains what one process trains with the
same global batch, each rank holding half of the base, killed and resumed to the same adapter,
exported with one process; QLoRA sharded too; the refusals; the CUDA path (make test-gpu)."""

from __future__ import annotations

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
def test_qlora_under_fsdp_matches_one_process(tmp_path):
    """The 4-bit weights, stored as the compute dtype, shard; their quantization state stays with
    each layer, so the gathered weights dequantize as one process's do."""
    schedule = [*COMMON, "quant=nf4", "train.max_steps=10", "train.eval_steps=10"]
    single = train_run([*schedule, "train.batch_size=16"], tmp_path / "single")
    sharded = fsdp_run(29544, schedule, tmp_path / "fsdp")
    assert sharded["eval/loss"] == pytest.approx(single["eval/loss"], rel=1e-4)
    assert_same_adapter(tmp_path / "single", tmp_path / "fsdp", atol=1e-5)
    assert sharded["memory/base_param_bytes_per_rank"] == single["memory/base_param_bytes_per_rank"] / 2


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
