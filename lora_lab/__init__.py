"""lora_lab: a Hydra-composed lab for LoRA / QLoRA / LoftQ fine-tuning, sweeps and run comparison."""

import logging
import warnings

# On CPUs with AVX512-BF16, importing bitsandbytes warns that its packed 4-bit inference kernel is
# missing. lora_lab never uses that path (models.keep_4bit_layout_trainable turns it off), so the
# warning would only be noise in front of every command's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` on every adapter it builds
# (peft_model.py): a FutureWarning on each run that no lora_lab user can act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__version__ = "0.1.0"
