"""Upstream's golden cases a and m through the ``torch`` component runtime (1e-4 absolute).

A module of its own (the rest of the torch runtime's tests: ``test_torch_runtime.py``): its
server (``golden_torch_server``) serves no other module, so the test plan
(``tests/parallel_plan.py``) may run it on either worker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_pipeline_golden import case_params
from test_torch_runtime import TOL, max_err

from acestep_client.client import AceStepClient
from acestep_triton.serving.server import TritonServer


@pytest.mark.parametrize("name", ["a_text2music_apg", "m_repaint"])
def test_golden_cases_through_the_torch_runtime(name: str, golden_torch_server: TritonServer,
                                                golden_cases: dict, golden_dir: Path) -> None:
    case = golden_cases[name]
    expected = np.load(golden_dir / "cases" / case["file"])["audio_48k"]
    p = case_params(case)
    src = golden_dir / "cases" / "case_a_text2music_apg_48k_float.wav" if p.task == "repaint" else None
    result = AceStepClient(golden_torch_server.grpc_url).generate(p, src_audio=src)
    err = max_err(result.audio, expected)
    assert err <= TOL, f"{name} through the torch runtime vs upstream: {err:.3g}"
