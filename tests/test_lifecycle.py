"""After and around a run: checkpoints and resume after SIGKILL, 2-process DDP, export, generate, init_from."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, cli, compose, read_metrics, train_run
from safetensors.torch import load_file

from lora_lab.config import ConfigError, validate

SMALL = ["train.eval_on_start=false", "task.max_eval_samples=32", "task.metrics=[token_accuracy]"]


def adapter_weights(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a, b, atol=1e-5):
    wa, wb = adapter_weights(a), adapter_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=atol), key


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path):
    common = [
        *SMALL,
        "train.max_steps=60",
        "train.save_steps=10",
        "train.eval_steps=60",
        "train.logging_steps=10",
    ]
    train_run(common, tmp_path / "straight")

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_lab.train", *common, f"hydra.run.dir={killed}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = killed / "checkpoints" / "checkpoint-20" / "checkpoint_complete"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (killed / "metrics.json").exists()  # killed mid-training

    # A kill during a later save leaves a partial checkpoint: copy one and remove its marker.
    partial = killed / "checkpoints" / "checkpoint-999"
    shutil.copytree(killed / "checkpoints" / "checkpoint-20", partial)
    (partial / "checkpoint_complete").unlink()
    (partial / "optimizer.pt").write_bytes(b"truncated")

    result = cli(
        ["-m", "lora_lab.train", *common, "train.resume=true", f"hydra.run.dir={killed}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "resuming from" in result.stdout + result.stderr
        and "checkpoint-999" not in result.stdout + result.stderr
    )
    assert_same_adapter(tmp_path / "straight", killed)
    assert read_metrics(killed)["train/steps"] == 60


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    common = [*SMALL, "train.max_steps=30", "train.eval_steps=30", "train.device=cpu", "adapter.dropout=0"]
    single = train_run([*common, "train.batch_size=16"], tmp_path / "single")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "-m",
            "lora_lab.train",
            *common,
            "train.batch_size=8",
            "logger=wandb",
            f"hydra.run.dir={tmp_path}/ddp",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ddp = read_metrics(tmp_path / "ddp")
    assert ddp["train/steps"] == 30
    assert ddp["train/tokens"] == single["train/tokens"]  # both ranks' batches, counted once
    assert len(list((tmp_path / "ddp" / "wandb").glob("offline-run-*"))) == 1  # only rank 0 logs
    assert ddp["eval/loss"] == pytest.approx(single["eval/loss"], rel=0.03)
    assert len(list((tmp_path / "ddp").glob("adapter"))) == 1 and not list(
        (tmp_path / "ddp").glob(".adapter.tmp*")
    )


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_export_merges_and_matches_the_adapter_model(tmp_path, quant):
    from transformers import AutoModelForCausalLM

    train_run([*SMALL, f"quant={quant}", "train.max_steps=20", "train.eval_steps=20"], tmp_path / "run")
    (tmp_path / "run" / ".hydra").mkdir(exist_ok=True)
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text(_config_yaml([*SMALL, f"quant={quant}"]))
    result = cli(
        ["-m", "lora_lab.export", str(tmp_path / "run"), "--out", str(tmp_path / "merged")], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    difference = float(result.stdout.strip().rsplit(" ", 1)[-1])
    assert difference < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not hasattr(merged.config, "quantization_config")


def _config_yaml(overrides):
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(compose(overrides))


def test_generate_completes_prompts_and_classifies_texts(tmp_path):
    for name, task, inputs in (
        ("lm", "task=sort", ["sort 3 1 2 :"]),
        ("cls", "task=sentiment", ["the film was superb", "the food was awful"]),
    ):
        run = tmp_path / name
        train_run(
            [
                *SMALL,
                task,
                "task.metrics=" + ("[accuracy]" if name == "cls" else "[token_accuracy]"),
                "task.metric=" + ("accuracy" if name == "cls" else "token_accuracy"),
                "train.max_steps=30",
                "train.eval_steps=30",
            ],
            run,
        )
        (run / ".hydra").mkdir()
        (run / ".hydra" / "config.yaml").write_text(_config_yaml([task]))
        result = cli(["-m", "lora_lab.generate", str(run), *inputs, "--max-new-tokens", "8"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        lines = result.stdout.strip().splitlines()
        assert len(lines) == len(inputs)
        if name == "cls":
            assert all(line.split("\t")[0] in ("negative", "positive") for line in lines)
        else:
            assert lines[0].startswith("sort 3 1 2 :")


def test_init_from_evaluates_and_continues_a_lora_lab_adapter(tmp_path):
    first = train_run([*SMALL, "train.max_steps=30", "train.eval_steps=30"], tmp_path / "first")
    adapter = tmp_path / "first" / "adapter"
    evaluated = train_run(
        [*SMALL, f"adapter.init_from={adapter}", "train.max_steps=0"], tmp_path / "eval_only"
    )
    assert evaluated["eval/loss"] == pytest.approx(first["eval/loss"], rel=1e-5)
    assert evaluated["train/steps"] == 0
    continued = train_run(
        [*SMALL, f"adapter.init_from={adapter}", "train.max_steps=30", "train.eval_steps=30"],
        tmp_path / "more",
    )
    assert continued["eval/loss"] < first["eval/loss"]


def test_init_from_a_plain_peft_adapter_and_refuses_a_mismatched_one(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_lab.models import build_tiny_model

    run = validate(compose(SMALL))
    base = AutoModelForCausalLM.from_pretrained(build_tiny_model(run.model.tiny))
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(
        tmp_path / "peft"
    )
    metrics = train_run([*SMALL, f"adapter.init_from={tmp_path}/peft", "train.max_steps=0"], tmp_path / "run")
    assert metrics["params/trainable"] == 0

    wrong = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    wrong["target_modules"] = ["c_attn"]
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(wrong))
    with pytest.raises(ConfigError, match="adapter.init_from.*c_attn"):
        train_run([*SMALL, f"adapter.init_from={tmp_path}/peft", "train.max_steps=0"], tmp_path / "bad")


def test_a_run_with_relative_data_paths_reloads_from_another_directory(tmp_path):
    run = tmp_path / "run"
    data = ["task.train_path=examples/arithmetic/train.jsonl", "task.eval_path=examples/arithmetic/dev.jsonl"]
    trained = cli(
        [
            "-m",
            "lora_lab.train",
            "task=jsonl",
            *data,
            "task.prompt_field=question",
            "task.response_field=answer",
            "train.max_steps=5",
            "train.eval_steps=5",
            f"hydra.run.dir={run}",
        ],
        cwd=ROOT,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = cli(
        ["-m", "lora_lab.generate", str(run), "What is 3 plus 4?", "--max-new-tokens", "3"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("What is 3 plus 4?")
