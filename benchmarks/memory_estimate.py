"""Calibrate the admission estimate (serving/admission.py) against measured peak memory.

Two parts, both in-process on the CPU (one torch thread), peak = ``VmHWM − VmRSS`` after
resetting the high-water mark (``/proc/self/clear_refs``), so each figure is the transient
memory of that one call:

* ``components``: the DiT decoder, the DCAE decoder and the vocoder at their real widths (the
  DiT at 1/5 of the 3.5B width: its terms scale with the width, and a full-width random DiT is
  too slow on a CPU), random weights, at a few shapes: the measured peak divided by the
  estimate's element count gives each per-element factor (the ``*_COPIES`` and
  ``*_ACTIVATIONS_*`` constants of admission.py);
* ``requests``: whole requests on the tiny random checkpoint (``MusicGenerator.generate``) at a
  few batch × duration shapes: estimate ÷ measured peak for the whole request.

    python benchmarks/memory_estimate.py [--part components|requests|all]

Linux only (reads /proc). On a GPU the same comparison would use
``torch.cuda.max_memory_allocated`` (not run here: no GPU was lent when this was written).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from process_memory import reset_peak, status_bytes

from acestep_client.params import GenerationParams
from acestep_triton.models.dcae import DCAEDecoder
from acestep_triton.models.transformer import ACEStepTransformer, TransformerConfig
from acestep_triton.models.vocoder import Vocoder, VocoderConfig
from acestep_triton.pipeline import local_generator
from acestep_triton.serving import admission as adm
from acestep_triton.serving.memory import malloc_trim
from acestep_triton.synthetic.tiny_checkpoint import tiny_dcae_config, write_tiny_checkpoint

MiB = 2**20


def measure(fn: Callable[[], object]) -> tuple[int, float]:
    """(peak transient bytes, seconds) of ``fn()``; its result is dropped before returning."""
    gc.collect()
    malloc_trim()
    reset_peak()
    base = status_bytes("self", "VmRSS")
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    peak = status_bytes("self", "VmHWM") - base
    del result
    return peak, seconds


def components() -> None:
    print("component            shape                     elements(M)  measured MiB  factor   (K in admission.py)")
    # DiT decoder: width 512 (8 heads × 64), FF 1280, 2 blocks (the peak is one block's)
    cfg = dict(in_channels=8, out_channels=8, num_layers=2, num_attention_heads=8, attention_head_dim=64,
               mlp_ratio=2.5, patch_size=[16, 1], max_height=16, text_embedding_dim=64, speaker_embedding_dim=512,
               lyric_encoder_vocab_size=6693, lyric_hidden_size=64, rope_theta=1e6, max_position=32768,
               lyric_encoder_num_heads=4, lyric_encoder_linear_units=128, lyric_encoder_num_blocks=1)
    dit = ACEStepTransformer(TransformerConfig.from_dict(cfg)).eval()
    dims = adm.ModelDims(dit_width=512, dit_ff=1280, dit_heads=8)
    for rows, frames, tokens in ((2, 1024, 64), (4, 1024, 64), (2, 2048, 64), (2, 512, 1024)):
        latents = torch.randn(rows, 8, 16, frames)
        states = torch.randn(rows, tokens, 512)

        def run(latents: torch.Tensor = latents, states: torch.Tensor = states, rows: int = rows,
                frames: int = frames, tokens: int = tokens) -> torch.Tensor:
            with torch.inference_mode():
                return dit.decode(latents, torch.ones(rows, frames), states, torch.ones(rows, tokens),
                                  torch.full((rows,), 500.0), torch.ones(rows, 2))

        peak, _ = measure(run)
        width = rows * frames * (adm.DIT_ACTIVATIONS_PER_WIDTH * dims.dit_width
                                 + adm.DIT_ACTIVATIONS_PER_FF_WIDTH * dims.dit_ff)
        cross = adm.CROSS_ATTENTION_SCORE_COPIES * rows * dims.dit_heads * frames * tokens
        estimate = (width + cross) * adm.BYTES
        print(f"dit (D 512)          rows {rows} frames {frames} tok {tokens:<5} {(width + cross) / 1e6:10.1f}"
              f"  {peak / MiB:12.0f}  est/meas {estimate / peak:.2f}")

    dcae_config = {"decoder_block_out_channels": [128, 256, 512, 1024], "decoder_layers_per_block": [3, 3, 3, 3],
                   "attention_head_dim": 32}

    decoder = DCAEDecoder({**tiny_dcae_config(), **dcae_config}).eval()
    big = adm.ModelDims()
    for window in (16, 32, 64):
        latents = torch.randn(1, 8, 16, window)

        def run_dcae(latents: torch.Tensor = latents) -> torch.Tensor:
            with torch.inference_mode():
                return decoder(latents)

        peak, _ = measure(run_dcae)
        elements = window * big.dcae_per_frame(big.dcae_channels)
        print(f"dcae decoder (3.5B)  window {window:<4} frames          {elements / 1e6:10.1f}  {peak / MiB:12.0f}"
              f"  factor {peak / adm.BYTES / elements:.2f}  (DCAE_ACTIVATION_COPIES {adm.DCAE_ACTIVATION_COPIES})")

    vocoder = Vocoder(VocoderConfig()).eval()
    for mel_frames in (32, 64, 128):
        mel = torch.randn(2, 128, mel_frames)

        def run_vocoder(mel: torch.Tensor = mel) -> torch.Tensor:
            with torch.inference_mode():
                return vocoder(mel)

        peak, _ = measure(run_vocoder)
        elements = 2 * mel_frames * 512 * big.vocoder_per_sample
        print(f"vocoder (3.5B)       2 rows × {mel_frames * 512:<7} samples    {elements / 1e6:10.1f}  "
              f"{peak / MiB:12.0f}  factor {peak / adm.BYTES / elements:.2f}  (factor {adm.VOCODER_ACTIVATION_COPIES})")


def requests() -> None:
    ckpt = write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
    generator = local_generator(ckpt)
    dims = adm.ModelDims.from_dir(ckpt)
    count = adm.token_counter(generator)
    generator.generate(GenerationParams(infer_step=1, audio_duration=2.0, manual_seeds="1"))  # warm up
    print("tiny checkpoint, 1 step   estimate MiB  measured MiB  est/meas  seconds")
    for batch, seconds, guidance in ((1, 10.0, 15.0), (1, 60.0, 15.0), (4, 30.0, 15.0), (2, 60.0, 1.0)):
        params = GenerationParams(infer_step=1, audio_duration=seconds, batch_size=batch, manual_seeds="1",
                                  guidance_scale=guidance, prompt="pop, piano", lyrics="[verse]\nla la la")
        text, lyric = count(params)
        shape = adm.request_shape(params, text_tokens=text, lyric_tokens=lyric)
        estimate = adm.estimate_memory(shape, dims).peak
        peak, wall = measure(lambda params=params: generator.generate(params))
        print(f"batch {batch:2d} × {seconds:5.0f} s g{guidance:<4g} {estimate / MiB:12.0f}  {peak / MiB:12.0f}  "
              f"{estimate / peak:8.2f}  {wall:7.1f}")
    shape = adm.request_shape(GenerationParams(batch_size=1, audio_duration=240.0), text_tokens=20,
                              lyric_tokens=300)
    big = adm.estimate_memory(shape, adm.ModelDims())
    print(f"3.5B estimate, batch 1 × 240 s (apg): {big.peak / MiB:.0f} MiB ({big.describe()})")
    batch16 = adm.estimate_memory(replace(shape, batch=16), adm.ModelDims())
    print(f"3.5B estimate, batch 16 × 240 s: {batch16.peak / MiB:.0f} MiB ({batch16.describe()})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("components", "requests", "all"), default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.part in ("components", "all"):
        components()
    if args.part in ("requests", "all"):
        requests()
    return 0


if __name__ == "__main__":
    sys.exit(main())
