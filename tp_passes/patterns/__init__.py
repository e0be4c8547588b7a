"""One file per rewrite family: matcher, replacement (traced from `tp_passes.comm`), eager twin."""
