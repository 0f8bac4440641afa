"""Thin, typed gRPC client for the ACE-Step Triton deployment.

Imports only ``tritonclient[grpc]``, ``numpy`` and ``soundfile`` so users can install it alone.
The request schema (``acestep_client.params``) is shared by client, server and front end.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "AceStepClient": "client",
    "AccessDenied": "client",
    "GenerationResult": "result",
    "ServerError": "client",
    "ServerUnavailable": "client",
    "GenerationCancelled": "client",
    "GenerationTimeout": "client",
    "InvalidRequest": "client",
    "RetryPolicy": "retry",
    "NO_RETRY": "retry",
    "ErrorCategory": "errors",
    "GenerationParams": "params",
    "ParamError": "params",
}


def __getattr__(name: str) -> object:
    """Lazy re-exports: the server imports only the schema and must not load tritonclient."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
