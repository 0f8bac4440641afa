"""Noticing, from inside an API handler, that the caller has gone away.

Gradio runs a synchronous handler in a worker thread and cannot stop that thread: when the
browser tab closes (its event stream drops) or a ``gradio_client`` job is cancelled, Gradio
only marks the queued event dead (``Event.alive = False``) or tears the job down (the event
leaves ``active_jobs``). Without a check, the request would keep the model server busy for
nobody. The handlers call :func:`caller_gone` on every progress step and raise
:class:`CallerGone`; the client library cancels the Triton request when its progress callback
raises, so the server-side sampling loop stops at its next step.

This reads Gradio's queue state through its context variables and private queue attributes, so
it is tied to the pinned Gradio version; ``tests/test_frontend.py`` exercises it against the
real queue (a cancelled job must show up as a cancelled request in the server's metrics).
"""

from __future__ import annotations

import gradio as gr
from gradio.context import LocalContext


class CallerGone(gr.Error):
    """The caller disconnected or cancelled; raised to stop (and cancel) its request."""

    def __init__(self) -> None:
        super().__init__("the caller disconnected; the request was cancelled at the model server",
                         print_exception=False)


def caller_gone() -> bool:
    """Whether Gradio has dropped the event this handler is running for.

    False outside a queued Gradio event (direct calls, tests), so it never stops work that has
    no Gradio caller to lose.
    """
    blocks = LocalContext.blocks.get(None)
    event_id = LocalContext.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    if queue is None or event_id is None:
        return False
    for job in queue.active_jobs:
        for event in job or ():
            if event._id == event_id:
                return not event.alive
    # A handler runs only while its job is active; a missing job was torn down (cancelled).
    return True


def raise_if_caller_gone() -> None:
    """Raise :class:`CallerGone` when :func:`caller_gone` says so."""
    if caller_gone():
        raise CallerGone()
