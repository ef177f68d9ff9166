"""The papers' own published numbers (one module per paper) as tidy DataFrames, in qlab's measurement schema.

The data ship with the package under ``qlab/resources/papers/<pr>/``: PR #2011's JSON
tables and PR #1394's logs + ``submission.json`` verbatim, plus small CSV/JSON files
transcribed from the PR texts (each row cites its source). Every loader takes an
optional ``root`` (a directory laid out like ``resources/papers``) so tests and users
can point it at other copies; missing files, missing keys and non-finite numbers raise
:class:`~qlab.errors.DataError` naming the file and field.

Schema notes (so paper rows and qlab rows can share one DataFrame):

* ``source`` is ``"paper:pr<N>"`` here and ``"qlab"`` for qlab's own measurements.
* ``variant`` is the cell/model name; ``stage`` uses the names records log
  (:data:`STAGES`); bpb columns end in ``_bpb``, milli-bpb differences in ``_mbpb``.
* PR #2011 stores the mean |cos(hᵢ, hⱼ)| anisotropy under the key ``isoscore``; qlab
  calls that quantity ``mean_abs_cos`` (``isoscore`` is the Rudman IsoScore there, see
  :mod:`qlab.analysis.geometry`), so the loaders rename ``isoscore`` →
  ``mean_abs_cos`` and ``isoscore_post`` → ``mean_abs_cos_post``.
* Depth blocks are 0-based like ``blocks.{i}`` (the paper's figure counts from 1).
"""

from qlab.analysis.papers._files import papers_dir
from qlab.analysis.papers.pr639 import pr639_results
from qlab.analysis.papers.pr1394 import pr1394_published_table, pr1394_seeds, pr1394_train_curve
from qlab.analysis.papers.pr1718 import pr1718_levers
from qlab.analysis.papers.pr1818 import pr1818_baseline_bpb, pr1818_seeds, pr1818_summary
from qlab.analysis.papers.pr2011 import (
    REGULARIZERS,
    canonical_metrics,
    cka_pairwise,
    depth_trajectory,
    eval_pipeline_breakdown,
    parse_cell,
    pipeline_attribution,
    pr2011_baselines,
    reg_deltas,
    reg_quant_matrix,
    stage_attribution,
    with_deltas,
)
from qlab.eval.stages import STAGE_LABELS, STAGES

__all__ = [
    "REGULARIZERS",
    "STAGES",
    "STAGE_LABELS",
    "papers_dir",
    "parse_cell",
    "pipeline_attribution",
    "eval_pipeline_breakdown",
    "stage_attribution",
    "with_deltas",
    "pr2011_baselines",
    "reg_deltas",
    "reg_quant_matrix",
    "canonical_metrics",
    "cka_pairwise",
    "depth_trajectory",
    "pr1394_seeds",
    "pr1394_published_table",
    "pr1394_train_curve",
    "pr1818_seeds",
    "pr1818_summary",
    "pr1818_baseline_bpb",
    "pr1718_levers",
    "pr639_results",
]
