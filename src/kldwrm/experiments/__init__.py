"""Experiments: data, models, the training loop, the paper's protocol, reports and the CLI.

Modules (imported on demand, so ``import kldwrm`` stays light):

- :mod:`~kldwrm.experiments.data`: MNIST / Fashion-MNIST from the IDX files (MD5-verified),
  a synthetic regression set, an in-memory batch iterator.
- :mod:`~kldwrm.experiments.models`: ``paper_cnn`` (DESIGN section 4), ``mlp``,
  ``resnet_small``, ``regression_mlp``, ``build_model``.
- :mod:`~kldwrm.experiments.train`: ``train`` with per-epoch metrics CSV, atomic
  ``weights_only`` checkpoints and bit-exact resume.
- :mod:`~kldwrm.experiments.reproduce`: the Table 1 protocol and parallel sweeps.
- :mod:`~kldwrm.experiments.report`: Table 1, Figures 1-2, time to 98% accuracy.
- :mod:`~kldwrm.experiments.cli`: the ``kldwrm`` command (``python -m kldwrm``).
"""
