"""torch.fx symbolic tracing: rnnkern's modules and functions as single nodes.

torch.fx's default tracer keeps torch.nn's modules whole (``is_leaf_module``
looks for a class defined under ``torch.nn``), so an nn.LSTM inside a traced
model is one ``call_module`` node. rnnkern's classes live elsewhere, and the
tracer would run their forward on Proxies, where no argument check can run.
So each entry point puts itself into the graph as one node when a Proxy
reaches it: a module as ``call_module``, as the tracer does for nn's modules,
and a function as ``call_function``, as ``torch.fx.wrap`` does. The traced
GraphModule then calls the module or the function itself, on real tensors.

Outside ``torch.fx`` tracing the check is a call that reads torch.fx's flag
(Dynamo folds it to False).
"""

from __future__ import annotations

import functools

import torch.fx
from torch.fx import _symbolic_trace

# True while torch.fx.symbolic_trace runs (torch.fx's is_fx_tracing, which
# also covers export, logs a warning at its first call). The modules ask it
# before building module_node's arguments.
tracing = getattr(_symbolic_trace, "is_fx_symbolic_tracing",
                  lambda: _symbolic_trace._is_fx_tracing_flag)


def _proxy_in(value):
    """A Proxy among value, a tuple or list of them (PackedSequence, the
    LSTM's (h, c)) or a dict's values, else None."""
    if isinstance(value, torch.fx.Proxy):
        return value
    if isinstance(value, dict):
        value = tuple(value.values())
    if isinstance(value, (tuple, list)):
        for v in value:
            p = _proxy_in(v)
            if p is not None:
                return p
    return None


def tracer_of(args: tuple, kwargs: dict):
    """The torch.fx tracer whose Proxy is among the arguments, or None."""
    if not tracing():
        return None
    p = _proxy_in((args, kwargs))
    return None if p is None else p.tracer


def module_node(module, args: tuple, kwargs: dict):
    """Under a torch.fx trace (a Proxy among the arguments), module(*args,
    **kwargs) as one call_module node of its graph, without the trailing None
    arguments and the None keywords (the call as the user would write it);
    else None."""
    tracer = tracer_of(args, kwargs)
    if tracer is None:
        return None
    if module is tracer.root:
        raise RuntimeError(
            f"torch.fx cannot trace rnnkern.{type(module).__name__} as the root module: trace a "
            f"module that holds it, where it becomes one call_module node (torch.nn's recurrent "
            f"modules cannot be the root either)")
    args = list(args)
    while args and args[-1] is None:
        args.pop()
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return tracer.create_proxy("call_module", tracer.path_of_module(module), tuple(args), kwargs)


def leaf_function(fn):
    """fn, which a torch.fx trace records as one call_function node."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        tracer = tracer_of(args, kwargs)
        if tracer is not None:
            return tracer.create_proxy("call_function", traced, args, kwargs)
        return fn(*args, **kwargs)
    return traced
