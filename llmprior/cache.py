"""The SQLite caches: an LLM prior's proposals and scores, and a frozen encoder's text embeddings.

Both are derived data, shared by every run and process on the machine (`<cache>/priors.sqlite`,
`<cache>/embeddings.sqlite`, cache = $LLMPRIOR_CACHE or ~/.cache/llmprior). Several processes may write one file at
once (WAL, a busy timeout, autocommit; `INSERT OR IGNORE` keeps the first value, which is right because a value is a
deterministic function of its key). A file that is not a readable SQLite database (a crash of the disk, a stray
write) is moved aside to `<file>.corrupt-<time>`, named in one line on stderr, and a fresh one is started: nothing in
it cannot be computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from llmprior.models import cache_dir


class SQLiteFile:
    """One key -> value table in a SQLite file, reconnecting after a fork (a connection must not cross one) and
    replacing the file if it turns out to be corrupt."""

    def __init__(self, path: Path, table: str, column: str, value_type: str) -> None:
        self.path, self.table = Path(path), table
        self.schema = f"CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, {column} {value_type} NOT NULL)"
        self._conn: Optional[sqlite3.Connection] = None
        self._pid = -1

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=60000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(self.schema)
        conn.execute(f"SELECT COUNT(*) FROM (SELECT 1 FROM {self.table} LIMIT 1)").fetchone()
        return conn

    def _set_aside(self, err: sqlite3.DatabaseError) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
        self._conn = None
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(f"{self.path}{suffix}"):
                os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
        print(f"warning: cache file {self.path} is not a readable database ({err}); moved it to {aside} and started "
              "a new one (it holds derived data only)", file=sys.stderr)  # fmt: skip

    def execute(self, sql: str, params=(), many: bool = False) -> sqlite3.Cursor:
        for attempt in (0, 1):
            try:
                if self._conn is None or self._pid != os.getpid():
                    self._conn, self._pid = self._open(), os.getpid()
                return (self._conn.executemany if many else self._conn.execute)(sql, params)
            except sqlite3.DatabaseError as err:
                if attempt or not _corrupt(err):  # a locked or full disk is not a corrupt file
                    raise
                self._set_aside(err)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None


def _corrupt(err: sqlite3.DatabaseError) -> bool:
    """"file is not a database", "database disk image is malformed": plain DatabaseErrors, unlike the operational
    ones (locked, disk full, no such table)."""
    return type(err) is sqlite3.DatabaseError or "malformed" in str(err)


def make_key(**fields) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


class ProposalCache:
    """JSON values by key: `off`, `memory` (this process) or `disk` (SQLite, shared, survives restarts)."""

    def __init__(self, kind: str = "disk", path: Optional[str] = None) -> None:
        if kind not in ("off", "memory", "disk"):
            raise ValueError(f"cache kind must be off, memory or disk, got {kind!r}")
        self.kind = kind
        self._memory: dict[str, list] = {}
        self._file = SQLiteFile(Path(path) if path else cache_dir() / "priors.sqlite", "priors", "value", "TEXT")
        if kind == "disk":
            self._file.execute("SELECT 1")  # a corrupt file is found (and replaced) now, not mid-run

    def get(self, key: str) -> Optional[list]:
        if self.kind == "off":
            return None
        if key in self._memory:
            return list(self._memory[key])
        if self.kind == "disk":
            row = self._file.execute("SELECT value FROM priors WHERE key = ?", (key,)).fetchone()
            if row is not None:
                self._memory[key] = json.loads(row[0])
                return list(self._memory[key])
        return None

    def put(self, key: str, value: list) -> None:
        if self.kind == "off":
            return
        self._memory[key] = list(value)
        if self.kind == "disk":
            self._file.execute("INSERT OR IGNORE INTO priors (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def __len__(self) -> int:
        if self.kind == "disk":
            return self._file.execute("SELECT COUNT(*) FROM priors").fetchone()[0]
        return len(self._memory)

    def close(self) -> None:
        self._file.close()


class EmbeddingCache:
    """float32 vectors by (encoder, text)."""

    def __init__(self, encoder_id: str, path: Optional[str] = None) -> None:
        self.encoder_id = encoder_id
        path = Path(path) if path else cache_dir() / "embeddings.sqlite"
        self._file = SQLiteFile(path, "embeddings", "vector", "BLOB")

    def key(self, text: str) -> str:
        return hashlib.sha256(json.dumps([self.encoder_id, text], ensure_ascii=True).encode()).hexdigest()

    def get_many(self, texts: list[str]) -> dict[str, np.ndarray]:
        keys = {self.key(t): t for t in texts}
        found, key_list = {}, list(keys)
        for i in range(0, len(key_list), 500):
            chunk = key_list[i : i + 500]
            rows = self._file.execute(
                f"SELECT key, vector FROM embeddings WHERE key IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()  # fmt: skip
            found.update({keys[k]: np.frombuffer(v, dtype=np.float32) for k, v in rows})
        return found

    def put_many(self, texts: list[str], vectors: np.ndarray) -> None:
        rows = [(self.key(t), np.asarray(v, dtype=np.float32).tobytes()) for t, v in zip(texts, vectors)]
        self._file.execute("INSERT OR IGNORE INTO embeddings (key, vector) VALUES (?, ?)", rows, many=True)
