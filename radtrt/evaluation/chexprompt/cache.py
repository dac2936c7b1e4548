"""An on-disk cache of judge answers, keyed by the judge (model and where it is served) and a hash of the
exact request.

It makes runs resumable (an interrupted run re-asks only what it had not stored) and makes parity runs
cheap when the exported engine writes the same report as the reference. Only the judge's name with a hash of
where it is served, the request hash and the answers that could be read are stored: never the reports, which can be patient data, nor any key. Answers
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
        try:  # stat() of a path in a folder this user cannot enter raises (a PermissionError traceback)
            self._check_path(path)
        except OSError as e:
            fail(f"cannot open the judge cache {path}: {e.strerror or e}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # a second eval sharing the default cache waits for the other's write instead of failing
            self._db = sqlite3.connect(path, timeout=60)
        except (OSError, sqlite3.Error) as e:
            fail(f"cannot open the judge cache {path}: {e}")
        try:
            objects = {(kind, name) for kind, name in self._db.execute("SELECT type, name FROM sqlite_master")}
            if objects and ("table", "answers") not in objects:  # CREATE TABLE would have added ours to its file
                self._db.close()
                fail(f"the judge cache {path} is another program's SQLite database (it holds tables or views, none "
                     f"of them radtrt's 'answers'): give --judge-cache a new file or a radtrt judge cache")
            self._db.execute(_SCHEMA)
            self._db.execute("SELECT model, prompt_sha256, answer FROM answers LIMIT 1").fetchall()
            self._db.commit()
            # a cache that cannot be written (a read-only file) opened and was read, and failed at the first answer's
            # store, after the paid requests had been sent: a row written and taken back proves it can be
            self._db.execute("INSERT OR IGNORE INTO answers (model, prompt_sha256, answer) VALUES ('', '', '')")
            self._db.rollback()
        except sqlite3.Error as e:  # not a cache of this schema (another SQLite file, say): closed, not leaked
            self._db.close()
            if (getattr(e, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_READONLY:
                fail(f"the judge cache {path} cannot be written ({e}); make it writable, or give --judge-cache "
                     f"another file")
            # the predictions file given as the cache, say: "file is not a database" (the code from Python 3.11)
            notadb = getattr(e, "sqlite_errorcode", None) == getattr(sqlite3, "SQLITE_NOTADB", 26)
            what = (": it is not a SQLite database (give --judge-cache a new file or a radtrt judge cache)" if notadb
                    else f": {e}")
            fail(f"cannot open the judge cache {path}{what}")
        self.path = path

    @staticmethod
    def _check_path(path: Path) -> None:
        """What sqlite says in its own words ("unable to open database file", "disk I/O error", "[Errno 17] File
        exists"), said in ours."""
        if path.is_dir():
            fail(f"--judge-cache {path} is a folder; give the judge cache's file (a new one, or a radtrt judge cache)")
        if path.exists() and not path.is_file():  # /dev/null
            fail(f"--judge-cache {path} is not a regular file; give the judge cache's file (a new one, or a radtrt "
                 f"judge cache)")
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            fail(f"--judge-cache {path}: {parent} is not a folder; give a path in a folder")

    def get(self, model: str, key: str) -> Optional[str]:
        """``model``: the judge's identity (``JudgeConfig.cache_identity``), not only its name."""
        try:
            row = self._db.execute("SELECT answer FROM answers WHERE model = ? AND prompt_sha256 = ?",
                                   (model, key)).fetchone()
        except sqlite3.Error as e:
            fail(f"cannot read the judge cache {self.path}: {e} (another radtrt eval using it, or not a radtrt "
                 f"judge cache? --judge-cache names another file)")
        return row[0] if row is not None and isinstance(row[0], str) else None

    def put(self, model: str, key: str, answer: str) -> None:
        try:
            self._db.execute("INSERT OR REPLACE INTO answers (model, prompt_sha256, answer) VALUES (?, ?, ?)",
                             (model, key, answer))
            self._db.commit()
        except sqlite3.Error as e:
            # the guess only where it fits: a full disk or a file made read-only meanwhile is no other eval
            busy = (getattr(e, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY
            fail(f"cannot write the judge cache {self.path}: {e}; the answers stored so far stay in it"
                 + (" (another radtrt eval using it? --judge-cache names another file)" if busy else ""))

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "JudgeCache":
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()
