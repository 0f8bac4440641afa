"""The diffusion transformer and lyric Conformer against upstream's numbers (golden components).

Tolerance: 1e-4 absolute in fp32 on arrays of order 1 (measured errors are in the messages).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from acestep_triton.models.attention import CrossAttention, LinearSelfAttention, rope_tables
from acestep_triton.models.lyric_encoder import relative_shift_index
from acestep_triton.models.transformer import UNUSED_KEYS, ACEStepTransformer, unused_key

ATOL = 1e-4
FOLDER = "ace_step_transformer"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _load_transformer(ckpt: Path) -> ACEStepTransformer:
    """Strict load of the official folder layout (bf16 on disk -> fp32), unused keys dropped."""
    folder = ckpt / FOLDER
    model = ACEStepTransformer.from_config(json.loads((folder / "config.json").read_text()))
    state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items() if not unused_key(k)}
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def model(golden_ckpt: Path) -> ACEStepTransformer:
    return _load_transformer(golden_ckpt)


@pytest.fixture(scope="module")
def g(golden_components: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in golden_components.items()
            if k.startswith(("enc_", "dec_", "fwd_", "lyric_"))}


def _erg(n: int, layers: range) -> torch.Tensor:
    scale = torch.ones(n)
    scale[list(layers)] = 0.01
    return scale


def _encode_inputs(g: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (g["enc_in_text_states"], g["enc_in_text_mask"], g["enc_in_speaker"], g["enc_in_lyric_ids"],
            g["enc_in_lyric_mask"])


def _decode_inputs(g: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (g["dec_in_hidden"], g["dec_in_attention_mask"], g["enc_out_states"], g["enc_out_mask"],
            g["dec_in_timestep"])


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = ATOL) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.float() - want.float()).abs().max().item()
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol:g}"


# --- checkpoint compatibility -------------------------------------------------------------------

def test_state_dict_and_unused_keys_cover_the_official_checkpoint(golden_ckpt: Path) -> None:
    folder = golden_ckpt / FOLDER
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        official = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    model = ACEStepTransformer.from_config(json.loads((folder / "config.json").read_text()))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    unused = {k for k in official if unused_key(k)}
    assert not unused & set(ours), f"UNUSED_KEYS match module keys: {sorted(unused & set(ours))[:5]}"
    missing = sorted(set(ours) - set(official))
    unexpected = sorted(set(official) - set(ours) - unused)
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    bad_shapes = [k for k in ours if ours[k] != official[k]]
    assert not bad_shapes, f"shape mismatch: {[(k, ours[k], official[k]) for k in bad_shapes[:5]]}"
    dead = [p for p in UNUSED_KEYS if not any(re.search(p, k) for k in official)]
    assert not dead, f"UNUSED_KEYS patterns matching nothing: {dead}"


# --- golden numerics ----------------------------------------------------------------------------

@torch.no_grad()
def test_encode_matches_upstream(model: ACEStepTransformer, g: dict[str, torch.Tensor]) -> None:
    states, mask = model.encode(*_encode_inputs(g))
    assert mask.dtype == torch.float32 and states.dtype == torch.float32
    _assert_close("enc_out_states", states, g["enc_out_states"])
    _assert_close("enc_out_mask", mask, g["enc_out_mask"], atol=0.0)


@torch.no_grad()
def test_lyric_encoder_matches_upstream(model: ACEStepTransformer, g: dict[str, torch.Tensor]) -> None:
    lyric = model.lyric_encoder(model.lyric_embs(g["enc_in_lyric_ids"]), g["enc_in_lyric_mask"])
    _assert_close("lyric_encoder_out", model.lyric_proj(lyric), g["lyric_encoder_out"])


@torch.no_grad()
def test_encode_erg_lyric_matches_upstream(model: ACEStepTransformer, g: dict[str, torch.Tensor]) -> None:
    assert model.lyric_layers == 6
    states, _ = model.encode(*_encode_inputs(g), lyric_query_scale=_erg(6, range(4, 6)))
    want = g["enc_out_states_erg_lyric_q0.01_layers4_5"]
    _assert_close("enc_out_states_erg_lyric", states, want)
    # The ERG branch must differ from the normal one, or the comparison above proves nothing.
    assert (want - g["enc_out_states"]).abs().max() > 10 * ATOL


@torch.no_grad()
def test_decode_matches_upstream(model: ACEStepTransformer, g: dict[str, torch.Tensor]) -> None:
    _assert_close("dec_out", model.decode(*_decode_inputs(g)), g["dec_out"])


@torch.no_grad()
def test_decode_erg_diffusion_matches_upstream(model: ACEStepTransformer, g: dict[str, torch.Tensor]) -> None:
    assert model.num_layers == 24
    out = model.decode(*_decode_inputs(g), query_scale=_erg(24, range(15, 20)))
    want = g["dec_out_erg_diffusion_q0.01_blocks15_19"]
    _assert_close("dec_out_erg_diffusion", out, want)
    assert (want - g["dec_out"]).abs().max() > 100 * ATOL


@torch.no_grad()
def test_forward_matches_upstream(model: ACEStepTransformer, g: dict[str, torch.Tensor]) -> None:
    out = model(g["dec_in_hidden"], g["dec_in_attention_mask"], *_encode_inputs(g)[:5], g["dec_in_timestep"])
    _assert_close("fwd_out", out, g["fwd_out"])


# --- input conventions --------------------------------------------------------------------------

@torch.no_grad()
def test_masks_int_or_float_and_default_scales(model: ACEStepTransformer, g: dict[str, torch.Tensor]) -> None:
    text, text_mask, speaker, ids, lyric_mask = _encode_inputs(g)
    ref_states, ref_mask = model.encode(text, text_mask, speaker, ids, lyric_mask)
    states, mask = model.encode(text, text_mask.float(), speaker, ids, lyric_mask.float(), torch.ones(6))
    assert torch.equal(states, ref_states) and torch.equal(mask, ref_mask)
    latents, latent_mask, enc, enc_mask, t = _decode_inputs(g)
    ref = model.decode(latents, latent_mask, enc, enc_mask, t)
    out = model.decode(latents, latent_mask.long(), enc, enc_mask.long(), t, torch.ones(24))
    assert torch.equal(out, ref)


@torch.no_grad()
def test_decode_with_padded_frames_is_finite(model: ACEStepTransformer, g: dict[str, torch.Tensor]) -> None:
    latents, latent_mask, enc, enc_mask, t = _decode_inputs(g)
    latent_mask = latent_mask.clone()
    latent_mask[1, 12:] = 0
    out = model.decode(latents, latent_mask, enc, enc_mask, t)
    assert torch.isfinite(out).all()
    # Item 0 is unpadded: another item's mask must not leak into it.
    _assert_close("unpadded item", out[:1], g["dec_out"][:1])


def test_query_scale_length_is_checked(model: ACEStepTransformer, g: dict[str, torch.Tensor]) -> None:
    with torch.no_grad(), pytest.raises(ValueError):
        model.decode(*_decode_inputs(g), query_scale=torch.ones(23))


# --- attention pieces ---------------------------------------------------------------------------

@torch.no_grad()
def test_linear_attention_ignores_padded_frames() -> None:
    torch.manual_seed(0)
    attn = LinearSelfAttention(dim=16, heads=2).eval()
    x = torch.randn(1, 9, 16)
    mask = torch.ones(1, 9)
    mask[:, 6:] = 0
    rope = rope_tables(torch.arange(9), 8, 1e6)
    frame_mask = mask[:, None, :, None]
    out = attn(x, frame_mask, rope)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(1, 3, 16) * 10
    out2 = attn(x2, frame_mask, rope)
    _assert_close("valid frames", out2[:, :6], out[:, :6], atol=1e-6)
    bias = attn.to_out[0].bias.expand(1, 3, 16)
    _assert_close("padded frames = output bias", out[:, 6:], bias, atol=1e-6)


@torch.no_grad()
def test_cross_attention_masks_tokens_and_frames() -> None:
    torch.manual_seed(0)
    attn = CrossAttention(dim=16, heads=2).eval()
    x, ctx = torch.randn(1, 5, 16), torch.randn(1, 7, 16)
    frames = torch.tensor([[1.0, 1, 1, 1, 0]])
    tokens = torch.tensor([[1.0, 1, 1, 1, 1, 0, 0]])
    key_bias = torch.zeros(1, 7).masked_fill(tokens == 0, torch.finfo(torch.float32).min)[:, None, None]
    row_valid = (frames > 0)[:, None, :, None]
    args = (rope_tables(torch.arange(5), 8, 1e6), rope_tables(torch.arange(7), 8, 1e6), key_bias, row_valid)
    out = attn(x, ctx, *args)
    ctx2 = ctx.clone()
    ctx2[:, 5:] = torch.randn(1, 2, 16) * 10
    _assert_close("masked tokens have no effect", attn(x, ctx2, *args), out, atol=1e-6)
    # A frame with no valid (frame, token) pair gets zero attention, as upstream's SDPA gives.
    _assert_close("padded frame = output bias", out[:, 4], attn.to_out[0].bias[None], atol=1e-6)


def test_relative_shift_index_equals_transformer_xl_shift() -> None:
    """The gather must select what ESPnet's pad-and-reshape ``rel_shift`` selects."""
    for t in (1, 2, 5):
        scores = torch.randn(2, 3, t, 2 * t - 1)
        padded = torch.cat([torch.zeros(2, 3, t, 1), scores], dim=-1).view(2, 3, 2 * t, t)
        classic = padded[:, :, 1:].reshape(2, 3, t, 2 * t - 1)[..., :t]
        ours = torch.gather(scores, -1, relative_shift_index(torch.arange(t)).expand(2, 3, t, t))
        assert torch.equal(ours, classic), f"T={t}"


# --- configuration ------------------------------------------------------------------------------

def _tiny_config() -> dict:
    return {
        "in_channels": 8, "out_channels": 8, "num_layers": 2, "num_attention_heads": 2,
        "attention_head_dim": 8, "mlp_ratio": 2.5, "patch_size": [16, 1], "max_height": 16,
        "max_width": 32768, "text_embedding_dim": 12, "speaker_embedding_dim": 512,
        "lyric_encoder_vocab_size": 50, "lyric_hidden_size": 32, "rope_theta": 1e6,
        "max_position": 32768, "lyric_encoder_num_heads": 4, "lyric_encoder_linear_units": 48,
        "lyric_encoder_num_blocks": 3,
    }


def _tiny_inputs(b: int, t: int, tl: int, w: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    """Random (encode inputs, decode inputs without encoder states) for :func:`_tiny_config`."""
    text_mask = torch.ones(b, t, dtype=torch.int64)
    text_mask[-1, t // 2 + 1:] = 0
    lyric_mask = torch.ones(b, tl, dtype=torch.int64)
    lyric_mask[-1, tl // 2 + 1:] = 0
    latent_mask = torch.ones(b, w)
    latent_mask[-1, w // 2 + 1:] = 0
    enc = (torch.randn(b, t, 12), text_mask, torch.randn(b, 512), torch.randint(0, 50, (b, tl)), lyric_mask,
           torch.rand(3))
    dec = (torch.randn(b, 8, 16, w), latent_mask, torch.rand(b) * 1000, torch.rand(2))
    return enc, dec


@torch.no_grad()
def test_tiny_config_sizes_and_optional_conformer_keys() -> None:
    model = ACEStepTransformer.from_config(_tiny_config()).eval()
    assert (model.num_layers, model.lyric_layers) == (2, 3)
    assert model.lyric_encoder.encoders[0].self_attn.heads == 4
    assert model.lyric_encoder.encoders[0].feed_forward.w_1.out_features == 48
    enc_in, (latents, latent_mask, t, q) = _tiny_inputs(2, 6, 9, 11)
    states, mask = model.encode(*enc_in)
    assert states.shape == (2, 1 + 6 + 9, 16) and mask.shape == (2, 16)
    out = model.decode(latents, latent_mask, states, mask, t, q)
    assert out.shape == latents.shape and torch.isfinite(out).all()
    defaults = {k: v for k, v in _tiny_config().items() if not k.startswith("lyric_encoder_num")
                and k != "lyric_encoder_linear_units"}
    full = ACEStepTransformer.from_config(defaults | {"lyric_hidden_size": 64})
    assert full.lyric_layers == 6 and full.lyric_encoder.encoders[0].self_attn.heads == 16


def test_config_errors_name_the_problem() -> None:
    cfg = _tiny_config()
    del cfg["rope_theta"]
    with pytest.raises(KeyError, match="rope_theta"):
        ACEStepTransformer.from_config(cfg)
    with pytest.raises(ValueError, match="patch_size"):
        ACEStepTransformer.from_config(_tiny_config() | {"patch_size": [16, 2]})


# --- export -------------------------------------------------------------------------------------

class _Encode(torch.nn.Module):
    """``encode`` as a module's forward, the shape ``torch.onnx.export`` takes."""

    def __init__(self, model: ACEStepTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, text_states: torch.Tensor, text_mask: torch.Tensor, speaker: torch.Tensor,
                lyric_ids: torch.Tensor, lyric_mask: torch.Tensor,
                lyric_query_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(text_states, text_mask, speaker, lyric_ids, lyric_mask, lyric_query_scale)


class _Decode(_Encode):
    def forward(self, latents: torch.Tensor, latent_mask: torch.Tensor,  # type: ignore[override]
                encoder_states: torch.Tensor, encoder_mask: torch.Tensor, timestep: torch.Tensor,
                query_scale: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents, latent_mask, encoder_states, encoder_mask, timestep, query_scale)


def _run(session, args: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """Run an onnxruntime session with positional torch inputs."""
    return session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)})


@pytest.mark.slow
def test_onnx_export_has_dynamic_batch_and_lengths(tmp_path: Path) -> None:
    """Export at one size (torch.onnx.export, dynamo, opset 18), run in onnxruntime at others:
    catches lengths baked into the graph and NaN from padded frames."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = ACEStepTransformer.from_config(_tiny_config() | {"num_layers": 1}).eval()
    dim = torch.export.Dim
    b, t, tl = dim("B", min=1, max=64), dim("T", min=1, max=512), dim("Tl", min=1, max=4096)
    w, s = dim("W", min=1, max=2583), dim("S", min=1, max=5000)
    enc_in, dec_in = _tiny_inputs(2, 5, 7, 9)
    with torch.no_grad():
        states, mask = model.encode(*enc_in)
    dec_args = (dec_in[0], dec_in[1], states, mask, dec_in[2], torch.ones(1))
    torch.onnx.export(_Encode(model).eval(), enc_in, tmp_path / "enc.onnx", dynamo=True, opset_version=18,
                      dynamic_shapes=({0: b, 1: t}, {0: b, 1: t}, {0: b}, {0: b, 1: tl}, {0: b, 1: tl}, None))
    torch.onnx.export(_Decode(model).eval(), dec_args, tmp_path / "dec.onnx", dynamo=True, opset_version=18,
                      dynamic_shapes=({0: b, 3: w}, {0: b, 1: w}, {0: b, 1: s}, {0: b, 1: s}, {0: b}, None))
    enc_sess = ort.InferenceSession(str(tmp_path / "enc.onnx"))
    dec_sess = ort.InferenceSession(str(tmp_path / "dec.onnx"))
    for size in [(1, 1, 1, 1), (3, 8, 20, 40)]:
        enc_in, (latents, latent_mask, ts, _) = _tiny_inputs(*size)
        with torch.no_grad():
            states, mask = model.encode(*enc_in)
            dec_args = (latents, latent_mask, states, mask, ts, torch.full((1,), 0.5))
            velocity = model.decode(*dec_args)
        got = _run(enc_sess, enc_in)
        _assert_close(f"onnx encoder_states {size}", torch.from_numpy(got[0]), states)
        _assert_close(f"onnx encoder_mask {size}", torch.from_numpy(got[1]), mask, atol=0.0)
        got = _run(dec_sess, dec_args)
        _assert_close(f"onnx velocity {size}", torch.from_numpy(got[0]), velocity)
