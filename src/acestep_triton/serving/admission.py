"""Admission control: estimate a request's peak memory from its shape, refuse or queue it.

Upstream users' most reported failure is an out-of-memory kill of the whole server by one big
request. Each endpoint instance therefore estimates, before any work, the peak memory a request
will need (summed over the processes it runs in: endpoint, DiT, DCAE and vocoder) and checks it
against a budget (config parameter ``memory_budget_mb``):

* a request that can never fit the budget is refused at once with a
  :class:`~acestep_client.params.ParamError` naming the field to shrink (``batch_size`` when
  fewer items of this length fit, else ``audio_duration``, or ``src_audio``/``ref_audio`` for
  tasks whose length follows an uploaded file, or ``lyrics``) and the numbers;
* a request that fits the budget but not what is free now waits (up to ``memory_wait_s``) for
  the requests in flight in this process to finish, then gets
  :class:`~acestep_client.errors.UnavailableError` (retry later). A decoupled endpoint instance
  serves one request at a time, so "in flight" is per instance process; with
  ``memory_check_free`` the live free memory of the device (GPU: ``cudaMemGetInfo``; CPU:
  ``MemAvailable``) minus the margin is also required, which accounts for the other instances.

The estimate (:func:`estimate_memory`) is the largest of the request's sequential phases plus
what lives through all of them, each term an element count derived from the checkpoint's sizes
(:class:`ModelDims`) times a per-element factor, 4 bytes per fp32 element:

* DiT call (per denoising step): ``rows = batch × branches`` (1 without guidance, 2 with
  cfg/apg/cfg_star, 3 with double-condition guidance: ``guidance_scale_text`` and
  ``guidance_scale_lyric`` both > 1), ``rows × frames × (DIT_ACTIVATIONS_PER_WIDTH·D +
  DIT_ACTIVATIONS_PER_FF_WIDTH·F)`` (linear self-attention is linear in the frames; the GLU-MBConv
  holds ~``2F`` wide temporaries) plus the cross-attention ``rows × heads × frames × tokens ×
  CROSS_ATTENTION_SCORE_COPIES`` (tokens = 1 speaker + text + lyric tokens; PyTorch's SDPA kernels
  do not materialise the scores: measured ~0, a small factor is kept for backends that do);
* lyric Conformer (once per condition, batch 1): ``heads × T_lyric² × LYRIC_ATTENTION_MATRICES``
  (relative-position attention holds the content, position and softmax matrices);
* DCAE decode of one window (512 latent frames past 48 s, else the whole song) and DCAE encode of a
  whole source (it is not windowed): ``frames × max_level(channels_l · 128 · 8 / 4^l) ×
  DCAE_ACTIVATION_COPIES``;
* vocoder call (2 channels × 262144 samples past 48 s, else the whole song): ``samples × rows ×
  max_stage(channels_k · upsampled_k / 512) × VOCODER_ACTIVATION_COPIES``;
* audio: ``batch × 2 × samples at 48 kHz × AUDIO_COPIES`` (44.1 kHz pieces, the resampled item, the
  per-item list and its stack, the endpoint's output tensor) beside the decode phase;
* a fixed ``REQUEST_OVERHEAD`` (conditions, tokenizer output, allocator slack).

Per-element factors: first fitted in-process by ``benchmarks/memory_estimate.py`` (DiT at width 512:
``DIT_ACTIVATIONS_PER_WIDTH = 12``, ``DIT_ACTIVATIONS_PER_FF_WIDTH = 6``, estimate ÷ measured
1.04–1.05; ``CROSS_ATTENTION_SCORE_COPIES = 0.5``; ``LYRIC_ATTENTION_MATRICES = 8``, not calibrated:
the tiny Conformer is too small to measure; ``AUDIO_COPIES = 5``), then recalibrated at full size
through tritonserver by ``benchmarks/full_size.py`` (3.5B checkpoint, torch runtime on the CPU,
every task at 5 and 10 s, after one unmeasured request per endpoint; measured = the sum of every
server process's RSS over its value before the request): ``DCAE_ACTIVATION_COPIES = 7`` (9 before;
the in-process fit at 16–64 frames, 7.7–12 per element, included fixed costs),
``VOCODER_ACTIVATION_COPIES = 12`` (24 before: the in-process 25–48 per element were small windows
dominated by fixed costs) and ``REQUEST_OVERHEAD = 200 MiB`` (32 before): a served request leaves
every component process up to its release threshold (64 MiB, ``serving/memory.py``) above its
post-load size, and the sum over the processes is a constant a request must be budgeted for. Full
size, 8 requests: estimate ÷ measured 1.08–1.43 (benchmarks/RESULTS.md; in-sample: the constants
were fitted on those requests).

For the 3.5B checkpoint (D 2560, F 6400, 20 heads, Conformer 16 heads, DCAE channels 128…1024,
vocoder 1024 initial channels) that is: DiT ``12·2560 + 6·6400 = 69 120`` elements = 270 KiB per
row and frame (a 240 s song, 2583 frames, apg at batch 1: 1362 MiB); cross-attention 40 B per
(row, frame, token); DCAE 131 072 elements per latent frame × 7 × 4 B = 3.5 MiB per frame (a
512-frame window: 1792 MiB); vocoder 8 elements per sample and channel × 12 × 4 B = 384 B (a
262 144-sample window of 2 channels: 192 MiB); audio 5 × 2 × 4 B = 40 B per output sample and
item (a 240 s song: 439 MiB per item). Batch 1 × 240 s with 300 lyric tokens: ~2.4 GiB; batch
16 × 240 s: ~24 GiB (the DiT call dominates: 16 × 2 rows × 2583 frames).
"""

from __future__ import annotations

import io
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import soundfile as sf
import torch

from acestep_client.errors import UnavailableError
from acestep_client.limits import MODEL_SAMPLE_RATE as MODEL_RATE
from acestep_client.limits import OUTPUT_SAMPLE_RATE as OUTPUT_RATE
from acestep_client.limits import OVERLAP_MIN_DURATION_S
from acestep_client.params import MAX_DURATION_S, GenerationParams, ParamError

from ..checkpoint import DCAE_DIR, TRANSFORMER_DIR, VOCODER_DIR, CheckpointLayout
from ..codec import OverlapWindows
from ..models.transformer import TransformerConfig
from ..models.vocoder import VocoderConfig
from ..sampling import SamplingCancelled
from ..sampling.noise import FRAMES_PER_SECOND, latent_frames
from .config_params import parse_flag
from .memory import proc_field_bytes

MiB = 2**20
BYTES = 4  # fp32: the CPU runtimes and the sampling loop; bf16 engines need less (conservative)
SAMPLES_PER_FRAME = round(MODEL_RATE / FRAMES_PER_SECOND)  # 4096: hop 512 × DCAE downsampling 8
MAX_SECONDS = MAX_DURATION_S  # the longest generation (and source) served
RANDOM_DURATION_MAX_S = MAX_DURATION_S  # audio_duration <= 0 draws a duration up to this
DCAE_WINDOW = OverlapWindows.dcae_window  # latent frames per windowed DCAE call
VOCODER_WINDOW = OverlapWindows.vocoder_window  # samples per windowed vocoder call

# Per-element factors (module docstring): fp32 elements each term holds per unit of its shape.
DIT_ACTIVATIONS_PER_WIDTH = 12.0
DIT_ACTIVATIONS_PER_FF_WIDTH = 6.0
CROSS_ATTENTION_SCORE_COPIES = 0.5
LYRIC_ATTENTION_MATRICES = 8.0
DCAE_ACTIVATION_COPIES = 7.0
VOCODER_ACTIVATION_COPIES = 12.0
AUDIO_COPIES = 5.0
REQUEST_OVERHEAD = 200 * MiB  # allocator slack of the served processes, conditions, tokenizer output
LATENT_COPIES_PER_ROW = 16.0  # latents, noise, velocities and guidance temporaries per row (float64 in APG)

SOURCE_TASKS = {"repaint": "src_audio", "edit": "src_audio", "extend": "src_audio", "audio2audio": "ref_audio"}


# ------------------------------------------------------------------------------ model sizes
@dataclass(frozen=True)
class ModelDims:
    """The checkpoint sizes the estimate scales with (defaults: the 3.5B checkpoint)."""

    dit_width: int = 2560
    dit_ff: int = 6400
    dit_heads: int = 20
    lyric_heads: int = 16
    lyric_width: int = 1024
    dcae_channels: tuple[int, ...] = (128, 256, 512, 1024)
    dcae_encoder_channels: tuple[int, ...] = (128, 256, 512, 1024)
    mel_bins: int = 128
    latent_stride: int = 8
    vocoder_channels: int = 1024
    vocoder_rates: tuple[int, ...] = (4, 4, 2, 2, 2, 2, 2)

    @classmethod
    def from_configs(cls, transformer: Mapping[str, Any], dcae: Mapping[str, Any],
                     vocoder: Mapping[str, Any]) -> ModelDims:
        """From the three ``config.json`` of a checkpoint (or of serving assets)."""
        t = TransformerConfig.from_dict(transformer)
        v = VocoderConfig.from_dict(vocoder)
        decoder = tuple(int(c) for c in dcae.get("decoder_block_out_channels", cls.dcae_channels))
        encoder = tuple(int(c) for c in dcae.get("encoder_block_out_channels", cls.dcae_encoder_channels))
        return cls(dit_width=t.inner_dim, dit_ff=t.ff_hidden, dit_heads=t.num_attention_heads,
                   lyric_heads=t.lyric_encoder_num_heads, lyric_width=t.lyric_hidden_size,
                   dcae_channels=decoder, dcae_encoder_channels=encoder, mel_bins=v.n_mels,
                   latent_stride=2 ** (len(decoder) - 1), vocoder_channels=v.upsample_initial_channel,
                   vocoder_rates=tuple(v.upsample_rates))

    @classmethod
    def from_dir(cls, folder: str | Path) -> ModelDims:
        """From a checkpoint or assets folder (the official four-folder layout)."""
        layout = CheckpointLayout(Path(folder))
        return cls.from_configs(layout.read_config(TRANSFORMER_DIR), layout.read_config(DCAE_DIR),
                                layout.read_config(VOCODER_DIR))

    @property
    def dit_per_row_frame(self) -> float:
        """Elements of DiT activations per (row, latent frame), cross-attention aside."""
        return DIT_ACTIVATIONS_PER_WIDTH * self.dit_width + DIT_ACTIVATIONS_PER_FF_WIDTH * self.dit_ff

    def dcae_per_frame(self, channels: tuple[int, ...]) -> float:
        """Elements of the largest DCAE level per latent frame (level l: ``c_l`` channels on a
        ``(mel/2^l) × (8·W/2^l)`` grid)."""
        return max(c * self.mel_bins * self.latent_stride / 4**level for level, c in enumerate(channels))

    @property
    def vocoder_per_sample(self) -> float:
        """Elements of the largest HiFi-GAN stage per output sample of one channel."""
        total = math.prod(self.vocoder_rates)
        best, length = float(self.vocoder_channels) / total, 1
        for k, rate in enumerate(self.vocoder_rates):
            length *= rate
            best = max(best, self.vocoder_channels / 2 ** (k + 1) * length / total)
        return best


# ------------------------------------------------------------------------------ request shape
@dataclass(frozen=True)
class RequestShape:
    """What a request's memory depends on."""

    batch: int
    frames: int  # latent frames generated (and decoded)
    branches: int = 1  # DiT rows per item in one guided call
    tokens: int = 1  # encoder tokens a frame attends to (speaker + text + lyrics)
    lyric_tokens: int = 1
    source_frames: int = 0  # latent frames of an uploaded file encoded whole (0: none)
    length_field: str = "audio_duration"  # the field that sets ``frames``

    @property
    def overlapped(self) -> bool:
        """Whether the decode runs in windows (songs over 48 s, as the codec does)."""
        return self.frames / FRAMES_PER_SECOND > OVERLAP_MIN_DURATION_S

    @property
    def seconds(self) -> float:
        return self.frames / FRAMES_PER_SECOND


def guidance_branches(params: GenerationParams) -> int:
    """DiT rows per item at a guided step (``sampling/loop.py`` ``GuidedVelocity.branches``)."""
    if params.guidance_scale_text > 1.0 and params.guidance_scale_lyric > 1.0:
        return 3  # double condition: cond, text-only, uncond
    if params.guidance_scale not in (0.0, 1.0):
        return 2  # cfg / apg / cfg_star: cond + uncond
    return 1


def frames_for(seconds: float) -> int:
    """Latent frames of ``seconds`` (``sampling.noise.latent_frames``; at least one)."""
    return max(1, latent_frames(seconds))


def audio_seconds(data: bytes | None) -> float | None:
    """Duration of an uploaded file from its header only (None: unreadable, let the decoder say
    why); costs no decode, so a refused request costs nothing."""
    if not data:
        return None
    try:
        info = sf.info(io.BytesIO(data))
    except (RuntimeError, TypeError, ValueError):
        return None
    return float(info.duration) if info.duration > 0 else None


def request_shape(params: GenerationParams, *, src_seconds: float | None = None,
                  ref_seconds: float | None = None, text_tokens: int = 256,
                  lyric_tokens: int = 1) -> RequestShape:
    """The shape of a validated request (upper bounds where the pipeline draws at random)."""
    field_name = SOURCE_TASKS.get(params.task, "audio_duration")
    source_frames = 0
    if params.task in ("repaint", "edit", "extend"):
        source_frames = frames_for(min(src_seconds, MAX_SECONDS)) if src_seconds else 0
        frames = source_frames
        if params.task == "extend":
            frames += int((params.left_extend_length + params.right_extend_length) * FRAMES_PER_SECOND) + 2
    elif params.task == "audio2audio":
        source_frames = frames_for(min(ref_seconds, MAX_SECONDS)) if ref_seconds else 0
        frames = source_frames
    else:
        duration = params.audio_duration if params.audio_duration > 0 else RANDOM_DURATION_MAX_S
        frames = frames_for(duration)
    lyric_tokens = max(1, lyric_tokens)
    return RequestShape(batch=params.batch_size, frames=max(1, frames), branches=guidance_branches(params),
                        tokens=1 + max(1, text_tokens) + lyric_tokens, lyric_tokens=lyric_tokens,
                        source_frames=source_frames, length_field=field_name)


# ------------------------------------------------------------------------------ estimate
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per term; ``peak`` is the largest phase plus what lives through all of them."""

    parts: Mapping[str, float] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        p = self.parts
        phases = (p["dit"] + p["cross_attention"], p["lyric_encoder"], p["source_encode"],
                  p["audio"] + max(p["dcae_window"], p["vocoder_window"]))
        return int(p["overhead"] + p["latents"] + max(phases))

    def describe(self) -> str:
        return ", ".join(f"{k} {v / MiB:.0f}" for k, v in self.parts.items() if v >= MiB) + " (MiB)"


def estimate_memory(shape: RequestShape, dims: ModelDims) -> MemoryEstimate:
    """The peak-memory estimate of a request of ``shape`` on a model of ``dims`` (see the module
    docstring for each term)."""
    rows = shape.batch * shape.branches
    decode_frames = min(shape.frames, DCAE_WINDOW) if shape.overlapped else shape.frames
    model_samples = shape.frames * SAMPLES_PER_FRAME
    vocoder_samples = VOCODER_WINDOW if shape.overlapped else model_samples
    output_samples = math.ceil(model_samples * OUTPUT_RATE / MODEL_RATE)
    parts = {
        "overhead": float(REQUEST_OVERHEAD),
        "latents": LATENT_COPIES_PER_ROW * rows * 8 * 16 * shape.frames * BYTES,
        "dit": rows * shape.frames * dims.dit_per_row_frame * BYTES,
        "cross_attention": CROSS_ATTENTION_SCORE_COPIES * rows * dims.dit_heads * shape.frames * shape.tokens * BYTES,
        "lyric_encoder": LYRIC_ATTENTION_MATRICES * dims.lyric_heads * shape.lyric_tokens**2 * BYTES,
        "source_encode": (DCAE_ACTIVATION_COPIES * shape.source_frames
                          * dims.dcae_per_frame(dims.dcae_encoder_channels) * BYTES),
        "dcae_window": DCAE_ACTIVATION_COPIES * decode_frames * dims.dcae_per_frame(dims.dcae_channels) * BYTES,
        "vocoder_window": VOCODER_ACTIVATION_COPIES * 2 * vocoder_samples * dims.vocoder_per_sample * BYTES,
        "audio": AUDIO_COPIES * shape.batch * 2 * output_samples * BYTES,
    }
    return MemoryEstimate(parts)


def largest_fitting(fits: Callable[[int], bool], low: int, high: int) -> int:
    """The largest ``n`` in ``[low, high]`` with ``fits(n)`` (``fits`` monotone), or ``low − 1``."""
    if not fits(low):
        return low - 1
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def refusal(shape: RequestShape, dims: ModelDims, budget: int) -> ParamError | None:
    """Why a request of ``shape`` can never fit ``budget`` bytes, naming the field to shrink
    (None when it fits). ``batch_size`` is named when fewer items of this length fit, else the
    length field (with the longest length that fits one item), else ``lyrics``."""
    need = estimate_memory(shape, dims).peak
    if need <= budget:
        return None
    numbers = f"needs about {need / MiB:.0f} MiB, over this endpoint's memory budget of {budget / MiB:.0f} MiB"

    def fits(**change: int) -> Callable[[int], bool]:
        key = next(iter(change))
        return lambda n: estimate_memory(replace(shape, **{key: n}), dims).peak <= budget

    items = largest_fitting(fits(batch=0), 1, shape.batch)
    seconds = shape.seconds
    if items >= 1:
        return ParamError("batch_size", f"{shape.batch} items of {seconds:.1f} s {numbers}; "
                                        f"at most {items} fit (or send several requests)")
    one = replace(shape, batch=1)

    def one_fits(frames: int) -> bool:
        sized = replace(one, frames=frames, source_frames=min(one.source_frames, frames))
        return estimate_memory(sized, dims).peak <= budget

    frames = largest_fitting(one_fits, 1, shape.frames)
    if frames >= 1:
        longest = frames / FRAMES_PER_SECOND
        what = {"audio_duration": f"audio_duration {seconds:.1f} s",
                "src_audio": f"a src_audio result of {seconds:.1f} s",
                "ref_audio": f"a ref_audio of {seconds:.1f} s"}[shape.length_field]
        batch = f" at batch_size {shape.batch}" if shape.batch > 1 else ""
        return ParamError(shape.length_field, f"{what}{batch} {numbers}; at most {longest:.1f} s fits one item")
    return ParamError("lyrics", f"{shape.lyric_tokens} lyric tokens {numbers} even for the shortest song")


# ------------------------------------------------------------------------------ budget
class MemoryBudget:
    """The memory a process may commit to requests at once, with waiting for in-flight ones.

    Thread-safe; ``free_now`` (optional) gives the memory free right now (bytes), which a
    request must also fit.
    """

    def __init__(self, budget: int, timeout_s: float = 30.0,
                 free_now: Callable[[], int] | None = None, poll_s: float = 0.25) -> None:
        self.budget = int(budget)
        self.timeout_s = timeout_s
        self.free_now = free_now
        self.poll_s = poll_s
        self.in_flight = 0
        self._cond = threading.Condition()

    def _fits_now(self, need: int) -> bool:
        if self.in_flight + need > self.budget:
            return False
        return self.free_now is None or self.in_flight > 0 or need <= self.free_now()

    @contextmanager
    def reserve(self, need: int, should_cancel: Callable[[], bool] | None = None) -> Iterator[None]:
        """Hold ``need`` bytes for the ``with`` block; wait while they are not free.

        ``need`` over the whole budget is a caller error (check :func:`refusal` first). Raises
        :class:`UnavailableError` after ``timeout_s``, and ``SamplingCancelled`` when the
        request is cancelled while waiting.
        """
        if need > self.budget:
            raise ValueError(f"{need} bytes can never fit the budget of {self.budget}")
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while not self._fits_now(need):
                left = deadline - time.monotonic()
                if should_cancel is not None and should_cancel():
                    raise SamplingCancelled(0, 0)
                if left <= 0:
                    raise UnavailableError(
                        f"the request needs about {need / MiB:.0f} MiB; {self.in_flight / MiB:.0f} MiB of the "
                        f"{self.budget / MiB:.0f} MiB budget are held by requests in flight and no memory "
                        f"came free within {self.timeout_s:g} s")
                self._cond.wait(min(left, self.poll_s))
            self.in_flight += need
        try:
            yield
        finally:
            with self._cond:
                self.in_flight -= need
                self._cond.notify_all()


def available_ram() -> int:
    """``MemAvailable`` of /proc/meminfo in bytes (0 where unknown)."""
    return proc_field_bytes("/proc/meminfo", "MemAvailable")


class Admission:
    """An endpoint's admission control: shape → estimate → refuse, wait or admit.

    Built from the endpoint's config parameters (:meth:`from_parameters`):

    * ``memory_budget_mb``: ``auto`` (default: the device's free memory minus the margin, read at
      the first request and kept: ``cudaMemGetInfo`` on a GPU, ``MemAvailable`` on the CPU),
      ``off``/``0``, or a number of MiB;
    * ``memory_margin_mb``: what ``auto`` and the live check leave free (default 2048);
    * ``memory_wait_s``: how long a request that fits waits for memory (default 30);
    * ``memory_check_free``: also require the live free memory (default false).
    """

    def __init__(self, dims: ModelDims, budget: MemoryBudget | Callable[[], MemoryBudget] | None,
                 count_tokens: Callable[[GenerationParams], tuple[int, int]] | None = None) -> None:
        """``budget``: the budget, None (no budget), or a function making it, called once at the
        first request (``auto`` on a GPU: see :meth:`from_parameters`)."""
        self.dims = dims
        self._budget: MemoryBudget | None = None
        self._make_budget: Callable[[], MemoryBudget] | None = None
        if callable(budget) and not isinstance(budget, MemoryBudget):
            self._make_budget = budget
        else:
            self._budget = budget
        self._lock = threading.Lock()
        self.count_tokens = count_tokens

    @property
    def budget(self) -> MemoryBudget | None:
        """The budget, made on first use when it is measured lazily (then kept).

        Why lazily: free device memory read while the instance loads also counts the memory that
        the components loading beside it (DiT, DCAE, vocoder in their own processes, often on
        the same GPU) have not taken yet, so the budget would promise memory they will hold. By
        the first request every model of the server is loaded (Triton serves only then)."""
        if self._make_budget is not None:
            with self._lock:
                if self._make_budget is not None:
                    self._budget = self._make_budget()  # raises (and is retried next time) when none is left
                    self._make_budget = None
        return self._budget

    @property
    def lazy(self) -> bool:
        """True until a lazily measured budget has been read."""
        return self._make_budget is not None

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str], dims: ModelDims, device: Any = "cpu",
                        count_tokens: Callable[[GenerationParams], tuple[int, int]] | None = None,
                        free_memory: Callable[[Any], int] | None = None) -> Admission:
        """``free_memory(device)``: bytes free on the device now (default: ``cudaMemGetInfo``
        on a GPU, ``MemAvailable`` on the CPU); tests pass a fake."""
        device = torch.device(device)
        value = parameters.get("memory_budget_mb", "auto").strip().lower()
        margin = int(float(parameters.get("memory_margin_mb", "2048")) * MiB)
        wait = float(parameters.get("memory_wait_s", "30"))
        check_free = parse_flag(parameters.get("memory_check_free", "false"), False, "memory_check_free")
        if wait < 0 or margin < 0:
            raise ValueError("config parameters memory_wait_s and memory_margin_mb must be >= 0")

        def free_now() -> int:
            if free_memory is not None:
                return int(free_memory(device)) - margin
            if device.type == "cuda":
                return int(torch.cuda.mem_get_info(device)[0]) - margin
            return available_ram() - margin

        if value in ("off", "none", "0", ""):
            return cls(dims, None, count_tokens)
        if value == "auto":
            # The CPU too: the host's MemAvailable minus the margin (what an out-of-memory kill of
            # the whole server would otherwise decide), read at the first request like a GPU's.
            where = str(device) if device.type == "cuda" else "the host (MemAvailable)"

            def measured() -> MemoryBudget:
                budget = free_now()
                if budget <= 0:
                    raise UnavailableError(
                        f"memory_budget_mb auto: {where} has {(budget + margin) / MiB:.0f} MiB free, not more "
                        f"than memory_margin_mb ({margin / MiB:.0f} MiB); nothing can be admitted now")
                return MemoryBudget(budget, wait, free_now if check_free else None)

            return cls(dims, measured, count_tokens)
        try:
            budget = int(float(value) * MiB)
        except ValueError:
            raise ValueError(f"config parameter memory_budget_mb must be auto, off or MiB, got {value!r}") from None
        if budget <= 0:
            raise ValueError(f"memory budget {budget / MiB:.0f} MiB: nothing left after the margin")
        return cls(dims, MemoryBudget(budget, wait, free_now if check_free else None), count_tokens)

    def describe(self) -> str:
        if self.lazy:
            return "memory budget auto (free memory minus the margin, read at the first request)"
        if self.budget is None:
            return "memory budget off"
        return f"memory budget {self.budget.budget / MiB:.0f} MiB (wait up to {self.budget.timeout_s:g} s)"

    def shape(self, params: GenerationParams, src_audio: bytes | None = None,
              ref_audio: bytes | None = None) -> RequestShape:
        text, lyric = self.count_tokens(params) if self.count_tokens is not None else (256, 1)
        return request_shape(params, src_seconds=audio_seconds(src_audio), ref_seconds=audio_seconds(ref_audio),
                             text_tokens=text, lyric_tokens=lyric)

    def admit(self, params: GenerationParams, src_audio: bytes | None = None, ref_audio: bytes | None = None,
              should_cancel: Callable[[], bool] | None = None) -> AbstractContextManager[None]:
        """A context to run the request in: raises ``ParamError`` now when it can never fit, and
        waits (or raises ``UnavailableError``) while memory is short."""
        budget = self.budget
        if budget is None:
            return nullcontext()
        shape = self.shape(params, src_audio, ref_audio)
        error = refusal(shape, self.dims, budget.budget)
        if error is not None:
            raise error
        return budget.reserve(estimate_memory(shape, self.dims).peak, should_cancel)


def token_counter(generator: Any) -> Callable[[GenerationParams], tuple[int, int]]:
    """``params → (text tokens, lyric tokens)`` with a :class:`~acestep_triton.pipeline.
    MusicGenerator`'s tokenizers (the longer of prompt and edit target for ``edit``). Too many
    lyric tokens raise the pipeline's own ``ParamError`` here, before any work."""

    def count(params: GenerationParams) -> tuple[int, int]:
        prompts = [params.prompt]
        lyrics = [("lyrics", params.lyrics)]
        if params.task == "edit":
            prompts.append(params.edit_target_prompt)
            lyrics.append(("edit_target_lyrics", params.edit_target_lyrics))
        text = max(int(generator.prompt_tokenizer([p])[0].shape[-1]) for p in prompts)
        lyric = max(len(generator.tokenize_lyrics(text, name)) for name, text in lyrics)
        return text, lyric

    return count
