"""vLLM integration (plugin and vLLM graph dialects)."""
