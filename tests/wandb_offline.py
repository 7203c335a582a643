"""Read back what wandb wrote offline: the history rows of a ``run-<id>.wandb`` file.

wandb 0.31 ships no Python reader for its transaction log (the Go core writes it; the old
``wandb.sdk.internal.datastore`` is gone), so the tests read it here: the LevelDB log framing wandb
uses (a 7-byte ``:W&B`` header, 32 KiB blocks, records of a 7-byte header and a payload that may span
blocks) around ``wandb_internal_pb2.Record`` protobufs, which wandb does ship.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

HEADER = b":W&B"
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path):
    """The protobuf Records of a .wandb file, in order; a checksum mismatch is an error."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != HEADER:
        raise ValueError(f"{path}: not a wandb transaction log (header {data[:7]!r})")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += room
            continue
        if zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{path}: bad record checksum at byte {pos}")
        pos += 7 + length
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def history(path: str | Path) -> list[dict]:
    """Every ``run.log`` row: ``{"_step": step, key: value, ...}`` (values decoded from JSON)."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row = {"_step": record.history.step.num}
            for item in record.history.item:
                key = item.key or ".".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows
