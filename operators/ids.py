"""Stable row ids: the same inputs give the same id in every run (lineage and resume key on them)."""

from __future__ import annotations

import hashlib
import json


def stable_id(prefix: str, *parts: object) -> str:
    payload = json.dumps(parts, ensure_ascii=False, sort_keys=True, default=str)
    return f"{prefix}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"
