"""rnnkern: fused C++ kernels for recurrent networks under PyTorch.

The forward pass and the whole backpropagation through time of an Elman RNN
each run as one kernel call, with variable lengths and truncated BPTT built in;
rnn_loss / RNNLoss fuse a linear head and a per-step loss into the same calls.
"""

from . import functional, reference
from ._details import RNNLossDetails
from ._ops import cpu_capability
from .check import gradcheck
from .loss import RNNLoss
from .modules import RNN

__all__ = ["RNN", "RNNLoss", "RNNLossDetails", "functional", "reference", "cpu_capability",
           "gradcheck"]
__version__ = "0.1.0"
