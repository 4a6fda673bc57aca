"""The offline dataset file (docs/dataset_format.md): JSON Lines, a header line, then one transition per line.

build_dataset.py writes it; cql_prior.py and bc.py read it. Each transition has the fields of DATASET_FIELDS; its
`proposals` / `next_proposals` are the prior's k proposals at s and s' (null where not stored). A file is written to
a temporary name and renamed, and read back with every line checked: a cut file, a missing or ill-typed field,
another format or version is a DatasetError naming the file, the line and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np

DATASET_FORMAT, DATASET_VERSION = "llmprior-offline-transitions", 1
DATASET_FIELDS = (
    "episode", "step", "task", "obs", "admissible", "action", "reward", "next_obs", "next_admissible",
    "terminated", "truncated", "proposals", "next_proposals",
)  # fmt: skip
# written where the writer knows them (datasets built with the synthetic prior): the expert's action at s and s'
OPTIONAL_FIELDS = ("expert", "next_expert")


def write_dataset(path: str, header: dict, records: list[dict]) -> None:
    """JSON Lines: one header line (format, version, env, prior identity, k), then one transition per line.

    Written to a temp file and renamed, so a crash never leaves a half-written dataset.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps({"format": DATASET_FORMAT, "version": DATASET_VERSION, **header}) + "\n")
        for r in records:
            f.write(json.dumps({k: r[k] for k in (*DATASET_FIELDS, *OPTIONAL_FIELDS) if k in r}) + "\n")
    os.replace(tmp, path)


class DatasetError(ValueError):
    """A malformed offline dataset; the message names the file, the line (and record) and the field."""


_STR_LIST = "a list of strings"


def _check_record(r: object) -> Optional[tuple[str, str]]:
    """(field, problem) for the first thing wrong with one transition, or None."""
    if not isinstance(r, dict):
        return "", f"is a JSON {type(r).__name__}, not an object"
    for name in DATASET_FIELDS:
        if name not in r:
            return name, "is missing"

    def is_str_list(x) -> bool:
        return isinstance(x, list) and all(isinstance(a, str) for a in x)

    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not is_int(r["episode"]):
        return "episode", f"must be an integer, got {r['episode']!r}"
    if not is_int(r["step"]) or r["step"] < 0:
        return "step", f"must be an integer >= 0, got {r['step']!r}"
    for name in ("task", "obs", "action", "next_obs"):
        if not isinstance(r[name], str):
            return name, f"must be a string, got {type(r[name]).__name__}"
    for name in ("admissible", "next_admissible"):
        if not is_str_list(r[name]):
            return name, f"must be {_STR_LIST}"
    if not r["admissible"]:
        return "admissible", "is empty"
    if r["action"] not in r["admissible"]:
        return "action", f"{r['action']!r} is not one of the admissible actions"
    if not isinstance(r["reward"], (int, float)) or isinstance(r["reward"], bool) or not np.isfinite(r["reward"]):
        return "reward", f"must be a finite number, got {r['reward']!r}"
    for name in ("terminated", "truncated"):
        if not isinstance(r[name], bool):
            return name, f"must be true or false, got {r[name]!r}"
    for name, allowed in (("proposals", r["admissible"]), ("next_proposals", r["next_admissible"])):
        value = r[name]
        if value is None:
            continue
        if not is_str_list(value):
            return name, f"must be null or {_STR_LIST}"
        bad = [a for a in value if a not in allowed]
        if bad:
            where = "admissible" if name == "proposals" else "next_admissible"
            return name, f"holds {bad[0]!r}, which is not in {where}"
    if r["proposals"] is not None and not r["proposals"]:
        return "proposals", "is an empty list (use null for 'not stored')"
    for name, where in (("expert", "admissible"), ("next_expert", "next_admissible")):
        if r.get(name) is not None and r[name] not in r[where]:
            return name, f"{r[name]!r} is not in {where}"
    return None


def load_dataset(path: str) -> tuple[dict, list[dict]]:
    """-> (header, transitions) of an offline dataset, every line checked: a truncated file, a missing or ill-typed
    field, another format or version raise DatasetError naming the file, the line (record) and the field."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read the dataset: {err}") from err
    if not text.strip():
        raise DatasetError(f"{path}: empty file (no header line)")
    lines = text.split("\n")
    ends_with_newline = lines[-1] == ""  # write_dataset ends every line with one: a missing one means a cut file
    if ends_with_newline:
        lines.pop()
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: line 1 (header): not valid JSON ({err.msg})") from err
    if not isinstance(header, dict):
        raise DatasetError(f"{path}: line 1 (header): not a JSON object")
    for name in ("format", "version", "env", "prior", "k"):
        if name not in header:
            raise DatasetError(f"{path}: line 1 (header): field {name!r} is missing")
    if header["format"] != DATASET_FORMAT:
        raise DatasetError(f"{path}: line 1 (header): field 'format' is {header['format']!r}, not {DATASET_FORMAT!r}")
    if header["version"] != DATASET_VERSION:
        raise DatasetError(
            f"{path}: line 1 (header): field 'version' is {header['version']!r}; this code reads version "
            f"{DATASET_VERSION}"
        )
    records = []
    for lineno, line in enumerate(lines[1:], start=2):
        where = f"{path}: line {lineno} (record {lineno - 1})"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            cut = lineno == len(lines) and not ends_with_newline
            hint = "; the file ends inside this record: truncated?" if cut else ""
            raise DatasetError(f"{where}: not valid JSON ({err.msg}){hint}") from err
        problem = _check_record(record)
        if problem is not None:
            name, what = problem
            raise DatasetError(f"{where}: field {name!r} {what}" if name else f"{where}: the record {what}")
        records.append(record)
    if not records:
        raise DatasetError(f"{path}: no transition after the header")
    if "transitions" in header and header["transitions"] != len(records):
        raise DatasetError(
            f"{path}: line 1 (header): field 'transitions' says {header['transitions']}, the file holds "
            f"{len(records)}: truncated?"
        )
    return header, records


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
