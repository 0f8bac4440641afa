"""The orchestrator's side of the serving loop, run in-process on each available device.

:class:`TritonBackend` (what the endpoints sample with) is driven here by a component call
that runs the tiny torch models instead of issuing BLS requests, and that checks every tensor
handed to a component: it must already be on the sampling device. On the ``gpu`` target that is
the property that matters (the loop never copies latents to the host between steps; see
``serving/orchestrator.py``). The audio must match the in-process reference pipeline on the
CPU for the same seeds, for every task.

Runs on the CPU everywhere; the ``cuda`` cases run where torch sees a GPU and are skipped,
saying so, elsewhere. The module makes its own tiny checkpoint and needs nothing from
``conftest.py``, so a GPU machine without the export and serving stacks (onnx, tritonserver)
runs it alone: ``pytest --noconftest tests/test_sampling_device.py``.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from acestep_client.params import GenerationParams
from acestep_triton.checkpoint import Components, load_components
from acestep_triton.pipeline import MusicGenerator, TorchBackend
from acestep_triton.serving.orchestrator import TritonBackend
from acestep_triton.synthetic.tiny_checkpoint import write_tiny_checkpoint

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")),
]
TOLERANCE = {"cpu": 1e-5, "cuda": 2e-3}
"""Max abs audio difference from the CPU reference: the same kernels on the CPU; on a GPU, other
fp32 kernels (TF32 off) whose rounding differences grow over the sampling steps."""


def component_call(models: TorchBackend, device: torch.device, seen: list[str]):
    """A ``ComponentCall`` over torch models on ``device`` that insists on device-resident inputs."""
    methods = {
        "text_encoder": (models.encode_text, ["input_ids", "attention_mask", "query_scale"]),
        "condition_encoder": (models.encode_conditions, ["text_states", "text_mask", "speaker", "lyric_ids",
                                                         "lyric_mask", "lyric_query_scale"]),
        "dit_decoder": (models.predict_velocity, ["latents", "latent_mask", "encoder_states", "encoder_mask",
                                                  "timestep", "query_scale"]),
        "dcae_encoder": (models.encode_mel, ["mel"]),
        "dcae_decoder": (models.decode_latents, ["latents"]),
        "vocoder": (models.vocode, ["mel"]),
    }

    def call(model: str, inputs: Mapping[str, torch.Tensor], outputs: Sequence[str]) -> list[torch.Tensor]:
        method, names = methods[model]
        assert sorted(inputs) == sorted(names), (model, sorted(inputs))
        off = {name: str(t.device) for name, t in inputs.items() if t.device != device}
        assert not off, f"{model} was handed tensors off {device}: {off}"
        seen.append(model)
        result = method(*(inputs[name] for name in names))
        return list(result) if isinstance(result, tuple) else [result]

    return call


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def components(checkpoint: Path) -> Components:
    """The tiny checkpoint's torch models on the CPU (fp32)."""
    return load_components(checkpoint)


@pytest.fixture(scope="module")
def reference(components: Components) -> MusicGenerator:
    """The in-process reference pipeline, on the CPU."""
    return MusicGenerator(TorchBackend(components), components.text_tokenizer, components.lyric_tokenizer,
                          components.vocoder.mel_transform)


@pytest.fixture(scope="module", params=DEVICES)
def served_generator(request: pytest.FixtureRequest, checkpoint: Path, components: Components):
    device = torch.device(request.param, 0) if request.param == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if device.type == "cuda":
        components = load_components(checkpoint)  # a second copy: the reference stays on the CPU
    for module in components.modules().values():
        module.to(device)
    seen: list[str] = []
    backend = TritonBackend(component_call(TorchBackend(components), device, seen),
                              components.text_encoder.num_layers, components.transformer.lyric_layers,
                              components.transformer.num_layers)
    generator = MusicGenerator(backend, components.text_tokenizer, components.lyric_tokenizer,
                               components.vocoder.mel_transform, device=device)
    return generator, device, seen


def wav_bytes(audio: torch.Tensor, rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio[0].T.cpu().numpy(), rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def test_every_task_samples_on_its_device(served_generator, reference: MusicGenerator) -> None:
    generator, device, seen = served_generator
    tolerance = TOLERANCE[device.type]
    base = {"prompt": "pop, guitar", "lyrics": "[verse]\nla la", "infer_step": 4, "manual_seeds": "7",
            "retake_seeds": "8"}
    song = reference.generate(GenerationParams(**base, audio_duration=2.0))
    source = wav_bytes(song.audio, song.sample_rate)
    requests = {
        "text2music": (GenerationParams(**{**base, "manual_seeds": "7, 9"}, audio_duration=2.0, batch_size=2,
                                        scheduler_type="pingpong", cfg_type="apg"), {}),
        "retake": (GenerationParams(**base, task="retake", audio_duration=2.0, retake_variance=0.4), {}),
        "repaint": (GenerationParams(**base, task="repaint", repaint_start=0.5, repaint_end=1.5),
                    {"src_audio": source}),
        "extend": (GenerationParams(**base, task="extend", right_extend_length=1.0), {"src_audio": source}),
        "edit": (GenerationParams(**base, task="edit", edit_type="remix", edit_target_prompt="rock"),
                 {"src_audio": source}),
        "audio2audio": (GenerationParams(**base, task="audio2audio", ref_audio_strength=0.5), {"ref_audio": source}),
    }
    for task, (params, audio_inputs) in requests.items():
        seen.clear()
        served = generator.generate(copy.deepcopy(params), **audio_inputs)
        expected = reference.generate(copy.deepcopy(params), **audio_inputs)
        assert served.latents.device == device and served.audio.device == device, task
        assert {"text_encoder", "dit_decoder", "vocoder"} <= set(seen), (task, seen)
        assert served.record["actual_seeds"] == expected.record["actual_seeds"], task
        diff = float((served.audio.cpu() - expected.audio).abs().max())
        assert served.audio.shape == expected.audio.shape and diff <= tolerance, f"{task} on {device}: {diff:.3g}"
        assert np.isfinite(served.audio.cpu().numpy()).all()
