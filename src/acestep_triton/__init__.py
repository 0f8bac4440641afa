"""ACE-Step v1 music generation served on NVIDIA Triton Inference Server.

The package holds the model code (state-dict compatible with ``ACE-Step/ACE-Step-v1-3.5B``),
the backend-agnostic sampling core, the in-process reference pipeline, the export stage and
the serving glue. The torch-free request schema and gRPC client live in ``acestep_client``.
"""

__version__ = "0.1.0"
