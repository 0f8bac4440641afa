"""The ``torch`` component runtime: unit behaviour, rendering, and serving through a real tritonserver.

The torch runtime is what the gpu target serves by default (compiled DiT blocks + CUDA graphs
there); here it runs fp32 on the CPU, where it must give the same audio as the in-process
pipeline and as the ``onnx`` runtime for every task (1e-4 absolute), and serve live LoRA adapters
at any strength, also set from the front end. Upstream's golden cases through it:
``test_torch_runtime_golden.py``; cross-request batching: ``test_torch_runtime_batching.py``
(modules of their own, each with a server no other module uses, so either test worker may take them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_onnx import single_thread
from fixtures_serving import TINY_LORA, TINY_LORA_WEIGHT
from test_tasks_end_to_end import TASK_REQUESTS, params
from test_tasks_end_to_end import source as source  # the 3 s upload fixture

from acestep_client.client import AceStepClient, ServerError
from acestep_client.params import GenerationParams
from acestep_triton.checkpoint import Components
from acestep_triton.component_graphs import component_graph, component_sources
from acestep_triton.export.model_configs import checkpoint_sizes, component_config
from acestep_triton.export.repository import render_repository
from acestep_triton.export.specs import COMPONENTS, read_onnx_sizes
from acestep_triton.export.triton_config import DynamicBatching, check_config, render_config
from acestep_triton.lora import InProcessLoras, LoraRegistry
from acestep_triton.pipeline import MusicGenerator, TorchBackend
from acestep_triton.serving.server import TritonServer
from acestep_triton.serving.torch_runtime import (
    DECODE_ONLY,
    ENCODE_ONLY,
    ComponentRunner,
    RuntimeOptions,
    load_component_module,
    parse_flag,
)

TOL = 1e-4
CPU = torch.device("cpu")


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.abs(a - b).max())


# ------------------------------------------------------------------------------ unit
def test_options_defaults_and_errors_name_the_parameter() -> None:
    cpu = RuntimeOptions.for_component("dit_decoder", CPU)
    assert (cpu.precision, cpu.compile, cpu.cuda_graphs) == ("fp32", False, False)
    gpu = RuntimeOptions.for_component("dit_decoder", torch.device("cuda", 0), {"compile": "false"})
    assert (gpu.precision, gpu.compile, gpu.cuda_graphs) == ("bf16", False, True)
    assert RuntimeOptions.for_component("vocoder", torch.device("cuda", 0)).precision == "fp32"
    with pytest.raises(ValueError, match="precision: bf16 on the CPU"):
        RuntimeOptions.for_component("dit_decoder", CPU, {"precision": "bf16"})
    with pytest.raises(ValueError, match="precision: expected one of"):
        RuntimeOptions(device=CPU, precision="int3")
    with pytest.raises(ValueError, match="config parameter cuda_graphs"):
        parse_flag("maybe", True, "cuda_graphs")


def test_each_transformer_half_keeps_only_its_weights(tiny_onnx_ckpt: Path,
                                                      tiny_onnx_components: Components) -> None:
    """Condition encoder and DiT decoder instances together hold one transformer, not two."""
    encode = load_component_module("condition_encoder", tiny_onnx_ckpt)
    decode = load_component_module("dit_decoder", tiny_onnx_ckpt)
    assert all(getattr(encode, n) is None for n in DECODE_ONLY)
    assert all(getattr(encode, n) is not None for n in ENCODE_ONLY)
    assert all(getattr(decode, n) is None for n in ENCODE_ONLY)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    speaker = count(decode.speaker_embedder)  # kept by both halves (the model's dtype is read from it)
    assert count(encode) + count(decode) - speaker == count(tiny_onnx_components.transformer)


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_runner_equals_the_torch_module(name: str, tiny_onnx_ckpt: Path, tiny_onnx_components: Components) -> None:
    """The runner is the checkpoint's module under the contract's names (fp32: exactly equal)."""
    runner = ComponentRunner(COMPONENTS[name], load_component_module(name, tiny_onnx_ckpt),
                             RuntimeOptions(device=CPU))
    reference = component_graph(name, component_sources(tiny_onnx_components)[name])
    inputs = reference.example_inputs(3, 7, seed=1)
    with torch.inference_mode():
        expected = reference(*inputs.values())
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    got = runner(inputs)
    assert len(got) == len(COMPONENTS[name].outputs)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e.float(), rtol=1e-5, atol=1e-6)


def test_lora_variant_module_is_the_fused_transformer(tiny_onnx_ckpt: Path, tiny_lora_dir: Path,
                                                      tiny_onnx_components: Components) -> None:
    from acestep_triton.lora import fused_transformer, load_lora

    adapter_dir = tiny_lora_dir / TINY_LORA
    served = load_component_module("dit_decoder", tiny_onnx_ckpt, lora_path=adapter_dir, lora_weight=0.5)
    fused = fused_transformer(tiny_onnx_components.transformer,
                              load_lora(adapter_dir, tiny_onnx_components.transformer), 0.5)
    block = "transformer_blocks.0.attn.to_q.weight"
    assert torch.equal(served.state_dict()[block], fused.state_dict()[block])
    assert not torch.equal(served.state_dict()[block], tiny_onnx_components.transformer.state_dict()[block])


# ------------------------------------------------------------------------------ rendering
def test_torch_configs_on_both_targets(tiny_onnx_ckpt: Path, tiny_onnx_paths: dict[str, Path],
                                       tmp_path: Path) -> None:
    sizes = checkpoint_sizes(tiny_onnx_ckpt)
    for name, spec in COMPONENTS.items():  # the checkpoint's configs give what the ONNX graphs say
        assert {k: v for k, v in sizes.items() if k in read_onnx_sizes(spec, tiny_onnx_paths[name])} == \
            read_onnx_sizes(spec, tiny_onnx_paths[name])
    out = render_repository(tmp_path / "gpu", "gpu", None, [], checkpoint=tiny_onnx_ckpt, gpus=[1],
                            batching={"dit_decoder": DynamicBatching(2000, (6,))})
    for name in COMPONENTS:
        config = check_config((out / name / "config.pbtxt").read_text())
        assert config.backend == "python" and config.instance_group[0].kind == 1  # KIND_GPU
        assert list(config.instance_group[0].gpus) == [1]
        assert config.parameters["component"].string_value == name
        assert Path(config.parameters["checkpoint_dir"].string_value) == tiny_onnx_ckpt.resolve()
        assert (out / name / "1" / "model.py").read_text().count("TorchComponentModel") >= 1
        assert not (out / name / "1" / "model.onnx").exists()
    dit = check_config((out / "dit_decoder" / "config.pbtxt").read_text())
    assert list(dit.dynamic_batching.preferred_batch_size) == [6]
    assert dit.dynamic_batching.max_queue_delay_microseconds == 2000
    cpu = check_config(render_config(component_config(COMPONENTS["vocoder"], "cpu", runtime="torch")))
    assert cpu.backend == "python" and cpu.instance_group[0].kind == 2  # KIND_CPU


def test_runtime_choices_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="runtime 'tensorrt' is not available for target 'cpu'"):
        render_repository(tmp_path / "r", "cpu", None, [], runtime="tensorrt")
    with pytest.raises(ValueError, match="runtime 'onnx' is not available for target 'gpu'"):
        render_repository(tmp_path / "r", "gpu", None, [], runtime="onnx")
    with pytest.raises(ValueError, match="runtime torch needs the checkpoint"):
        render_repository(tmp_path / "r", "cpu", None, [], runtime="torch")


# ------------------------------------------------------------------------------ through tritonserver
@pytest.fixture(scope="module")
def torch_client(torch_server: TritonServer) -> AceStepClient:
    return AceStepClient(torch_server.grpc_url)


SERVED_TASKS = {"text2music": ({"audio_duration": 2.0}, None), **TASK_REQUESTS}


@pytest.mark.parametrize("task", sorted(SERVED_TASKS))
def test_every_task_same_audio_as_in_process_and_onnx(task: str, torch_client: AceStepClient,
                                                      tiny_server: TritonServer, tiny_local: MusicGenerator,
                                                      source: bytes) -> None:
    fields, audio = SERVED_TASKS[task]
    kwargs = {} if audio is None else {"src_audio" if audio == "src" else "ref_audio": source}

    def request() -> GenerationParams:
        return params(**fields, batch_size=2, manual_seeds="3,4", retake_seeds="5,6")

    served = torch_client.generate(request(), **kwargs)
    onnx = AceStepClient(tiny_server.grpc_url).generate(request(), **kwargs)
    with single_thread():
        local = tiny_local.generate(request(), **kwargs)
    assert max_err(served.audio, local.audio.numpy()) <= TOL, f"{task}: torch runtime vs in-process"
    assert max_err(served.audio, onnx.audio) <= TOL, f"{task}: torch runtime vs onnx runtime"
    assert max_err(served.audio[0], served.audio[1]) > 1e-4, "batch items with different seeds are identical"


def test_live_lora_served_at_any_strength_by_the_torch_runtime(torch_client: AceStepClient,
                                                                  tiny_onnx_components: Components,
                                                                  torch_lora_dir: Path) -> None:
    """The torch runtime applies the adapter at run time: any lora_weight (not only the 0.5 its
    serving.json names, which fused variants are limited to), equal to the in-process pipeline
    with the adapter fused at that strength; strength 0 is the base model exactly."""
    c = tiny_onnx_components
    local = MusicGenerator(TorchBackend(c), c.text_tokenizer, c.lyric_tokenizer, c.vocoder.mel_transform,
                           lora_scope=InProcessLoras(c.transformer, LoraRegistry.from_dir(torch_lora_dir)))
    request = {"audio_duration": 2.0, "lora_name_or_path": TINY_LORA, "lora_weight": 0.8}
    assert request["lora_weight"] != TINY_LORA_WEIGHT
    with single_thread():
        expected = local.generate(params(**request)).audio.numpy()
        base = local.generate(params(audio_duration=2.0)).audio.numpy()
    served = torch_client.generate(params(**request))
    assert max_err(served.audio, expected) <= TOL
    assert max_err(expected, base) > 1e-3, "the adapter barely changes the audio: the test could not fail"
    zero = torch_client.generate(params(audio_duration=2.0, lora_name_or_path=TINY_LORA, lora_weight=0.0))
    none = torch_client.generate(params(audio_duration=2.0))
    assert np.array_equal(zero.audio, none.audio), "lora_weight 0 must be exactly no LoRA"
    assert max_err(none.audio, base) <= TOL
    with pytest.raises(ServerError, match="lora_name_or_path"):
        torch_client.generate(params(audio_duration=2.0, lora_name_or_path="jazz"))


def test_frontend_lora_fields_reach_the_runtime_adapters(torch_server: TritonServer, tmp_path: Path) -> None:
    """The gradio front end's ``lora_name_or_path`` / ``lora_weight`` (upstream's argument names)
    travel to the server, which applies the adapter at that strength (any strength: runtime)."""
    import soundfile as sf

    from acestep_triton.frontend.service import FrontendService
    from acestep_triton.frontend.upstream import text2music_params

    service = FrontendService(AceStepClient(torch_server.grpc_url), tmp_path)
    settings = {"prompt": "pop, upbeat, guitar, 120 BPM", "lyrics": "[verse]\nfree as a bird", "infer_step": 3,
                "manual_seeds": "9"}

    def run(name: str | None, weight: float) -> tuple[np.ndarray, dict]:
        params = text2music_params(settings, format="wav", audio_duration=2.0, audio2audio_enable=False,
                                   ref_audio_strength=0.5, ref_audio_input=None, lora_name_or_path=name,
                                   lora_weight=weight)
        out = service.generate(params)
        return sf.read(out.audio_path, dtype="float32")[0], out.params

    with_lora, shown = run(TINY_LORA, 1.7)
    without, _ = run(None, 1.7)
    assert shown["lora_name_or_path"] == TINY_LORA and shown["lora_weight"] == pytest.approx(1.7)
    assert float(np.abs(with_lora - without).max()) > 1e-3, "the adapter did not reach the server"
    direct = AceStepClient(torch_server.grpc_url).generate(
        GenerationParams(**settings, audio_duration=2.0, lora_name_or_path=TINY_LORA, lora_weight=1.7))
    assert float(np.abs(direct.audio[0].T - with_lora).max()) <= 1e-3, "front end and client disagree (wav rounding)"
