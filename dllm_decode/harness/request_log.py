"""Per-rank JSONL logs of evaluation requests, which also make a run resumable.

Every answered request appends one line to ``<log_dir>/rank<r>.jsonl``: its key, the rank, its
position in the call, the lm-eval document id, a hash of the prompt, the output and the cost
(NFE, generated tokens, seconds). The key hashes the request method, the request arguments and
a fingerprint of everything that decides the answer (model, resolved recipe, likelihood
options), so a changed recipe never reuses stale answers. On a restart every ``rank*.jsonl`` in
the directory is read (the sharding may differ if the number of processes changed) and logged
requests are answered from it instead of being recomputed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence


def stable_hash(obj: Any) -> str:
    """sha256 of a canonical JSON rendering (sorted keys; non-JSON values by ``str``)."""
    text = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def request_key(method: str, args: Sequence[Any], fingerprint: str) -> str:
    return stable_hash([method, list(args), fingerprint])


class RequestLog:
    """Append-only JSONL of this rank's answered requests plus a lookup over all ranks' files.
    With ``directory=None`` nothing is read or written."""

    def __init__(self, directory: str | Path | None, rank: int):
        self.path = None if directory is None else Path(directory) / f"rank{rank}.jsonl"
        self.rank = rank
        self._done: dict[str, dict[str, Any]] = {}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.reload()

    def reload(self) -> None:
        """Read every rank's file. A torn last line (a rank killed mid-write) is skipped."""
        if self.path is None:
            return
        for f in sorted(self.path.parent.glob("rank*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "key" in rec:
                    self._done[rec["key"]] = rec

    def get(self, key: str) -> dict[str, Any] | None:
        return self._done.get(key)

    def __len__(self) -> int:
        return len(self._done)

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        """Append ``records`` (each with a ``key``) and flush, so a crash loses at most the batch
        being decoded."""
        for rec in records:
            self._done[rec["key"]] = rec
        if self.path is None or not records:
            return
        torn = _ends_mid_line(self.path)
        with self.path.open("a", encoding="utf-8") as f:
            if torn:                     # a killed run left half a line: end it, keep ours whole
                f.write("\n")
            for rec in records:
                f.write(json.dumps({"rank": self.rank, **rec}, ensure_ascii=False, default=str) + "\n")
            f.flush()


def _ends_mid_line(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"
