"""Bad input: one clear line naming the key, the value and what is valid; exit != 0; no traceback;
nothing written to the run dir but Hydra's own .hydra/."""

from __future__ import annotations

import pytest
from conftest import cli

BAD_INPUTS = [
    # (overrides, words the message must contain)
    (["model=foo"], ["model/foo", "tiny", "llama3_8b"]),
    (["adapter.r=abc"], ["adapter.r", "abc", "Integer"]),
    (["adapter.r=0"], ["adapter.r=0", ">= 1"]),
    (["train.lr=-1e-4"], ["train.lr=-0.0001", "positive"]),
    (["train.batch_size=0"], ["train.batch_size=0", ">= 1"]),
    (["adapter.rr=3"], ["rr", "Did you mean"]),
    (["quant=nf5"], ["quant/nf5", "nf4", "int8"]),
    (["adapter.init=magic"], ["adapter.init='magic'", "gaussian", "loftq"]),
    (["adapter.target_modules=everything"], ["adapter.target_modules='everything'", "all-linear"]),
    (["adapter.target_modules=[foo_proj]"], ["foo_proj", "matches no linear layer", "q_proj"]),
    (
        ["task=jsonl", "task.train_path=missing.jsonl", "task.eval_path=missing.jsonl"],
        ["task.train_path='missing.jsonl'", "no such file"],
    ),
    (["task=sentiment", "model.kind=causal_lm"], ["model.kind='causal_lm'", "seq_cls"]),
    (["quant=int8", "adapter.init=loftq"], ["adapter.init='loftq'", "nf4"]),
    (["optimized_metric=eval/bleu"], ["optimized_metric='eval/bleu'", "eval/token_accuracy"]),
    (["model=llama3_8b"], ["model.name_or_path='meta-llama/Llama-3.1-8B'", "Hub"]),
    (["task=gsm8k"], ["task.dataset='openai/gsm8k'", "could not load"]),
    (["train.fused_loss=maybe"], ["train.fused_loss='maybe'", "auto, true or false"]),
    (["task=sentiment", "train.liger=true"], ["train.liger=True", "causal-LM tasks only", "auto or false"]),
    (
        ["adapter.target_modules=[q_proj,lm_head]", "train.fused_loss=true"],
        ["train.fused_loss=True", "lora.layer.Linear", "plain torch.nn.Linear", "auto or false"],
    ),
]


@pytest.mark.parametrize("overrides,words", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_refused_clearly(tmp_path, overrides, words):
    run_dir = tmp_path / "run"
    result = cli(["-m", "lora_lab.train", *overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output, output[-3000:]
    for word in words:
        assert word in output, (word, output[-3000:])
    leftovers = (
        {p.name for p in run_dir.iterdir()} - {".hydra", "train.log", "checkpoints"}
        if run_dir.exists()
        else set()
    )
    assert not leftovers
    assert not (run_dir / "adapter").exists() and not (run_dir / "metrics.json").exists()
