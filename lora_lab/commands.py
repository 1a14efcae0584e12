"""The command lines lora_lab writes for its users: values quoted for Hydra's override grammar, an
override's key, and the confirm command a sweep's summary and report suggest. Light on imports: the
sweeper loads it with every sweep."""

from __future__ import annotations

from typing import Any

CONFIRM = "python -m lora_lab.confirm {target} --top 3 --seeds 5"


def quote(value: Any) -> str:
    """Quote a value for Hydra's override grammar (storage URLs contain ':' and '/')."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def key_of(override: str) -> str:
    return override.split("=")[0].lstrip("+~")
