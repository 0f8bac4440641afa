"""The endpoint models: the shared pipeline driven through BLS calls to the served components.

Each task endpoint (``text2music`` …) is a decoupled Python-backend model whose ``model.py`` is
a two-line shim importing :class:`TritonPythonModel` from here. It

* reads one optional ``[1]`` tensor per request-schema field and validates them with the one
  schema (errors name the field and end only that request);
* runs :class:`~acestep_triton.pipeline.MusicGenerator` with :class:`TritonBackend`, whose six
  methods are BLS requests to the six component models (tensors cross by DLPack, no copies);
* pads every DiT call to a shape bucket (config parameters ``frame_buckets`` and
  ``token_buckets``: ``default``, ``none`` or a comma list; see :mod:`acestep_triton.sampling.
  buckets`), so calls of concurrent requests with similar lengths have equal shapes and
  Triton's dynamic batcher merges them into one ``dit_decoder`` execution; padding is invisible
  to the valid frames and tokens, so the audio does not change;
* streams ``progress`` (step, total) after every sampling step, checks for cancellation
  between steps, and ends with ``audio`` [B,2,N] FP32 at 48 kHz, ``sample_rate`` and
  ``params_json`` (every parameter and the actual seeds).

Config parameter ``sampling_device`` (``cpu``, the default, or ``cuda``; the ``gpu`` render
target sets ``cuda`` and a ``KIND_GPU`` instance) says where the sampling loop keeps its
tensors. On ``cuda`` the BLS requests ask for their outputs in GPU memory (``preferred_memory``)
and the loop's tensors stay on the instance's GPU from the first component call to the final
audio: no host round trip per step. Only the finished audio is copied to the host for gRPC.

One instance serves one request at a time: ``execute`` runs a whole generation before it
returns, so a second request to the same instance waits in Triton's queue. Concurrency comes from
the instance count (the shipped definitions have two per endpoint) and from the dynamic batching
of the components the instances share.

``triton_python_backend_utils`` only exists inside the Python-backend stub, so it is imported
lazily; everything else here is plain torch and unit-testable.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.dlpack import to_dlpack

from acestep_client.errors import ErrorCategory, UnavailableError, means_unavailable, tag_message
from acestep_client.limits import MAX_AUDIO_BYTES, MAX_UPLOAD_ENV
from acestep_client.params import (
    TASKS,
    GenerationParams,
    ParamError,
    check_field,
    decode_field,
    params_from_wire,
)

from ..export.specs import COMPONENTS, SAMPLING_DEVICES, with_lora_rows
from ..lora import RoutingCall, base_component, served_scope
from ..pipeline import MusicGenerator
from ..sampling import SamplingCancelled
from ..sampling.buckets import BucketedBackend, ShapeBuckets
from .admission import Admission, ModelDims, token_counter
from .assets import ServingAssets, load_assets
from .config_params import read_model_config
from .drain import DrainGate
from .memory import MemoryReleaser
from .metrics import TaskMetrics

CPU = torch.device("cpu")

#: Called as ``call(model_name, {input_name: tensor}, [output_names]) -> [tensors]``.
ComponentCall = Callable[[str, Mapping[str, torch.Tensor], Sequence[str]], list[torch.Tensor]]


def _rows(scale: torch.Tensor, batch: int) -> torch.Tensor:
    """A query scale as the served [B, layers] (a shared [layers] vector is repeated per row)."""
    scale = scale.to(torch.float32)
    if scale.dim() == 1:
        scale = scale.unsqueeze(0).expand(batch, -1)
    return scale.contiguous()


class TritonBackend:
    """The :class:`~acestep_triton.sampling.ComponentBackend` over the served component models."""

    def __init__(self, call: ComponentCall, text_layers: int, lyric_layers: int, dit_layers: int) -> None:
        self._call = call
        self.text_layers = text_layers
        self.lyric_layers = lyric_layers
        self.dit_layers = dit_layers

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    query_scale: torch.Tensor) -> torch.Tensor:
        (states,) = self._call("text_encoder", {
            "input_ids": input_ids, "attention_mask": attention_mask,
            "query_scale": _rows(query_scale, input_ids.shape[0])}, ["last_hidden_state"])
        return states

    def encode_conditions(self, text_states: torch.Tensor, text_mask: torch.Tensor, speaker: torch.Tensor,
                          lyric_ids: torch.Tensor, lyric_mask: torch.Tensor,
                          lyric_query_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states, mask = self._call("condition_encoder", {
            "text_states": text_states, "text_mask": text_mask, "speaker": speaker,
            "lyric_ids": lyric_ids, "lyric_mask": lyric_mask,
            "lyric_query_scale": _rows(lyric_query_scale, text_states.shape[0])},
            ["encoder_states", "encoder_mask"])
        return states, mask

    def predict_velocity(self, latents: torch.Tensor, latent_mask: torch.Tensor,
                         encoder_states: torch.Tensor, encoder_mask: torch.Tensor,
                         timestep: torch.Tensor, query_scale: torch.Tensor) -> torch.Tensor:
        (velocity,) = self._call("dit_decoder", {
            "latents": latents, "latent_mask": latent_mask, "encoder_states": encoder_states,
            "encoder_mask": encoder_mask, "timestep": timestep.reshape(-1).expand(latents.shape[0]),
            "query_scale": _rows(query_scale, latents.shape[0])}, ["velocity"])
        return velocity

    def encode_mel(self, mel: torch.Tensor) -> torch.Tensor:
        return self._call("dcae_encoder", {"mel": mel}, ["latents"])[0]

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self._call("dcae_decoder", {"latents": latents}, ["mel"])[0]

    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        return self._call("vocoder", {"mel": mel}, ["waveform"])[0]


def preferred_memory(pb_utils: Any, device: torch.device) -> dict[str, Any]:
    """The ``preferred_memory`` keyword of BLS requests for a loop whose tensors live on ``device``.

    Components (TensorRT engines on the gpu target) then hand their outputs over where the loop
    needs them, and DLPack wraps them without a copy.
    """
    if not hasattr(pb_utils, "PreferredMemory"):
        return {}
    if device.type == "cuda":
        memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, device.index or 0)
    else:
        memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
    return {"preferred_memory": memory}


STUB_DIED_MARKER = "is not healthy"
"""In Triton's error for a request to a model instance whose stub process died (``Stub process
'dit_decoder_0_0' is not healthy.``); see :mod:`acestep_triton.serving.health`."""
COMPONENT_RESTARTING = ("{model} is unavailable: its process stopped and the server is restarting it; "
                        "retry the request ({detail})")
"""The one text of that failure (the request may be retried once the model is reloaded)."""


def bls_call(pb_utils: Any, device: torch.device = CPU) -> ComponentCall:
    """A :data:`ComponentCall` issuing synchronous BLS requests; tensors cross by DLPack."""
    preferred = preferred_memory(pb_utils, device)

    def call(model: str, inputs: Mapping[str, torch.Tensor], outputs: Sequence[str]) -> list[torch.Tensor]:
        # LoRA variants (dit_decoder__rap) share the contract; live adapters add per-row inputs
        spec = with_lora_rows(COMPONENTS[base_component(model)])
        tensors = []
        for name, value in inputs.items():
            value = value.detach().reshape(spec.request_shape(name, tuple(value.shape)))
            tensors.append(pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous())))
        request = pb_utils.InferenceRequest(model_name=model, requested_output_names=list(outputs),
                                            inputs=tensors, **preferred)
        if device.type == "cuda":
            # DLPack hands over bare pointers: the kernels that wrote the inputs (queued on
            # torch's stream) must be done before the component, on its own stream, reads them.
            torch.cuda.current_stream(device).synchronize()
        response = request.exec()
        if response.has_error():
            message = response.error().message()
            if STUB_DIED_MARKER in message:  # Triton's words for a dead backend process
                raise UnavailableError(COMPONENT_RESTARTING.format(model=model, detail=message))
            raise RuntimeError(f"{model}: {message}")
        # clone: the response's memory is released with the response object. ``.to`` is a no-op
        # when the component honoured the preferred memory (a backend may still answer elsewhere).
        return [torch.from_dlpack(pb_utils.get_output_tensor_by_name(response, name).to_dlpack())
                .to(device).clone() for name in outputs]

    return call


def sampling_device(name: str, instance_device_id: str | int | None = None) -> torch.device:
    """The ``sampling_device`` config parameter as a device; ``cuda`` means this instance's GPU
    (Triton passes ``model_instance_device_id`` to ``KIND_GPU`` instances)."""
    if name not in SAMPLING_DEVICES:
        raise ValueError(f"config parameter sampling_device must be 'cpu' or 'cuda', got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("config parameter sampling_device is 'cuda' but torch sees no CUDA device")
    return torch.device("cuda", int(instance_device_id or 0))


def read_request_fields(get_input: Callable[[str], Any], task: str) -> GenerationParams:
    """Build validated parameters from a request (``get_input(name)`` → numpy array or None).

    The endpoint decides the task: a request that omits ``task`` gets the endpoint's, one that
    names another task is refused (it was sent to the wrong endpoint).
    """
    arrays = {spec.name: get_input(spec.name) for spec in GenerationParams.wire_specs()}
    if arrays.get("task") is None:
        arrays["task"] = np.array([task.encode()], dtype=object)
    # The task first: a request for another endpoint's task is refused for that, naming `task`,
    # not for a field that only that task checks (repaint's `repaint_end` sent to text2music).
    sent = check_field("task", decode_field(GenerationParams.spec("task"), arrays["task"]))
    if sent != task:
        raise ParamError("task", f"{sent!r} sent to the {task!r} endpoint; send it to the {sent!r} endpoint "
                                 f"or leave task out")
    return params_from_wire(arrays)


def upload_limit_bytes() -> int:
    """The upload limit of this process (:data:`MAX_UPLOAD_ENV`; a bad value keeps the default)."""
    value = os.environ.get(MAX_UPLOAD_ENV, "").strip()
    try:
        limit = int(float(value) * 2**20) if value else MAX_AUDIO_BYTES
    except ValueError:
        return MAX_AUDIO_BYTES
    return limit if limit > 0 else MAX_AUDIO_BYTES


def read_audio_input(get_input: Callable[[str], Any], name: str, limit: int | None = None) -> bytes | None:
    """The file bytes of an optional BYTES [1] audio input (``src_audio``/``ref_audio``), at most
    ``limit`` bytes (default :func:`upload_limit_bytes`); refused naming ``name`` otherwise."""
    array = get_input(name)
    if array is None:
        return None
    if array.size != 1 or not isinstance(array.reshape(-1)[0], bytes):
        raise ParamError(name, f"expected the bytes of one audio file (BYTES [1]), got shape {list(array.shape)}")
    data = array.reshape(-1)[0]
    limit = upload_limit_bytes() if limit is None else limit
    if len(data) > limit:
        raise ParamError(name, f"{len(data) / 2**20:.0f} MiB; this server accepts at most {limit / 2**20:.0f} MiB "
                               f"(a 240 s stereo source fits as FLAC, or as WAV at 48 kHz)")
    return data


_OUTCOMES = {ErrorCategory.INVALID_ARGUMENT: "invalid", ErrorCategory.UNAVAILABLE: "unavailable",
             ErrorCategory.CANCELLED: "cancelled", ErrorCategory.INTERNAL: "error"}


def error_category(exc: BaseException) -> ErrorCategory:
    """What a failed request's exception means for its caller (see :mod:`acestep_client.errors`)."""
    if isinstance(exc, ParamError):
        return ErrorCategory.INVALID_ARGUMENT
    if isinstance(exc, UnavailableError):
        return ErrorCategory.UNAVAILABLE
    if isinstance(exc, SamplingCancelled):
        return ErrorCategory.CANCELLED
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc)):
        return ErrorCategory.UNAVAILABLE  # the request fitted the budget; memory was short right now
    if isinstance(exc, RuntimeError) and means_unavailable(str(exc)):  # a component call Triton refused
        return ErrorCategory.UNAVAILABLE
    return ErrorCategory.INTERNAL


def error_report(model_name: str, exc: BaseException) -> tuple[ErrorCategory, str]:
    """(category, tagged message) for the error response of a failed request.

    Bad input keeps the schema's ``"<field>: <reason>"`` text; the others say where it failed.
    """
    category = error_category(exc)
    if category is ErrorCategory.INVALID_ARGUMENT:
        text = str(exc)
    elif category is ErrorCategory.UNAVAILABLE:
        text = f"{model_name} cannot serve this request now, retry it: {exc}"
    elif category is ErrorCategory.CANCELLED:
        text = f"{model_name}: request cancelled ({exc})"
    else:
        text = f"internal error in {model_name}: {type(exc).__name__}: {exc}"
    return category, tag_message(category, text)


class TritonPythonModel:
    """The decoupled endpoint model (the ``model.py`` shims re-export this class)."""

    def initialize(self, args: dict[str, Any]) -> None:
        # only importable inside Triton's Python-backend stub process
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.model_name, _, parameters = read_model_config(args)
        self.task = parameters.get("task", "text2music")
        if self.task not in TASKS:
            raise ValueError(f"{self.model_name}: unknown task {self.task!r} (known: {', '.join(TASKS)})")
        assets_dir = parameters.get("assets_dir")
        if not assets_dir:
            raise ValueError(f"{self.model_name}: config parameter 'assets_dir' is required")
        torch.set_num_threads(max(1, int(parameters.get("torch_threads", "1"))))
        self.device = sampling_device(parameters.get("sampling_device", "cpu"), args.get("model_instance_device_id"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.metrics = TaskMetrics(pb_utils, self.task)
        assets: ServingAssets = load_assets(assets_dir)
        assets.lyric_tokenizer.warm_up()  # fail at load time, not on the first request
        routing = RoutingCall(bls_call(pb_utils, self.device))
        backend: Any = TritonBackend(routing, assets.text_layers, assets.lyric_layers, assets.dit_layers)
        self.buckets = ShapeBuckets.from_parameters(parameters)
        if self.buckets.enabled:  # DiT calls padded to shared shapes: requests batch in dit_decoder
            backend = BucketedBackend(backend, self.buckets)
        self.generator = MusicGenerator(backend, assets.prompt_tokenizer, assets.lyric_tokenizer,
                                        assets.mel, lora_scope=served_scope(routing, assets_dir),
                                        device=self.device)
        self.admission = Admission.from_parameters(parameters, ModelDims.from_dir(assets_dir), self.device,
                                                   token_counter(self.generator))  # see serving/admission.py
        self.memory = MemoryReleaser(self.device)  # after loading: the size requests must come back to
        self.drain = DrainGate()  # `serve` drains before a stop: refuse new requests, count ours
        pb_utils.Logger.log_info(f"{self.model_name} ready (task {self.task}, sampling on {self.device}, "
                                 f"DiT shape buckets {self.buckets.as_parameters()}, {self.admission.describe()}, "
                                 f"assets {assets_dir})")

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            with self.drain.track():  # in flight until its final response is sent: `serve` waits for it
                self._serve(request)
            self.memory.after_request()  # the request's buffers are unreferenced now: hand them back
        return None

    def _serve(self, request: Any) -> None:
        pb = self.pb
        sender = request.get_response_sender()
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL

        def get_input(name: str) -> Any:
            tensor = pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        def progress(step: int, total: int) -> None:
            self.metrics.step()
            out = pb.Tensor("progress", np.array([step, total], dtype=np.int32))
            sender.send(pb.InferenceResponse(output_tensors=[out]))

        started = time.perf_counter()
        try:
            self.drain.check()  # [unavailable] once the server drains (before any input is read)
            params = read_request_fields(get_input, self.task)
            src, ref = read_audio_input(get_input, "src_audio"), read_audio_input(get_input, "ref_audio")
            with self.admission.admit(params, src, ref, request.is_cancelled):  # refuse/wait before any work
                output = self.generator.generate(params, src_audio=src, ref_audio=ref, progress=progress,
                                                 should_cancel=request.is_cancelled)
        except SamplingCancelled as exc:
            self.metrics.finished("cancelled")
            pb.Logger.log_info(f"{self.model_name}: cancelled at step {exc.step} of {exc.total}")
            sender.send(flags=final)
            return
        except Exception as exc:  # never take the server down: report and end this request
            category, message = error_report(self.model_name, exc)
            self.metrics.finished(_OUTCOMES[category])
            if category is ErrorCategory.INTERNAL:
                pb.Logger.log_error(f"{self.model_name} failed: {traceback.format_exc()}")
            else:
                pb.Logger.log_warn(f"{self.model_name}: {message}")
            sender.send(pb.InferenceResponse(error=pb.TritonError(message)), flags=final)
            return
        wall = time.perf_counter() - started
        output.record["timecosts"] = {"total": wall}
        self.metrics.succeeded(output.audio.shape[0] * output.audio.shape[-1] / output.sample_rate, wall)
        audio = output.audio.to(device="cpu", dtype=torch.float32).contiguous().numpy()
        tensors = [
            pb.Tensor("audio", audio),
            pb.Tensor("sample_rate", np.array([output.sample_rate], dtype=np.int32)),
            pb.Tensor("params_json", np.array([json.dumps(output.record, ensure_ascii=False).encode()],
                                              dtype=object)),
        ]
        sender.send(pb.InferenceResponse(output_tensors=tensors), flags=final)

    def finalize(self) -> None:
        self.pb.Logger.log_info(f"{self.model_name} unloaded")
