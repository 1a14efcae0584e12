"""The user's own data files, read through `datasets`: a file, a glob of files of one format, or a
directory written by `save_to_disk`. Nothing here parses a format by hand."""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path

from lora_lab.errors import ConfigError

BUILDERS = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".parquet": ("parquet", {}),
    ".arrow": ("arrow", {}),
}


def data_files(key: str, spec: str) -> list[Path] | Path:
    """The files `spec` names (a file or a glob), or the save_to_disk directory it is."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
            raise ConfigError(key, spec, "a directory must be one written by datasets' save_to_disk")
        return path
    if glob.has_magic(spec):
        files = [Path(f) for f in sorted(glob.glob(spec)) if Path(f).is_file()]
        if not files:
            raise ConfigError(key, spec, "the pattern matches no file")
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(key, spec, "no such file")
    suffixes = sorted({f.suffix.lower() for f in files})
    if len(suffixes) != 1 or suffixes[0] not in BUILDERS:
        raise ConfigError(
            key,
            spec,
            f"files of one format: {', '.join(BUILDERS)}, or a save_to_disk dir (found {', '.join(suffixes)})",
        )
    return files


def read_rows(key: str, spec: str, text_columns: set[str]) -> list[dict]:
    """Every row of the data `spec` names. CSV and TSV cells of `text_columns` stay the text they are
    (" 007" is not the number 7), and an empty cell is an empty string, not a missing value."""
    import datasets

    found = data_files(key, spec)
    for file in [] if isinstance(found, Path) else found:
        if not file.read_bytes().strip():
            raise ConfigError(key, spec, f"{file}, line 1: the file is empty")
    try:
        if isinstance(found, Path):
            dataset = datasets.load_from_disk(str(found))
            if isinstance(dataset, datasets.DatasetDict):
                raise ConfigError(
                    key,
                    spec,
                    f"a DatasetDict: point at one of its splits ({', '.join(str(found / s) for s in dataset)})",
                )
        else:
            builder, kwargs = BUILDERS[found[0].suffix.lower()]
            if builder == "csv":
                kwargs = {
                    **kwargs,
                    "keep_default_na": False,
                    "converters": dict.fromkeys(sorted(text_columns), str),
                }
            dataset = datasets.load_dataset(
                builder, data_files=[str(f) for f in found], split="train", **kwargs
            )
    except ConfigError:
        raise
    except Exception as e:  # malformed files: each builder raises its own types
        where = None if isinstance(found, Path) else _json_error(found)
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        raise ConfigError(key, spec, where or f"could not be read ({reason})") from None
    return dataset.to_list()


def _json_error(files: list[Path]) -> str | None:
    """The first line of a JSON Lines (or JSON) file that is not a JSON object, with the line number
    an editor shows; None where the files are not JSON or parse (the reader failed on something else)."""
    for file in files:
        if file.suffix.lower() == ".json":
            try:
                json.loads(file.read_text())
            except json.JSONDecodeError as e:
                return f"{file}, line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})"
            continue
        if file.suffix.lower() != ".jsonl":
            return None
        with open(file, encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    return f"{file}, line {number}: not valid JSON ({e.msg}, column {e.colno})"
                if not isinstance(row, dict):
                    return f"{file}, line {number}: a row is a JSON object, this line holds a {type(row).__name__}"
    return None


def digest(key: str, spec: str) -> str:
    """sha256 over the bytes of the data `spec` names, to tell whether it changed since a run."""
    found = data_files(key, spec)
    files = sorted(p for p in found.rglob("*") if p.is_file()) if isinstance(found, Path) else found
    hashed = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            hashed.update(hashlib.file_digest(f, "sha256").digest())
    return hashed.hexdigest()
