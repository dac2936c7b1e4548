"""An on-disk cache of judge answers, keyed by judge model and a hash of the exact request.

It makes runs resumable (an interrupted run re-asks only what it had not stored) and makes parity runs
cheap when the exported engine writes the same report as the reference. Only the model name, the request
hash and the answer text are stored: never the reports, which can be patient data, nor any key. Answers
are written one at a time from the calling thread and committed at once, so a crash loses at most the
requests in flight.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from types import TracebackType
from typing import Optional

from radtrt.errors import fail
from radtrt.evaluation.chexprompt.prompt import Messages

_SCHEMA = """CREATE TABLE IF NOT EXISTS answers (
    model TEXT NOT NULL,
    prompt_sha256 TEXT NOT NULL,
    answer TEXT NOT NULL,
    PRIMARY KEY (model, prompt_sha256)
)"""


def prompt_hash(messages: Messages, temperature: float, max_tokens: int) -> str:
    """SHA-256 of everything besides the model that shapes the answer: the messages and sampling settings."""
    payload = json.dumps({"messages": messages, "temperature": temperature, "max_tokens": max_tokens},
                         sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """SQLite store of answers; use from one thread."""

    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path)
            self._db.execute(_SCHEMA)
            self._db.commit()
        except (OSError, sqlite3.Error) as e:
            fail(f"cannot open the judge cache {path}: {e}")
        self.path = path

    def get(self, model: str, key: str) -> Optional[str]:
        row = self._db.execute("SELECT answer FROM answers WHERE model = ? AND prompt_sha256 = ?",
                               (model, key)).fetchone()
        return None if row is None else row[0]

    def put(self, model: str, key: str, answer: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO answers (model, prompt_sha256, answer) VALUES (?, ?, ?)",
                         (model, key, answer))
        self._db.commit()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "JudgeCache":
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()
