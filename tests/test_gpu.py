"""GPU-only paths: `make test-gpu` on a CUDA machine; skipped elsewhere, and in `make test`, which
hides the GPU so that the rest of the suite tests the CPU paths."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import SMALL_EVAL, cli, read_metrics, train_run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make test-gpu)"),
]


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    """A random-init Llama with real proportions (small enough to build in seconds), saved locally."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_lab.models import byte_level_tokenizer

    path = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return str(path)


def test_default_run_trains_in_bf16_on_the_gpu(tmp_path):
    metrics = train_run([*SMALL_EVAL, "train.max_steps=200", "train.eval_steps=200"], tmp_path)
    assert metrics["eval/token_accuracy"] > 0.5
    assert 0 < metrics["memory/peak_gib"] < 2  # CUDA peak allocated, not the host's RSS
    assert metrics["train/liger"] == float(importlib.util.find_spec("liger_kernel") is not None)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs lora_lab[gpu]")
def test_liger_gives_the_plain_loss_and_patches_only_its_own_model(random_llama):
    """Liger's loss matches the model's own; and Liger, which swaps classes and functions in the
    architecture's transformers module, leaves that module as it was for the next model."""
    from conftest import compose
    from transformers.models.llama import modeling_llama

    from lora_lab.adapters import attach_adapter
    from lora_lab.models import load_model
    from lora_lab.speed import apply_speed_switches
    from lora_lab.validate import validate

    originals = dict(vars(modeling_llama))
    run = validate(compose([f"model.name_or_path={random_llama}", "adapter.dropout=0"]))
    ids = torch.randint(0, 320, (2, 256), generator=torch.Generator().manual_seed(0)).cuda()
    losses, grads = {}, {}
    for liger in (False, True):
        model, _ = load_model(run.model, run.quant, [], "cuda")
        model = attach_adapter(model, run.adapter, "causal_lm")
        assert apply_speed_switches(model, liger, False, "causal_lm", "cuda")["liger"] is liger
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses[liger] = loss.item()
        grads[liger] = model.base_model.model.model.layers[0].mlp.down_proj.lora_B.default.weight.grad.float()
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)
    assert torch.allclose(grads[True], grads[False], rtol=0.05, atol=1e-4)
    assert {k: v for k, v in vars(modeling_llama).items() if originals.get(k) is not v} == {}
    # and not only since this test began: an earlier Liger run in this process left nothing either
    assert not [
        k for k, v in vars(modeling_llama).items() if getattr(v, "__module__", "").startswith("liger")
    ]


@pytest.mark.parametrize("init", ["gaussian", "loftq"])
def test_random_llama_in_nf4_trains_on_the_gpu(tmp_path, random_llama, init):
    metrics = train_run(
        [
            *SMALL_EVAL,
            f"model.name_or_path={random_llama}",
            "quant=nf4",
            f"adapter.init={init}",
            "train.max_steps=30",
            "train.eval_steps=30",
            "train.lr=1e-3",
            "train.eval_on_start=true",
        ],
        tmp_path,
    )
    assert metrics["eval/loss"] < metrics["baseline/loss"] and metrics["train/steps"] == 30
    rows = __import__("json").loads((tmp_path / "quant_error.json").read_text())
    assert rows and (init != "loftq" or all(r["loftq_rel_err"] < r["qlora_rel_err"] for r in rows))


def test_nf4_export_matches_the_adapter_model_on_the_gpu(tmp_path, random_llama):
    from conftest import compose
    from omegaconf import OmegaConf

    overrides = [
        *SMALL_EVAL,
        f"model.name_or_path={random_llama}",
        "quant=nf4",
        "train.max_steps=10",
        "train.eval_steps=10",
    ]
    train_run(overrides, tmp_path / "run")
    (tmp_path / "run" / ".hydra").mkdir()
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(compose(overrides)))
    result = cli(
        [
            "-m",
            "lora_lab.export",
            str(tmp_path / "run"),
            "--out",
            str(tmp_path / "merged"),
            "--tolerance",
            "2e-2",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    assert read_metrics(tmp_path / "run")["train/steps"] == 10


def test_automatic_checkpointing_turns_on_only_when_a_step_would_not_fit(random_llama):
    from conftest import compose

    from lora_lab.adapters import attach_adapter
    from lora_lab.data import build_task_data, longest_batch
    from lora_lab.models import load_model
    from lora_lab.speed import checkpointing_needed
    from lora_lab.validate import validate

    run = validate(compose([f"model.name_or_path={random_llama}"]))
    model, tokenizer = load_model(run.model, run.quant, [], "cuda")
    model = attach_adapter(model, run.adapter, "causal_lm")
    rows = [{"prompt": "x" * 500, "response": "y" * 8}] * 4096
    data = build_task_data(rows, rows[:4], "sft", tokenizer, 512, packing=False)
    assert checkpointing_needed(model, longest_batch(data, 4), "cuda", torch.bfloat16) is False
    # 4,096 x 512 tokens in one step: hundreds of GiB of activations without checkpointing
    assert checkpointing_needed(model, longest_batch(data, 4096), "cuda", torch.bfloat16) is True
