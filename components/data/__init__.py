"""Datasets: registry of sources (elpv, folder, synthetic), preparation into sharded Parquet."""
from components.data.images import ImageDecodeError, decode_image, encode_png
from components.data.prepare import CorruptDataError, load_report, prepare_dataset
from components.data.shards import read_shards, shard_files, write_shards
from components.data.sources import get_source, list_sources

__all__ = ["ImageDecodeError", "decode_image", "encode_png", "CorruptDataError", "load_report", "prepare_dataset",
           "read_shards", "shard_files", "write_shards", "get_source", "list_sources"]
