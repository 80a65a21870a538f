"""Experiments: data, models, the training loop, the paper's protocol, reports and the CLI.

Four subpackages, each importing only from those listed after it (``cli → study →
training → data``, never back), and none imported here, so ``import kldwrm`` stays light:

- :mod:`~kldwrm.experiments.cli`: the ``kldwrm`` command (``python -m kldwrm``):
  :mod:`~kldwrm.experiments.cli.commands` (the sub-commands and ``main``), its parser in
  :mod:`~kldwrm.experiments.cli.arguments` and its progress bars in
  :mod:`~kldwrm.experiments.cli.progress`.
- :mod:`~kldwrm.experiments.study`: many runs and what they say.
  :mod:`~kldwrm.experiments.study.protocol` (the paper's protocol, the released code's
  quirks, the tasks) and :mod:`~kldwrm.experiments.study.reproduce` (parallel sweeps);
  :mod:`~kldwrm.experiments.study.runs` (what the runs say),
  :mod:`~kldwrm.experiments.study.stats` and :mod:`~kldwrm.experiments.study.claims`
  (tests of the paper's claims), :mod:`~kldwrm.experiments.study.figures`,
  :mod:`~kldwrm.experiments.study.tables` and :mod:`~kldwrm.experiments.study.report`
  (Table 1, figures, time to accuracy); :mod:`~kldwrm.experiments.study.timing` (the quick
  interleaved step-time check of ``compare``).
- :mod:`~kldwrm.experiments.training`: one training run.
  :mod:`~kldwrm.experiments.training.train` (the session and ``train``),
  :mod:`~kldwrm.experiments.training.config` (configuration, validation, builders),
  :mod:`~kldwrm.experiments.training.metrics` (losses, evaluation of the two test views,
  the metrics CSV), :mod:`~kldwrm.experiments.training.status` (where a run stands),
  :mod:`~kldwrm.experiments.training.checkpoint` (atomic files, checkpoints with a
  fallback), :mod:`~kldwrm.experiments.training.interrupt` (Ctrl-C) and
  :mod:`~kldwrm.experiments.training.ranks` (data-parallel helpers).
- :mod:`~kldwrm.experiments.data`: what a run trains on and what it trains.
  :mod:`~kldwrm.experiments.data.datasets`: MNIST / Fashion-MNIST from the IDX files
  (MD5-verified, :mod:`~kldwrm.experiments.data.idx`), synthetic regression sets
  (``sincos``: the QE tests' eq. 35 task), a batch iterator;
  :mod:`~kldwrm.experiments.data.models`: ``paper_cnn`` (DESIGN section 4), ``mlp``,
  ``resnet_small``, ``regression_mlp``, ``sincos_mlp``, ``build_model``.
"""
