"""Shape buckets: the ladders and their config parameters, padding-exactness of the DiT decoder,
and whole requests of every task giving the same audio with and without bucketing.

Padding is only worth having if it changes nothing: the decoder must give the unpadded velocity
on the valid frames (1e-5 relative in fp32, measured about 4e-7), and a bucketed generator the
unbucketed audio (1e-4 absolute, as every other in-process comparison of the project).
"""

from __future__ import annotations

import io
import itertools
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from acestep_client.params import GenerationParams
from acestep_triton.checkpoint import Components
from acestep_triton.lyrics import MAX_LYRIC_TOKENS
from acestep_triton.models.transformer import ACEStepTransformer, masked_group_norm
from acestep_triton.pipeline import MusicGenerator, TorchBackend
from acestep_triton.sampling import ComponentBackend
from acestep_triton.sampling.buckets import (
    DEFAULT_FRAME_BUCKETS,
    DEFAULT_TOKEN_BUCKETS,
    MAX_ENCODER_TOKENS,
    PROMPT_MAX_TOKENS,
    BucketedBackend,
    ShapeBuckets,
)
from acestep_triton.sampling.noise import MAX_FRAMES
from acestep_triton.serving.config_params import model_parameters

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REL_TOL = 1e-5
AUDIO_TOL = 1e-4


# ------------------------------------------------------------------------------ ShapeBuckets

def test_default_ladders_are_geometric_and_end_at_the_maxima() -> None:
    assert ShapeBuckets.default() == ShapeBuckets(DEFAULT_FRAME_BUCKETS, DEFAULT_TOKEN_BUCKETS)
    assert DEFAULT_FRAME_BUCKETS[-1] == MAX_FRAMES == 2583
    ratios = [b / a for a, b in itertools.pairwise(DEFAULT_FRAME_BUCKETS)]
    assert max(ratios) <= 1.5, "a request could be padded by more than 50%"
    assert MAX_ENCODER_TOKENS == 1 + PROMPT_MAX_TOKENS + MAX_LYRIC_TOKENS == DEFAULT_TOKEN_BUCKETS[-1]
    assert ShapeBuckets.default().enabled and not ShapeBuckets().enabled
    assert ShapeBuckets(frames=(64,)).enabled and ShapeBuckets(tokens=(64,)).enabled


def test_parse_default_none_and_lists() -> None:
    assert ShapeBuckets.parse("default", " Default ") == ShapeBuckets.default()
    assert ShapeBuckets.parse("none", "") == ShapeBuckets()
    assert ShapeBuckets.parse("NONE", "default") == ShapeBuckets((), DEFAULT_TOKEN_BUCKETS)
    parsed = ShapeBuckets.parse("64, 128,256", "256,64,64")  # order and repeats mean nothing
    assert parsed == ShapeBuckets((64, 128, 256), (64, 256))
    assert ShapeBuckets(frames=[32, 64]) == ShapeBuckets(frames=(32, 64))  # type: ignore[arg-type]


@pytest.mark.parametrize(("frames", "tokens", "field"), [
    ("64,abc", "default", "frame_buckets"), ("64,,128", "default", "frame_buckets"),
    ("0,64", "default", "frame_buckets"), ("-32", "none", "frame_buckets"), ("1.5", "none", "frame_buckets"),
    ("default", "x", "token_buckets"), ("none", "128,0", "token_buckets"), ("none", "auto", "token_buckets"),
])
def test_parse_errors_name_the_parameter(frames: str, tokens: str, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        ShapeBuckets.parse(frames, tokens)


def test_construction_checks_the_ladders() -> None:
    with pytest.raises(ValueError, match=r"^frame_buckets: .*ascending"):
        ShapeBuckets(frames=(64, 32))
    with pytest.raises(ValueError, match=r"^token_buckets: .*positive"):
        ShapeBuckets(tokens=(0, 32))
    with pytest.raises(ValueError, match=r"^frame_buckets: .*ints"):
        ShapeBuckets(frames=(True,))  # type: ignore[arg-type]


def test_bucket_edges() -> None:
    b = ShapeBuckets((32, 48, 64), (64, 128))
    assert [b.frame_bucket(w) for w in (1, 31, 32, 33, 48, 49, 64, 65, 5000)] == [32, 32, 32, 48, 48, 64, 64, 65, 5000]
    assert [b.token_bucket(s) for s in (1, 64, 65, 128, 129)] == [64, 64, 128, 128, 129]
    off = ShapeBuckets()
    assert (off.frame_bucket(37), off.token_bucket(11)) == (37, 11)
    d = ShapeBuckets.default()
    assert d.frame_bucket(MAX_FRAMES) == MAX_FRAMES and d.frame_bucket(MAX_FRAMES - 1) == MAX_FRAMES
    assert d.frame_bucket(322) == 384 and d.token_bucket(MAX_ENCODER_TOKENS) == MAX_ENCODER_TOKENS


def test_parameters_round_trip() -> None:
    for buckets in (ShapeBuckets.default(), ShapeBuckets(), ShapeBuckets((32, 64)), ShapeBuckets((), (128,))):
        assert ShapeBuckets.from_parameters(buckets.as_parameters()) == buckets
    assert ShapeBuckets((32, 64)).as_parameters() == {"frame_buckets": "32,64", "token_buckets": "none"}
    assert ShapeBuckets.from_parameters({}) == ShapeBuckets.default()  # a missing key means "default"
    assert ShapeBuckets.from_parameters({"frame_buckets": "none"}) == ShapeBuckets((), DEFAULT_TOKEN_BUCKETS)
    # Triton's raw config-parameter form, as a Python backend's model_config carries it.
    raw = {"frame_buckets": {"string_value": "64"}, "token_buckets": {"string_value": "none"}}
    assert ShapeBuckets.from_parameters(model_parameters({"parameters": raw})) == ShapeBuckets((64,))
    with pytest.raises(ValueError, match=r"^token_buckets: "):
        ShapeBuckets.from_parameters({"token_buckets": "many"})


# ------------------------------------------------------------------------------ BucketedBackend unit

class _RecordingBackend:
    """Returns a velocity that encodes each frame's index, and keeps the inputs it was given."""

    text_layers, lyric_layers, dit_layers = 3, 4, 5
    extra = "inner attribute"

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, ...]] = []

    def predict_velocity(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.seen.append(inputs)
        latents = inputs[0]
        return torch.arange(latents.shape[-1], dtype=latents.dtype, device=latents.device).expand_as(latents)

    def encode_mel(self, mel: torch.Tensor) -> torch.Tensor:
        return mel + 1


def _decoder_inputs(b: int, w: int, s: int, d: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    return (torch.randn(b, 8, 16, w, dtype=dtype), torch.ones(b, w, dtype=dtype), torch.randn(b, s, d, dtype=dtype),
            torch.ones(b, s, dtype=dtype), torch.rand(b) * 1000, torch.ones(b, 5))


def test_bucketed_backend_pads_slices_and_delegates() -> None:
    inner = _RecordingBackend()
    bucketed = BucketedBackend(inner, ShapeBuckets((16, 32), (8, 16)))
    assert isinstance(bucketed, ComponentBackend)
    assert (bucketed.text_layers, bucketed.lyric_layers, bucketed.dit_layers) == (3, 4, 5)
    assert bucketed.extra == "inner attribute" and torch.equal(bucketed.encode_mel(torch.zeros(1)), torch.ones(1))

    inputs = _decoder_inputs(2, 20, 9, 4, torch.bfloat16)
    out = bucketed.predict_velocity(*inputs)
    latents, latent_mask, states, mask, timestep, scale = inner.seen[-1]
    assert latents.shape == (2, 8, 16, 32) and states.shape == (2, 16, 4)
    assert all(t.dtype == torch.bfloat16 for t in (latents, latent_mask, states, mask))
    assert torch.equal(latents[..., :20], inputs[0]) and not latents[..., 20:].any()
    assert torch.equal(latent_mask[:, :20], inputs[1]) and not latent_mask[:, 20:].any()
    assert torch.equal(states[:, :9], inputs[2]) and not states[:, 9:].any() and not mask[:, 9:].any()
    assert timestep is inputs[4] and scale is inputs[5]
    assert out.shape == inputs[0].shape and torch.equal(out[0, 0, 0], torch.arange(20, dtype=torch.bfloat16))

    exact = _decoder_inputs(2, 32, 16, 4)  # already bucket sizes: passed through, not copied
    bucketed.predict_velocity(*exact)
    assert all(got is given for got, given in zip(inner.seen[-1], exact, strict=True))
    bucketed.predict_velocity(*_decoder_inputs(1, 40, 3, 4))  # above the largest frame bucket
    assert inner.seen[-1][0].shape[-1] == 40 and inner.seen[-1][2].shape[1] == 8
    assert (bucketed.calls, bucketed.padded_calls) == (3, 2)


# ------------------------------------------------------------------------------ decode padding-exactness

def _pad_right(x: torch.Tensor, dim: int, size: int, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``x`` extended along ``dim`` to ``size``; the new entries are ``fill`` (broadcast)."""
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    extra = torch.zeros(shape, dtype=x.dtype) + fill
    return torch.cat((x, extra), dim=dim)


def _padded_decode(model: ACEStepTransformer, inputs: tuple[torch.Tensor, ...], w_pad: int, s_pad: int,
                   garbage: float = 0.0) -> torch.Tensor:
    """``decode`` with frames padded to ``w_pad`` and tokens to ``s_pad`` (masks 0 there); the
    padded latents/states are zeros, or random values of scale ``garbage``."""
    latents, latent_mask, states, mask, timestep, scale = inputs
    b, _, _, w = latents.shape
    s, d = states.shape[1:]
    lat_fill = garbage * torch.randn(b, 8, 16, w_pad - w) if garbage else 0.0
    state_fill = garbage * torch.randn(b, s_pad - s, d) if garbage else 0.0
    padded = (_pad_right(latents, 3, w_pad, lat_fill), _pad_right(latent_mask, 1, w_pad),
              _pad_right(states, 1, s_pad, state_fill), _pad_right(mask, 1, s_pad), timestep, scale)
    with torch.no_grad():
        return model.decode(*padded)[..., :w]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs difference relative to the largest reference magnitude."""
    return float((got - want).abs().max() / want.abs().max())


def _tiny_decode_inputs(model: ACEStepTransformer, w: int, s: int) -> tuple[torch.Tensor, ...]:
    """Three rows: per-row ERG query scales mixing 1.0 and 0.01, the last row with padded tokens
    (as a batch of conditions of different lengths has)."""
    b, layers = 3, model.num_layers
    mask = torch.ones(b, s)
    mask[2, max(1, s // 2):] = 0
    scale = torch.ones(b, layers)
    scale[1, layers // 3: 2 * layers // 3] = 0.01
    scale[2, ::2] = 0.01
    return (torch.randn(b, 8, 16, w), torch.ones(b, w), torch.randn(b, s, model.config.inner_dim), mask,
            torch.tensor([900.0, 500.0, 30.0]), scale)


@pytest.fixture(scope="module")
def tiny_transformer(tiny_onnx_components: Components) -> ACEStepTransformer:
    return tiny_onnx_components.transformer.eval()


@pytest.mark.parametrize(("w", "w_pad", "s", "s_pad"), [
    (21, 22, 30, 30), (21, 21, 30, 31), (21, 32, 30, 64), (37, 48, 9, 64), (100, 128, 130, 256), (1, 32, 2, 64),
])
def test_padded_decode_equals_unpadded(tiny_transformer: ACEStepTransformer, w: int, w_pad: int, s: int,
                                       s_pad: int) -> None:
    inputs = _tiny_decode_inputs(tiny_transformer, w, s)
    with torch.no_grad():
        want = tiny_transformer.decode(*inputs)
    err = _rel(_padded_decode(tiny_transformer, inputs, w_pad, s_pad), want)
    assert err <= REL_TOL, f"W {w}->{w_pad}, S {s}->{s_pad}: padded velocity differs by {err:.3g} (relative)"


def test_padding_content_is_invisible(tiny_transformer: ACEStepTransformer) -> None:
    """Large garbage in the padded frames and tokens must not reach the valid frames.

    Checked to fail without either masking of the decoder (measured on this tiny model): with the
    GroupNorm statistics over all frames the error here is 0.6 relative (0.14 with zero padding,
    W 21 -> 32), and without the depthwise-conv input mask (GLUMBConv) 1.4e-2 (1.8e-2 with zero
    padding: padded frames' hidden states are not zero, whatever the latents there). The
    whole-request tests below fail too (audio off by up to 1.5e-2 and 1.5e-3 respectively).
    """
    inputs = _tiny_decode_inputs(tiny_transformer, 45, 20)
    with torch.no_grad():
        want = tiny_transformer.decode(*inputs)
    for w_pad, s_pad in ((46, 21), (64, 64)):
        err = _rel(_padded_decode(tiny_transformer, inputs, w_pad, s_pad, garbage=100.0), want)
        assert err <= REL_TOL, f"garbage padding to ({w_pad}, {s_pad}) leaked: {err:.3g} (relative)"


def test_all_ones_mask_is_the_trained_group_norm(tiny_transformer: ACEStepTransformer) -> None:
    """With every frame valid the masked GroupNorm is ``nn.GroupNorm`` (the trained model)."""
    patch, norm, _ = tiny_transformer.proj_in.early_conv_layers
    with torch.no_grad():
        h = patch(torch.randn(2, 8, 16, 29))
        want = norm(h)
        err = _rel(masked_group_norm(h, torch.ones(2, 29), norm), want)
    assert err <= 1e-6, f"masked GroupNorm with an all-ones mask differs by {err:.3g}"


def test_padded_decode_equals_unpadded_in_bf16(tiny_transformer: ACEStepTransformer) -> None:
    """bf16 keeps fp32 statistics; padding must not cost more than bf16 rounding itself."""
    model = ACEStepTransformer(tiny_transformer.config).eval()
    model.load_state_dict(tiny_transformer.state_dict())
    model = model.to(torch.bfloat16)
    inputs = _tiny_decode_inputs(model, 21, 30)
    with torch.no_grad():
        want = model.decode(*inputs)
        padded = _padded_decode(model, inputs, 32, 64)
    assert torch.isfinite(padded).all()
    err = _rel(padded, want)
    assert err <= 5e-2, f"bf16 padded velocity differs by {err:.3g} (relative)"


def test_golden_padded_decode_equals_unpadded(golden_models: Components,
                                              golden_components: dict[str, np.ndarray]) -> None:
    g = {k: torch.from_numpy(v) for k, v in golden_components.items()}
    model = golden_models.transformer.eval()
    scale = torch.ones(2, model.num_layers)
    scale[1, 15:20] = 0.01
    inputs = (g["dec_in_hidden"], g["dec_in_attention_mask"], g["enc_out_states"], g["enc_out_mask"],
              g["dec_in_timestep"], scale)
    with torch.no_grad():
        want = model.decode(*inputs)
    w, s = inputs[0].shape[-1], inputs[2].shape[1]
    err = _rel(_padded_decode(model, inputs, ShapeBuckets.default().frame_bucket(w) + 5,
                              ShapeBuckets.default().token_bucket(s)), want)
    assert err <= REL_TOL, f"golden DiT: padded velocity differs by {err:.3g} (relative)"


# ------------------------------------------------------------------------------ whole requests, every task

BASE = {"prompt": "pop, upbeat, guitar, 120 BPM", "lyrics": "[verse]\nfree as a bird\n[chorus]\nsing",
        "infer_step": 6, "manual_seeds": "3,4", "retake_seeds": "5,6", "batch_size": 2}
TASKS: dict[str, tuple[dict[str, Any], str | None]] = {
    "text2music": ({"audio_duration": 2.2}, None),
    "retake": ({"task": "retake", "audio_duration": 2.2, "retake_variance": 0.4}, None),
    "repaint": ({"task": "repaint", "repaint_start": 0.5, "repaint_end": 1.8, "retake_variance": 0.6}, "src_audio"),
    "edit": ({"task": "edit", "edit_type": "remix", "edit_target_prompt": "rock, electric guitar",
              "edit_target_lyrics": "[chorus]\nnew words"}, "src_audio"),
    "extend": ({"task": "extend", "left_extend_length": 0.5, "right_extend_length": 1.0}, "src_audio"),
    "audio2audio": ({"task": "audio2audio", "ref_audio_strength": 0.4}, "ref_audio"),
}


class _ShapeSpy:
    """Records the (W, S) of every decoder call the sampling loop makes; delegates the rest."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.shapes: list[tuple[int, int]] = []

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def predict_velocity(self, latents: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        self.shapes.append((int(latents.shape[-1]), int(rest[1].shape[1])))
        return self.inner.predict_velocity(latents, *rest)


def _generator(backend: Any, c: Components) -> MusicGenerator:
    return MusicGenerator(backend, c.text_tokenizer, c.lyric_tokenizer, c.vocoder.mel_transform)


@pytest.fixture(scope="module")
def source_wav(tiny_onnx_components: Components) -> bytes:
    """A 2.5 s song of the tiny model as a float WAV (W is then no bucket size)."""
    out = _generator(TorchBackend(tiny_onnx_components), tiny_onnx_components).generate(
        GenerationParams(**{**BASE, "batch_size": 1, "manual_seeds": "7"}, audio_duration=2.5))
    buffer = io.BytesIO()
    sf.write(buffer, np.ascontiguousarray(out.audio[0].numpy().T), out.sample_rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


@pytest.mark.parametrize("task", list(TASKS))
def test_bucketed_generation_gives_the_same_audio(task: str, tiny_onnx_components: Components,
                                                  source_wav: bytes) -> None:
    fields, audio_input = TASKS[task]
    kwargs = {} if audio_input is None else {audio_input: source_wav}
    plain = _generator(TorchBackend(tiny_onnx_components), tiny_onnx_components)
    buckets = ShapeBuckets.default()
    bucketed = BucketedBackend(TorchBackend(tiny_onnx_components), buckets)
    spy = _ShapeSpy(bucketed)
    want = plain.generate(GenerationParams(**{**BASE, **fields}), **kwargs)
    got = _generator(spy, tiny_onnx_components).generate(GenerationParams(**{**BASE, **fields}), **kwargs)

    assert bucketed.padded_calls > 0 and bucketed.calls == len(spy.shapes)
    assert any(buckets.frame_bucket(w) != w for w, _ in spy.shapes), f"{task}: no frame padding {spy.shapes}"
    assert any(buckets.token_bucket(s) != s for _, s in spy.shapes), f"{task}: no token padding {spy.shapes}"
    assert got.audio.shape == want.audio.shape
    err = float((got.audio - want.audio).abs().max())
    assert err <= AUDIO_TOL, f"{task}: bucketed audio differs by {err:.3g}"
    assert got.record == want.record
