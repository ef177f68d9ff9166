"""Data layer: token shards, loaders, tokenizers + byte tables, corpora, FineWeb."""

from qlab.data.corpus import (
    build_dataset,
    build_from_folder,
    default_dataset,
    embedded_documents,
    read_folder_documents,
)
from qlab.data.dataset import DatasetInfo, open_dataset
from qlab.data.fineweb import download_fineweb
from qlab.data.loader import ShuffledSequenceLoader, load_validation_tokens
from qlab.data.shards import read_shard, read_shard_header, write_shard
from qlab.data.tokenizer import (
    ByteTables,
    build_byte_tables,
    load_tokenizer,
    token_bytes,
    train_tokenizer,
)

__all__ = [
    "ByteTables",
    "DatasetInfo",
    "ShuffledSequenceLoader",
    "build_byte_tables",
    "build_dataset",
    "build_from_folder",
    "default_dataset",
    "download_fineweb",
    "embedded_documents",
    "load_tokenizer",
    "load_validation_tokens",
    "open_dataset",
    "read_folder_documents",
    "read_shard",
    "read_shard_header",
    "token_bytes",
    "train_tokenizer",
    "write_shard",
]
