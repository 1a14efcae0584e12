"""Shared test setup: offline, a session-wide model cache, and helpers that compose the real config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from cli_process import CliProcess

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

os.environ.update(
    {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
)
# The suite tests the CPU paths on any machine: on a GPU machine, train.device=auto would send its
# runs to CUDA, where they test something else. `make test-gpu` runs the GPU tests with the GPU.
if os.environ.get("LORA_LAB_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
# Each xdist worker (and the subprocesses it starts) gets its share of the cores as torch threads,
# set before torch is imported. Left to torch, every worker runs one OpenMP thread per core, and on
# 2 cores two workers' pools spin against each other: tests/test_loftq.py and tests/test_train.py at
# -n 2 took 573 s so, 72 s with one thread each.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, share))


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """One tiny-model cache for the whole session, so the model is built once."""
    path = tmp_path_factory.mktemp("lora_lab_cache")
    os.environ["LORA_LAB_CACHE"] = str(path)
    return path


# Small, fast settings for the tiny model on 2 CPU cores.
FAST = ["train.max_steps=40", "train.eval_steps=20", "train.logging_steps=20", "task.max_eval_samples=64"]
# A trial of a test sweep: a few steps, a small eval set.
SWEEP_FAST = [
    "train.max_steps=10",
    "train.eval_steps=5",
    "train.logging_steps=5",
    "task.max_eval_samples=16",
    "task.metrics=[token_accuracy]",
]
SMALL_EVAL = ["train.eval_on_start=false", "task.max_eval_samples=32", "task.metrics=[token_accuracy]"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import lora_lab.config  # noqa: F401  registers the schema the root config builds on

    with initialize_config_dir(config_dir=str(CONF_DIR)):
        return hydra_compose(config_name="train", overrides=overrides)


def train_run(overrides: list[str], run_dir: Path) -> dict:
    """A real training run, in-process, on the composed config, the overrides as its command line."""
    from lora_lab.pipeline import train
    from lora_lab.validate import validate

    run_dir.mkdir(parents=True, exist_ok=True)
    return train(validate(compose(overrides), overrides), run_dir)


def cli(
    args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None, fresh: bool = False
) -> subprocess.CompletedProcess:
    """`python -m <module> args` as a process of its own, as a user runs it: forked from an interpreter
    that has imported the training stack (tests/cli_process.py), or with `fresh` a new interpreter,
    for what depends on imports. `env` changes the environment (a None value unsets the variable)."""
    env = cli_env(env)
    if fresh:
        return subprocess.run(
            [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    with tempfile.TemporaryDirectory() as outputs:
        stdout, stderr = Path(outputs) / "stdout", Path(outputs) / "stderr"
        process = CliProcess(args, cwd, env, stdout, stderr, new_session=False)
        process.wait(timeout)
        return subprocess.CompletedProcess(
            [sys.executable, *args], process.returncode, stdout.read_text(), stderr.read_text()
        )


def start_cli(args: list[str], cwd: Path, log: Path, new_session: bool = False) -> CliProcess:
    """`python -m <module> args` started, forked as in `cli`; stdout and stderr go to `log`.
    new_session: in a process group of its own, to signal it with the processes it starts."""
    return CliProcess(args, cwd, cli_env(None), log, log, new_session)


def cli_env(changes: dict | None) -> dict:
    return {
        k: v for k, v in {**os.environ, "PYTHONPATH": str(ROOT), **(changes or {})}.items() if v is not None
    }


def run_sweep(
    tmp_path, *overrides, name="s", search="hparams_search=lora", timeout=600
) -> subprocess.CompletedProcess:
    """A test sweep from the command line: sweep dir tmp_path/<name>, study `study` in
    tmp_path/optuna.db, trials at SWEEP_FAST."""
    args = [
        "-m",
        "lora_lab.train",
        "-m",
        search,
        f"hydra.sweep.dir={tmp_path / name}",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
        "hydra.sweeper.study_name=study",
        *SWEEP_FAST,
        *overrides,
    ]
    return cli(args, cwd=tmp_path, timeout=timeout)


def sweep_output(tmp_path, *overrides, name="s", search="hparams_search=lora", timeout=600) -> str:
    """Run a sweep that must succeed; its output (stdout and stderr)."""
    result = run_sweep(tmp_path, *overrides, name=name, search=search, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def sweep(tmp_path, *overrides, name="s", search="hparams_search=lora", timeout=600):
    sweep_output(tmp_path, *overrides, name=name, search=search, timeout=timeout)
    return tmp_path / name


def load_study(tmp_path):
    """The study a `run_sweep` made (an optuna.Study)."""
    import optuna

    return optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path}/optuna.db")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    """Rows as a JSONL file; its path, for a task.*_path override."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _postgres_binary(name: str) -> str | None:
    import glob
    import shutil

    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on loopback, from Debian's postgresql package (.ci/run installs it)."""
    import shutil
    import socket
    import tempfile

    initdb, pg_ctl = _postgres_binary("initdb"), _postgres_binary("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    data = Path(tempfile.mkdtemp(prefix="lora_lab_pg_"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(data, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run(initdb, "-D", str(data / "db"), "--auth=trust", "-U", "postgres")
    run(
        pg_ctl,
        "-D",
        str(data / "db"),
        "-w",
        "-l",
        str(data / "log"),
        "-o",
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={data}",
        "start",
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(pg_ctl, "-D", str(data / "db"), "-m", "immediate", "stop")
        shutil.rmtree(data, ignore_errors=True)


def exact_match_before_and_after(overrides: list[str], run_dir: Path) -> tuple[float, dict]:
    """A chat run's exact match of the untrained base model (scored as the run scores, stopping at
    its template's end-of-turn tokens), and the metrics of the run trained on `overrides`."""
    from lora_lab.data import build_task_data
    from lora_lab.metrics import ExactMatchScorer
    from lora_lab.models import load_model
    from lora_lab.tasks import load_rows
    from lora_lab.validate import validate

    run = validate(compose(overrides), overrides)
    model, tokenizer = load_model(run.model, run.quant, [], "cpu")
    train_rows, eval_rows = load_rows(run.task)
    data = build_task_data(train_rows, eval_rows, "chat", tokenizer, run.task.max_length, False)
    scorer = ExactMatchScorer(
        tokenizer,
        data.eval_prompts,
        data.eval_references,
        None,
        run.task.generate_max_new_tokens,
        64,
        data.stop_token_ids,
    )
    untrained = scorer(model)
    return untrained, train_run(overrides, run_dir)
