"""Base model and tokenizer loading, the bitsandbytes quantization config, and the local tiny model."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as transformers_logging

from lora_lab.config import ModelConfig, QuantConfig, TinyModelConfig
from lora_lab.errors import ConfigError
from lora_lab.structure import block_parts, blocks, is_adaptable, is_quantized

log = logging.getLogger(__name__)

# Bump when the tiny model's recipe changes, so that stale cached copies are not reused.
# 2: the tokenizer has a chat template.
TINY_RECIPE_VERSION = 2
# Classification heads (new at fine-tuning time) and LM heads stay unquantized.
HEAD_MODULES = ["lm_head", "score", "classifier", "pooler"]
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# The tiny tokenizer's chat template, ChatML-like with its own special tokens and no new ones: a turn
# is <s>role\ncontent</s>, so that generation, which stops at EOS, stops at the end of a turn.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ bos_token + message['role'] + '\n' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("LORA_LAB_CACHE", Path.home() / ".cache" / "lora_lab"))


def resolve_device(device: str) -> str:
    """cpu or cuda. On cuda the process's own GPU (LOCAL_RANK under torchrun / accelerate) becomes
    the current device before anything runs, so that memory statistics and the checkpointing probe
    read the GPU that holds this process's model."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", device, "no CUDA device is visible; use train.device=cpu or auto")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return device


def resolve_compute_dtype(compute_dtype: str, device: str) -> torch.dtype:
    """`auto` is bf16 on a GPU that supports it and fp32 on CPU (CPU bf16 matmuls are slow)."""
    if compute_dtype == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, compute_dtype)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges and a chat template: any text encodes, nothing is
    downloaded."""
    specials = list(SPECIAL_TOKENS.values())
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=TINY_CHAT_TEMPLATE, **SPECIAL_TOKENS
    )


def build_tiny_model(tiny: TinyModelConfig) -> Path:
    """Build (once) and cache a small random Llama and its tokenizer; return the directory.

    The directory is written to a temporary name and renamed into place, so parallel trials
    that race to build it never see a half-written model.
    """
    recipe = {"version": TINY_RECIPE_VERSION, **asdict(tiny)}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"tiny-llama-{key}"
    if (target / "config.json").exists():
        return target
    log.info("building the tiny model into %s", target)
    tokenizer = byte_level_tokenizer()
    if tiny.vocab_size < len(tokenizer):
        raise ConfigError(
            "model.tiny.vocab_size",
            tiny.vocab_size,
            f"must be at least {len(tokenizer)}, the tokenizer's size",
        )
    config = LlamaConfig(
        vocab_size=tiny.vocab_size,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        # Wider than the usual 0.02: frozen random output weights that small cap the logits
        # (and so the loss) an adapter can reach, and the demo would learn nothing visible.
        initializer_range=0.2,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process renamed its copy first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def quantization_config(
    quant: QuantConfig, compute_dtype: torch.dtype, sharded: bool = False
) -> BitsAndBytesConfig | None:
    """bitsandbytes' settings. A `sharded` (FSDP) base stores its packed 4-bit weights as the compute
    dtype, as FSDP splits only floating-point tensors, and all of them in one dtype."""
    if quant.name == "none":
        return None
    if quant.name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=HEAD_MODULES)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.name,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype if sharded else torch.uint8,
        llm_int8_skip_modules=HEAD_MODULES,
    )


def model_dir(model_cfg: ModelConfig) -> Path:
    """The local directory of the base model: the tiny model's cache, a local path, or the Hub cache."""
    if model_cfg.name_or_path is None:
        return build_tiny_model(model_cfg.tiny)
    if Path(model_cfg.name_or_path).is_dir():
        return Path(model_cfg.name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                model_cfg.name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]
            )
        )
    except Exception as e:  # offline and not cached, unknown id, gated repo: many error types
        raise ConfigError(
            "model.name_or_path",
            model_cfg.name_or_path,
            f"not a local model directory, and the Hub could not provide it ({str(e).splitlines()[0]})",
        ) from None


def is_conv1d(layer: torch.nn.Module) -> bool:
    """GPT-2's Conv1D, which stores its weight (in, out), or a quantized layer that replaced one
    (transformers records the replaced class as `source_cls`)."""
    return issubclass(getattr(layer, "source_cls", type(layer)), Conv1D)


class CheckpointReader:
    """Reads one full-precision weight at a time from a safetensors checkpoint (for LoftQ and the
    quantization-error report), so the extra memory is one layer, not a second copy of the model."""

    def __init__(self, directory: Path, base_model_prefix: str):
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {key: directory / file for key, file in weight_map.items()}
        else:
            single = directory / "model.safetensors"
            with safe_open(single, "pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        self.prefix = base_model_prefix

    def weight(self, module_name: str, layer: torch.nn.Module) -> torch.Tensor:
        """The weight of a module, named as in the loaded model, as (out, in) like the loaded `layer`
        computes with it: GPT-2's Conv1D checkpoints store (in, out), and a square one would pass
        unnoticed.
        Checkpoints of a bare base model (a BERT encoder for a classifier) lack the `bert.` prefix,
        others may add one."""
        key = f"{module_name}.weight"
        for candidate in (key, key.removeprefix(f"{self.prefix}."), f"{self.prefix}.{key}"):
            if candidate in self.files:
                with safe_open(self.files[candidate], "pt") as f:
                    weight = f.get_tensor(candidate)
                return weight.T.contiguous() if is_conv1d(layer) else weight
        raise KeyError(f"{key} is not in the checkpoint")


def progress_bars_on_terminals_only() -> None:
    """transformers draws its "Loading weights" and "Writing model shards" bars into whatever stderr
    is: in a log file, a Slurm job or a sweep's trial each redraw is one more line."""
    if not sys.stderr.isatty():
        transformers_logging.disable_progress_bar()


def load_device(device: str, to_shard: bool) -> str | int:
    """Where the base loads. Under torchrun / accelerate each process loads its copy onto its own
    (current) GPU. A base to be sharded, 4-bit or not, loads into rank 0's CPU memory only (a 4-bit
    one quantized there), and the other ranks build it on `meta`: FSDP sends each rank its shards
    (lora_lab.sharding.shard), so a base that fits no GPU, nor N copies of it the host's memory,
    still loads."""
    if to_shard:
        return "cpu" if int(os.environ.get("RANK", "0")) == 0 else "meta"
    return torch.cuda.current_device() if device == "cuda" else device


def load_model(
    model_cfg: ModelConfig, quant: QuantConfig, labels: list[str], device: str, sharded: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load tokenizer and base model (quantized if asked) onto `device`, frozen, ready for an adapter;
    `sharded`: to be sharded with FSDP (lora_lab.sharding)."""
    progress_bars_on_terminals_only()  # for this process's later saves too
    path = str(model_dir(model_cfg))
    compute_dtype = resolve_compute_dtype(quant.compute_dtype, device)
    kwargs = {
        "dtype": compute_dtype,
        "quantization_config": quantization_config(quant, compute_dtype, sharded),
        "device_map": {"": load_device(device, sharded)},
        "trust_remote_code": model_cfg.trust_remote_code,
        "attn_implementation": model_cfg.attn_implementation,
    }
    if kwargs["device_map"][""] == "meta":
        # This rank's weights arrive from rank 0 as it is sharded (sharding.receive_from_rank0): what
        # loads into its meta model before then (an init_from adapter) is a no-op on purpose.
        warnings.filterwarnings("ignore", message="for .*: copying from a non-meta parameter")
    if model_cfg.kind == "seq_cls":
        auto_cls = AutoModelForSequenceClassification
        kwargs |= {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {n: i for i, n in enumerate(labels)},
        }
    else:
        auto_cls = AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        model = from_pretrained_with_attention(auto_cls, path, model_cfg.kind, kwargs)
    except OSError as e:  # model_dir already resolved a local directory: its files are the problem
        raise ConfigError(
            "model.name_or_path", path, f"not a loadable model directory ({str(e).splitlines()[0]})"
        ) from None
    if quant.name != "none":
        check_quantized(model, quant.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # Training needs no KV cache, and an (empty) cache would also stop transformers from reading
    # packed-sequence boundaries out of the position ids. Generation asks for it explicitly.
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    keep_4bit_layout_trainable(model)
    return model, tokenizer


def from_pretrained_with_attention(auto_cls, path: str, kind: str, kwargs: dict) -> PreTrainedModel:
    """The model with model.attn_implementation, or with eager attention where transformers does not
    support that implementation for this architecture (Gemma 2 and sdpa), said in one line. The
    implementation the model runs is model.config._attn_implementation."""
    try:
        return from_pretrained_reporting_in_one_line(auto_cls, path, kind, kwargs)
    except ValueError as e:
        asked = kwargs["attn_implementation"]
        # transformers' refusal for this architecture, not for an unknown name or a missing package
        if asked == "eager" or "does not support an attention implementation" not in str(e):
            raise
        log.warning(
            "model.attn_implementation=%s is not available for this model (%s): using eager",
            asked,
            str(e).split(". ")[0],
        )
        return from_pretrained_reporting_in_one_line(
            auto_cls, path, kind, kwargs | {"attn_implementation": "eager"}
        )


def check_quantized(model: PreTrainedModel, quant_name: str) -> None:
    """Refuse a quantization that reached no layer of the blocks, and say what it left in full
    precision: transformers' bitsandbytes integration converts torch.nn.Linear itself (and GPT-2's
    Conv1D) only, so Falcon's FalconLinear subclass stays as it is, and fused MoE expert parameters
    are not linear layers."""
    _, stack = blocks(model)
    quantized = left = 0
    kept = set()
    for block in stack:
        experts = {e.rsplit(".", 1)[0] for e in block_parts(block).experts}  # their modules' paths
        for name, module in block.named_modules():
            if is_quantized(module):
                quantized += module.in_features * module.out_features  # whatever it is packed into
            elif is_adaptable(module) or name in experts:
                left += sum(p.numel() for p in module.parameters(recurse=False) if p.ndim >= 2)
                kept.add(f"{name} ({type(module).__name__})")
    if not quantized:
        raise ConfigError(
            "quant",
            quant_name,
            f"transformers' bitsandbytes integration quantized no layer of this {model.config.model_type} "
            f"model's blocks ({', '.join(sorted(kept)[:3])}: not torch.nn.Linear itself); use quant=none",
        )
    if left:
        log.warning(
            "quant=%s left %.0f%% of the blocks' weights in full precision: %s",
            quant_name,
            100 * left / (left + quantized),
            ", ".join(sorted(kept)[:4]),
        )


def _no_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


def from_pretrained_reporting_in_one_line(auto_cls, path: str, kind: str, kwargs: dict) -> PreTrainedModel:
    """`from_pretrained` with one plain log line about weights not loaded, instead of transformers'
    LOAD REPORT table: its colour codes land raw in train.log, and it calls a classifier's head
    MISSING, which is expected: the head is new and trains in full with the adapter."""
    modeling_log = logging.getLogger("transformers.modeling_utils")
    # A filter, not a higher level: transformers 5 checks its tensor-parallel plan, and warns about it
    # on every model, when this logger's level is WARNING or above.
    modeling_log.addFilter(_no_load_report)
    try:
        model, loading = auto_cls.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        modeling_log.removeFilter(_no_load_report)
    missing, unused = sorted(loading["missing_keys"]), sorted(loading["unexpected_keys"])
    if missing and kind == "seq_cls":
        log.info("new weights, trained in full with the adapter: %s", ", ".join(missing))
    elif missing:
        log.warning("weights not in the checkpoint, initialised at random: %s", ", ".join(missing))
    if unused:
        log.info("checkpoint weights this model does not use: %s", ", ".join(unused))
    return model


def keep_4bit_layout_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, the first eval-mode forward of a Linear4bit rewrites its weight in
    place into a packed layout and never converts it back. Training afterwards goes through a
    kernel without autograd: the adapter silently stops learning (or, for layers with a bias,
    fails with "a view of a leaf Variable ... in-place operation"), and dequantizing (LoftQ,
    merging) reads garbage. Unpacked 4-bit inference is slower on CPU but stays correct.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
