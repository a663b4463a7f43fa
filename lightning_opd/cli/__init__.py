"""The tools around experiments: the `lightning-opd` command line and what its subcommands run
(`align`: coverage of tokenizer pairs, `ablate` + `report`: ablation runs and their tables,
`bench`: timings). Nothing in the training core imports from here."""

from lightning_opd.cli.main import main

__all__ = ["main"]
