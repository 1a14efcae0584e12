"""LoRA adapter: target-module presets from the model's own structure, the PEFT config, and attaching it."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import PreTrainedModel

from lora_lab.config import TARGET_PRESETS, AdapterConfig
from lora_lab.errors import ConfigError
from lora_lab.structure import BlockParts, block_parts, blocks, is_adaptable

log = logging.getLogger(__name__)

# Query and value projections by the names transformers' architectures give them, or the fused
# layer that computes them together with the keys (GPT-2's c_attn, GPT-NeoX's and Falcon's
# query_key_value, Phi-3's qkv_proj, ModernBERT's Wqkv): a name is all that tells q from k.
_QUERY_VALUE = re.compile(
    r"q|v|q_proj|v_proj|wq|wv|query|value|query_proj|value_proj|qkv|qkv_proj|wqkv|c_attn|query_key_value",
    re.IGNORECASE,
)
# Heads that a classification fine-tune trains in full (PEFT adds `classifier` and `score`
# itself); DeBERTa's pooler is new at fine-tuning time too.
EXTRA_TRAINED_MODULES = {"deberta-v2": ["pooler"]}
# loftq: PEFT leaves the weights alone and lora_lab.loftq sets both A and B.
PEFT_INIT = {"gaussian": "gaussian", "kaiming": True, "pissa": "pissa", "olora": "olora", "loftq": False}


def _layer_names(parts: BlockParts, preset: str) -> list[str]:
    if preset == "qv":
        return [n for n in parts.attention if _QUERY_VALUE.fullmatch(n.rsplit(".", 1)[-1])]
    return {"attn": parts.attention, "mlp": parts.mlp, "all-linear": parts.attention + parts.mlp}[preset]


@dataclass
class Targets:
    """What PEFT adapts: target_modules (names, PEFT's `all-linear`) and fused expert parameters."""

    modules: list[str] | str | None
    parameters: list[str]
    layers_to_transform: list[int] | None = None


def resolve_targets(
    model: PreTrainedModel, target_modules: list[str] | str, layers: list[int] | str
) -> Targets:
    """A preset becomes the paths of this model's layers in that role, found from its blocks
    (`block_parts`), restricted to `layers`; an explicit list of names is checked and PEFT selects its
    layers. `mlp` and `all-linear` include fused expert parameters; MoE routers stay frozen."""
    stack_name, stack = blocks(model)
    indices = resolve_layers(len(stack), layers)
    if not isinstance(target_modules, str):
        return Targets(check_module_names(model, target_modules), [], indices)
    modules, parameters = [], []
    for index, block in enumerate(stack):
        if indices is not None and index not in indices:
            continue
        parts = block_parts(block)
        prefix = f"{stack_name}.{index}."
        modules += [prefix + name for name in _layer_names(parts, target_modules)]
        if target_modules in ("mlp", "all-linear"):
            parameters += [prefix + name for name in parts.experts]
    if target_modules == "all-linear" and indices is None and not parameters:
        return Targets("all-linear", [])  # PEFT's own: every linear layer but the output head
    if not modules and not parameters:
        first = block_parts(stack[0])
        raise ConfigError(
            "adapter.target_modules",
            target_modules,
            f"this {model.config.model_type} model's blocks ({stack_name}.N) have no {target_modules} layers: "
            f"attention {first.attention or 'none'}, MLP {first.mlp or 'none'}, "
            f"experts {first.experts or 'none'}; presets are {', '.join(TARGET_PRESETS)}",
        )
    return Targets(modules or None, parameters)


def check_module_names(model: PreTrainedModel, target_modules: list[str]) -> list[str]:
    """An explicit list of module names, each matching a linear layer (by name or path suffix)."""
    adaptable = [name for name, module in model.named_modules() if is_adaptable(module)]
    suffixes = {name.rsplit(".", 1)[-1] for name in adaptable}
    missing = [
        t
        for t in target_modules
        if t not in suffixes and not any(n == t or n.endswith("." + t) for n in adaptable)
    ]
    if missing:
        raise ConfigError(
            "adapter.target_modules",
            target_modules,
            f"{', '.join(missing)} matches no linear layer of this {model.config.model_type} model; "
            f"presets are {', '.join(TARGET_PRESETS)}, layer names are {', '.join(sorted(suffixes))}",
        )
    return list(target_modules)


def task_type(kind: str) -> TaskType:
    return TaskType.SEQ_CLS if kind == "seq_cls" else TaskType.CAUSAL_LM


def resolve_layers(n: int, layers: list[int] | str) -> list[int] | None:
    """adapter.layers as the indices of the `n` blocks to adapt (None: every block). middle is the
    middle half of the blocks, top_half the upper (output-side) half."""
    if layers == "all":
        return None
    halves = {
        "bottom_half": list(range(n // 2)),
        "top_half": list(range(n // 2, n)),
        "middle": list(range(n // 4, n - n // 4)),
    }
    indices = halves[layers] if isinstance(layers, str) else layers
    if not indices or max(indices) >= n:
        raise ConfigError("adapter.layers", layers, f"block indices of this model are 0 to {n - 1}")
    return sorted(indices)


def lora_config(model: PreTrainedModel, adapter: AdapterConfig, kind: str) -> LoraConfig:
    targets = resolve_targets(model, adapter.target_modules, adapter.layers)
    dropout = adapter.dropout
    if targets.parameters and dropout:
        # PEFT cannot apply dropout to the input of a LoRA on a parameter (lora.ParamWrapper)
        log.info(
            "adapter.dropout=%s not applied: the adapter includes fused expert parameters (%s), "
            "whose LoRA takes no dropout in PEFT; the run uses 0",
            dropout,
            targets.parameters[0].rsplit(".", 2)[-2] + ".*",
        )
        dropout = 0.0
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=dropout,
        target_modules=targets.modules,
        target_parameters=targets.parameters or None,
        layers_to_transform=targets.layers_to_transform,
        init_lora_weights=PEFT_INIT[adapter.init],
        use_rslora=adapter.use_rslora,
        use_dora=adapter.use_dora,
        task_type=task_type(kind),
        modules_to_save=EXTRA_TRAINED_MODULES.get(model.config.model_type),
    )


def attach_adapter(model: PreTrainedModel, adapter: AdapterConfig, kind: str) -> PeftModel:
    """Wrap the frozen base model with a trainable LoRA adapter."""
    config = lora_config(model, adapter, kind)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # PEFT's "Target modules ... not found in the base model"
        if "not found in the base model" not in str(e):
            raise
        raise ConfigError(
            "adapter.target_modules",
            adapter.target_modules,
            f"matches no layer of this {model.config.model_type} model",
        ) from None
    keep_trainable_in_fp32(peft_model)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info(
        "trainable parameters: %d of all %d (%.4f%% of all parameters, the adapter's included)",
        trainable,
        total,
        100 * trainable / total,
    )
    return peft_model


def keep_trainable_in_fp32(model: PeftModel) -> None:
    """Every trainable parameter in fp32. PEFT upcasts the LoRA weights, but a classifier's new head
    (modules_to_save) is a copy in the base's bf16 or fp16: in bf16 small updates round away, and in
    fp16 the grad scaler refuses its gradients. Autocast runs the head in the compute dtype."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def load_adapter(model: PreTrainedModel, source: str, kind: str, trainable: bool) -> PeftModel:
    """An existing PEFT LoRA adapter (made by lora_lab or anyone) on this base model, checked first."""
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(source)
    except Exception as e:  # a missing dir, a hub id offline, not a PEFT adapter
        raise ConfigError(
            "adapter.init_from", source, f"not a loadable PEFT adapter ({str(e).splitlines()[0]})"
        ) from None
    if config.peft_type != "LORA":
        raise ConfigError(
            "adapter.init_from", source, f"a {config.peft_type} adapter; lora_lab trains LoRA adapters"
        )
    # PEFT would load it and drop (or leave untrained) the classification head it was made with
    if config.task_type is not None and config.task_type != task_type(kind):
        raise ConfigError(
            "adapter.init_from",
            source,
            f"an adapter for task_type {config.task_type}; this run's model.kind={kind} needs {task_type(kind).value}",
        )
    targets = config.target_modules
    if targets and not isinstance(targets, str):  # a regex or all-linear needs no check by name
        try:
            check_module_names(model, sorted(targets))
        except ConfigError as e:
            raise ConfigError(
                "adapter.init_from", source, f"its target modules do not fit this base model: {e.valid}"
            ) from None
    try:
        peft_model = PeftModel.from_pretrained(model, source, is_trainable=trainable)
    except RuntimeError as e:  # size mismatch: made for another base model
        raise ConfigError(
            "adapter.init_from",
            source,
            f"made for another base model ({config.base_model_name_or_path}): {str(e).splitlines()[-1].strip()}",
        ) from None
    keep_trainable_in_fp32(peft_model)
    log.info(
        "adapter from %s (r=%s, alpha=%s, base %s)",
        source,
        config.r,
        config.lora_alpha,
        config.base_model_name_or_path,
    )
    return peft_model
