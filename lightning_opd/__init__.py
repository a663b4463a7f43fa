"""lightning_opd: on-policy distillation across tokenizers (see the README's architecture).

The aligner package is imported first: importing it registers every aligner, and the aligner
name check that `config.validate` runs (config itself imports no aligner).
"""

from lightning_opd import align  # noqa: F401
