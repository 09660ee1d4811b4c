"""rnnkern: fused C++ kernels for recurrent networks under PyTorch.

The forward pass and the whole backpropagation through time of an Elman RNN,
an LSTM or a GRU each run as one kernel call, with variable lengths and truncated BPTT built in;
rnn_loss / RNNLoss fuse a linear head and a per-step loss into the same calls.
"""

from . import functional, reference
from ._details import RNNLossDetails
from ._ops import cache_info, cpu_capability, empty_cache, gemm_backend
from .check import gradcheck
from .loss import RNNLoss
from .modules import GRU, LSTM, RNN

import torch as _torch

# Whole-model checkpoints (torch.save(model), then torch.load with the default
# weights_only=True) must load as they do for torch.nn's own modules: every
# module class rnnkern defines is an allowed global once rnnkern is imported.
_torch.serialization.add_safe_globals([RNN, LSTM, GRU, RNNLoss])

__all__ = ["RNN", "LSTM", "GRU", "RNNLoss", "RNNLossDetails", "functional", "reference", "cpu_capability",
           "gemm_backend", "empty_cache", "cache_info", "gradcheck"]
__version__ = "0.1.0"
