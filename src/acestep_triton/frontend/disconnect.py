"""Noticing, from inside an API handler, that the caller has gone away.

Gradio runs a synchronous handler in a worker thread and cannot stop that thread: when the
browser tab closes (its event stream drops) or a ``gradio_client`` job is cancelled, Gradio
only marks the queued event dead (``Event.alive = False``) or tears the job down (the event
leaves ``active_jobs``). Without a check, the request would keep the model server busy for
nobody. The handlers pass :func:`caller_gone` to the client library as ``should_cancel``; the
client polls it while it waits (also while the request is still queued at the model server)
and cancels the Triton request, so a queued request never starts and a running sampling loop
stops at its next step.

This reads Gradio's queue state through its context variables and private queue attributes, so
it is tied to the pinned Gradio version; ``tests/test_frontend.py`` exercises it against the
real queue (a cancelled job must show up as a cancelled request in the server's metrics).
"""

from __future__ import annotations

from gradio.context import LocalContext


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
