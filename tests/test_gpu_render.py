"""What the gpu target renders and what its components check, tested on a CPU (issue 18).

No GPU here, so the GPU-only behaviour is proven where it is decided: in the rendered configs
(parsed with Triton's own protobuf), and in the component's check mode, whose one rule compares
devices (a ``cuda`` device object needs no GPU). The build options that the GPU check uses
(``--endpoint-instances``, ``--lora-memory-mb``) go through the real CLI.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils.dlpack import to_dlpack

from acestep_triton import cli
from acestep_triton.export.model_configs import FORCE_CPU_ONLY_INPUT_TENSORS, load_endpoints
from acestep_triton.export.render_cli import parse_endpoint_instances
from acestep_triton.export.repository import render_repository
from acestep_triton.export.specs import COMPONENTS
from acestep_triton.export.triton_config import check_config
from acestep_triton.serving.component_stats import ComponentMemoryMetrics, module_bytes, tensor_bytes
from acestep_triton.serving.torch_component import (
    REQUIRE_DEVICE_INPUTS_ENV,
    InputOnHostError,
    TorchComponentModel,
    check_input_device,
    requires_device_inputs,
)

CUDA = torch.device("cuda", 0)


def config(repository: Path, name: str) -> Any:
    return check_config((repository / name / "config.pbtxt").read_text())


# ------------------------------------------------------------------------------ item 1: device inputs
def test_gpu_torch_components_take_their_inputs_on_the_device(tiny_onnx_ckpt: Path, tmp_path: Path) -> None:
    endpoints = load_endpoints(["text2music"])
    gpu = render_repository(tmp_path / "gpu", "gpu", None, endpoints, runtime="torch", checkpoint=tiny_onnx_ckpt,
                            assets=tmp_path)
    for name in COMPONENTS:
        parameters = config(gpu, name).parameters
        assert parameters[FORCE_CPU_ONLY_INPUT_TENSORS].string_value == "no", name
    # the endpoint gets its inputs from gRPC clients (host memory): nothing to keep on the device
    assert FORCE_CPU_ONLY_INPUT_TENSORS not in config(gpu, "text2music").parameters
    cpu = render_repository(tmp_path / "cpu", "cpu", None, [], runtime="torch", checkpoint=tiny_onnx_ckpt)
    for name in COMPONENTS:
        assert FORCE_CPU_ONLY_INPUT_TENSORS not in config(cpu, name).parameters, name


def test_check_mode_is_a_parameter_or_an_environment_variable() -> None:
    assert not requires_device_inputs({}, environ={})
    assert requires_device_inputs({"require_device_inputs": "true"}, environ={})
    assert not requires_device_inputs({"require_device_inputs": "false"}, environ={})
    assert requires_device_inputs({}, environ={REQUIRE_DEVICE_INPUTS_ENV: "1"})


def test_check_mode_refuses_a_host_tensor_at_a_gpu_instance() -> None:
    with pytest.raises(InputOnHostError, match=r"input 'latents' arrived on the host .* cuda:0"):
        check_input_device("latents", torch.zeros(2), CUDA)
    check_input_device("latents", torch.zeros(2), torch.device("cpu"))  # a CPU instance takes any

    class HostTensor:
        """A ``pb_utils.Tensor`` as the stub hands it over: a name and DLPack."""

        def __init__(self, name: str, value: torch.Tensor) -> None:
            self._name, self._value = name, value

        def name(self) -> str:
            return self._name

        def to_dlpack(self) -> Any:
            return to_dlpack(self._value)

    model = TorchComponentModel.__new__(TorchComponentModel)  # no load: only read_input is exercised
    model.device = CUDA
    model.require_device_inputs = True
    with pytest.raises(InputOnHostError, match=r"'encoder_states'.*FORCE_CPU_ONLY_INPUT_TENSORS"):
        model.read_input(HostTensor("encoder_states", torch.ones(1, 3)))
    model.require_device_inputs = False  # outside the check mode the runner moves it, as before
    assert torch.equal(model.read_input(HostTensor("encoder_states", torch.ones(1, 3))), torch.ones(1, 3))


# ------------------------------------------------------------------------------ item 6: memory gauges
def test_weight_bytes_count_each_storage_once() -> None:
    linear = torch.nn.Linear(4, 3)
    assert module_bytes(linear) == (4 * 3 + 3) * 4
    tied = torch.nn.Sequential(torch.nn.Embedding(5, 2), torch.nn.Linear(2, 5, bias=False))
    tied[1].weight = tied[0].weight
    assert module_bytes(tied) == 5 * 2 * 4
    assert module_bytes(None) == 0 and tensor_bytes([]) == 0
    assert module_bytes(linear.to(torch.bfloat16)) == (4 * 3 + 3) * 2


def test_component_gauges_through_the_custom_metrics_api() -> None:
    """The gauges a CPU instance sets (the GPU ones are 0 there), with a stand-in for pb_utils."""
    values: dict[tuple[str, str], float] = {}

    class Family:
        GAUGE = "gauge"

        def __init__(self, name: str, description: str, kind: str) -> None:
            assert kind == "gauge" and description
            self.name = name

        def Metric(self, labels: dict[str, str]) -> Any:  # noqa: N802 (the backend's spelling)
            return SimpleNamespace(set=lambda v: values.__setitem__((self.name, labels["instance"]), v))

    metrics = ComponentMemoryMetrics(SimpleNamespace(MetricFamily=Family), "dit_decoder", "dit_decoder_0",
                                     torch.device("cpu"), weights=1234)
    assert values == {("acestep_component_weights_bytes", "dit_decoder_0"): 1234.0,
                      ("acestep_component_cuda_allocated_at_load_bytes", "dit_decoder_0"): 0.0,
                      ("acestep_component_cuda_max_allocated_bytes", "dit_decoder_0"): 0.0}
    metrics.update()  # nothing grew: nothing is sent again
    assert len(values) == 3


# ------------------------------------------------------------------------------ item 4: build options
def test_endpoint_instances_parse() -> None:
    assert parse_endpoint_instances(None) is None and parse_endpoint_instances(" ") is None
    assert parse_endpoint_instances("8") == 8
    assert parse_endpoint_instances("text2music=8, repaint=2") == {"text2music": 8, "repaint": 2}
    for bad, message in (("0", ">= 1"), ("x", "whole number"), ("text2music=0", ">= 1"), ("=3", "NAME=COUNT")):
        with pytest.raises(ValueError, match=message):
            parse_endpoint_instances(bad)


def test_endpoint_instances_render(tmp_path: Path) -> None:
    endpoints = load_endpoints(["text2music", "repaint"])
    default = {e.name: e.instance_count for e in endpoints}
    some = render_repository(tmp_path / "some", "cpu", None, endpoints, components=[], assets=tmp_path,
                             endpoint_instances={"text2music": 8})
    assert config(some, "text2music").instance_group[0].count == 8
    assert config(some, "repaint").instance_group[0].count == default["repaint"]
    every = render_repository(tmp_path / "every", "cpu", None, endpoints, components=[], assets=tmp_path,
                              endpoint_instances=3)
    assert [config(every, n).instance_group[0].count for n in ("text2music", "repaint")] == [3, 3]
    with pytest.raises(ValueError, match=r"not rendered: \['edit'\]"):
        render_repository(tmp_path / "bad", "cpu", None, endpoints, components=[], assets=tmp_path,
                          endpoint_instances={"edit": 2})


def test_build_cli_takes_endpoint_instances_and_lora_memory(tiny_onnx_ckpt: Path, tiny_lora_dir: Path,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workdir = tmp_path / "w"
    assert cli.main(["build", "--checkpoint", str(tiny_onnx_ckpt), "--workdir", str(workdir), "--runtime", "torch",
                     "--endpoint-instances", "text2music=3", "--lora-dir", str(tiny_lora_dir),
                     "--lora-memory-mb", "96"]) == 0
    repository = workdir / "repository"
    assert config(repository, "text2music").instance_group[0].count == 3
    assert config(repository, "repaint").instance_group[0].count == load_endpoints(["repaint"])[0].instance_count
    for name in ("condition_encoder", "dit_decoder"):
        assert float(config(repository, name).parameters["lora_memory_mb"].string_value) == 96.0
    control = json.dumps({k: v.string_value for k, v in config(repository, "lora_registry").parameters.items()})
    assert "96" in control
    capsys.readouterr()
    # refused before any work: no adapters to size, or a runtime without live adapters
    assert cli.main(["build", "--checkpoint", str(tiny_onnx_ckpt), "--workdir", str(workdir),
                     "--runtime", "torch", "--lora-memory-mb", "96"]) == 2
    assert "--lora-memory-mb" in capsys.readouterr().err
    assert cli.main(["build", "--checkpoint", str(tiny_onnx_ckpt), "--workdir", str(workdir),
                     "--endpoint-instances", "text2music=0"]) == 2
    assert ">= 1" in capsys.readouterr().err
