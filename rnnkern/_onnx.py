"""torch.onnx.export: each layer and direction as ONNX's own RNN, GRU or LSTM
operator, as torch.nn's recurrent modules export.

The exporter (``torch.onnx.export(..., dynamo=True)``, the default) traces the
model with torch.export, where rnnkern's ops would stay opaque custom ops that
ONNX has no translation for. While it traces, each layer therefore emits the
ONNX operator instead (``torch.onnx.ops.symbolic_multi_out``), with the
weights in ONNX's gate order, ``sequence_lens`` from ``lengths`` and
``direction`` from ``reverse``: ONNX's operators have PyTorch's semantics for
all of these (GRU with ``linear_before_reset=1``; padded steps are 0, the
reverse direction starts at each sequence's last valid step). Training-only
arguments (truncate) do not change the forward and are dropped.

Refused by name: the LSTM's projection (ONNX's LSTM has none; nn.LSTM's
fails too), the TorchScript-based exporter (``dynamo=False``), a
PackedSequence input (its batch sizes are data; ``lengths=`` exports) and
``rnn_loss`` (a training loss). The kernels' op does not run on this path,
so the callers make its checks through ``check``, in its words.

The ONNXProgram's own ExportedProgram holds the ONNX operators, whose torch
implementation is a placeholder (zeros): run the ONNX model, not
``onnx_program.exported_program``, and ``verify=True`` compares against those
placeholders. An ExportedProgram made beforehand (``torch.export.export``)
holds rnnkern's ops, for which ONNX has no translation: export the module.
"""

from __future__ import annotations

import sys

import torch


def exporting(x) -> bool:
    """True while torch.onnx.export traces this call (x: the call's input).

    The exporter's flag is the process's, set for the whole export, so the
    call must also be one being traced (x a fake tensor, or under Dynamo, the
    exporter's strict fallback): an eager call in another thread meanwhile
    runs the kernels. The flag is read as an attribute, which Dynamo reads
    too (it folds is_in_onnx_export() to False, and that function imports at
    each call); where torch.onnx was never imported the check is one dict
    lookup. The TorchScript exporter traces with torch.jit.trace."""
    if "torch.onnx" not in sys.modules:
        return False
    if torch.jit.is_tracing():
        return sys.modules["torch.onnx"].is_in_onnx_export()
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    if not getattr(flags, "_is_onnx_exporting", False):
        return False
    if torch.compiler.is_dynamo_compiling():
        return True
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(x, FakeTensor)


# PyTorch's gate blocks in ONNX's order: LSTM (i, f, g, o) -> (i, o, f, c=g),
# GRU (r, z, n) -> (z, r, h).
_GATE_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "rnn_tanh": (0,), "rnn_relu": (0,)}


def _onnx_gates(w: torch.Tensor, mode: str) -> torch.Tensor:
    order = _GATE_ORDER[mode]
    blocks = w.chunk(len(order), 0)
    return torch.cat([blocks[i] for i in order], 0)


def check(op: str, checks, *args) -> None:
    """The op's own argument checks, which the op cannot make on this path (it
    does not run): their mirror in rnnkern._checks (the one the reference
    runs), with the op's name before the words, so that an export refuses a
    call with the error the eager call gets."""
    try:
        checks(*args)
    except (TypeError, ValueError, RuntimeError) as e:
        if type(e) not in (TypeError, ValueError, RuntimeError):
            raise  # torch's own (a guard, say), not a check's
        raise type(e)(f"{op}: {e}") from None


def layer(mode: str, x, hx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths,
          reverse: bool):
    """One layer, one direction, time-major, as an ONNX operator: x [T,B,I],
    hx the cell's state (the LSTM's (h_0, c_0)) or None -> (output [T,B,H],
    h_n [B,H], c_n [B,H] for the LSTM, else None)."""
    if torch.jit.is_tracing():
        raise RuntimeError(
            "rnnkern exports to ONNX with torch.onnx.export(..., dynamo=True), the default "
            "exporter; the TorchScript-based one (dynamo=False) is not supported")
    if weight_hr is not None:
        raise RuntimeError("an LSTM with proj_size cannot be exported to ONNX: ONNX's LSTM has "
                           "no projection (torch.nn.LSTM's fails too)")
    onnx = sys.modules["torch.onnx"]
    if not hasattr(onnx, "ops"):
        raise RuntimeError(f"rnnkern's ONNX export needs torch >= 2.8 (torch.onnx.ops), "
                           f"got {torch.__version__}")
    H = weight_hh.shape[1]
    T, B = x.shape[0], x.shape[1]
    W = _onnx_gates(weight_ih, mode)[None]  # [1, G, I]
    R = _onnx_gates(weight_hh, mode)[None]  # [1, G, H]
    if bias_ih is None and bias_hh is None:
        bias = None
    else:
        b_ih = bias_ih if bias_ih is not None else weight_ih.new_zeros(weight_ih.shape[0])
        b_hh = bias_hh if bias_hh is not None else weight_ih.new_zeros(weight_ih.shape[0])
        bias = torch.cat([_onnx_gates(b_ih, mode), _onnx_gates(b_hh, mode)])[None]  # [1, 2G]
    seq = None if lengths is None else lengths.to(device=x.device, dtype=torch.int32)
    if mode == "lstm":
        h0, c0 = (None, None) if hx is None else (hx[0][None], hx[1][None])
        inputs = [x, W, R, bias, seq, h0, c0]
    else:
        inputs = [x, W, R, bias, seq, None if hx is None else hx[None]]
    attrs = {"hidden_size": int(H), "direction": "reverse" if reverse else "forward"}
    if mode == "gru":
        attrs["linear_before_reset"] = 1
    elif mode != "lstm":
        attrs["activations"] = ["Tanh" if mode == "rnn_tanh" else "Relu"]
    op = {"lstm": "LSTM", "gru": "GRU"}.get(mode, "RNN")
    n_out = 3 if mode == "lstm" else 2
    outputs = onnx.ops.symbolic_multi_out(
        op, inputs, attrs, dtypes=[x.dtype] * n_out,
        shapes=[(T, 1, B, H)] + [(1, B, H)] * (n_out - 1))
    y, h_n = outputs[0][:, 0], outputs[1][0]  # [T,B,H], [B,H]
    c_n = outputs[2][0] if mode == "lstm" else None
    if hx is not None and seq is not None:
        # ONNX's final state of an empty sequence is 0; rnnkern's (as its
        # eager kernels') is the initial state.
        empty = (seq == 0)[:, None]
        if mode == "lstm":
            h_n, c_n = torch.where(empty, hx[0], h_n), torch.where(empty, hx[1], c_n)
        else:
            h_n = torch.where(empty, hx, h_n)
    return y, h_n, c_n
