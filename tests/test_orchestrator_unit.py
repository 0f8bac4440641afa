"""The orchestrator's request reading, without a server (the served behaviour is in test_tasks_end_to_end.py)."""

from __future__ import annotations

import numpy as np
import pytest

from acestep_client.errors import ErrorCategory, UnavailableError, parse_message
from acestep_client.limits import MAX_AUDIO_BYTES
from acestep_client.params import ParamError
from acestep_triton.sampling import SamplingCancelled
from acestep_triton.serving.orchestrator import error_report, read_audio_input, read_request_fields


def inputs(**arrays: np.ndarray):
    return lambda name: arrays.get(name)


def test_the_endpoint_supplies_the_task_and_refuses_another() -> None:
    assert read_request_fields(inputs(), "retake").task == "retake"
    wrong = np.array([b"edit"], dtype=object)
    with pytest.raises(ParamError, match=r"^task: 'edit' sent to the 'retake' endpoint"):
        read_request_fields(inputs(task=wrong), "retake")


def test_audio_inputs_are_checked() -> None:
    assert read_audio_input(inputs(), "src_audio") is None
    assert read_audio_input(inputs(src_audio=np.array([b"RIFF"], dtype=object)), "src_audio") == b"RIFF"
    with pytest.raises(ParamError, match=r"^src_audio: expected the bytes of one audio file"):
        read_audio_input(inputs(src_audio=np.array([b"a", b"b"], dtype=object)), "src_audio")
    big = np.array([b"\0" * (MAX_AUDIO_BYTES + 1)], dtype=object)
    with pytest.raises(ParamError, match=r"^ref_audio: .*accepts at most 128 MiB"):
        read_audio_input(inputs(ref_audio=big), "ref_audio")


def test_the_upload_limit_is_a_deployment_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ACESTEP_MAX_UPLOAD_MB`` (``serve --max-upload-mb``) sets the endpoints' limit."""
    from acestep_client.limits import MAX_UPLOAD_ENV
    from acestep_triton.serving.orchestrator import upload_limit_bytes

    monkeypatch.setenv(MAX_UPLOAD_ENV, "1")
    assert upload_limit_bytes() == 2**20
    two_mib = np.array([b"\0" * 2**21], dtype=object)
    with pytest.raises(ParamError, match=r"^src_audio: 2 MiB; this server accepts at most 1 MiB"):
        read_audio_input(inputs(src_audio=two_mib), "src_audio")
    for bad in ("", "zero", "-5"):
        monkeypatch.setenv(MAX_UPLOAD_ENV, bad)
        assert upload_limit_bytes() == MAX_AUDIO_BYTES


@pytest.mark.parametrize(("exc", "category"), [
    (ParamError("audio_duration", "too short"), ErrorCategory.INVALID_ARGUMENT),
    (UnavailableError("no memory free within 30 s"), ErrorCategory.UNAVAILABLE),
    (RuntimeError("dit_decoder: Stub process 'dit_decoder_0_0' is not healthy."), ErrorCategory.UNAVAILABLE),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), ErrorCategory.UNAVAILABLE),
    (SamplingCancelled(3, 10), ErrorCategory.CANCELLED),
    (RuntimeError("shape mismatch in dcae_decoder"), ErrorCategory.INTERNAL),
    (KeyError("velocity"), ErrorCategory.INTERNAL),
])
def test_every_error_response_carries_its_category(exc: Exception, category: ErrorCategory) -> None:
    got, message = error_report("text2music", exc)
    assert got is category
    parsed, text = parse_message(message)
    assert parsed is category
    if category is ErrorCategory.INVALID_ARGUMENT:
        assert text == "audio_duration: too short"  # the schema's "<field>: <reason>", unchanged
    elif category is ErrorCategory.INTERNAL:
        assert text.startswith(f"internal error in text2music: {type(exc).__name__}")
    elif category is ErrorCategory.CANCELLED:
        assert text.startswith("text2music: request cancelled")
    else:
        assert text.startswith("text2music cannot serve this request now, retry it: ") and str(exc) in text
