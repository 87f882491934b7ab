"""prefsynth: prompts in; responses, judge ratings, chosen/rejected pairs and a card out.

The public functions that need no model: ``parse_ratings`` (a judge's UltraFeedback answer to
one rating per text) and ``verify_constraints`` (IFEval instruction checks). The pipeline is
``prefsynth.core.pipeline.run(prefsynth.config.load_config(path))`` or the ``prefsynth`` command.
"""

from prefsynth.stages.constraints.verifier import verify_constraints
from prefsynth.stages.judge.parse import parse_ratings

__version__ = "0.1.0"

__all__ = ["__version__", "parse_ratings", "verify_constraints"]
