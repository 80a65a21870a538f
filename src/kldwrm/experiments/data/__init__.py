"""What a training run is given: data sets and models (imports nothing of the experiments).

- :mod:`.datasets`: :func:`~.datasets.load_dataset` (MNIST, Fashion-MNIST, synthetic
  regression sets), the standardisation constants, :func:`~.datasets.iterate_batches`;
- :mod:`.idx`: the IDX files: located, MD5-verified, parsed, cached;
- :mod:`.models`: the networks and :func:`~.models.build_model`.
"""
