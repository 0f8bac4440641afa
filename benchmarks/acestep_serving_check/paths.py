"""The three ways the check serves a request (Triton, the same runners in-process, eager
PyTorch), and the server's start in the background."""

from __future__ import annotations

import importlib
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from acestep_triton.serving.server import TritonInstall

from .figures import nanmax


def dit_counts(url: str) -> dict[str, int]:
    """``dit_decoder``'s cumulative counters from Triton's statistics: BLS requests (success),
    batch rows run (inference_count) and executions (execution_count)."""
    import tritonclient.grpc as grpcclient  # heavy (see __init__): imported where used

    client = grpcclient.InferenceServerClient(url)
    try:
        model = client.get_inference_statistics(model_name="dit_decoder", as_json=True)["model_stats"][0]
    finally:
        client.close()
    return {"requests": int(model.get("inference_stats", {}).get("success", {}).get("count", 0)),
            "inferences": int(model.get("inference_count", 0)), "executions": int(model.get("execution_count", 0))}


class CudaPeaks:
    """Device memory per path: what its weights hold (allocated after it loaded) and the highest
    ``max_memory_allocated`` above the allocation at the start of each of its calls (activations,
    graph pools). Peak statistics are reset per call, so the process-wide peak is kept here."""

    def __init__(self, device: Any) -> None:
        import torch  # heavy (see __init__): imported where used

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.device = device
        self.weights: dict[str, float] = {}
        self.above: dict[str, float] = {}
        self.process_peak = math.nan

    def allocated(self) -> float:
        return self.torch.cuda.memory_allocated(self.device) / 2**20 if self.cuda else math.nan

    def call(self, label: str, fn: Callable[[], Any]) -> Any:
        if not self.cuda:
            return fn()
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.reset_peak_memory_stats(self.device)
        start = self.torch.cuda.memory_allocated(self.device)
        result = fn()
        self.torch.cuda.synchronize(self.device)
        peak = self.torch.cuda.max_memory_allocated(self.device)
        self.above[label] = nanmax(self.above.get(label, math.nan), (peak - start) / 2**20)
        self.process_peak = nanmax(self.process_peak, peak / 2**20)
        return result

    def peak(self, label: str) -> float:
        return self.weights.get(label, math.nan) + self.above.get(label, math.nan)


class InProcess:
    """The in-process twin of the deployment: the same compiled runners, no Triton."""

    def __init__(self, checkpoint: Path, device: str, peaks: CudaPeaks) -> None:
        # torch, through the runtime: heavy (see __init__), imported where used
        from acestep_triton.serving.torch_runtime import in_process_twin_generator

        self.peaks = peaks
        before = peaks.allocated()
        started = time.perf_counter()
        self.generator = in_process_twin_generator(checkpoint, device=device)
        self.load_s = time.perf_counter() - started
        peaks.weights["in-process"] = peaks.allocated() - before

    def dit_calls(self) -> int:
        return int(getattr(self.generator.backend, "calls", -1))

    def generate(self, params: Any) -> tuple[Any, float, int]:
        """(audio [B, 2, N] numpy, seconds, DiT calls); the audio is on the host when timed, as
        Triton's is when the client has it."""
        before_calls = self.dit_calls()

        def run() -> tuple[Any, float]:
            started = time.perf_counter()
            audio = self.generator.generate(params).audio.float().cpu().numpy()
            return audio, time.perf_counter() - started

        audio, elapsed = self.peaks.call("in-process", run)
        return audio, elapsed, self.dit_calls() - before_calls

    def token_counts(self, prompt: str, lyrics: str) -> tuple[int, int]:
        """(prompt tokens, lyric tokens) of a request, as its DiT conditions will have them."""
        # torch, through sampling: heavy (see __init__), imported where used
        from acestep_triton.sampling.conditions import lyric_inputs

        ids, _ = self.generator.prompt_tokenizer([prompt])
        lyric_ids, _ = lyric_inputs(self.generator.tokenize_lyrics(lyrics))
        return int(ids.shape[1]), int(lyric_ids.shape[1])


class EagerBaseline:
    """Upstream's way on the same device: eager PyTorch, one DiT call per CFG branch.

    This is ``gpu_eager_vs_optimized.py``'s eager-sequential variant (its backend, branch
    splitter, call counter and timed ``generate``, imported), on random weights of the served
    checkpoint's architecture built directly on the device, conditioned with the served request's
    token counts and sampler settings. As there, prompt encoding is not timed and the DCAE and
    vocoder run in the model dtype (bf16 on a GPU, as upstream).
    """

    def __init__(self, checkpoint: Path, device: str, text_tokens: int, lyric_tokens: int, config: Any,
                 peaks: CudaPeaks, seed: int = 0) -> None:
        # torch and the modules built on it: heavy (see __init__), imported where used
        import torch

        from acestep_triton.checkpoint import DCAE_DIR, TRANSFORMER_DIR, VOCODER_DIR, CheckpointLayout
        from acestep_triton.codec import AudioCodec
        from acestep_triton.sampling import PromptTokens, build_conditions
        from acestep_triton.synthetic.full_size import FullSizeConfigs

        self.gpu = importlib.import_module("gpu_eager_vs_optimized")
        self.torch = torch
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.seed = seed
        layout = CheckpointLayout(checkpoint)
        configs = FullSizeConfigs(transformer=layout.read_config(TRANSFORMER_DIR), dcae=layout.read_config(DCAE_DIR),
                                  vocoder=layout.read_config(VOCODER_DIR))
        self.peaks = peaks
        before = peaks.allocated()
        started = time.perf_counter()
        models = self.gpu.build_random_models(self.device, self.dtype, seed=seed, configs=configs,
                                              parts=("transformer", "dcae_decoder", "vocoder"))
        self.build_s = time.perf_counter() - started
        self.layers = int(models.transformer.num_layers)
        ids, mask, lyric_ids, lyric_mask, states = self.gpu.fixed_inputs(models.transformer, text_tokens,
                                                                         lyric_tokens, self.device, seed)
        base = self.gpu.BenchBackend(models.transformer, models.dcae_decoder, models.vocoder, self.dtype, states)
        self.codec = AudioCodec(base.encode_mel, base.decode_latents, base.vocode, models.vocoder.mel_transform,
                                overlapped_decode=True)
        self.counter = self.gpu.CallCounter(models.transformer.decode)
        self.variant = self.gpu.Variant("eager-sequential",
                                        base.with_decode(self.gpu.SequentialBranches(self.counter, items=1)),
                                        False, self.counter, "PyTorch eager, one DiT call per CFG branch")
        with torch.inference_mode():
            self.conditions = build_conditions(base, PromptTokens(ids, mask, lyric_ids, lyric_mask), config)
        peaks.weights["eager"] = peaks.allocated() - before

    def generate(self, seconds: float, config: Any) -> tuple[float, int, bool]:
        """(seconds: sampling loop + latents → audio, DiT calls, everything finite)."""
        # torch, through sampling: heavy (see __init__), imported where used
        from acestep_triton.sampling import latent_frames

        generator = self.torch.Generator().manual_seed(self.seed)
        noise = self.torch.randn(1, 8, 16, latent_frames(seconds), generator=generator).to(self.device)
        self.counter.calls = 0
        latents, audio, loop_s, decode_s = self.peaks.call("eager", lambda: self.gpu.generate(
            self.variant, self.conditions, noise, config, self.codec, seconds))
        finite = bool(self.torch.isfinite(latents).all() and self.torch.isfinite(audio).all())
        return loop_s + decode_s, self.counter.calls, finite


class TritonPath:
    """The deployment through its gRPC client, with the DiT calls counted from Triton's statistics."""

    def __init__(self, url: str, timeout_s: float) -> None:
        from acestep_client.client import AceStepClient  # tritonclient: heavy (see __init__), imported where used

        self.url = url
        self.client = AceStepClient(url)
        self.timeout_s = timeout_s

    def generate(self, params: Any) -> tuple[Any, float, int]:
        before = dit_counts(self.url)["requests"]
        started = time.perf_counter()
        result = self.client.generate(params, timeout_s=self.timeout_s)
        elapsed = time.perf_counter() - started
        return result.audio, elapsed, dit_counts(self.url)["requests"] - before



class ServerStarter(threading.Thread):
    """Starts tritonserver in the background: its models load while this process loads its own."""

    def __init__(self, server: Any) -> None:
        super().__init__(name="tritonserver-start", daemon=True)
        self.server = server
        self.error: BaseException | None = None
        self.seconds = math.nan

    def run(self) -> None:
        started = time.perf_counter()
        try:
            self.server.start()
        except BaseException as exc:  # reported by the caller, with the log tail
            self.error = exc
        self.seconds = time.perf_counter() - started


def triton_install(root: Path | None) -> Any:
    """The tritonserver to run: a carried ``nvidia-pytriton`` tree (``root`` holds ``pytriton/`` and
    ``nvidia_pytriton.libs/`` as in site-packages), else this environment's (``TritonInstall.locate``)."""
    if root is None:
        return TritonInstall.locate()
    libs = root / "nvidia_pytriton.libs"
    return TritonInstall.from_root(root / "pytriton" / "tritonserver", libs_dir=libs if libs.is_dir() else None)


