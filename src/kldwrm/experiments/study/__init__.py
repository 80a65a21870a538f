"""Many runs and what they say (imports :mod:`..training` and :mod:`..data`, never :mod:`..cli`).

- :mod:`.protocol`: the paper's protocol, the released code's quirks, the named tasks;
- :mod:`.reproduce`: sweeps of runs in parallel workers, and the short comparisons;
- :mod:`.timing`: the quick interleaved step-time check of ``kldwrm compare``;
- :mod:`.runs`: run directories and the statistics they give per solver;
- :mod:`.stats` and :mod:`.claims`: the two-sample tests of the paper's claims;
- :mod:`.tables`, :mod:`.figures` and :mod:`.report`: Table 1, time to accuracy, Figures 1-2.
"""
