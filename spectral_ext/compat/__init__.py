"""Drop-in call shapes of the tools users run today (../shared/PEERS.md), computed
by spectral_ext: change one import, get the same numbers.

Submodules (import the one you need): ``weightwatcher`` (WeightWatcher 0.7.7),
``svr`` (the SVR authors' class), ``torch_cka`` (torch-cka 0.21), ``pytorch_cka``
(pytorch-cka 1.1.3), ``pot`` (POT's Sinkhorn solvers), ``modelsym`` (the seed 004
authors' measures)."""
