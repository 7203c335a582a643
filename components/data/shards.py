"""Sharded Parquet storage of encoded images: a few files that DVC versions quickly."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SHARD_GLOB = "part-*.parquet"


def write_shards(df: pd.DataFrame, out_dir: str | os.PathLike, rows_per_shard: int = 512) -> list[str]:
    """Write ``df`` as ``part-00000.parquet``... under ``out_dir``; returns the file names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(SHARD_GLOB):
        old.unlink()
    names = []
    n = max(1, -(-len(df) // rows_per_shard))
    for i in range(n):
        part = df.iloc[i * rows_per_shard:(i + 1) * rows_per_shard]
        name = f"part-{i:05d}.parquet"
        # No dictionary encoding or compression of the image column: PNG is already compressed.
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), out / name,
                       compression="zstd", use_dictionary=["label_name", "split", "source"])
        names.append(name)
    return names


def shard_files(path: str | os.PathLike) -> list[str]:
    """The shard files under ``path`` (absolute: Ray tasks may run in another working directory)
    in a stable order; a clear error when there are none."""
    files = sorted(str(p.resolve()) for p in Path(path).glob(SHARD_GLOB))
    if not files:
        raise FileNotFoundError(f"no {SHARD_GLOB} shards under {path}: run the stage that writes it first")
    return files


def read_shards(path: str | os.PathLike, columns: list[str] | None = None, split: str | None = None) -> pd.DataFrame:
    """Read every shard under ``path`` (optionally one split) into one DataFrame."""
    filters = [("split", "=", split)] if split else None
    table = pq.read_table(shard_files(path), columns=columns, filters=filters)
    return table.to_pandas()
