"""Credentials: the optional inference key and the admin key, shared by server, client and front end.

Two secrets, both off by default (the demo stays two commands):

* the **API key** (``ACESTEP_API_KEY``) guards inference. ``acestep-triton serve --api-key``
  restricts Triton's ``inference`` protocol (gRPC and HTTP) to requests carrying the header
  :data:`API_KEY_HEADER`; Triton itself checks it, before any model sees the request. Over gRPC
  Triton expects restricted-protocol headers prefixed with ``triton-grpc-protocol-``.
* the **admin key** (``ACESTEP_ADMIN_KEY``) guards what changes the server for everybody: the
  model-repository, shared-memory, logging and trace protocols (Triton checks the
  ``acestep-model-control`` header; without a configured key the server makes a random one per
  start, so nobody outside the serving process can use them), and the ``load`` / ``unload`` /
  ``reload`` commands of the runtime LoRA registry, which the ``lora_registry`` model checks
  itself: the client sends the key as the request parameter :data:`ADMIN_KEY_PARAMETER` and the
  model compares it with the ``ACESTEP_ADMIN_KEY`` of its own environment (set by ``serve``).

Errors: Triton refuses a restricted protocol with ``This protocol is restricted, expecting header
...`` and gRPC status UNAVAILABLE, which must not read as "retry later"; :func:`means_refused`
recognises it, and the client raises its never-retried ``AccessDenied``.
"""

from __future__ import annotations

import hmac
import os

API_KEY_ENV = "ACESTEP_API_KEY"
"""Environment variable holding the inference key (server, client and front end read it)."""

ADMIN_KEY_ENV = "ACESTEP_ADMIN_KEY"
"""Environment variable holding the admin key (server and client); inside the server process it
is always set, to the configured key or the per-start secret."""

API_KEY_HEADER = "acestep-api-key"
"""HTTP header carrying the API key (gRPC: :data:`GRPC_HEADER_PREFIX` + this name)."""

ADMIN_HEADER = "acestep-model-control"
"""HTTP header unlocking the admin protocols (gRPC: with :data:`GRPC_HEADER_PREFIX`)."""

GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
"""Prefix Triton's gRPC frontend expects on the header of a restricted protocol."""

ADMIN_KEY_PARAMETER = "acestep_admin_key"
"""Request parameter carrying the admin key to the ``lora_registry`` model."""

RESTRICTED_MARKERS = ("this protocol is restricted", "this api is restricted")
"""How Triton's gRPC / HTTP frontends word a refusal for a missing or wrong header."""


def env_key(name: str) -> str | None:
    """A key from the environment; empty or unset is None (no key)."""
    value = os.environ.get(name, "").strip()
    return value or None


def grpc_headers(api_key: str | None) -> dict[str, str] | None:
    """The gRPC metadata that carries ``api_key`` (None without one)."""
    return {f"{GRPC_HEADER_PREFIX}{API_KEY_HEADER}": api_key} if api_key else None


def means_refused(message: str) -> bool:
    """Whether a Triton error says a restricted protocol's header was missing or wrong."""
    text = message.lower()
    return any(marker in text for marker in RESTRICTED_MARKERS)


def keys_match(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison; no key is ever matched when none is expected or none given."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def check_key(name: str, value: str | None) -> str | None:
    """A configured key as given (None for empty); refuse one with characters a header cannot
    carry, so a misconfiguration fails at start-up instead of refusing every request."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if any(not (32 < ord(c) < 127) for c in value) or any(c in value for c in ",:="):
        raise ValueError(f"{name}: use printable ASCII without spaces, ',', ':' or '=' (it travels in an "
                         "HTTP header and in tritonserver's --*-restricted-* options)")
    if len(value) < 16:
        raise ValueError(f"{name}: at least 16 characters (e.g. `openssl rand -hex 32`)")
    return value
