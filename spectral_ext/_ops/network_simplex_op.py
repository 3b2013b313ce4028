"""network_simplex: exact optimal transport by the network simplex (CPU
kernel). Its wrapper is compat.pot's emd / emd2 (POT's call shapes); here is
the fake kernel."""
from __future__ import annotations

import torch


# ---------------------------------------------------------------- fake kernel

@torch.library.register_fake("spectral_ext::network_simplex")
def _network_simplex_fake(M, a, b, max_iter=100000, u0=None, v0=None):
    B, n, m = M.shape
    counts = M.new_empty(B, dtype=torch.int64)
    return M.new_empty(B, n, m), M.new_empty(B, n), M.new_empty(B, m), M.new_empty(B), counts, counts.clone()
