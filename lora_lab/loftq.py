"""LoftQ initialisation (Li et al. 2023) of LoRA adapters on a bitsandbytes 4-bit model, and the
per-layer quantization-error report.

For each adapted weight W, alternate Q = quantize(W - L R) and L R = rank-r approximation of W - Q.
Unlike PEFT's `loftq_init`, this
- quantizes with bitsandbytes' own 4-bit quantizer and the layer's block size, and installs that
  exact Q in the layer, so the adapter is fitted against the backbone that trains;
- splits L R into the adapter with the layer's LoRA scaling s (alpha / r, or alpha / sqrt(r) with
  rsLoRA), so that s * B @ A == L R for every alpha (PEFT assumes alpha == r);
- streams one full-precision weight at a time from the checkpoint, on whatever device the model is;
- uses a randomized rank-r SVD by default (torch.svd_lowrank's algorithm with a sketch that is the
  same on every device), an exact SVD by config;
- caches Q, L and R on disk: sweep trials that differ only in alpha or lr reuse them;
- saves its recipe beside the trained adapter (loftq.json), so that init_from, export and generate
  put back the backbone the adapter trained on, from the cache or recomputed (it is deterministic).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from tqdm import tqdm
from transformers.integrations.bitsandbytes import dequantize_bnb_weight

from lora_lab.config import AdapterConfig, QuantConfig
from lora_lab.errors import ConfigError
from lora_lab.models import CheckpointReader, cache_dir, model_dir

log = logging.getLogger(__name__)

# Bump when the algorithm or the cache layout changes.
LOFTQ_VERSION = 2
# Extra dimensions of the randomized SVD's subspace, beyond the rank (Halko et al.'s oversampling).
SVD_OVERSAMPLING = 32
SVD_POWER_ITERATIONS = 4
# Beside a trained adapter: the LoftQRecipe of the backbone it trained on.
RECIPE_FILE = "loftq.json"


@dataclass
class LayerInit:
    """LoftQ's result for one layer: its 4-bit weight and the unscaled low-rank factors L @ R."""

    packed_weight: torch.Tensor
    quant_state: bnbf.QuantState
    left: torch.Tensor  # (out, r)
    right: torch.Tensor  # (r, in)

    def to(self, device: torch.device) -> LayerInit:
        self.quant_state.to(device)  # in place, as bitsandbytes moves a state
        return LayerInit(
            self.packed_weight.to(device), self.quant_state, self.left.to(device), self.right.to(device)
        )


@dataclass(frozen=True)
class LoftQRecipe:
    """What rebuilds a LoftQ backbone on the base model: the adapter's factors are fitted to that Q,
    and on plain quantize(W) the trained adapter computes something else."""

    quant: str
    double_quant: bool
    rank: int
    iterations: int
    svd: str

    def save(self, adapter_dir: Path) -> None:
        (adapter_dir / RECIPE_FILE).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")


def loftq_recipe(
    adapter: AdapterConfig, quant: QuantConfig, trained_adapter: str | Path | None
) -> LoftQRecipe | None:
    """The LoftQ backbone a run works on: the one a trained adapter (a local directory) was trained on,
    else the one adapter.init=loftq fits now; None for plain quantization."""
    if trained_adapter is None:
        if adapter.init != "loftq":
            return None
        return LoftQRecipe(quant.name, quant.double_quant, adapter.r, adapter.loftq_iter, adapter.loftq_svd)
    path = Path(trained_adapter) / RECIPE_FILE
    if not path.exists():
        return None
    recipe = LoftQRecipe(**json.loads(path.read_text()))
    if (quant.name, quant.double_quant) != (recipe.quant, recipe.double_quant):
        raise ConfigError(
            "quant",
            f"{quant.name} (double_quant={quant.double_quant})",
            f"{trained_adapter} was trained on a LoftQ backbone that needs "
            f"quant={recipe.quant} quant.double_quant={str(recipe.double_quant).lower()}",
        )
    return recipe


@dataclass(frozen=True)
class QuantSpec:
    """How a bitsandbytes 4-bit layer quantizes its weight."""

    quant_type: str = "nf4"
    blocksize: int = 64
    compress_statistics: bool = True  # double quantization
    quant_storage: torch.dtype = torch.uint8

    @classmethod
    def of(cls, weight: bnb.nn.Params4bit) -> QuantSpec:
        return cls(weight.quant_type, weight.blocksize, weight.compress_statistics, weight.quant_storage)


def quantize_like(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, bnbf.QuantState]:
    """Quantize as the layer's own Params4bit did: same quantizer, type, block size and double quant."""
    return bnbf.quantize_4bit(
        weight,
        blocksize=spec.blocksize,
        compress_statistics=spec.compress_statistics,
        quant_type=spec.quant_type,
        quant_storage=spec.quant_storage,
    )


def randomized_svd(matrix: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.svd_lowrank's algorithm (Halko, Martinsson & Tropp 2011) with its Gaussian sketch drawn
    on the CPU from a fixed seed. svd_lowrank draws it from the device's generator, so a backbone
    recomputed on another device (a run reloaded without its LoftQ cache) came out different: two
    sketches of a test matrix gave 9% different 4-bit codes, which the adapter was not fitted to.
    Now only rounding differs."""
    transposed = matrix.shape[0] < matrix.shape[1]
    a = matrix.mT if transposed else matrix
    sketch = torch.randn(a.shape[1], q, generator=torch.Generator().manual_seed(0))
    basis = torch.linalg.qr(a @ sketch.to(a.device, a.dtype)).Q
    for _ in range(SVD_POWER_ITERATIONS):
        basis = torch.linalg.qr(a.mT @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    u, s, vh = torch.linalg.svd(basis.mT @ a, full_matrices=False)
    u, v = basis @ u, vh.mT
    return (v, s, u) if transposed else (u, s, v)


def low_rank(residual: torch.Tensor, rank: int, svd: str) -> tuple[torch.Tensor, torch.Tensor]:
    """L (out, k), R (k, in) with L @ R the best rank-k approximation of `residual` (randomized or
    exact), k = min(rank, out, in): beyond that the approximation is exact already."""
    if svd == "exact":
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        u, s, v = u[:, :rank], s[:rank], vh[:rank].T
    else:
        u, s, v = randomized_svd(residual, min(rank + SVD_OVERSAMPLING, *residual.shape))
        u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    root = s.sqrt()
    return u * root, (v * root).T


def loftq_layer(weight: torch.Tensor, spec: QuantSpec, rank: int, iterations: int, svd: str) -> LayerInit:
    """The LoftQ alternation for one full-precision weight (computed in fp32)."""
    target = weight.float()
    residual_fit = torch.zeros_like(target)
    for _ in range(iterations):
        packed, state = quantize_like((target - residual_fit).to(weight.dtype), spec)
        dequantized = bnbf.dequantize_4bit(packed, state).float()
        left, right = low_rank(target - dequantized, rank, svd)
        residual_fit = left @ right
    return LayerInit(packed, state, left, right)


def install(lora_layer, init: LayerInit, adapter_weights: bool, adapter_name: str = "default") -> None:
    """Put Q into the layer's 4-bit weight and, with adapter_weights, s * B @ A == L @ R into its adapter;
    an adapter wider than L @ R's rank (r above a layer's smaller side) gets zeros in the extra rows."""
    base = lora_layer.base_layer
    old = base.weight
    base.weight = bnb.nn.Params4bit(
        init.packed_weight,
        requires_grad=False,
        quant_state=init.quant_state,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
        module=base,
        bnb_quantized=True,
    )
    base.quant_state = init.quant_state
    if not adapter_weights:
        return
    root_scaling = float(lora_layer.scaling[adapter_name]) ** 0.5
    lora_A, lora_B = lora_layer.lora_A[adapter_name].weight, lora_layer.lora_B[adapter_name].weight
    fitted_rank = init.right.shape[0]
    with torch.no_grad():
        lora_A.zero_()
        lora_B.zero_()
        lora_A[:fitted_rank].copy_((init.right / root_scaling).to(lora_A.dtype))
        lora_B[:, :fitted_rank].copy_((init.left / root_scaling).to(lora_B.dtype))


def adapted_4bit_layers(peft_model) -> dict[str, torch.nn.Module]:
    """PEFT LoRA layers wrapping a bitsandbytes Linear4bit, by their base-model module name."""
    layers = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), bnb.nn.Linear4bit):
            layers[name.removeprefix("base_model.model.")] = module
    return layers


def cache_key(
    model_identity: str,
    layers: dict,
    quant_name: str,
    double_quant: bool,
    rank: int,
    iterations: int,
    svd: str,
) -> str:
    first = next(iter(layers.values())).base_layer.weight
    recipe = {
        "version": LOFTQ_VERSION,
        "model": model_identity,
        "quant": quant_name,
        "double_quant": double_quant,
        "blocksize": first.blocksize,
        "dtype": str(first.quant_state.dtype),
        "storage": str(first.quant_storage),  # uint8, or the compute dtype under FSDP
        "rank": rank,
        "iterations": iterations,
        "svd": svd,
        "modules": sorted(layers),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _save(path: Path, inits: dict[str, LayerInit]) -> None:
    payload = {
        name: {
            "weight": i.packed_weight,
            "quant_state": i.quant_state.as_dict(packed=True),
            "left": i.left,
            "right": i.right,
        }
        for name, i in inits.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # parallel trials never read a half-written file


def _load(path: Path, device: torch.device) -> dict[str, LayerInit]:
    payload = torch.load(path, map_location=device, weights_only=True)
    return {
        name: LayerInit(
            d["weight"], bnbf.QuantState.from_dict(d["quant_state"], device), d["left"], d["right"]
        )
        for name, d in payload.items()
    }


@torch.no_grad()
def loftq_initialise(
    peft_model,
    checkpoint: CheckpointReader,
    model_identity: str,
    quant_name: str,
    double_quant: bool,
    rank: int,
    iterations: int,
    svd: str,
    adapter_weights: bool = True,
    compute_device: str | None = None,
) -> dict[str, LayerInit]:
    """Initialise every adapted 4-bit layer with LoftQ, from the cache when the same init was computed before.

    Without adapter_weights only the backbone's Q is installed: for reloading a trained LoftQ adapter.
    `compute_device`: where the layers are fitted (the run's device), if not where they are."""
    layers = adapted_4bit_layers(peft_model)
    if not layers:
        raise ConfigError(
            "adapter.init",
            "loftq",
            "LoftQ fits 4-bit linear layers, and this adapter has none (fused expert parameters are not "
            "quantized); use adapter.init=gaussian or a target_modules preset with attention layers",
        )
    if adapter_weights:
        start_others_at_zero(peft_model, layers)
    key = cache_key(model_identity, layers, quant_name, double_quant, rank, iterations, svd)
    path = cache_dir() / "loftq" / f"{key}.pt"
    device = next(iter(layers.values())).base_layer.weight.device
    # under FSDP rank 0 holds the layers in CPU memory: it fits them on its GPU, one at a time
    compute = device if compute_device is None else torch.device(compute_device)
    if path.exists():
        log.info("LoftQ: reusing %s", path)
        inits = _load(path, device)
    else:
        inits = {}
        # disable=None: a bar on a terminal only.
        bar = {"desc": f"LoftQ r={rank} x{iterations}", "unit": "layer", "disable": None}
        for name, layer in tqdm(layers.items(), **bar):
            dtype = layer.base_layer.weight.quant_state.dtype
            weight = checkpoint.weight(name, layer.base_layer).to(device=compute, dtype=dtype)
            init = loftq_layer(weight, QuantSpec.of(layer.base_layer.weight), rank, iterations, svd)
            inits[name] = init.to(device)
        _save(path, inits)
    for name, layer in layers.items():
        install(layer, inits[name], adapter_weights)
    return inits


def start_others_at_zero(peft_model, loftq_layers: dict) -> None:
    """LoRA layers LoftQ does not fit (on fused expert parameters) start as PEFT's default does, B = 0,
    so that the adapter starts from the LoftQ backbone's function: init_lora_weights=False, which
    leaves LoftQ's layers to it, draws both A and B at random."""
    others = [
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_B")
        and "default" in module.lora_B
        and name.removeprefix("base_model.model.") not in loftq_layers
    ]
    for name in others:
        module = peft_model.get_submodule(f"base_model.model.{name}")
        for weight in module.lora_B["default"].parameters():
            weight.data.zero_()
    if others:
        log.info(
            "LoftQ: %d adapted parameters that are not 4-bit layers (%s) start with B = 0",
            len(others),
            others[0],
        )


def prepare_quantized_adapter(
    peft_model,
    model_cfg,
    quant,
    loftq: LoftQRecipe | None,
    fit_adapter: bool,
    report: bool,
    compute_device: str | None = None,
) -> list[dict] | None:
    """On a quantized base: the `loftq` backbone, with the adapter fitted to it when `fit_adapter`
    (a trained adapter keeps its weights), and the per-layer quantization-error rows when `report`
    (None otherwise); LoftQ computes on `compute_device` (see loftq_initialise)."""
    if quant.name == "none" or not (loftq or report):
        return None
    directory = model_dir(model_cfg)
    checkpoint = CheckpointReader(directory, peft_model.get_base_model().base_model_prefix)
    inits = None
    if loftq is not None:
        inits = loftq_initialise(
            peft_model,
            checkpoint,
            str(directory),
            loftq.quant,
            loftq.double_quant,
            loftq.rank,
            loftq.iterations,
            loftq.svd,
            fit_adapter,
            compute_device,
        )
    return quant_error_report(peft_model, checkpoint, inits) if report else None


def dequantized_weight(layer) -> torch.Tensor:
    """The full-precision weight a layer computes with: bitsandbytes 4-bit or int8 dequantized, others as they are."""
    return dequantize_bnb_weight(layer.weight, getattr(layer, "state", None)).float()


@torch.no_grad()
def quant_error_report(
    peft_model, checkpoint: CheckpointReader, loftq: dict[str, LayerInit] | None
) -> list[dict]:
    """Per adapted module: ||W - Q0|| / ||W|| of plain quantization, and with LoftQ ||W - Q - s B A|| / ||W||."""
    rows = []
    for name, module in peft_model.named_modules():
        base = getattr(module, "base_layer", None)
        if not hasattr(module, "lora_A") or not isinstance(base, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        name = name.removeprefix("base_model.model.")
        weight = checkpoint.weight(name, base).to(base.weight.device).float()
        norm = weight.norm()
        if loftq is not None and name in loftq:  # the layer now holds LoftQ's Q: quantize W afresh
            packed, state = quantize_like(weight.to(base.weight.quant_state.dtype), QuantSpec.of(base.weight))
            plain_error = weight - bnbf.dequantize_4bit(packed, state).float()
        else:
            plain_error = weight - dequantized_weight(base)
        row = {"module": name, "shape": list(weight.shape), "qlora_rel_err": float(plain_error.norm() / norm)}
        if loftq is not None and name in loftq:
            delta = module.get_delta_weight("default").float()
            row["loftq_rel_err"] = float((weight - dequantized_weight(base) - delta).norm() / norm)
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> str:
    parts = []
    for key in ("qlora_rel_err", "loftq_rel_err"):
        values = [r[key] for r in rows if key in r]
        if values:
            worst = max(rows, key=lambda r: r.get(key, -1.0))
            parts.append(
                f"{key} mean {sum(values) / len(values):.4f}, worst {worst[key]:.4f} ({worst['module']})"
            )
    return "; ".join(parts)
