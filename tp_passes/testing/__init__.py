"""Test and demo scaffolding: real gloo ranks in spawned CPU processes (`run_ranks`) and a
reference tensor-parallel Llama (`tp_passes.testing.models`). Not used by the rewrites."""

from tp_passes.testing.ranks import RankFailure, free_port, run_ranks

__all__ = ["RankFailure", "free_port", "run_ranks"]
