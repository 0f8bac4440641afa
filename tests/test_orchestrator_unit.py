"""The orchestrator's request reading, without a server (the served behaviour is in test_tasks.py)."""

from __future__ import annotations

import numpy as np
import pytest

from acestep_client.params import MAX_AUDIO_BYTES, ParamError
from acestep_triton.serving.orchestrator import read_audio_input, read_request_fields


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
    with pytest.raises(ParamError, match=r"^ref_audio: .*the limit is"):
        read_audio_input(inputs(ref_audio=big), "ref_audio")
