"""ACE-Step's vocoder (upstream ``ADaMoSHiFiGANV1``): log-mel → 44.1 kHz waveform.

Structure (every size from ``music_vocoder/config.json``):

* ``backbone``: a 1-D ConvNeXt encoder. A stem (k7 conv with replicate padding + channels-first
  LayerNorm), then per stage a (LayerNorm + 1×1 conv) channel change followed by ConvNeXt blocks
  (depthwise conv, LayerNorm, Linear ×4, GELU, Linear, layer scale ``gamma``, residual), and a
  final LayerNorm. It turns the ``n_mels``-row mel into ``dims[-1]`` feature rows.
* ``head``: a HiFi-GAN generator over those rows (``num_mels`` in the config): pre conv,
  then per upsampling stage SiLU → transposed conv (channels halve) → mean of multi-receptive-
  field residual blocks (SiLU/dilated conv/SiLU/conv, residual); SiLU → post conv → tanh.
  The product of the upsample rates equals the mel hop, so T frames give ``T · hop`` samples.
* ``mel_transform``: the log-mel front end whose buffers the checkpoint carries; inference of
  the vocoder itself does not use it, the codec does (see :mod:`.mel`).

The checkpoint stores the generator's convolutions with old-style weight normalisation
(``weight_g`` gain per output row, ``weight_v`` direction). :class:`WeightNormConv1d` and
:class:`WeightNormConvTranspose1d` keep those two tensors so the official file loads strictly;
:meth:`Vocoder.fold_weight_norm` replaces them by the plain ``weight`` they define, which is
what export and fast inference want (the result is identical, the per-call norm disappears).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .mel import LogMelSpectrogram

log = logging.getLogger(__name__)

#: Official keys that inference never reads. The mel buffers are used (by the codec), so none.
UNUSED_KEYS: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class VocoderConfig:
    """``music_vocoder/config.json``; defaults are upstream's constructor defaults."""

    input_channels: int = 128
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (128, 256, 384, 512)
    kernel_sizes: tuple[int, ...] = (7,)
    upsample_rates: tuple[int, ...] = (4, 4, 2, 2, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (8, 8, 4, 4, 4, 4, 4)
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11, 13)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 4
    num_mels: int = 512
    upsample_initial_channel: int = 1024
    use_template: bool = False
    pre_conv_kernel_size: int = 13
    post_conv_kernel_size: int = 13
    drop_path_rate: float = 0.0
    sampling_rate: int = 44100
    n_fft: int = 2048
    win_length: int = 2048
    hop_length: int = 512
    f_min: float = 40.0
    f_max: float = 16000.0
    n_mels: int = 128

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> VocoderConfig:
        """Parse a config dict; ``_``-prefixed metadata is skipped, unknown keys are logged."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key not in fields:
                log.warning("vocoder config: ignoring unknown key %r", key)
                continue
            if key == "resblock_dilation_sizes":
                value = tuple(tuple(int(d) for d in ds) for ds in value)
            elif isinstance(value, list):
                value = tuple(value)
            values[key] = value
        cfg = cls(**values)
        if cfg.use_template:
            raise ValueError("vocoder config: use_template=true needs a pitch template input, unsupported")
        if math.prod(cfg.upsample_rates) != cfg.hop_length:
            raise ValueError(
                f"vocoder config: prod(upsample_rates)={math.prod(cfg.upsample_rates)} "
                f"must equal hop_length={cfg.hop_length}"
            )
        if len(cfg.depths) != len(cfg.dims):
            raise ValueError("vocoder config: depths and dims differ in length")
        return cfg


# --------------------------------------------------------------------------------------------
# weight-normalised convolutions (old-style keys)


def _split_weight(conv: nn.Module) -> None:
    """Replace ``conv.weight`` by ``weight_g`` (norm over all but dim 0) and ``weight_v``."""
    weight = conv.weight.detach()
    del conv._parameters["weight"]
    norm = weight.flatten(1).norm(dim=1).reshape(-1, *([1] * (weight.dim() - 1)))
    conv.weight_g = nn.Parameter(norm)
    conv.weight_v = nn.Parameter(weight.clone())


def _effective_weight(conv: nn.Module) -> Tensor:
    """The weight the layer applies: ``g · v / ‖v‖`` until folded, then the plain weight."""
    if "weight" in conv._parameters:
        return conv._parameters["weight"]
    return torch._weight_norm(conv.weight_v, conv.weight_g, 0)


def _fold(conv: nn.Module) -> None:
    if "weight" in conv._parameters:
        return
    weight = _effective_weight(conv).detach()
    del conv._parameters["weight_g"]
    del conv._parameters["weight_v"]
    conv.weight = nn.Parameter(weight)


class WeightNormConv1d(nn.Conv1d):
    """``Conv1d`` stored as ``weight_g``/``weight_v`` until :meth:`fold`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _split_weight(self)

    def fold(self) -> None:
        _fold(self)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, _effective_weight(self), self.bias)


class WeightNormConvTranspose1d(nn.ConvTranspose1d):
    """``ConvTranspose1d`` stored as ``weight_g``/``weight_v`` until :meth:`fold`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _split_weight(self)

    def fold(self) -> None:
        _fold(self)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return F.conv_transpose1d(
            x, _effective_weight(self), self.bias, self.stride, self.padding,
            self.output_padding, self.groups, self.dilation,
        )


# --------------------------------------------------------------------------------------------
# ConvNeXt backbone


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over dim 1 of ``[B, C, T]`` (ConvNeXt's channels-first variant, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).square().mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None] * x + self.bias[:, None]


class ConvNeXtBlock(nn.Module):
    """Depthwise conv → LayerNorm → MLP (×4, GELU) → layer scale; the caller adds the residual."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=(kernel_size - 1) // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def branch(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).transpose(1, 2)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return (self.gamma * y).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


class ParallelConvNeXtBlock(nn.Module):
    """Several ConvNeXt branches with different kernels summed with the input (config with >1 kernel)."""

    def __init__(self, dim: int, kernel_sizes: Sequence[int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ConvNeXtBlock(dim, k) for k in kernel_sizes)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for block in self.blocks:
            out = out + block.branch(x)
        return out


class ConvNeXtEncoder(nn.Module):
    """Mel rows → ``dims[-1]`` feature rows at the same frame rate."""

    def __init__(self, cfg: VocoderConfig) -> None:
        super().__init__()
        dims = cfg.dims
        stem = nn.Sequential(
            nn.Conv1d(cfg.input_channels, dims[0], 7, padding=3, padding_mode="replicate"),
            ChannelsFirstLayerNorm(dims[0]),
        )
        transitions = [
            nn.Sequential(ChannelsFirstLayerNorm(dims[i]), nn.Conv1d(dims[i], dims[i + 1], 1))
            for i in range(len(dims) - 1)
        ]
        self.channel_layers = nn.ModuleList([stem, *transitions])

        def block(dim: int) -> nn.Module:
            if len(cfg.kernel_sizes) == 1:
                return ConvNeXtBlock(dim, cfg.kernel_sizes[0])
            return ParallelConvNeXtBlock(dim, cfg.kernel_sizes)

        self.stages = nn.ModuleList(
            nn.Sequential(*(block(dim) for _ in range(depth)))
            for dim, depth in zip(dims, cfg.depths, strict=True)
        )
        self.norm = ChannelsFirstLayerNorm(dims[-1])

    def forward(self, x: Tensor) -> Tensor:
        for channel_layer, stage in zip(self.channel_layers, self.stages, strict=True):
            x = stage(channel_layer(x))
        return self.norm(x)


# --------------------------------------------------------------------------------------------
# HiFi-GAN generator


def _same_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


class ResBlock(nn.Module):
    """HiFi-GAN "ResBlock1": per dilation, SiLU → dilated conv → SiLU → conv, residual."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            WeightNormConv1d(
                channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d)
            )
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            WeightNormConv1d(channels, channels, kernel_size, padding=_same_padding(kernel_size))
            for _ in dilations
        )

    def forward(self, x: Tensor) -> Tensor:
        for dilated, plain in zip(self.convs1, self.convs2, strict=True):
            x = x + plain(F.silu(dilated(F.silu(x))))
        return x


class HiFiGANGenerator(nn.Module):
    """Feature rows ``[B, num_mels, T]`` → waveform ``[B, 1, T · prod(upsample_rates)]`` in [−1, 1]."""

    def __init__(self, cfg: VocoderConfig) -> None:
        super().__init__()
        base = cfg.upsample_initial_channel
        self.conv_pre = WeightNormConv1d(
            cfg.num_mels, base, cfg.pre_conv_kernel_size, padding=_same_padding(cfg.pre_conv_kernel_size)
        )
        self.ups = nn.ModuleList(
            WeightNormConvTranspose1d(base // 2**i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True))
        )
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.resblocks = nn.ModuleList(
            ResBlock(base // 2 ** (i + 1), k, d)
            for i in range(len(self.ups))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
        )
        last = base // 2 ** len(self.ups)
        self.conv_post = WeightNormConv1d(
            last, 1, cfg.post_conv_kernel_size, padding=_same_padding(cfg.post_conv_kernel_size)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.silu(x))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            acc = blocks[0](x)
            for block in blocks[1:]:
                acc = acc + block(x)
            x = acc / self.num_kernels
        return torch.tanh(self.conv_post(F.silu(x)))


class Vocoder(nn.Module):
    """Log-mel ``[B, n_mels, T]`` (one audio channel per row) → waveform ``[B, 1, T · hop]``."""

    def __init__(self, config: Mapping[str, Any] | VocoderConfig) -> None:
        super().__init__()
        cfg = config if isinstance(config, VocoderConfig) else VocoderConfig.from_dict(config)
        self.config = cfg
        self.backbone = ConvNeXtEncoder(cfg)
        self.head = HiFiGANGenerator(cfg)
        self.mel_transform = LogMelSpectrogram(
            sample_rate=cfg.sampling_rate,
            n_fft=cfg.n_fft,
            win_length=cfg.win_length,
            hop_length=cfg.hop_length,
            n_mels=cfg.n_mels,
            f_min=cfg.f_min,
            f_max=cfg.f_max,
        )
        self.eval()

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def sample_rate(self) -> int:
        return self.config.sampling_rate

    def fold_weight_norm(self) -> Vocoder:
        """Replace every ``weight_g``/``weight_v`` pair by the plain weight (in place; returns self)."""
        for module in self.modules():
            if isinstance(module, (WeightNormConv1d, WeightNormConvTranspose1d)):
                module.fold()
        return self

    def forward(self, mel: Tensor) -> Tensor:
        return self.head(self.backbone(mel))


def build_vocoder(config: Mapping[str, Any], state_dict: Mapping[str, Tensor] | None = None) -> Vocoder:
    """The vocoder from its config dict, loaded strictly from the official state dict if given."""
    vocoder = Vocoder(config)
    if state_dict is not None:
        vocoder.load_state_dict(state_dict, strict=True)
    return vocoder.eval()
