"""prefsynth: prompts in; responses, judge ratings, chosen/rejected pairs and a card out.

The public functions that need no model: ``parse_ratings`` (a judge's UltraFeedback answer to
one rating per text) and ``verify_constraints`` (IFEval instruction checks). The pipeline is
``prefsynth.core.pipeline.run(prefsynth.config.load_config(path))`` or the ``prefsynth`` command.
Both functions are imported on first use (PEP 562), so ``import prefsynth.cli`` pays for
neither before a run's first request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefsynth.stages.constraints.verifier import verify_constraints
    from prefsynth.stages.judge.parse import parse_ratings

__version__ = "0.1.0"

_LAZY = {
    "parse_ratings": "prefsynth.stages.judge.parse",
    "verify_constraints": "prefsynth.stages.constraints.verifier",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'prefsynth' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = ["__version__", "parse_ratings", "verify_constraints"]
