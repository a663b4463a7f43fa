"""`lightning-opd align`: alignment coverage of a tokenizer pair on a JSONL file (placeholder)."""

from __future__ import annotations

import argparse


def add_align_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file")


def run_align(args: argparse.Namespace) -> int:
    raise SystemExit("lightning-opd align: not implemented yet")
