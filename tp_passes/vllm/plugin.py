"""`vllm.general_plugins` entry point.

Not implemented yet (tracked by the vLLM integration issue): `register()` only checks
that it is safe to call, so declaring the entry point changes nothing in vLLM.
"""


def register() -> None:
    """Called by vLLM in every process; idempotent and currently a no-op."""
