"""Drop-in call shapes of the tools users run today (their conventions, read in the peers' code), computed
by spectral_ext: change one import, get the same numbers.

Submodules (import the one you need): ``weightwatcher`` (WeightWatcher 0.7.7),
``svr`` (the SVR authors' class), ``torch_cka`` (torch-cka 0.21), ``pytorch_cka``
(pytorch-cka 1.1.3), ``pot`` (POT's Sinkhorn solvers, emd, emd2, barycenter),
``modelsym`` (the seed 004 authors' measures),
``repsim`` (repsim 0.1.5's M x M measures), ``rsatoolbox`` (rsatoolbox 0.3.2's calc_rdm and
compare), ``netrep`` (netrep's LinearMetric, PermutationMetric and pairwise_distances).
scipy's linear_sum_assignment call shape is spectral_ext.linear_sum_assignment itself."""
