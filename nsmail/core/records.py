"""Strict JSON records: one object in a bounded datagram with exactly a dataclass's fields.

What a less trusted process sends to root (a worker's status reports, its hand-off
requests) is decoded here first. Pure. Security: `fields_of` runs as root on bytes a
tenant may control: bounded, and raising nothing but the caller's error class.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


def fields_of(
    data: bytes, limit: int, record: type[DataclassInstance], error: type[ValueError]
) -> dict[str, Any]:
    """The fields of `data`, one JSON object (ASCII, at most `limit` bytes) holding exactly
    the fields of the dataclass `record`; `error` when it is anything else."""
    if len(data) > limit:
        raise error(f"{len(data)} bytes, more than {limit}")
    try:
        found = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"not JSON: {e}") from None
    if not isinstance(found, dict) or set(found) != {field.name for field in fields(record)}:
        raise error("fields missing or unknown")
    return found
