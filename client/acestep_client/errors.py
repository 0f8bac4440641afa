"""Error categories: the one vocabulary server and client share for what went wrong.

A decoupled Triton endpoint reports a failed request as a stream response whose only payload
is a message string (gRPC's ``ModelStreamInferResponse.error_message`` has no status code), so
a client cannot tell "bad input, do not retry" from "the server broke, retry" by the transport
alone. The endpoints therefore start every error message with its category in brackets::

    [invalid_argument] audio_duration: 0.05 s is shorter than one latent frame (0.093 s)
    [unavailable] dit_decoder is restarting after its process died; retry the request

and the client maps the category to an exception type (:mod:`acestep_client.client`).
Messages without a tag (older servers, errors raised by Triton itself) parse as ``None``.
"""

from __future__ import annotations

import re
from enum import Enum


class ErrorCategory(str, Enum):
    """What the caller can do about a failed request."""

    INVALID_ARGUMENT = "invalid_argument"
    """The request is wrong (the message names the field): fix it, never retry it as is."""
    UNAVAILABLE = "unavailable"
    """The server could not serve it now (restarting, overloaded, out of memory for the moment):
    safe to retry after a backoff, here or on another replica; nothing was generated."""
    CANCELLED = "cancelled"
    """The request was cancelled (by the caller, or the server shutting down)."""
    INTERNAL = "internal"
    """The server failed unexpectedly: a bug to report; retrying may or may not help."""
    PERMISSION_DENIED = "permission_denied"
    """A credential the operation needs is missing or wrong (the admin key of the LoRA registry's
    load/unload/reload): never retried, the same request would be refused again."""

    @property
    def retryable(self) -> bool:
        """Whether a client may resend the same request without changing it."""
        return self is ErrorCategory.UNAVAILABLE


_TAG_RE = re.compile(r"^\[([a-z_]+)\] ?")

UNAVAILABLE_MARKERS = ("is not healthy", "not ready", "unknown model", "is restarting", "unavailable",
                       "exceeds maximum queue size", "request timeout expired")
"""Phrases of Triton's own (untagged) errors that mean "this model cannot serve right now": its
stub process died (``Stub process 'text2music_0_0' is not healthy.``), it is being reloaded or is
not loaded, or its queue policy refused the request (full queue, or queued past its timeout).
Both sides use them: the endpoint for failed component calls, the client for errors that Triton
sends in the endpoint's place (its queue, or its own stub being the one that died)."""


def means_unavailable(message: str) -> bool:
    """Whether an untagged Triton error message says the model cannot serve right now."""
    text = message.lower()
    return any(marker in text for marker in UNAVAILABLE_MARKERS)


def tag_message(category: ErrorCategory, message: str) -> str:
    """``message`` with its category tag in front (an already tagged message is kept as is)."""
    if parse_message(message)[0] is not None:
        return message
    return f"[{category.value}] {message}"


def parse_message(text: str) -> tuple[ErrorCategory | None, str]:
    """(category, message without the tag) of an error message; ``None`` when it has no tag."""
    match = _TAG_RE.match(text)
    if match is None:
        return None, text
    try:
        category = ErrorCategory(match.group(1))
    except ValueError:
        return None, text
    return category, text[match.end():]


class UnavailableError(RuntimeError):
    """Raised inside the server when a request cannot be served *now* but may be later
    (a component restarting, no memory free within the admission timeout). The endpoint
    reports it as ``[unavailable]``; the same request may be retried unchanged."""
