"""Target-module presets resolve to the right layers per architecture (Llama, GPT-2 Conv1D, BERT)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from lora_lab.adapters import lora_config
from lora_lab.config import AdapterConfig


def adapted_suffixes(model, preset, kind="causal_lm") -> set[str]:
    peft_model = get_peft_model(model, lora_config(model, AdapterConfig(target_modules=preset), kind))
    names = [n.removesuffix(".lora_A") for n, m in peft_model.named_modules() if n.endswith(".lora_A")]
    return {".".join(n.split(".")[-2:]) for n in names}


def llama():
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )


def gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32))


def bert():
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
        )
    )


@pytest.mark.parametrize(
    "build,preset,kind,expected",
    [
        (llama, "qv", "causal_lm", {"self_attn.q_proj", "self_attn.v_proj"}),
        (
            llama,
            "attn",
            "causal_lm",
            {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"},
        ),
        (llama, "mlp", "causal_lm", {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
        (gpt2, "qv", "causal_lm", {"attn.c_attn"}),
        (gpt2, "attn", "causal_lm", {"attn.c_attn", "attn.c_proj"}),
        (gpt2, "mlp", "causal_lm", {"mlp.c_fc", "mlp.c_proj"}),
        (gpt2, "all-linear", "causal_lm", {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
        (bert, "qv", "seq_cls", {"self.query", "self.value"}),
        (bert, "attn", "seq_cls", {"self.query", "self.key", "self.value", "output.dense"}),
        (bert, "mlp", "seq_cls", {"intermediate.dense", "output.dense"}),
    ],
)
def test_presets_resolve_per_architecture(build, preset, kind, expected):
    torch.manual_seed(0)
    assert adapted_suffixes(build(), preset, kind) == expected


def test_bert_attn_and_mlp_presets_do_not_overlap():
    attn = get_peft_model(bert(), lora_config(bert(), AdapterConfig(target_modules="attn"), "seq_cls"))
    mlp = get_peft_model(bert(), lora_config(bert(), AdapterConfig(target_modules="mlp"), "seq_cls"))
    attn_names = {n for n, _ in attn.named_modules() if n.endswith(".lora_A")}
    mlp_names = {n for n, _ in mlp.named_modules() if n.endswith(".lora_A")}
    assert attn_names and mlp_names and not attn_names & mlp_names


def test_lm_head_is_never_adapted_by_all_linear():
    assert "lm_head" not in {s.split(".")[-1] for s in adapted_suffixes(llama(), "all-linear")}


def test_a_classifier_head_on_a_bf16_base_trains_in_fp32(tmp_path):
    """PEFT copies the new head in the base's dtype: in bf16 small updates would round away."""
    from conftest import compose, train_run

    from lora_lab.adapters import attach_adapter
    from lora_lab.models import load_model
    from lora_lab.validate import validate

    overrides = ["task=sentiment", "quant.compute_dtype=bfloat16"]
    run = validate(compose(overrides))
    base, _ = load_model(run.model, run.quant, run.task.labels, "cpu")
    model = attach_adapter(base, run.adapter, "seq_cls")
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and set(trainable.values()) == {torch.float32}
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    # and it trains under bf16 autocast, fp32 head on bf16 hidden states
    metrics = train_run(
        [*overrides, "train.max_steps=4", "train.eval_steps=4", "task.max_eval_samples=16"], tmp_path
    )
    assert metrics["train/steps"] == 4 and metrics["eval/loss"] > 0


def adapted_blocks(model, layers, target_modules="all-linear") -> dict[int, set[str]]:
    """Block index -> the module names adapted in it."""
    config = lora_config(model, AdapterConfig(target_modules=target_modules, layers=layers), "causal_lm")
    peft_model = get_peft_model(model, config)
    blocks: dict[int, set[str]] = {}
    for name, _ in peft_model.named_modules():
        if name.endswith(".lora_A"):
            parts = name.split(".")
            index = next(int(p) for p in parts if p.isdigit())
            blocks.setdefault(index, set()).add(parts[-2])
    return blocks


def deep_llama(n: int):
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=n, num_attention_heads=4
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize(
    "layers, expected",
    [
        ("all", range(8)),
        ("middle", range(2, 6)),
        ("top_half", range(4, 8)),
        ("bottom_half", range(4)),
        ([0, 7], [0, 7]),
    ],
)
def test_adapter_layers_select_blocks_with_every_linear_layer_of_them(layers, expected):
    every = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert adapted_blocks(deep_llama(8), layers) == dict.fromkeys(expected, every)
    assert adapted_blocks(deep_llama(8), layers, ["q_proj", "v_proj"]) == dict.fromkeys(
        expected, {"q_proj", "v_proj"}
    )


def test_adapter_layers_out_of_range_are_refused():
    from lora_lab.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"adapter.layers=\[8\] is invalid: block indices of this model are 0 to 7"
    ):
        lora_config(deep_llama(8), AdapterConfig(layers=[8]), "causal_lm")


def test_adapter_layers_select_blocks_of_a_preset_resolved_from_the_structure():
    """BERT's `mlp` layers (intermediate.dense, output.dense) share a suffix with attention's
    output.dense: a preset names whole paths, so it selects blocks and no attention layer."""
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64
        )
    )
    peft_model = get_peft_model(
        model, lora_config(model, AdapterConfig(target_modules="mlp", layers="middle"), "seq_cls")
    )
    adapted = sorted(
        n.removesuffix(".lora_A") for n, _ in peft_model.named_modules() if n.endswith(".lora_A")
    )
    assert [n.removeprefix("base_model.model.bert.encoder.layer.") for n in adapted] == [
        "1.intermediate.dense",
        "1.output.dense",
        "2.intermediate.dense",
        "2.output.dense",
    ]
