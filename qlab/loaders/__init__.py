"""Reading checkpoints of every kind: the top of the data path.

* :mod:`.readers` — :func:`detect_format`, :func:`iter_tensors`, :func:`load_state_dict`
  for qlab runs, safetensors, Hugging Face directories, torch state dicts, ``.ptz`` and
  ``.qlab`` artifacts (each tensor validated, memory bounded);
* :mod:`.models` — :func:`load_model` (a run directory's GPT), :func:`save_quantized` /
  :func:`load_quantized` (a quantized model as a ``.qlab`` artifact and back).

Everything below (``io``, ``data``, ``model``, ``quant``, ``compress``) stays ignorant of
this package; everything above (``eval``, ``train``, ``analysis``, the CLI) loads through it.
"""

from qlab.loaders.models import LoadedArtifact, load_model, load_quantized, save_quantized
from qlab.loaders.readers import detect_format, iter_tensors, load_state_dict

__all__ = [
    "detect_format",
    "iter_tensors",
    "load_state_dict",
    "load_model",
    "save_quantized",
    "load_quantized",
    "LoadedArtifact",
]
