"""Datasets: registry of sources (elpv, folder, synthetic), preparation into sharded Parquet.

The names below are imported lazily, so ``components.data.images`` (numpy and Pillow only) can be
used where pandas, pyarrow and scikit-learn are not installed: the edge runtime (``resops edge``).
"""
_LAZY = {"ImageDecodeError": "images", "decode_image": "images", "encode_png": "images",
         "CorruptDataError": "prepare", "load_report": "prepare", "prepare_dataset": "prepare",
         "read_shards": "shards", "shard_files": "shards", "write_shards": "shards",
         "get_source": "sources", "list_sources": "sources"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"components.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'components.data' has no attribute {name!r}")
