"""`python -m lightning_opd.cli ...` = `lightning-opd ...`."""

import sys

from lightning_opd.cli.main import main

sys.exit(main())
