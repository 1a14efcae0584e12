"""Every architecture, as a matrix: tiny random models built from the real transformers configs of
17 decoder and 4 encoder families (no download), each with the target-module presets resolved from
its own structure, trained on a plain, 4-bit and LoftQ base with the loss falling, and exported to a
model that transformers loads back and that computes what the adapter model computes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import train_run
from peft import get_peft_model
from test_lifecycle import with_config
from tokenizers import processors
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from lora_lab.adapters import lora_config
from lora_lab.config import AdapterConfig
from lora_lab.errors import ConfigError
from lora_lab.models import byte_level_tokenizer

SIZES = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
DECODERS = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, **MOE},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16},
    "phi3": {},
    "olmo2": {},
    "granite": {},
    "smollm3": {},
    "gpt_neox": {},
    "falcon": {"num_kv_heads": 2, "new_decoder_architecture": True},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "stablelm": {},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512},
}
ENCODERS = {"bert": {}, "roberta": {}, "deberta-v2": {}, "modernbert": {}}

LLAMA_ATTN = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
LLAMA_MLP = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
LLAMA_QV = {"self_attn.q_proj", "self_attn.v_proj"}
EXPERTS = {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
BERT = (
    {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"},
    {"intermediate.dense", "output.dense"},
    {"attention.self.query", "attention.self.value"},
)
# Written by hand from each architecture's modeling file: (attn, mlp, qv) layer paths inside a block.
EXPECTED = {
    **dict.fromkeys(
        [
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma2",
            "gemma3_text",
            "olmo2",
            "granite",
            "smollm3",
            "stablelm",
        ],
        (LLAMA_ATTN, LLAMA_MLP, LLAMA_QV),
    ),
    "qwen3_moe": (LLAMA_ATTN, EXPERTS, LLAMA_QV),
    "mixtral": (LLAMA_ATTN, EXPERTS, LLAMA_QV),
    "phi3": (
        {"self_attn.qkv_proj", "self_attn.o_proj"},
        {"mlp.gate_up_proj", "mlp.down_proj"},
        {"self_attn.qkv_proj"},
    ),
    "gpt_neox": (
        {"attention.query_key_value", "attention.dense"},
        {"mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
        {"attention.query_key_value"},
    ),
    "falcon": (
        {"self_attention.query_key_value", "self_attention.dense"},
        {"mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
        {"self_attention.query_key_value"},
    ),
    "opt": (
        {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"},
        {"fc1", "fc2"},
        LLAMA_QV,
    ),
    "gpt2": ({"attn.c_attn", "attn.c_proj"}, {"mlp.c_fc", "mlp.c_proj"}, {"attn.c_attn"}),
    "bert": BERT,
    "roberta": BERT,
    "deberta-v2": (
        {
            "attention.self.query_proj",
            "attention.self.key_proj",
            "attention.self.value_proj",
            "attention.output.dense",
        },
        {"intermediate.dense", "output.dense"},
        {"attention.self.query_proj", "attention.self.value_proj"},
    ),
    "modernbert": ({"attn.Wqkv", "attn.Wo"}, {"mlp.Wi", "mlp.Wo"}, {"attn.Wqkv"}),
}
# transformers' bitsandbytes integration converts torch.nn.Linear itself only, not FalconLinear.
NOT_QUANTIZED = {"falcon"}


def build(model_type: str):
    tokenizer = byte_level_tokenizer()
    if model_type in ENCODERS:  # a first token to pool, as BERT-style tokenizers add ([CLS])
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
        )
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
    config = AutoConfig.for_model(
        model_type,
        **SIZES,
        **ids,
        eos_token_id=tokenizer.eos_token_id,
        **{**DECODERS, **ENCODERS}[model_type],
    )
    auto = AutoModelForSequenceClassification if model_type in ENCODERS else AutoModelForCausalLM
    torch.manual_seed(0)
    return auto.from_config(config), tokenizer


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """model type -> a saved tiny model with the byte-level tokenizer, built on first use."""
    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            model, tokenizer = build(model_type)
            built[model_type] = tmp_path_factory.mktemp(model_type)
            model.save_pretrained(built[model_type])
            tokenizer.save_pretrained(built[model_type])
        return built[model_type]

    return get


def adapted(model_type: str, preset: str) -> tuple[set[str], set[str]]:
    """The layer paths inside a block that the preset adapts, and its expert parameters."""
    model, _ = build(model_type)
    kind = "seq_cls" if model_type in ENCODERS else "causal_lm"
    config = lora_config(model, AdapterConfig(target_modules=preset, dropout=0.0), kind)
    peft_model = get_peft_model(model, config)
    layers = set()
    for name, _ in peft_model.named_modules():
        if name.endswith(".lora_A") and ".0." in name:
            path = name.removesuffix(".lora_A").split(".0.", 1)[1]
            if not path.startswith("mlp.experts"):
                layers.add(path)
    parameters = {p.split(".0.", 1)[1] for p in config.target_parameters or [] if ".0." in p}
    return layers, parameters


@pytest.mark.parametrize("model_type", list(EXPECTED))
def test_presets_resolve_from_each_architectures_own_blocks(model_type):
    attn, mlp, qv = EXPECTED[model_type]
    experts = mlp & EXPERTS
    assert adapted(model_type, "attn") == (attn, set())
    assert adapted(model_type, "qv") == (qv, set())
    assert adapted(model_type, "mlp") == (mlp - experts, experts)
    layers, parameters = adapted(model_type, "all-linear")
    assert parameters == experts
    if experts:  # resolved by lora_lab: attention and experts, never the router
        assert layers == attn
    else:  # PEFT's own all-linear: every linear layer of the blocks
        assert attn | mlp <= layers


@pytest.mark.parametrize("quant", ["none", "nf4", "loftq"])
@pytest.mark.parametrize("model_type", [*DECODERS, *ENCODERS])
def test_each_family_trains_its_loss_falling_and_exports_on_each_base(
    model_type, quant, model_dirs, tmp_path
):
    from lora_lab.export import export

    overrides = [
        f"model.name_or_path={model_dirs(model_type)}",
        f"quant={'none' if quant == 'none' else 'nf4'}",
        "train.max_steps=10",
        "train.eval_steps=10",
        "task.max_eval_samples=16",
    ]
    if quant == "loftq":
        overrides.append("adapter.init=loftq")
    if model_type in ENCODERS:
        overrides += [
            "model.kind=seq_cls",
            "task=sentiment",
            "task.metrics=[accuracy]",
            "train.lr=0.001",
            "task.max_eval_samples=64",
        ]
    else:
        overrides += ["task.metrics=[token_accuracy]", "train.lr=0.01"]
    if quant != "none" and model_type in NOT_QUANTIZED:
        with pytest.raises(
            ConfigError,
            match=r"^quant='nf4' is invalid: transformers' bitsandbytes integration quantized no layer",
        ):
            train_run(overrides, tmp_path / "run")
        return
    metrics = train_run(overrides, tmp_path / "run")
    assert metrics["eval/loss"] < metrics["baseline/loss"]
    difference = export(with_config(tmp_path / "run", overrides), tmp_path / "merged", "cpu", None)
    assert difference < 1e-2
    auto = AutoModelForSequenceClassification if model_type in ENCODERS else AutoModelForCausalLM
    assert auto.from_pretrained(tmp_path / "merged").config.model_type == model_type


def test_a_lora_on_the_experts_changes_the_output_and_trains_with_the_router_frozen(model_dirs, tmp_path):
    model, _ = build("qwen3_moe")
    config = lora_config(model, AdapterConfig(target_modules="mlp"), "causal_lm")
    assert config.lora_dropout == 0.0 and config.target_modules is None  # only the experts
    peft_model = get_peft_model(model, config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".mlp.experts." in n for n in trainable)
    assert not any(".gate." in n for n in trainable)  # the router
    ids = torch.randint(0, 300, (2, 12))
    before = peft_model(input_ids=ids).logits
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    assert not torch.allclose(before, peft_model(input_ids=ids).logits, atol=1e-4)

    overrides = [
        f"model.name_or_path={model_dirs('qwen3_moe')}",
        "adapter.target_modules=mlp",
        "train.max_steps=10",
        "train.lr=0.01",
        "task.max_eval_samples=16",
        "task.metrics=[token_accuracy]",
    ]
    metrics = train_run(overrides, tmp_path / "run")
    assert metrics["eval/loss"] < metrics["baseline/loss"]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    experts_b = [v for k, v in saved.items() if "experts" in k and "lora_B" in k]
    assert experts_b and all(v.abs().sum() > 0 for v in experts_b)  # B starts at 0: these trained


def test_an_attention_implementation_the_model_lacks_falls_back_to_eager_in_one_line(model_dirs, caplog):
    from lora_lab.config import ModelConfig, QuantConfig
    from lora_lab.models import load_model

    with caplog.at_level(logging.WARNING, logger="lora_lab"):
        model, _ = load_model(
            ModelConfig(name_or_path=str(model_dirs("gemma2")), attn_implementation="sdpa"),
            QuantConfig(),
            [],
            "cpu",
        )
    assert model.config._attn_implementation == "eager"
    assert [r.getMessage() for r in caplog.records if "attn_implementation" in r.getMessage()] == [
        "model.attn_implementation=sdpa is not available for this model (Gemma2ForCausalLM does not support "
        "an attention implementation through torch.nn.functional.scaled_dot_product_attention yet): using eager"
    ]


@pytest.mark.parametrize("sharded", [False, True], ids=["packed-uint8", "packed-as-compute-dtype"])
def test_nf4_says_what_share_of_the_blocks_weights_it_leaves_in_full_precision(model_dirs, caplog, sharded):
    """bitsandbytes quantizes linear layers: an MoE's fused experts stay as they are, and the log says
    how much of the blocks that is, counted here from the unquantized model; the same share when the
    4-bit weights are packed into the compute dtype to be sharded."""
    from lora_lab.config import ModelConfig, QuantConfig
    from lora_lab.models import load_model

    model, _ = build("qwen3_moe")
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    linear = sum(
        m.weight.numel() for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)
    )
    with caplog.at_level(logging.WARNING, logger="lora_lab"):
        load_model(
            ModelConfig(name_or_path=str(model_dirs("qwen3_moe"))),
            QuantConfig(name="nf4"),
            [],
            "cpu",
            sharded,
        )
    share = round(100 * experts / (experts + linear))
    assert [r.getMessage() for r in caplog.records if "full precision" in r.getMessage()] == [
        f"quant=nf4 left {share}% of the blocks' weights in full precision: mlp.experts (Qwen3MoeExperts)"
    ]
