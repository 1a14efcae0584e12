"""Structured schema of the composed config: one dataclass per config group, the valid values of
its choices, and the resolver that fills a task's metrics from its kind. Checks are in validate.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

log = logging.getLogger("lora_lab")


MODEL_KINDS = ("causal_lm", "seq_cls")
TARGET_PRESETS = ("attn", "mlp", "all-linear", "qv")
LAYER_PRESETS = ("all", "middle", "top_half", "bottom_half")
INITS = ("gaussian", "kaiming", "loftq", "pissa", "olora")
QUANTS = ("none", "nf4", "fp4", "int8")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
TASK_SOURCES = ("builtin", "files", "hub")
# What a task's rows are tokenised as (lora_lab/data.py); auto: what the detected row shape needs.
TASK_FORMATS = ("auto", "sft", "lm", "cls", "chat")
# The row shapes lora_lab reads (lora_lab/tasks), in the order they are detected, and the format each
# becomes: OpenAI messages, ShareGPT conversations, Alpaca, TRL's prompt/completion, prompt/response,
# text with a label (classification), plain text.
ROW_SHAPE_FORMATS = {
    "messages": "chat",
    "conversations": "chat",
    "alpaca": "sft",
    "prompt_completion": "sft",
    "prompt_response": "sft",
    "text_label": "cls",
    "text": "lm",
}
METRIC_DIRECTIONS = ("maximize", "minimize")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
# Several processes (torchrun / accelerate): a full copy of the model per rank, or FSDP2 shards.
DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class TinyModelConfig:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 320  # the byte-level tokenizer's 260 tokens, padded to a multiple of 64
    max_position_embeddings: int = 256


@dataclass
class ModelConfig:
    name: str = "tiny"
    name_or_path: str | None = None  # None: the tiny model, built locally
    kind: str = "causal_lm"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False


@dataclass
class AdapterConfig:
    r: int = 8
    alpha: float = 16.0
    alpha_multiple: float | None = None  # when set, alpha = alpha_multiple * r (for sweeps over r)
    dropout: float = 0.05
    target_modules: Any = "all-linear"  # a preset name or a list of module names
    init: str = "gaussian"
    loftq_iter: int = 1
    loftq_svd: str = "randomized"  # randomized (rank-r, fast) | exact
    use_rslora: bool = False
    use_dora: bool = False
    # Which transformer blocks get adapters: all, middle (the middle half), top_half, bottom_half, or
    # a list of block indices (PEFT's layers_to_transform).
    layers: Any = "all"
    # An existing PEFT LoRA adapter (dir or hub id) to continue training or, with
    # train.max_steps=0, only to evaluate; r, alpha and targets then come from it.
    init_from: str | None = None


@dataclass
class QuantConfig:
    name: str = "none"
    double_quant: bool = True
    compute_dtype: str = "auto"
    # Write quant_error.json (reads each adapted full-precision weight once from the checkpoint).
    error_report: bool = True


@dataclass
class TaskConfig:
    name: str = "sort"
    kind: str = "causal_lm"
    source: str = "builtin"
    # auto, or one of TASK_FORMATS: a fixed format limits detection to the row shapes that make it
    format: str = "sft"
    shape: str | None = None  # null: detected from the first row; or one of ROW_SHAPE_FORMATS
    template: str | None = None  # a prompt template for hub presets (gsm8k)
    answer_pattern: str | None = None  # regex whose group 1 is the answer compared by exact_match
    dataset: str | None = None  # hub dataset id
    dataset_config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    # source=files: a file (.jsonl .json .csv .tsv .parquet .arrow), a glob, or a save_to_disk dir
    train_path: str | None = None
    eval_path: str | None = None  # null: eval_fraction of the training rows, split with a fixed seed
    eval_fraction: float = 0.1
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    prompt_field: str = "prompt"
    response_field: str = "response"
    labels: list[str] = field(default_factory=list)  # source=files: empty infers them, sorted
    metrics: list[str] = field(default_factory=list)
    metric: str = "loss"
    metric_direction: str = "minimize"
    max_length: int = 512
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    generate_max_new_tokens: int = 32
    # Conversations: which assistant turns carry the loss (all_assistant | last_turn), and the chat
    # template for a tokenizer without one (chatml, llama3, or a Jinja string), and options that
    # reach apply_chat_template (e.g. Qwen3's enable_thinking: false); whether an assistant's
    # reasoning (reasoning_content, <think>...</think>), where the template renders it, carries loss.
    train_on: str = "all_assistant"
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    train_on_reasoning: bool = True


@dataclass
class HarnessConfig:
    """EleutherAI lm-evaluation-harness on the trained model (empty `tasks`: off)."""

    tasks: list[str] = field(default_factory=list)
    num_fewshot: int | None = None
    limit: int | None = None  # examples per task (for sweeps); null: all
    batch_size: int = 8
    include_path: str | None = None  # a folder of the user's own task YAMLs (lm-eval's --include_path)
    baseline: bool = False  # also score the untrained adapter, as baseline_harness/...


@dataclass
class TrainConfig:
    lr: float = 2e-4
    max_steps: int = -1
    epochs: float = 1.0
    batch_size: int = 4
    eval_batch_size: int = 16
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    # LoRA+ (Hayou et al. 2024): B's learning rate as this multiple of A's (train.lr); null = off
    loraplus_lr_ratio: float | None = None
    lr_scheduler: str = "cosine"
    eval_steps: int = 100
    logging_steps: int = 10
    seed: int = 42
    save_steps: int | None = (
        None  # checkpoint (adapter, optimizer, scheduler, RNG, data position) every N steps
    )
    resume: Any = (
        False  # true: continue from the latest complete checkpoint in the run dir; or a checkpoint path
    )
    eval_on_start: bool = True  # the untrained model's metrics, as the baseline in metrics.json
    device: str = "auto"
    # auto: on CUDA, measured: on when one step of the longest batch without it would run out of
    # memory or come near the limit; off on CPU. Or true / false.
    gradient_checkpointing: Any = "auto"
    # padding-free batches for SFT tasks (LM blocks have no padding; classification pads)
    packing: bool = True
    # Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy): auto = on
    # CUDA when liger-kernel is installed (`pip install lora_lab[gpu]`).
    liger: Any = "auto"
    # PyTorch's chunked linear cross-entropy (the logits are never held whole) for causal LMs with a
    # plain output head: auto = on unless liger is on (liger fuses the loss itself).
    fused_loss: Any = "auto"
    compile: bool = False  # torch.compile the model
    # Under torchrun / accelerate: ddp (every rank holds the whole model) or fsdp (FSDP2: each
    # transformer block and the root sharded across the ranks, the adapter and its optimizer state too).
    distributed: str = "ddp"


@dataclass
class LoggerConfig:
    name: str = "none"
    project: str = "lora_lab"
    entity: str | None = None
    group: str | None = None  # default: the study name in a sweep, task_name otherwise
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # auto (online when logged in, else offline) | online | offline
    init_timeout: float = 30.0


@dataclass
class TrialRef:
    """Set by the lora_lab_optuna sweeper in each job: the Optuna trial this run is."""

    study_name: str | None = None
    storage: str | None = None
    trial_id: int | None = None
    number: int | None = None


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    # One metric name, or a list of them for a multi-objective study.
    optimized_metric: Any = "eval/loss"
    optuna_trial: TrialRef = field(default_factory=TrialRef)
    task_name: str = "train"
    tags: list[str] = field(default_factory=list)


# The root config lists this schema first in its defaults: every group's yaml merges onto it, so
# keys a preset leaves out take these defaults and a wrongly typed override fails at composition.
ConfigStore.instance().store(name="lora_lab_schema", node=RunConfig)

# The metrics of a task that leaves them to its kind (task=files):
# `metrics: ${lora_lab.kind_default:metrics,${task.kind}}`. An unknown kind is refused by validate.
KIND_METRIC_DEFAULTS = {
    "causal_lm": {
        "metrics": ["token_accuracy", "perplexity"],
        "metric": "loss",
        "metric_direction": "minimize",
    },
    "seq_cls": {"metrics": ["accuracy", "f1_macro"], "metric": "accuracy", "metric_direction": "maximize"},
}


def _kind_default(key: str, kind: str) -> Any:
    return KIND_METRIC_DEFAULTS.get(kind, KIND_METRIC_DEFAULTS["causal_lm"])[key]


OmegaConf.register_resolver("lora_lab.kind_default", _kind_default, replace=True)
