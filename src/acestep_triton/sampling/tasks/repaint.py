"""repaint and extend: regenerate a window of the source latents, keep the rest bit for bit.

Both are one process upstream (``text2music_diffusion_process`` with a repaint window); the
window in seconds, relative to the source, decides what happens:

- inside the source ``[repaint_start, repaint_end)``: a repaint. Frames
  ``int(s·44100/512/8)`` to ``int(e·44100/512/8)`` are masked. The target noise ``z0`` is the
  retake mix ``cos(a)·ε + sin(a)·ε_retake`` (``a = retake_variance·π/2``) inside the mask and
  the seed noise ``ε`` outside.
- reaching outside the source (``repaint_start < 0`` or the end frame past the last source
  frame): an extension. The source latents are zero-padded by ``L = −start_frame`` frames on
  the left and ``R = end_frame − W`` on the right, the mask is exactly the padding (the inner
  ends of the window are ignored, as upstream), ``z0`` is ``ε_retake[:L] | ε | ε_retake[−R:]``
  (no cos/sin mix). ``extend`` is this with ``repaint_start = −left_extend_length`` and
  ``repaint_end = source_duration + right_extend_length``.
- the whole source exactly (frames 0 to W): upstream takes the retake path (the source is
  not used at all); ``sample_repaint`` does the same.

Sampling: with N = ``config.num_steps`` the loop skips the steps ``i < n_min =
int(N·(1 − retake_variance))``, starts at ``x = (1 − σ)·x0 + σ·z0`` (σ = t_{n_min}/1000), and
every step is a plain Euler update on σ = t/1000 (``steps.py``) followed by re-imposing
``(1 − σ_next)·x0 + σ_next·z0`` outside the mask; at the end σ_next = 0, so the frames outside
the mask are the source latents exactly. Guidance is text2music's (``GuidedVelocity``).

Deliberate differences from upstream (each is a bug or crash there):

- ``scheduler_type`` and ``omega_scale`` are ignored, as upstream does for euler and pingpong.
  For heun upstream walks heun's doubled grid (t0, t1, t1, t2, …) with the same Euler rule:
  every other update has length 0, n_min indexes the doubled grid (so it starts at roughly
  twice the requested noise level) and the guidance interval is misplaced. We use the plain
  N-point grid for every scheduler.
- When no step is left (``n_min ≥`` the schedule's length: ``retake_variance`` 0, or a short
  oss_steps list, where N = max(oss_steps) but n_min indexes the list, as upstream) upstream
  returns the raw seed noise; we return the source (σ = 0 there).
- Extending on both sides: upstream computes the right padding against the already
  left-padded length (``R = end_frame − L − W``), losing L frames on the right (or trimming
  the source when negative). We pad ``R = end_frame − W``.
- Extensions longer than the source: upstream takes the new noise from a retake draw of only
  W frames and fails its own shape assertion. The retake noise must have
  ``RepaintWindow.retake_noise_frames = max(W, L, R)`` frames, which is W (upstream's draw,
  identical numbers) whenever upstream works.
- Longer than 2583 frames (240 s) in all: upstream generates only a 2583-frame window and
  re-attaches the rest of the source afterwards, but re-attaches the wrong tensor (a copy of
  the window's own end instead of the trimmed part; for a right extension it concatenates a
  None along the batch axis, pipeline l.1344, and crashes). We raise ``ValueError`` naming the
  field instead, so no request silently produces more than the 240 s the service serves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..backend import ComponentBackend
from ..conditions import EncodedConditions
from ..config import SamplerConfig
from ..hooks import NO_HOOKS, SamplingHooks
from ..loop import GuidedVelocity, integrate
from ..noise import FRAMES_PER_SECOND, MAX_FRAMES, latent_frames, mix_retake_noise
from .retake import sample_retake
from .steps import TimestepEuler, euler_update, noised

_FRAME_S = 1.0 / FRAMES_PER_SECOND


@dataclass(frozen=True)
class RepaintWindow:
    """Where a repaint/extend generates, in latent frames of the output.

    The output is ``left_pad`` new frames, the ``source_frames`` source frames, ``right_pad``
    new frames. For a repaint (no padding) frames ``start ≤ f < end`` are regenerated; for an
    extension exactly the padding is.
    """

    source_frames: int
    start: int = 0
    end: int = 0
    left_pad: int = 0
    right_pad: int = 0

    @property
    def frames(self) -> int:
        return self.left_pad + self.source_frames + self.right_pad

    @property
    def is_extension(self) -> bool:
        return self.left_pad > 0 or self.right_pad > 0

    @property
    def is_whole_clip(self) -> bool:
        """The window is the whole source: upstream's retake path."""
        return not self.is_extension and self.start == 0 and self.end == self.source_frames

    @property
    def retake_noise_frames(self) -> int:
        """Frames the retake noise must be drawn with: the source's, or more for long pads."""
        return max(self.source_frames, self.left_pad, self.right_pad)

    def frame_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """bool [frames]: True where the output is generated."""
        mask = torch.zeros(self.frames, dtype=torch.bool, device=device)
        if self.is_extension:
            mask[: self.left_pad] = True
            mask[self.frames - self.right_pad :] = True
        else:
            mask[self.start : self.end] = True
        return mask

    @classmethod
    def from_seconds(cls, repaint_start: float, repaint_end: float, source_frames: int) -> RepaintWindow:
        """The window of ``task="repaint"`` (a window outside the source extends it, as upstream)."""
        _check_finite(("repaint_start", repaint_start), ("repaint_end", repaint_end))
        if repaint_end <= repaint_start:
            raise ValueError(
                f"repaint_end: must be greater than repaint_start ({repaint_start}), got {repaint_end}"
            )
        start, end = latent_frames(repaint_start), latent_frames(repaint_end)
        left = -start if start < 0 else 0
        right = end - source_frames if end > source_frames else 0
        window = cls(source_frames, start=max(start, 0), end=min(end, source_frames),
                     left_pad=left, right_pad=right)
        if not window.is_extension and window.end <= window.start:
            raise ValueError(
                f"repaint_end: the window [{repaint_start}, {repaint_end}) s covers no latent frame "
                f"(one frame is {_FRAME_S:.4f} s)"
            )
        field = "repaint_start" if left and not right else "repaint_end"
        return window._checked(field)

    @classmethod
    def for_extension(
        cls,
        left_extend_length: float,
        right_extend_length: float,
        source_duration: float,
        source_frames: int,
    ) -> RepaintWindow:
        """The window of ``task="extend"``: upstream's ``repaint_start = −left``,
        ``repaint_end = source_duration + right`` (``source_duration`` is the duration the
        request reports for the source, as upstream's ``audio_duration``)."""
        _check_finite(
            ("left_extend_length", left_extend_length),
            ("right_extend_length", right_extend_length),
            ("audio_duration", source_duration),
        )
        for name, value in (("left_extend_length", left_extend_length),
                            ("right_extend_length", right_extend_length)):
            if not value >= 0:
                raise ValueError(f"{name}: must be >= 0, got {value}")
        start = latent_frames(-left_extend_length)
        end = latent_frames(source_duration + right_extend_length)
        left = -start
        right = max(end - source_frames, 0)
        if left == 0 and right == 0:
            field = "left_extend_length" if left_extend_length > 0 else "right_extend_length"
            raise ValueError(
                f"{field}: the extension adds no latent frame to the {source_frames}-frame source "
                f"(left {left_extend_length} s, right {right_extend_length} s past "
                f"{source_duration} s; one frame is {_FRAME_S:.4f} s)"
            )
        window = cls(source_frames, start=0, end=source_frames, left_pad=left, right_pad=right)
        return window._checked("right_extend_length" if right else "left_extend_length")

    def _checked(self, field: str) -> RepaintWindow:
        if self.frames > MAX_FRAMES:
            raise ValueError(
                f"{field}: the result would be {self.frames} latent frames "
                f"({self.frames * _FRAME_S:.1f} s: {self.left_pad} new + {self.source_frames} source + "
                f"{self.right_pad} new), more than the {MAX_FRAMES} frames (240 s) one generation "
                f"can hold; the source is {self.source_frames * _FRAME_S:.2f} s long, shorten it or the extension"
            )
        return self

    def layout(
        self, source: torch.Tensor, noise: torch.Tensor, retake_noise: torch.Tensor, retake_variance: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, z0) [B, 8, 16, frames]: the padded source latents and the target noise."""
        if not self.is_extension:
            mask = self.frame_mask(noise.device)
            return source, torch.where(mask, mix_retake_noise(noise, retake_noise, retake_variance), noise)
        x0 = torch.nn.functional.pad(source, (self.left_pad, self.right_pad), "constant", 0.0)
        parts = []
        if self.left_pad:
            parts.append(retake_noise[..., : self.left_pad])
        parts.append(noise)
        if self.right_pad:
            parts.append(retake_noise[..., retake_noise.shape[-1] - self.right_pad :])
        return x0, torch.cat(parts, dim=-1)


def _check_finite(*fields: tuple[str, float]) -> None:
    for name, value in fields:
        if not math.isfinite(value):
            raise ValueError(f"{name}: must be a finite number of seconds, got {value}")


def repaint_first_step(retake_variance: float, num_steps: int) -> int:
    """n_min = ``int(N·(1 − retake_variance))``: the steps before it are skipped."""
    return int(num_steps * (1 - retake_variance))


class RepaintStepper(TimestepEuler):
    """Euler on σ = t/1000, then the frames outside ``mask`` are put back on the source's path."""

    def __init__(
        self, timesteps: torch.Tensor, first: int, mask: torch.Tensor, x0: torch.Tensor, z0: torch.Tensor
    ) -> None:
        super().__init__(timesteps, first)
        self.mask, self.x0, self.z0 = mask, x0, z0

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        sigma, sigma_next = self.advance()
        moved = euler_update(sample, velocity, sigma, sigma_next)
        return torch.where(self.mask, moved, noised(self.x0, self.z0, sigma_next))


def _check_latents(name: str, tensor: torch.Tensor, items: int, frames: int, batch_one_ok: bool) -> None:
    ok = tensor.dim() == 4 and tuple(tensor.shape[1:3]) == (8, 16) and tensor.shape[-1] == frames
    ok = ok and (tensor.shape[0] == items or (batch_one_ok and tensor.shape[0] == 1))
    if not ok:
        raise ValueError(f"{name}: expected [{items}, 8, 16, {frames}] latents, got {list(tensor.shape)}")


def sample_window(
    backend: ComponentBackend,
    conditions: EncodedConditions,
    window: RepaintWindow,
    source: torch.Tensor,
    noise: torch.Tensor,
    retake_noise: torch.Tensor,
    retake_variance: float,
    config: SamplerConfig,
    *,
    generator: torch.Generator | None = None,
    hooks: SamplingHooks = NO_HOOKS,
) -> torch.Tensor:
    """Regenerate ``window`` of ``source`` [1 or B, 8, 16, W]; returns [B, 8, 16, window.frames].

    ``noise`` [B, 8, 16, W] is the manual-seed draw, ``retake_noise`` [B, 8, 16,
    window.retake_noise_frames] the retake-seed draw (``SeededNoise.draw_latents``).
    ``generator`` is only used when the window is the whole clip (retake with pingpong).
    """
    if not 0.0 <= retake_variance <= 1.0:
        raise ValueError(f"retake_variance: must be in [0, 1], got {retake_variance}")
    items, width = noise.shape[0], window.source_frames
    _check_latents("noise", noise, items, width, batch_one_ok=False)
    _check_latents("retake_noise", retake_noise, items, window.retake_noise_frames, batch_one_ok=False)
    _check_latents("source latents", source, items, width, batch_one_ok=True)
    if window.is_whole_clip:
        return sample_retake(backend, conditions, noise, retake_noise, retake_variance, config,
                             generator=generator, hooks=hooks)

    source = source.to(device=noise.device, dtype=torch.float32).expand(items, -1, -1, -1)
    x0, z0 = window.layout(source, noise, retake_noise, retake_variance)
    mask = window.frame_mask(noise.device)
    schedule = config.schedule()
    first = min(repaint_first_step(retake_variance, config.num_steps), schedule.num_steps)
    stepper = RepaintStepper(schedule.timesteps, first, mask, x0, z0)
    # Upstream adds the noised source to a copy of x0 and subtracts x0 again; in float32 that
    # is not exactly the noised source, so keep its order of operations.
    start = x0 + noised(x0, z0, stepper.sigmas[first]) - x0
    latent_mask = torch.ones(items, window.frames, dtype=torch.float32, device=noise.device)
    guided = GuidedVelocity(backend, conditions, config, schedule.num_steps, items, latent_mask,
                            hooks.row_query_scale)
    return integrate(guided, stepper, start, first_index=first, hooks=hooks)


def sample_repaint(
    backend: ComponentBackend,
    conditions: EncodedConditions,
    source: torch.Tensor,
    noise: torch.Tensor,
    retake_noise: torch.Tensor,
    repaint_start: float,
    repaint_end: float,
    retake_variance: float,
    config: SamplerConfig,
    *,
    generator: torch.Generator | None = None,
    hooks: SamplingHooks = NO_HOOKS,
) -> torch.Tensor:
    """repaint: regenerate ``[repaint_start, repaint_end)`` seconds of the source latents.

    ``source`` [1 or B, 8, 16, W] (DCAE latents of the source audio), ``noise`` and
    ``retake_noise`` [B, 8, 16, W] from the manual and retake seeds. A window reaching outside
    the source extends it (then the retake noise needs ``RepaintWindow.retake_noise_frames``
    frames); the whole clip is a retake (``generator``: pingpong's, the manual-seed
    generator of item 0). Returns [B, 8, 16, frames].
    """
    window = RepaintWindow.from_seconds(repaint_start, repaint_end, source.shape[-1])
    return sample_window(backend, conditions, window, source, noise, retake_noise, retake_variance, config,
                         generator=generator, hooks=hooks)


def sample_extend(
    backend: ComponentBackend,
    conditions: EncodedConditions,
    source: torch.Tensor,
    noise: torch.Tensor,
    retake_noise: torch.Tensor,
    left_extend_length: float,
    right_extend_length: float,
    source_duration: float,
    config: SamplerConfig,
    *,
    retake_variance: float = 1.0,
    hooks: SamplingHooks = NO_HOOKS,
) -> torch.Tensor:
    """extend: add ``left_extend_length``/``right_extend_length`` seconds of new music.

    ``noise`` [B, 8, 16, W] and ``retake_noise`` [B, 8, 16, ``window.retake_noise_frames``]
    (use ``RepaintWindow.for_extension`` to size it; it is W unless an extension is longer
    than the source). ``retake_variance`` 1.0 is what upstream's UI sends (all steps run).
    Returns [B, 8, 16, L + W + R]; frames ``L:L+W`` are the source latents exactly.
    """
    window = RepaintWindow.for_extension(left_extend_length, right_extend_length, source_duration,
                                         source.shape[-1])
    return sample_window(backend, conditions, window, source, noise, retake_noise, retake_variance, config,
                         hooks=hooks)
