"""Every user-facing failure in qlab is a QlabError.

Messages name the file, tensor or field that was wrong and what was expected, so a
user never has to read a traceback from deep inside torch or numpy.
"""


class QlabError(Exception):
    """Base class for all errors qlab reports to users."""


class ConfigError(QlabError):
    """A configuration value, preset name, CLI flag or environment variable is invalid."""


class DataError(QlabError):
    """A shard, corpus, tokenizer or token stream is missing, corrupt or inconsistent."""


class CheckpointError(QlabError):
    """A checkpoint file or run directory is missing, corrupt, unsafe or unreadable."""


class ArtifactError(QlabError):
    """A compressed artifact is corrupt, truncated, tampered with or over budget."""


class QuantError(QlabError):
    """A quantizer got input it cannot handle (shape, NaN/Inf, bad bit width, …)."""


class NumericalError(QlabError):
    """A numerical procedure failed (e.g. a Cholesky factorisation that never succeeded)."""


class NotebookError(QlabError):
    """A notebook cell raised: the cell, the error's last line, and where the run was written."""
