"""LoRA through a real tritonserver (``onnx`` runtime): fused variant models routed per request, against the
in-process pipeline with the same adapter fused at the same strength (1e-4 absolute; measured
3.5e-7). The adapter is ``tiny_lora_dir``'s, served by the session's ``tiny_server``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures_onnx import single_thread
from fixtures_serving import TINY_LORA, TINY_LORA_WEIGHT

from acestep_client.client import AceStepClient, ServerError
from acestep_client.params import GenerationParams
from acestep_triton.checkpoint import Components
from acestep_triton.lora import InProcessLoras, LoraRegistry
from acestep_triton.pipeline import MusicGenerator, TorchBackend
from acestep_triton.serving.server import TritonServer

TOL = 1e-4
FAST = {"prompt": "pop, upbeat, guitar, 120 BPM", "lyrics": "[verse]\nfree as a bird\n[chorus]\nsing",
        "audio_duration": 2.0, "infer_step": 6, "manual_seeds": "7"}


def test_served_lora_matches_in_process_and_checks_the_request(tiny_server: TritonServer,
                                                               tiny_onnx_components: Components,
                                                               tiny_lora_dir: Path) -> None:
    c = tiny_onnx_components
    local = MusicGenerator(TorchBackend(c), c.text_tokenizer, c.lyric_tokenizer, c.vocoder.mel_transform,
                           lora_scope=InProcessLoras(c.transformer, LoraRegistry.from_dir(tiny_lora_dir)))
    lora = {"lora_name_or_path": TINY_LORA, "lora_weight": TINY_LORA_WEIGHT}
    client = AceStepClient(tiny_server.grpc_url)
    with single_thread():
        ref_lora = local.generate(GenerationParams(**FAST, **lora)).audio.numpy()
        ref_base = local.generate(GenerationParams(**FAST)).audio.numpy()
    served = client.generate(GenerationParams(**FAST, **lora))
    err = float(np.abs(served.audio - ref_lora).max())
    moved = float(np.abs(ref_lora - ref_base).max())
    assert err <= TOL, f"Triton LoRA vs in-process LoRA: {err:.3g}"
    assert moved > 1e-3, f"the adapter barely changes the audio ({moved:.3g}): the test could not fail"
    assert served.params["lora_name_or_path"] == TINY_LORA and served.params["lora_weight"] == TINY_LORA_WEIGHT
    base = client.generate(GenerationParams(**FAST))
    assert float(np.abs(base.audio - ref_base).max()) <= TOL, "requests without LoRA must use the base models"
    with pytest.raises(ServerError, match="lora_weight"):
        client.generate(GenerationParams(**FAST, lora_name_or_path=TINY_LORA, lora_weight=1.0))
    with pytest.raises(ServerError, match="lora_name_or_path"):
        client.generate(GenerationParams(**FAST, lora_name_or_path="jazz"))
    with pytest.raises(ServerError, match="no 'lora_registry' model"):  # fused variants: no runtime registry
        client.list_loras()
