"""lightning_opd: on-policy distillation across tokenizers (see the README's architecture).

The aligner and data packages are imported first: importing them registers every aligner and
task, and the name checks that `config.validate` runs (config itself imports neither).
"""

from lightning_opd import align, data  # noqa: F401
