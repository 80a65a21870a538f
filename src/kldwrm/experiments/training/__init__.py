"""One training run: its configuration, the loop, its files (imports only :mod:`..data`).

- :mod:`.train`: the session, :func:`~.train.train` and bit-exact resume;
- :mod:`.config`: :class:`~.config.TrainConfig`, validation and the builders of a run;
- :mod:`.metrics`: losses, the evaluation of the two test views, ``metrics.csv``;
- :mod:`.status`: where a run stands, in memory and on disk;
- :mod:`.checkpoint`: atomic files, checkpoints with a fallback to the previous one;
- :mod:`.interrupt`: stopping at a step boundary (Ctrl-C, agreed by every rank);
- :mod:`.ranks`: the collectives of a data-parallel run.
"""
