"""``python -m kldwrm ...``: the ``kldwrm`` command line (see :mod:`kldwrm.experiments.cli`)."""

from kldwrm.experiments.cli import main

raise SystemExit(main())
