"""IFEval-style instruction constraints: the verifier and its 25 checks."""

from prefsynth.stages.constraints.verifier import verify_constraints

__all__ = ["verify_constraints"]
