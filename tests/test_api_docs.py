"""docs/api.md is what docs/build_api.py writes from the code today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _builder():
    spec = importlib.util.spec_from_file_location("build_api", DOCS / "build_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_api_reference_is_up_to_date():
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    assert text == _builder().render(), "docs/api.md is stale: run `python docs/build_api.py`"


def test_the_reference_lists_the_public_entry_points():
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    for name in ("EvalContext", "quantize_checkpoint", "run_pipeline", "marginal_table", "rate_frontier",
                 "choose_settings", "load_state_dict", "gptq_quantize_many"):  # fmt: skip
        assert f"`{name}(" in text, name
    assert "## `qlab.cli" not in text  # the CLI is documented by --help
