"""Experiments: data, models, the training loop, the paper's protocol, reports and the CLI.

Modules (imported on demand, so ``import kldwrm`` stays light):

- :mod:`~kldwrm.experiments.data`: MNIST / Fashion-MNIST from the IDX files (MD5-verified,
  :mod:`~kldwrm.experiments.idx`),
  synthetic regression sets (``sincos``: the QE tests' eq. 35 task), a batch iterator.
- :mod:`~kldwrm.experiments.models`: ``paper_cnn`` (DESIGN section 4), ``mlp``,
  ``resnet_small``, ``regression_mlp``, ``sincos_mlp``, ``build_model``.
- Training one run: :mod:`~kldwrm.experiments.train` (the session and ``train``),
  :mod:`~kldwrm.experiments.config` (configuration, validation, builders),
  :mod:`~kldwrm.experiments.metrics` (losses, evaluation of the two test views, the metrics
  CSV), :mod:`~kldwrm.experiments.status` (where a run stands),
  :mod:`~kldwrm.experiments.checkpoint` (atomic files, checkpoints with a fallback),
  :mod:`~kldwrm.experiments.interrupt` (Ctrl-C), :mod:`~kldwrm.experiments.ranks`
  (data-parallel helpers).
- Many runs: :mod:`~kldwrm.experiments.protocol` (the paper's protocol, the released
  code's quirks, the tasks) and :mod:`~kldwrm.experiments.reproduce` (parallel sweeps).
- Reading results: :mod:`~kldwrm.experiments.runs` (what the runs say),
  :mod:`~kldwrm.experiments.stats` and :mod:`~kldwrm.experiments.claims` (tests of the
  paper's claims), :mod:`~kldwrm.experiments.figures`, :mod:`~kldwrm.experiments.tables`
  and :mod:`~kldwrm.experiments.report` (Table 1, figures, time to accuracy).
- :mod:`~kldwrm.experiments.timing`: the quick interleaved step-time check of ``compare``.
- :mod:`~kldwrm.experiments.cli`: the ``kldwrm`` command (``python -m kldwrm``), with its
  parser in :mod:`~kldwrm.experiments.arguments` and its progress bars in
  :mod:`~kldwrm.experiments.progress`.
"""
