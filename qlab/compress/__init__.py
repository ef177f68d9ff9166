"""Codecs, qlab's artifact container, Parameter Golf ``.ptz`` files, entropy estimates
and brotli-11 size prediction."""

from qlab.compress.ans import ans_decode, ans_encode
from qlab.compress.codecs import Codec, available_codecs, get_codec
from qlab.compress.container import read_artifact, write_artifact
from qlab.compress.entropy import entropy_bits, order0_entropy, order1_entropy, row_entropy
from qlab.compress.predict import measure_compressed_bytes, predict_compressed_bytes, predict_table
from qlab.compress.ptz import read_ptz, write_ptz
from qlab.compress.shuffle import shuffle, unshuffle

__all__ = [
    "Codec",
    "ans_decode",
    "ans_encode",
    "available_codecs",
    "entropy_bits",
    "get_codec",
    "measure_compressed_bytes",
    "order0_entropy",
    "order1_entropy",
    "predict_compressed_bytes",
    "predict_table",
    "read_artifact",
    "read_ptz",
    "row_entropy",
    "shuffle",
    "unshuffle",
    "write_artifact",
    "write_ptz",
]
