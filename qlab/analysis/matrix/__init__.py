"""The reg × quant matrix builder (PR #2011's experiment, made resumable, shardable and seed-aware).

A grid spec names training bases, regularizer variants (singles and pairs, plus the
no-regularizer control), seeds and quantization schemes; every (base, variant, seed) cell
is trained once and measured under every weight policy and hidden-state scheme.

* :mod:`.spec` — spec files (TOML/YAML), cells, ids, sharding;
* :mod:`.measure` — what a cell measures on its trained model;
* :mod:`.runner` — training, measurement and atomic per-cell results with resume;
* :mod:`.results` — merged tidy tables in the papers' schema;
* :mod:`.stats` — mean ± std over seeds, paired tests vs the control, sign and λ tables.

Full-scale use is documented in ``qlab/resources/matrix/full_8xh100.toml``.
"""

from qlab.analysis.matrix.results import MatrixResults, collect_results, merge_results, read_cell
from qlab.analysis.matrix.runner import cell_result_path, run_cell, run_matrix, with_overrides
from qlab.analysis.matrix.spec import (
    CONTROL,
    BaseSpec,
    Cell,
    EvalSpec,
    MatrixSpec,
    Variant,
    cell_at,
    load_spec,
    parse_shard,
    parse_variant,
    plan_cells,
    shard_cells,
    spec_from_dict,
)
from qlab.analysis.matrix.stats import (
    lambda_budget,
    paired_deltas,
    paired_test,
    reg_deltas,
    seed_summary,
    sign_table,
)

__all__ = [
    "CONTROL",
    "BaseSpec",
    "Cell",
    "EvalSpec",
    "MatrixResults",
    "MatrixSpec",
    "Variant",
    "cell_at",
    "cell_result_path",
    "collect_results",
    "lambda_budget",
    "load_spec",
    "merge_results",
    "paired_deltas",
    "paired_test",
    "parse_shard",
    "parse_variant",
    "plan_cells",
    "read_cell",
    "reg_deltas",
    "run_cell",
    "run_matrix",
    "seed_summary",
    "shard_cells",
    "sign_table",
    "spec_from_dict",
    "with_overrides",
]
