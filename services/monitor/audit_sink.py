"""Append-only JSON-lines file of the audit topic: one line per message, as the message is on the wire.

- De-duplicated by (type, id): Kafka delivers at least once and the monitor re-reads the topic from its start
  after a restart; the ids already in the file are loaded when the sink opens, so a line is never written twice.
- Append-only: the file is opened in append mode and never rewritten; each line is flushed (and fsynced on
  `flush`) before the monitor commits the offsets of the messages it holds.
- No secrets: the sink writes the messages as they are. No message type carries credentials (they live only in
  the execution worker's process), and the test suite scans the file of a whole run for the configured secrets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

import orjson

from shared.codec import encode
from shared.messages import Message


def _key(mtype: str, mid: str) -> str:
    return f"{mtype}:{mid}"


class AuditFileSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: set[str] = set()
        self._fh: IO[bytes] | None = None
        self.written = 0
        self.duplicates = 0

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if self.path.exists():
            self._load_ids()
            with self.path.open("rb") as fh:
                if fh.seek(0, os.SEEK_END) > 0:
                    fh.seek(-1, os.SEEK_END)
                    torn = fh.read(1) != b"\n"
        self._fh = self.path.open("ab")
        if torn:
            self._fh.write(b"\n")  # end a line torn by a crash, so the next message starts on its own line

    def _load_ids(self) -> None:
        with self.path.open("rb") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    raw = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a torn last line from a crash: keep it, it never matches a complete message
                if isinstance(raw, dict) and "id" in raw:
                    self._seen.add(_key(str(raw.get("type", "")), str(raw["id"])))

    def write(self, msg: Message) -> bool:
        """Append the message unless its (type, id) is already in the file; True when written."""
        if self._fh is None:
            raise RuntimeError("AuditFileSink.open() first")
        k = _key(str(getattr(msg, "type", type(msg).__name__)), msg.id)
        if k in self._seen:
            self.duplicates += 1
            return False
        self._seen.add(k)
        self._fh.write(encode(msg) + b"\n")
        self.written += 1
        return True

    def flush(self) -> None:
        """Durable before the offsets are committed: the effect comes first."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self.flush()
            self._fh.close()
            self._fh = None

    def __len__(self) -> int:
        return len(self._seen)
