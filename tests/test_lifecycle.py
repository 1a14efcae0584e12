"""After and around a run: checkpoints and resume after SIGKILL, 2-process DDP, export, generate, init_from."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, cli, compose, read_metrics, start_cli, train_run
from safetensors.torch import load_file
from test_loftq import gpt2_overrides, save_tiny_gpt2

from lora_lab.data import IGNORE_INDEX, tokenize_sft
from lora_lab.errors import ConfigError
from lora_lab.tasks import load_rows
from lora_lab.validate import validate

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
    proc = start_cli(
        ["-m", "lora_lab.train", *common, f"hydra.run.dir={killed}"],
        tmp_path,
        tmp_path / "killed.log",
        new_session=True,
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
    result = cli(
        [
            "-m",
            "torch.distributed.run",  # its two ranks are new interpreters
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
        env={"OMP_NUM_THREADS": "1"},
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
    for name, task, inputs, options in (
        ("lm", "task=sort", ["sort 3 1 2 :"], []),
        ("cls", "task=sentiment", ["the film was superb", "the food was awful"], []),
        ("chat", "task=chat_sort", ["sort 3 1 2"], ["--system", "Sort the digits."]),
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
        result = cli(
            ["-m", "lora_lab.generate", str(run), *inputs, *options, "--max-new-tokens", "8"], cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr[-3000:]
        lines = result.stdout.strip().splitlines()
        if name == "chat":  # the text as a user turn and the response, ended at the template's </s>
            assert result.stdout.startswith("sort 3 1 2\t") and "<s>" not in result.stdout
            continue
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


def with_config(run_dir, overrides):
    """An in-process run's dir as Hydra leaves it, with .hydra/config.yaml (for export and generate)."""
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "config.yaml").write_text(_config_yaml(overrides))
    return run_dir


def export_cli(run_dir, out, *args):
    result = cli(["-m", "lora_lab.export", str(run_dir), "--out", str(out), *args], cwd=run_dir.parent)
    difference = float(result.stdout.strip().rsplit(" ", 1)[-1]) if result.returncode == 0 else None
    return result, difference


@torch.no_grad()
def hand_eval_loss(model_dir, overrides) -> float:
    """The mean NLL of the eval set's label tokens, one example at a time, from a model that
    transformers loads: independent of lora_lab's batching, packing and Trainer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = validate(compose(overrides))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total, count = 0.0, 0
    for example in tokenize_sft(load_rows(run.task)[1], tokenizer, run.task.max_length):
        logits = model(torch.tensor([example["input_ids"]])).logits[0, :-1]
        targets = torch.tensor(example["labels"][1:])
        keep = targets != IGNORE_INDEX
        total += float(F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        count += int(keep.sum())
    return total / count


LOFTQ = [*SMALL, "quant=nf4", "adapter.init=loftq", "adapter.r=4", "adapter.loftq_iter=2"]


def test_a_loftq_adapter_reloads_on_its_backbone_in_init_from_export_and_generate(tmp_path, model_cache):
    """The adapter was fitted and trained on LoftQ's Q, not on plain quantize(W): a reload that puts
    plain quantization back (or a fresh LoftQ init, or one of another rank) computes something else."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    trained = train_run([*LOFTQ, "train.max_steps=20", "train.eval_steps=20"], run)
    shutil.rmtree(model_cache / "loftq")  # the first reload recomputes the backbone
    for extra in ([], ["adapter.init=loftq"]):  # the command as it trained, with the default r=8
        evaluated = train_run(
            [*SMALL, "quant=nf4", *extra, f"adapter.init_from={run / 'adapter'}", "train.max_steps=0"],
            tmp_path / f"eval{len(extra)}",
        )
        assert evaluated["eval/loss"] == pytest.approx(trained["eval/loss"], rel=1e-6), extra

    result, difference = export_cli(with_config(run, LOFTQ), tmp_path / "merged")
    assert result.returncode == 0, result.stderr[-3000:]
    assert difference < 1e-4
    assert hand_eval_loss(tmp_path / "merged", LOFTQ) == pytest.approx(trained["eval/loss"], rel=1e-4)

    prompt = "sort 3 1 2 :"
    generated = cli(["-m", "lora_lab.generate", str(run), prompt, "--max-new-tokens", "8"], cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    tokens = merged.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    completion = tokenizer.decode(tokens[0, ids.shape[1] :], skip_special_tokens=True)
    assert generated.stdout.strip() == (prompt + completion).strip()


def test_a_loftq_adapter_refuses_another_quantization(tmp_path):
    train_run([*LOFTQ, "train.max_steps=2", "train.eval_steps=2"], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"quant=.*needs quant=nf4 quant.double_quant=true"):
        train_run(
            [*SMALL, "quant=fp4", f"adapter.init_from={tmp_path / 'run' / 'adapter'}", "train.max_steps=0"],
            tmp_path / "bad",
        )
    assert not (tmp_path / "bad" / "metrics.json").exists()


def test_export_of_a_quantized_gpt2_loads_back_in_transformers(tmp_path):
    """transformers loads GPT-2's Conv1D weights as (in, out): a merged nn.Linear (out, in) fails to
    load, and a square c_proj would load transposed."""
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    overrides = [*SMALL, *gpt2_overrides(save_tiny_gpt2(tmp_path / "gpt2")), "quant=nf4"]
    trained = train_run([*overrides, "train.max_steps=10", "train.eval_steps=10"], tmp_path / "run")
    result, difference = export_cli(with_config(tmp_path / "run", overrides), tmp_path / "merged")
    assert result.returncode == 0, result.stderr[-3000:]
    assert difference < 1e-4
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    assert type(merged.transformer.h[0].attn.c_proj) is Conv1D
    assert hand_eval_loss(tmp_path / "merged", overrides) == pytest.approx(trained["eval/loss"], rel=1e-4)


def test_export_of_a_bf16_run_passes_the_default_tolerance(tmp_path):
    """bf16 rounds the merged weights: the default tolerance scales with the compute dtype."""
    overrides = [*SMALL, "quant=nf4", "quant.compute_dtype=bfloat16"]
    train_run([*overrides, "train.max_steps=10", "train.eval_steps=10"], tmp_path / "run")
    result, difference = export_cli(with_config(tmp_path / "run", overrides), tmp_path / "merged")
    assert result.returncode == 0, result.stderr[-3000:]
    assert difference > 0
    assert (
        load_file(tmp_path / "merged" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].dtype
        == torch.bfloat16
    )
    # the fp32 default still holds a bf16 run to fp32 precision
    result, _ = export_cli(tmp_path / "run", tmp_path / "strict", "--tolerance", "1e-3")
    assert result.returncode == 1 and "nothing saved" in result.stderr and not (tmp_path / "strict").exists()


def test_export_of_a_qlora_dora_run_keeps_the_magnitude(tmp_path):
    """W' = m (Q + s B A) / ||Q + s B A|| per output row, from the saved adapter's tensors by hand."""
    import bitsandbytes.functional as bnbf
    from peft import PeftModel

    from lora_lab.runs import load_run

    overrides = [*SMALL, "quant=nf4", "adapter.use_dora=true"]
    trained = train_run([*overrides, "train.max_steps=10", "train.eval_steps=10"], tmp_path / "run")
    result, difference = export_cli(with_config(tmp_path / "run", overrides), tmp_path / "merged")
    assert result.returncode == 0, result.stderr[-3000:]
    assert difference < 1e-4
    assert hand_eval_loss(tmp_path / "merged", overrides) == pytest.approx(trained["eval/loss"], rel=1e-4)

    model, _, _ = load_run(tmp_path / "run", "cpu")
    assert isinstance(model, PeftModel)
    adapter = adapter_weights(tmp_path / "run")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    base = model.get_base_model().get_submodule(name).base_layer
    q = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    prefix = f"base_model.model.{name}"
    scaling = 16 / 8  # alpha / r
    direction = q + scaling * adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
    magnitude = adapter[f"{prefix}.lora_magnitude_vector"]
    expected = magnitude.view(-1, 1) * direction / direction.norm(dim=1, keepdim=True)
    assert torch.allclose(merged[f"{name}.weight"], expected, atol=1e-5)
    assert not torch.allclose(merged[f"{name}.weight"], direction, atol=1e-3)


def test_init_from_refuses_an_adapter_made_for_another_task_type(tmp_path):
    """A classification adapter carries its trained head: on a causal LM PEFT would drop it silently."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from lora_lab.models import build_tiny_model

    run = validate(compose(SMALL))
    base = AutoModelForSequenceClassification.from_pretrained(build_tiny_model(run.model.tiny), num_labels=2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type=TaskType.SEQ_CLS)
    get_peft_model(base, config).save_pretrained(tmp_path / "cls")
    with pytest.raises(
        ConfigError, match=r"adapter.init_from=.*task_type SEQ_CLS.*model.kind=causal_lm needs CAUSAL_LM"
    ):
        train_run([*SMALL, f"adapter.init_from={tmp_path}/cls", "train.max_steps=0"], tmp_path / "bad")


def test_export_help_names_only_flags_it_takes():
    import re

    result = cli(["-m", "lora_lab.export", "--help"], cwd=ROOT)
    assert result.returncode == 0
    description, _, options = result.stdout.partition("\noptions:")
    described = set(re.findall(r"--[a-z][a-z-]*", description))
    accepted = set(re.findall(r"^ +(?:-\w, )?(--[a-z][a-z-]*)", options, re.MULTILINE))
    assert described and described <= accepted, described - accepted
