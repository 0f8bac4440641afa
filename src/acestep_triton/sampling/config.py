"""The sampling parameters of one generation (the torch-free request schema maps onto this).

Field names are upstream's ``ACEStepPipeline.__call__`` argument names, so a validation error
(``"<field>: <reason>"``) names the same field the user typed. Defaults are ``__call__``'s
(note: its ``guidance_interval_decay`` is 0.0; the Gradio UI differs only in use_erg_lyric).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .guidance import CFG_TYPES
from .schedule import Schedule, flow_match_schedule, oss_schedule, parse_oss_steps
from .schedulers import SCHEDULER_TYPES


@dataclass(frozen=True)
class SamplerConfig:
    """Everything the text2music loop needs besides conditions and noise.

    ``oss_steps`` may be given as "1,3,5,8" or a sequence; it is normalised to a tuple.
    ``zero_steps``/``use_zero_init`` are upstream's fixed CFG-Zero* settings.
    """

    infer_step: int = 60
    guidance_scale: float = 15.0
    scheduler_type: str = "euler"
    cfg_type: str = "apg"
    omega_scale: float = 10.0
    guidance_interval: float = 0.5
    guidance_interval_decay: float = 0.0
    min_guidance_scale: float = 3.0
    use_erg_tag: bool = True
    use_erg_lyric: bool = True
    use_erg_diffusion: bool = True
    oss_steps: tuple[int, ...] = field(default=())
    guidance_scale_text: float = 0.0
    guidance_scale_lyric: float = 0.0
    zero_steps: int = 1
    use_zero_init: bool = True
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 2.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "oss_steps", parse_oss_steps(self.oss_steps))  # type: ignore[arg-type]
        if self.scheduler_type not in SCHEDULER_TYPES:
            raise ValueError(
                f"scheduler_type: must be one of {', '.join(SCHEDULER_TYPES)}, got {self.scheduler_type!r}"
            )
        if self.cfg_type not in CFG_TYPES:
            raise ValueError(f"cfg_type: must be one of {', '.join(CFG_TYPES)}, got {self.cfg_type!r}")
        if not self.oss_steps and self.infer_step < 1:
            raise ValueError(f"infer_step: must be >= 1, got {self.infer_step}")
        if not 0.0 <= self.guidance_interval <= 1.0:
            raise ValueError(f"guidance_interval: must be in [0, 1], got {self.guidance_interval}")

    @property
    def do_guidance(self) -> bool:
        """Upstream skips every extra branch when the scale is exactly 0 or 1."""
        return self.guidance_scale not in (0.0, 1.0)

    @property
    def double_condition(self) -> bool:
        """Separate text/lyric guidance: both scales > 1 (then cfg_type is ignored)."""
        return self.guidance_scale_text > 1.0 and self.guidance_scale_lyric > 1.0

    @property
    def num_steps(self) -> int:
        """upstream's ``infer_steps`` after oss remapping (max(oss_steps) when given).

        Task logic keyed on the step count (repaint's n_min) uses this value.
        """
        return max(self.oss_steps) if self.oss_steps else self.infer_step

    def schedule(self) -> Schedule:
        """The text2music sigma schedule for this configuration."""
        if self.oss_steps:
            return oss_schedule(self.oss_steps)
        return flow_match_schedule(self.infer_step)
