"""Typed gRPC client for the ACE-Step endpoints (decoupled streaming over ``tritonclient.grpc``).

An endpoint streams one ``progress`` (step, total) response per denoising step and ends with a
response carrying ``audio`` [B, 2, N], ``sample_rate`` and ``params_json``. :meth:`generate`
drives that stream and turns its failure modes into exceptions a caller can act on, by the
error category the endpoint tags its messages with (:mod:`acestep_client.errors`):
:class:`ServerUnavailable` (nothing listening, endpoint not loaded, or ``[unavailable]``: a
component restarting, no memory free now; safe to retry), :class:`InvalidRequest` (the server
refused an input; ``field`` names it; never retried), :class:`ServerError` (the server failed
the request) and :class:`GenerationCancelled` (``cancel()``, a timeout, or Ctrl-C).

``generate`` retries what is safe to retry (:mod:`acestep_client.retry`) within the request's
deadline ``timeout_s``.

Stream callbacks run on tritonclient's reader thread; they only queue what arrives, and the
calling thread does everything else (progress callback included), so user code never runs on
a gRPC thread and ``cancel()`` may be called from the progress callback itself.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from acestep_client.audio_io import audio_tensor
from acestep_client.auth import ADMIN_KEY_ENV, ADMIN_KEY_PARAMETER, API_KEY_ENV, env_key, grpc_headers, means_refused
from acestep_client.errors import ErrorCategory, means_unavailable, parse_message
from acestep_client.params import AUDIO_INPUTS, GenerationParams, params_to_wire
from acestep_client.result import GenerationResult
from acestep_client.retry import DEFAULT_RETRY, RetryCallback, RetryPolicy

ProgressCallback = Callable[[int, int], None]
AudioInput = str | Path | bytes | tuple[np.ndarray, int]
"""An audio file path, its bytes, or (audio [channels, samples], sample_rate)."""
_POLL_S = 0.1
"""How often a waiting generate() looks at its cancel flag and deadline."""
LORA_REGISTRY_MODEL = "lora_registry"
"""The control model of runtime LoRA adapters (``acestep_triton.lora.live_control``)."""


class AceStepError(Exception):
    """Base of the client's errors."""


class ServerUnavailable(AceStepError):  # noqa: N818 - the name users catch
    """No server answers at the URL, the endpoint is not loaded and ready there, or it could not
    serve the request now (``[unavailable]``). Nothing was generated: safe to retry.

    ``audio_started`` is True when the failure came after audio had begun to arrive (then the
    client does not retry it)."""

    def __init__(self, message: str, *, audio_started: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.audio_started = audio_started


class ServerError(AceStepError):
    """The server failed the request. ``field`` names the request field when the server
    rejected an input (its message then starts with ``"<field>: "``), else ``None``;
    ``category`` is the endpoint's error category (``None`` for errors from Triton itself)."""

    def __init__(self, message: str, *, status: str | None = None, field: str | None = None,
                 category: ErrorCategory | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.field = field
        self.category = category


class InvalidRequest(ServerError):  # noqa: N818 - the name users catch
    """The server refused the request's input (``field`` names it): fix it, do not retry."""


class AccessDenied(AceStepError):  # noqa: N818 - the name users catch
    """The server refused the request's credential: ``credential`` is ``"api_key"`` (inference on a
    server started with ``--api-key``) or ``"admin_key"`` (the LoRA registry's load, unload and
    reload). The message says whether none was sent or the one sent was wrong. Never retried:
    the same request would be refused again."""

    def __init__(self, message: str, *, credential: str) -> None:
        super().__init__(message)
        self.message = message
        self.credential = credential


class GenerationCancelled(AceStepError):  # noqa: N818 - the name users catch
    """The generation was stopped before it finished (``cancel()``, timeout, interrupt)."""


class GenerationTimeout(GenerationCancelled, TimeoutError):  # noqa: N818
    """The generation did not finish within ``timeout`` seconds (and was cancelled)."""


_FIELD_NAMES = frozenset(s.name for s in GenerationParams.specs()) | {"json_data"} | frozenset(AUDIO_INPUTS)
_FIELD_RE = re.compile(r"(?<![\w.])([a-z][a-z0-9_]*): ")


def field_of(message: str, extra_names: frozenset[str] = frozenset()) -> str | None:
    """The schema field a server error message names (``"infer_step: 0 is below..."``)."""
    known = _FIELD_NAMES | extra_names
    for match in _FIELD_RE.finditer(message):
        if match.group(1) in known:
            return match.group(1)
    return None


class AceStepClient:
    """Client for one Triton server (``host:port`` of its gRPC endpoint).

    Thread-safe: each :meth:`generate` opens its own stream, so several may run at once;
    :meth:`cancel` stops all of this client's running generations.
    """

    def __init__(self, url: str = "localhost:8001", *, ssl: bool = False, verbose: bool = False,
                 connect_timeout: float = 10.0, retry: RetryPolicy = DEFAULT_RETRY,
                 api_key: str | None = None, admin_key: str | None = None) -> None:
        """``retry`` is :meth:`generate`'s default :class:`RetryPolicy` (``retry.NO_RETRY``: never).

        ``api_key``: the inference key of a server started with ``--api-key`` (default: the
        ``ACESTEP_API_KEY`` environment variable; ``""``: none). ``admin_key``: the key that the
        LoRA registry's load/unload/reload need (default: ``ACESTEP_ADMIN_KEY``). A missing or
        wrong key raises :class:`AccessDenied` (see :mod:`acestep_client.auth`)."""
        self.api_key = env_key(API_KEY_ENV) if api_key is None else (api_key.strip() or None)
        self.admin_key = env_key(ADMIN_KEY_ENV) if admin_key is None else (admin_key.strip() or None)
        self.url = url
        self.ssl = ssl
        self.verbose = verbose
        self.connect_timeout = connect_timeout
        self.retry = retry
        self._lock = threading.Lock()
        self._active: set[threading.Event] = set()

    # ------------------------------------------------------------------------- health
    def _new_client(self) -> grpcclient.InferenceServerClient:
        try:
            return grpcclient.InferenceServerClient(self.url, verbose=self.verbose, ssl=self.ssl)
        except InferenceServerException as exc:
            raise ServerUnavailable(f"cannot reach {self.url}: {exc.message()}") from exc

    def _check_ready(self, client: grpcclient.InferenceServerClient, endpoint: str) -> None:
        try:
            live = client.is_server_live(client_timeout=self.connect_timeout)
            ready = live and client.is_model_ready(endpoint, client_timeout=self.connect_timeout)
        except InferenceServerException as exc:
            raise ServerUnavailable(f"no Triton server answers at {self.url}: {exc.message()}") from exc
        if not live:
            raise ServerUnavailable(f"the Triton server at {self.url} is not live")
        if not ready:
            raise ServerUnavailable(f"endpoint {endpoint!r} is not loaded and ready on {self.url}")

    def is_ready(self, endpoint: str | None = None) -> bool:
        """True when the server (and ``endpoint``, if given) answers ready."""
        client = self._new_client()
        try:
            if endpoint is None:
                return bool(client.is_server_ready(client_timeout=self.connect_timeout))
            self._check_ready(client, endpoint)
            return True
        except (InferenceServerException, ServerUnavailable):
            return False
        finally:
            client.close()

    # ------------------------------------------------------------------------- generation
    def cancel(self) -> None:
        """Stop every generation this client is running (each raises GenerationCancelled)."""
        with self._lock:
            for event in self._active:
                event.set()

    @staticmethod
    def build_inputs(params: GenerationParams,
                     extra_inputs: Mapping[str, np.ndarray] | None = None) -> list[grpcclient.InferInput]:
        """One typed ``[1]`` tensor per schema wire field (+ task tensors such as source audio)."""
        inputs = []
        wire = params_to_wire(params)
        for spec in GenerationParams.wire_specs():
            array = wire[spec.name]
            tensor = grpcclient.InferInput(spec.name, list(array.shape), spec.triton_dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        for name, value in (extra_inputs or {}).items():
            array = np.ascontiguousarray(value)
            dtype = "BYTES" if array.dtype == object else _numpy_to_triton(array.dtype)
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    def generate(self, params: GenerationParams, *, endpoint: str | None = None,
                 on_progress: ProgressCallback | None = None, timeout_s: float | None = None,
                 validate: bool = True, extra_inputs: Mapping[str, np.ndarray] | None = None,
                 src_audio: AudioInput | None = None, ref_audio: AudioInput | None = None,
                 should_cancel: Callable[[], bool] | None = None, retry: RetryPolicy | None = None,
                 on_retry: RetryCallback | None = None) -> GenerationResult:
        """Run one request on ``endpoint`` (default: ``params.task``) and wait for its audio.

        ``timeout_s`` is the request's deadline, over all attempts and the waits between them:
        past it the request is cancelled on the server and :class:`GenerationTimeout` raised.
        ``retry`` (default: the client's policy) resends the request after a
        :class:`ServerUnavailable` that came before any audio, waiting between attempts, until
        ``timeout_s`` (or the policy's ``max_elapsed_s`` after the first failure without one);
        ``on_retry(attempt, attempts, error, delay_s)`` hears about each resend. Progress then
        starts again from the first step. The last failure is raised when attempts or the
        deadline run out.

        ``src_audio`` (repaint/edit/extend) and ``ref_audio`` (audio2audio) take a file path, the
        bytes of an audio file, or ``(audio [channels, samples], sample_rate)`` (e.g. an item of
        a previous result); they travel as file bytes and the server decodes them.

        ``on_progress(step, total)`` is called in this thread for every progress response.
        ``should_cancel()`` is polled in this thread while waiting (every 0.1 s, also while the
        request waits in the server's queue); when it returns True the request is cancelled on
        the server and :class:`GenerationCancelled` raised (e.g. a web front end whose caller left).
        ``validate`` checks the parameters locally first (a ``ParamError`` names the field);
        the server validates again either way.
        """
        if validate:
            params.validate()
        extra_inputs = dict(extra_inputs or {})
        for name, source in (("src_audio", src_audio), ("ref_audio", ref_audio)):
            if source is not None:
                extra_inputs[name] = audio_tensor(source, name)
        endpoint = endpoint or params.task
        inputs = self.build_inputs(params, extra_inputs)
        policy = retry or self.retry
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delays = policy.delays()
        retry_until: float | None = None  # without a deadline: max_elapsed_s after the first failure
        for attempt in range(1, policy.attempts + 1):
            if should_cancel is not None and should_cancel():  # nothing in flight: nothing to cancel there
                raise GenerationCancelled(f"generation on {endpoint!r} cancelled before it was sent")
            try:
                result = self._attempt(inputs, endpoint, on_progress, deadline, timeout_s, should_cancel)
            except ServerUnavailable as exc:
                delay = next(delays, None)
                if retry_until is None and deadline is None and policy.max_elapsed_s is not None:
                    retry_until = time.monotonic() + policy.max_elapsed_s
                until = deadline if deadline is not None else retry_until
                left = None if until is None else until - time.monotonic()
                if exc.audio_started or delay is None or (left is not None and delay >= left):
                    raise
                if on_retry is not None:
                    on_retry(attempt, policy.attempts, exc, delay)
                self._sleep(delay, should_cancel, endpoint)
                continue
            # Client-side fields (the file format) never travel; record them with the rest.
            for spec in GenerationParams.specs():
                if not spec.wire:
                    result.params[spec.name] = getattr(params, spec.name)
            return result
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    @contextlib.contextmanager
    def _cancel_flag(self) -> Iterator[threading.Event]:
        """An event that :meth:`cancel` sets while the block runs (one per waiting call)."""
        flag = threading.Event()
        with self._lock:
            self._active.add(flag)
        try:
            yield flag
        finally:
            with self._lock:
                self._active.discard(flag)

    def _sleep(self, delay: float, should_cancel: Callable[[], bool] | None, endpoint: str) -> None:
        """Wait ``delay`` s before a retry, still honouring ``cancel()`` and ``should_cancel``."""
        with self._cancel_flag() as cancelled:
            end = time.monotonic() + delay
            while (left := end - time.monotonic()) > 0:
                if cancelled.wait(min(_POLL_S, left)) or (should_cancel is not None and should_cancel()):
                    raise GenerationCancelled(f"generation on {endpoint!r} cancelled while waiting to retry")

    def _attempt(self, inputs: list[grpcclient.InferInput], endpoint: str, on_progress: ProgressCallback | None,
                 deadline: float | None, timeout_s: float | None,
                 should_cancel: Callable[[], bool] | None) -> GenerationResult:
        """Send the request once and collect its stream (the body of one retry attempt)."""
        client = self._new_client()
        events: queue.Queue[tuple[Any, Any]] = queue.Queue()
        finished = False
        with self._cancel_flag() as cancelled:
            try:
                self._check_ready(client, endpoint)
                try:
                    client.start_stream(callback=lambda result=None, error=None: events.put((result, error)),
                                        headers=grpc_headers(self.api_key))
                    client.async_stream_infer(endpoint, inputs, request_id=uuid.uuid4().hex,
                                              enable_empty_final_response=True)
                except InferenceServerException as exc:
                    # A stream the server refused at once (e.g. a missing API key) fails the send
                    # with "the error detail is reported through provided callback": report that.
                    try:
                        detail = events.get(timeout=1.0)[1]
                    except queue.Empty:
                        detail = None
                    raise self._translate(detail if detail is not None else exc) from exc
                result = self._collect(events, cancelled, endpoint, on_progress, deadline, timeout_s,
                                       should_cancel)
                finished = True
                return result
            finally:
                # Anything but a clean finish (error, cancel, timeout, Ctrl-C, a raising progress
                # callback) cancels the request on the server so it stops spending compute.
                # Closing is best effort: the request's outcome is already decided.
                with contextlib.suppress(Exception):
                    client.stop_stream(cancel_requests=not finished)
                client.close()

    def _collect(self, events: queue.Queue[tuple[Any, Any]], cancelled: threading.Event, endpoint: str,
                 on_progress: ProgressCallback | None, deadline: float | None, timeout_s: float | None,
                 should_cancel: Callable[[], bool] | None = None) -> GenerationResult:
        chunks: list[np.ndarray] = []
        sample_rate: int | None = None
        params_json: str | None = None
        while True:
            if cancelled.is_set() or (should_cancel is not None and should_cancel()):
                raise GenerationCancelled(f"generation on {endpoint!r} cancelled")
            wait = _POLL_S
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GenerationTimeout(f"generation on {endpoint!r} did not finish within {timeout_s:g} s")
                wait = min(wait, left)
            try:
                result, error = events.get(timeout=wait)
            except queue.Empty:
                continue
            if error is not None:
                raise self._translate(error, audio_started=bool(chunks))
            progress = result.as_numpy("progress")
            if progress is not None and on_progress is not None:
                on_progress(int(progress[0]), int(progress[1]))
            audio = result.as_numpy("audio")
            if audio is not None:
                chunks.append(audio.astype(np.float32, copy=False))
            rate = result.as_numpy("sample_rate")
            if rate is not None:
                sample_rate = int(rate.reshape(-1)[0])
            text = result.as_numpy("params_json")
            if text is not None:
                raw = text.reshape(-1)[0]
                params_json = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            if _is_final(result):
                break
        if not chunks or sample_rate is None or params_json is None:
            raise ServerError(f"endpoint {endpoint!r} ended its stream without audio, sample_rate and "
                              f"params_json")
        # An endpoint may stream the audio in pieces along time; join them in order.
        audio = chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=-1)
        return GenerationResult(audio=audio, sample_rate=sample_rate, params=json.loads(params_json),
                                params_json=params_json)

    # ------------------------------------------------------------------------- runtime LoRA adapters
    def list_loras(self) -> dict[str, Any]:
        """The runtime LoRA adapters of a ``torch``-runtime server (its ``lora_registry`` model).

        Keys: ``loaded`` (name, index, ranks, components, parameters per component ...: what a
        request's ``lora_name_or_path`` may name, at any ``lora_weight``), ``available`` (folders
        of the registry not loaded), ``failed`` (refused loads and why), ``budget_bytes`` and
        ``instances`` (per component instance: the adapters resident in memory and their bytes).
        """
        return self._lora_command("list")

    def load_lora(self, name: str) -> dict[str, Any]:
        """Load (or re-read, when its file changed) the registry folder ``name``; the listing after.
        An adapter that does not fit the checkpoint raises :class:`InvalidRequest` naming
        ``lora_name_or_path``; the server keeps serving what it served."""
        return self._lora_command("load", name)

    def unload_lora(self, name: str) -> dict[str, Any]:
        """Stop serving adapter ``name`` (its memory is freed on the instances' next calls).

        ``load_lora``, ``unload_lora`` and ``reload_loras`` change what every user of the server
        gets, so they need the client's ``admin_key`` (:class:`AccessDenied` without it);
        ``list_loras`` is open."""
        return self._lora_command("unload", name)

    def reload_loras(self) -> dict[str, Any]:
        """Load every new or changed folder of the registry and unload the vanished ones."""
        return self._lora_command("reload")

    def _lora_command(self, command: str, name: str | None = None) -> dict[str, Any]:
        inputs = []
        for key, value in (("command", command), ("lora_name_or_path", name)):
            if value is None:
                continue
            tensor = grpcclient.InferInput(key, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([value.encode()], dtype=object))
            inputs.append(tensor)
        parameters = {ADMIN_KEY_PARAMETER: self.admin_key} if command != "list" and self.admin_key else None
        client = self._new_client()
        try:
            result = client.infer(LORA_REGISTRY_MODEL, inputs, client_timeout=self.connect_timeout * 6,
                                  headers=grpc_headers(self.api_key), parameters=parameters)
        except InferenceServerException as exc:
            if "unknown model" in (exc.message() or "").lower():
                raise ServerError(f"{self.url} has no {LORA_REGISTRY_MODEL!r} model: runtime LoRA adapters need a "
                                  "torch-runtime deployment built with a LoRA registry (--lora-dir)") from exc
            raise self._translate(exc) from exc
        finally:
            client.close()
        raw = result.as_numpy("loras_json").reshape(-1)[0]
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))

    def _translate(self, error: Any, *, audio_started: bool = False) -> AceStepError:
        """:func:`_translate` with what this client knows about its own credentials."""
        translated = _translate(error, self.url, audio_started=audio_started)
        if isinstance(translated, AccessDenied):
            sent = self.api_key if translated.credential == "api_key" else self.admin_key
            env = API_KEY_ENV if translated.credential == "api_key" else ADMIN_KEY_ENV
            what = ("the key this client sent was refused" if sent else
                    f"this client sent none (pass {translated.credential}= or set {env})")
            translated = AccessDenied(f"{translated.message}: {what}", credential=translated.credential)
        return translated

    def close(self) -> None:
        self.cancel()

    def __enter__(self) -> AceStepClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_final(result: Any) -> bool:
    parameters = result.get_response().parameters
    return "triton_final_response" in parameters and parameters["triton_final_response"].bool_param


def _translate(error: Any, url: str, *, audio_started: bool = False) -> AceStepError:
    """Map a stream error to the client's exceptions: by the endpoint's category tag when the
    message has one, else by the gRPC status (the transport's own failures)."""
    if not isinstance(error, InferenceServerException):
        return ServerError(str(error))
    status = str(error.status() or "")
    category, message = parse_message(error.message() or str(error))
    if category is ErrorCategory.UNAVAILABLE:
        return ServerUnavailable(message, audio_started=audio_started)
    if category is ErrorCategory.CANCELLED:
        return GenerationCancelled(message)
    if category is ErrorCategory.INVALID_ARGUMENT:
        return InvalidRequest(message, status=status or None, field=field_of(message), category=category)
    if category is ErrorCategory.INTERNAL:
        return ServerError(message, status=status or None, category=category)
    if category is ErrorCategory.PERMISSION_DENIED:
        return AccessDenied(message, credential="admin_key")
    if means_refused(message):  # Triton's own check of a restricted protocol (gRPC says UNAVAILABLE)
        return AccessDenied(f"{url} requires an API key for inference ({message})", credential="api_key")
    if status.endswith("UNAVAILABLE"):
        return ServerUnavailable(f"lost the Triton server at {url}: {message}", audio_started=audio_started)
    if means_unavailable(message):  # Triton answering for an endpoint whose own process died
        return ServerUnavailable(f"endpoint unavailable at {url}: {message}", audio_started=audio_started)
    if status.endswith("CANCELLED"):
        return GenerationCancelled(message)
    return ServerError(message, status=status or None, field=field_of(message))


def _numpy_to_triton(dtype: np.dtype) -> str:
    name = np_to_triton_dtype(np.dtype(dtype))
    if name is None:
        raise ValueError(f"numpy dtype {dtype} has no Triton equivalent")
    return name
