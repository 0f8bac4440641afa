"""Thin, typed gRPC client for the ACE-Step Triton deployment.

Imports only ``tritonclient[grpc]``, ``numpy`` and ``soundfile`` so users can install it alone.
The request schema (``acestep_client.params``) is shared by client, server and front end.
"""

__version__ = "0.1.0"
