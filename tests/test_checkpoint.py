"""Checkpoint layout, strict loading, the tiny random checkpoint and the download command."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import tokenizers
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_weights import TiedEmbeddings
from torch import nn

from acestep_triton import checkpoint as ckpt
from acestep_triton.checkpoint import (
    OFFICIAL_FILES,
    CheckpointDownloadError,
    CheckpointError,
    CheckpointLayout,
    Components,
    load_components,
    load_state_dict_strict,
)
from acestep_triton.synthetic import cli as synthetic_cli
from acestep_triton.synthetic.tiny_checkpoint import write_tiny_checkpoint

TINY_LIMIT_BYTES = 50 * 2**20


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_onnx_ckpt: Path) -> Path:
    """The session's tiny checkpoint (seed 0); tests that alter files work on a copy."""
    return tiny_onnx_ckpt


@pytest.fixture(scope="module")
def tiny(tiny_onnx_components: Components) -> Components:
    return tiny_onnx_components


@pytest.fixture(scope="module")
def golden(golden_ckpt: Path, golden_dir: Path) -> Components:
    return load_components(golden_ckpt, vocab_path=golden_dir / "lyrics_vocab.json")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# load_state_dict_strict on a small module


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(2, 2, bias=False)


def _small_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: torch.randn_like(v) for k, v in _Small().state_dict().items()}


def test_strict_load_copies_and_casts_bf16_to_module_dtype() -> None:
    state = {k: v.to(torch.bfloat16) for k, v in _small_state().items()}
    module = _Small()
    load_state_dict_strict(module, state, (), "small")
    for k, v in module.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, state[k].float()), k  # bf16 -> fp32 is exact


def test_strict_load_names_every_missing_unexpected_and_misshaped_key() -> None:
    state = _small_state()
    del state["a.bias"]
    state["c.weight"] = torch.zeros(1)
    state["b.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(_Small(), state, (), "small")
    msg = str(info.value)
    assert msg.startswith("small:")
    for needle in ("missing keys (1)", "a.bias", "unexpected keys (1)", "c.weight",
                   "shape mismatches (1)", "b.weight: checkpoint (3, 3) vs model (2, 2)"):
        assert needle in msg, f"{needle!r} not in error:\n{msg}"


def test_strict_load_skips_only_unused_patterns() -> None:
    state = _small_state()
    state["proj.0.weight"] = torch.zeros(1)
    load_state_dict_strict(_Small(), state, (r"^proj\.",), "small")
    state["proj_extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="proj_extra"):
        load_state_dict_strict(_Small(), state, (r"^proj\.",), "small")


def test_strict_load_fills_tied_keys() -> None:
    src = {"shared.weight": torch.arange(8.0).reshape(4, 2)}
    module = TiedEmbeddings()
    load_state_dict_strict(module, src, (), "tied", tied={"inner.weight": "shared.weight"})
    assert torch.equal(module.inner.weight, src["shared.weight"])
    with pytest.raises(CheckpointError, match=re.escape("inner.weight")):
        load_state_dict_strict(TiedEmbeddings(), src, (), "tied")


# ---------------------------------------------------------------------------------------------
# Layout and vocabulary


def test_layout_names_every_missing_file(tmp_path: Path) -> None:
    (tmp_path / "umt5-base").mkdir()
    (tmp_path / "umt5-base" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as info:
        CheckpointLayout(tmp_path).validate()
    msg = str(info.value)
    for folder, files in OFFICIAL_FILES.items():
        for name in files:
            if (folder, name) != ("umt5-base", "config.json"):
                assert f"{folder}/{name}" in msg
    assert "umt5-base/config.json" not in msg
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointLayout(tmp_path / "nowhere").validate()


def test_vocab_lookup_order_and_error(tmp_path: Path) -> None:
    layout = CheckpointLayout(tmp_path)
    with pytest.raises(CheckpointError, match=r"lyrics_vocab\.json or vocab\.json"):
        layout.find_vocab()
    (tmp_path / "vocab.json").write_text("{}")
    assert layout.find_vocab() == tmp_path / "vocab.json"
    (tmp_path / "lyrics_vocab.json").write_text("{}")
    assert layout.find_vocab() == tmp_path / "lyrics_vocab.json"
    explicit = tmp_path / "elsewhere.json"
    explicit.write_text("{}")
    assert layout.find_vocab(explicit) == explicit
    with pytest.raises(CheckpointError, match=r"missing\.json"):
        layout.find_vocab(tmp_path / "missing.json")


def test_load_components_without_vocab_fails_clearly(golden_ckpt: Path) -> None:
    with pytest.raises(CheckpointError, match="lyric vocabulary not found"):
        load_components(golden_ckpt)


# ---------------------------------------------------------------------------------------------
# The golden checkpoint (upstream's tiny one, official layout)


def _assert_loaded_from(module: nn.Module, file: Path, unused: tuple[str, ...]) -> int:
    """Every module tensor equals the file's (cast to fp32); every other file key is unused.
    Returns the number of file keys skipped as unused."""
    state = load_file(str(file))
    own = module.state_dict()
    for key, value in own.items():
        if key == "encoder.embed_tokens.weight" and key not in state:
            key = "shared.weight"  # tied, stored once
        assert torch.equal(value, state[key].to(value.dtype)), f"{file}: {key} not loaded"
    skipped = [k for k in state if k not in own]
    assert all(any(re.search(p, k) for p in unused) for k in skipped), skipped
    return len(skipped)


def test_golden_checkpoint_loads_strictly(golden: Components, golden_ckpt: Path) -> None:
    from acestep_triton.models import dcae, text_encoder, transformer, vocoder

    layout = CheckpointLayout(golden_ckpt)
    for module in golden.modules().values():
        assert all(p.dtype == torch.float32 for p in module.parameters())
    n_unused = _assert_loaded_from(golden.transformer, layout.transformer_dir / ckpt.DIFFUSERS_WEIGHTS,
                                   transformer.UNUSED_KEYS)
    assert n_unused == 192 + 12, "cross-attn add_* (192) and REPA projectors (12) are the skipped keys"
    _assert_loaded_from(golden.text_encoder.umt5, layout.text_encoder_dir / ckpt.TRANSFORMERS_WEIGHTS,
                        text_encoder.UNUSED_KEYS)
    _assert_loaded_from(golden.vocoder, layout.vocoder_dir / ckpt.DIFFUSERS_WEIGHTS, vocoder.UNUSED_KEYS)
    dcae_file = layout.dcae_dir / ckpt.DIFFUSERS_WEIGHTS
    _assert_loaded_from(golden.dcae_encoder, dcae_file, dcae.ENCODER_FOREIGN_KEYS)
    _assert_loaded_from(golden.dcae_decoder, dcae_file, dcae.DECODER_FOREIGN_KEYS)
    assert golden.transformer.num_layers == 24 and golden.text_encoder.num_layers == 12
    assert set(golden.configs) == set(OFFICIAL_FILES)


def test_golden_prompt_ids_via_components(golden: Components, golden_components, golden_cases) -> None:
    ids, _ = golden.text_tokenizer([golden_cases["a_text2music_apg"]["call_kwargs"]["prompt"]])
    assert ids.tolist() == golden_components["umt5_prompt_input_ids"].tolist()


def _edit_file(path: Path, edit) -> None:
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(("folder", "edit", "component", "problem", "key"), [
    (ckpt.TRANSFORMER_DIR, lambda s: s.update({"transformer_blocks.3.attn.extra.weight": torch.zeros(2)}),
     "transformer (ace_step_transformer)", "unexpected keys (1)", "transformer_blocks.3.attn.extra.weight"),
    (ckpt.VOCODER_DIR, lambda s: s.pop("head.conv_post.weight_g"),
     "vocoder (music_vocoder)", "missing keys (1)", "head.conv_post.weight_g"),
], ids=["extra_key", "missing_key"])
def test_a_wrong_key_fails_naming_it(tiny_ckpt: Path, tmp_path: Path, folder: str,
                                     edit: Callable[[dict[str, torch.Tensor]], object], component: str,
                                     problem: str, key: str) -> None:
    root = _copy(tiny_ckpt, tmp_path / "ckpt")
    _edit_file(root / folder / ckpt.DIFFUSERS_WEIGHTS, edit)
    with pytest.raises(CheckpointError) as info:
        load_components(root)
    msg = str(info.value)
    assert component in msg and problem in msg
    assert key in msg


def test_problems_of_all_components_are_reported_together(tiny_ckpt: Path, tmp_path: Path) -> None:
    root = _copy(tiny_ckpt, tmp_path / "ckpt")
    _edit_file(root / ckpt.VOCODER_DIR / ckpt.DIFFUSERS_WEIGHTS, lambda s: s.pop("head.conv_pre.weight_v"))
    _edit_file(root / ckpt.TRANSFORMER_DIR / ckpt.DIFFUSERS_WEIGHTS, lambda s: s.pop("lyric_embs.weight"))
    with pytest.raises(CheckpointError) as info:
        load_components(root)
    assert "head.conv_pre.weight_v" in str(info.value) and "lyric_embs.weight" in str(info.value)


def test_stray_dcae_key_fails(tiny_ckpt: Path, tmp_path: Path) -> None:
    root = _copy(tiny_ckpt, tmp_path / "ckpt")
    weights = root / ckpt.DCAE_DIR / ckpt.DIFFUSERS_WEIGHTS
    _edit_file(weights, lambda s: s.update({"decoder.bogus": torch.zeros(1), "quant.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError) as info:
        load_components(root)
    msg = str(info.value)
    assert "DCAE encoder" in msg and "DCAE decoder" in msg
    assert "decoder.bogus" in msg and msg.count("quant.weight") == 2  # stray for both halves


def test_shape_mismatch_fails_naming_it(tiny_ckpt: Path, tmp_path: Path) -> None:
    root = _copy(tiny_ckpt, tmp_path / "ckpt")
    weights = root / ckpt.TEXT_ENCODER_DIR / ckpt.TRANSFORMERS_WEIGHTS
    _edit_file(weights, lambda s: s.update({"encoder.final_layer_norm.weight": torch.ones(7)}))
    with pytest.raises(CheckpointError, match=re.escape("encoder.final_layer_norm.weight: checkpoint (7,)")):
        load_components(root)


# ---------------------------------------------------------------------------------------------
# The tiny random checkpoint


def test_tiny_layout_is_the_official_one(tiny_ckpt: Path) -> None:
    expected = {f"{d}/{f}" for d, files in OFFICIAL_FILES.items() for f in files} | {"lyrics_vocab.json"}
    assert set(_files(tiny_ckpt)) == expected
    assert set(OFFICIAL_FILES) == {"ace_step_transformer", "music_dcae_f8c8", "music_vocoder", "umt5-base"}


def test_tiny_is_deterministic_and_small(tiny_ckpt: Path, tmp_path: Path) -> None:
    first = _files(tiny_ckpt)
    again = _files(write_tiny_checkpoint(tmp_path / "again", seed=0))
    assert first.keys() == again.keys()
    differing = [k for k in first if first[k] != again[k]]
    assert not differing, f"same seed, different bytes: {differing}"
    total = sum(len(b) for b in first.values())
    assert total < TINY_LIMIT_BYTES, f"tiny checkpoint is {total / 2**20:.1f} MiB"
    other = _files(write_tiny_checkpoint(tmp_path / "other", seed=1))
    weights = f"{ckpt.TRANSFORMER_DIR}/{ckpt.DIFFUSERS_WEIGHTS}"
    assert hashlib.sha256(other[weights]).digest() != hashlib.sha256(first[weights]).digest()


def test_tiny_dtypes_on_disk_match_the_official_ones(tiny_ckpt: Path) -> None:
    layout = CheckpointLayout(tiny_ckpt)
    for name in OFFICIAL_FILES:
        with safe_open(str(layout.weights_path(name)), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
            keys = list(f.keys())
        assert dtypes == ({"BF16"} if name == ckpt.TRANSFORMER_DIR else {"F32"}), (name, dtypes)
        if name == ckpt.VOCODER_DIR:
            assert any(k.endswith(".weight_g") for k in keys) and any(k.endswith(".weight_v") for k in keys)


def test_tiny_loads_strictly_with_official_structure(tiny: Components) -> None:
    assert isinstance(tiny.text_tokenizer.tokenizer, tokenizers.Tokenizer)  # the fast (Rust) tokenizer
    assert tiny.text_encoder.num_layers == 12  # ERG tag blocks 8-9 exist
    assert tiny.transformer.num_layers == 24  # ERG diffusion blocks 15-19 exist
    assert tiny.transformer.lyric_layers == 6  # ERG lyric blocks 4-5 exist
    assert tiny.configs[ckpt.TRANSFORMER_DIR]["lyric_encoder_vocab_size"] == 6693
    assert all(p.dtype == torch.float32 for m in tiny.modules().values() for p in m.parameters())


def test_tiny_encode_decode_is_finite_and_audible(tiny: Components) -> None:
    torch.manual_seed(0)
    ids, mask = tiny.text_tokenizer(["pop, upbeat, guitar, 120 BPM", "rock"])
    lyric_ids = torch.tensor([tiny.lyric_tokenizer.encode("[verse]\nhello world")] * 2)
    lyric_mask = torch.ones_like(lyric_ids)
    frames = 8
    with torch.no_grad():
        text = tiny.text_encoder(ids, mask)
        states, states_mask = tiny.transformer.encode(text, mask, torch.zeros(2, 512), lyric_ids, lyric_mask)
        latents = torch.randn(2, 8, 16, frames)
        velocity = tiny.transformer.decode(latents, torch.ones(2, frames), states, states_mask,
                                           torch.tensor([900.0, 300.0]))
        mel = tiny.dcae_decoder(latents - 0.5 * velocity)
        wave = tiny.vocoder(mel[:, 0])
        relatents = tiny.dcae_encoder(mel)
    for name, t in {"text": text, "states": states, "velocity": velocity, "mel": mel, "wave": wave,
                    "relatents": relatents}.items():
        assert torch.isfinite(t).all(), f"{name} not finite"
    assert velocity.std() > 0.05, f"velocity std {velocity.std():.3g}"
    assert wave.shape == (2, 1, frames * 8 * 512)
    assert wave.std() > 1e-2, f"tiny audio is near-silent: std {wave.std():.3g}"
    assert relatents.shape == latents.shape


def test_cli_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert synthetic_cli.main(["tiny", str(tmp_path / "t"), "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "t")
    CheckpointLayout(tmp_path / "t").validate()


# ---------------------------------------------------------------------------------------------
# Download (offline here: both sources point at a closed local port)


def test_download_offline_fails_with_instructions(tmp_path: Path) -> None:
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"}
    command = [sys.executable, "-m", "acestep_triton.checkpoint", "download", str(tmp_path / "d")]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "could not download ACE-Step/ACE-Step-v1-3.5B" in proc.stderr
    assert "Offline, copy a downloaded checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_vocab_download_offline_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(CheckpointDownloadError, match="could not download the lyric vocabulary"):
        ckpt.download_vocab(tmp_path / "v.json", url="http://127.0.0.1:9/vocab.json", timeout_s=5)
    assert not (tmp_path / "v.json").exists()
