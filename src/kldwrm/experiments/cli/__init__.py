"""The ``kldwrm`` command line (``python -m kldwrm``; the console script is ``cli:main``).

- :mod:`.commands`: the sub-commands (train, compare, reproduce, report) and :func:`main`;
- :mod:`.arguments`: the parser and its value types;
- :mod:`.progress`: the progress bars and per-epoch lines.

The top of the import chain (``cli → study → training → data``): nothing imports it.
"""

from .commands import main

__all__ = ["main"]
