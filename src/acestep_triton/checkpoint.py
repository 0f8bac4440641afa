"""The official ACE-Step checkpoint: its layout, strict loading, download.

The loader takes the Hugging Face ``ACE-Step/ACE-Step-v1-3.5B`` folder exactly as published
(four sub-folders, diffusers/transformers file names) plus the lyric BPE vocabulary, which
upstream keeps in its GitHub repository rather than in the checkpoint. Loading is strict: every
key of the files must land in a module and every parameter must come from the files, except
for the weights each model module declares unused (``UNUSED_KEYS``); anything else is an error
that names the keys, because a silently half-loaded model produces plausible-sounding garbage.

Random checkpoints in the same layout (the tiny one tests run on, the full-size one for GPU
measurements) are written by :mod:`acestep_triton.synthetic` and loaded here like the real one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .command_line import print_written
from .lyrics.tokenizer import LyricTokenizer
from .models.prompt_tokenizer import PromptTokenizer
from .models.transformer import UNUSED_KEYS as TRANSFORMER_UNUSED_KEYS
from .models.transformer import ACEStepTransformer
from .models.vocoder import UNUSED_KEYS as VOCODER_UNUSED_KEYS
from .models.vocoder import Vocoder
from .weights import (  # noqa: F401 (re-exported: the checkpoint API's error and file reader)
    CheckpointError,
    SafetensorsFile,
    build_on_meta,
    load_state_dict_strict,
    materialize,
    read_safetensors,
)

HF_REPO_ID = "ACE-Step/ACE-Step-v1-3.5B"
"""The official checkpoint on the Hugging Face Hub."""

UPSTREAM_COMMIT = "d612523f50e252c0e138e68ae75b06223f96e934"
"""The ace-step/ACE-Step commit our reference numbers come from; the vocab is pinned to it."""

VOCAB_URL = (f"https://raw.githubusercontent.com/ace-step/ACE-Step/{UPSTREAM_COMMIT}/"
             "acestep/models/lyrics_utils/vocab.json")
VOCAB_SHA256 = "c2a66ea48c478c0bb9acb5497144b926acdeaa37128faa799508d40f2b9cc558"
"""SHA-256 of upstream's ``vocab.json`` at :data:`UPSTREAM_COMMIT` (checked after download)."""

TRANSFORMER_DIR = "ace_step_transformer"
DCAE_DIR = "music_dcae_f8c8"
VOCODER_DIR = "music_vocoder"
TEXT_ENCODER_DIR = "umt5-base"
CONFIG_FILE = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
VOCAB_FILENAMES = ("lyrics_vocab.json", "vocab.json")
"""Names under which the lyric vocabulary is looked for inside the checkpoint folder, in order."""

OFFICIAL_FILES: dict[str, tuple[str, ...]] = {
    TRANSFORMER_DIR: (CONFIG_FILE, DIFFUSERS_WEIGHTS),
    DCAE_DIR: (CONFIG_FILE, DIFFUSERS_WEIGHTS),
    VOCODER_DIR: (CONFIG_FILE, DIFFUSERS_WEIGHTS),
    TEXT_ENCODER_DIR: (CONFIG_FILE, TRANSFORMERS_WEIGHTS, *TOKENIZER_FILES),
}
"""Every file the loader reads, per folder: the official layout, which we never rename."""


# ---------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class CheckpointLayout:
    """Paths of the official four-folder layout under ``root``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    transformer_dir = property(lambda self: self.root / TRANSFORMER_DIR, doc="The transformer's folder.")
    dcae_dir = property(lambda self: self.root / DCAE_DIR, doc="The music DCAE's folder.")
    vocoder_dir = property(lambda self: self.root / VOCODER_DIR, doc="The vocoder's folder.")
    text_encoder_dir = property(lambda self: self.root / TEXT_ENCODER_DIR, doc="The UMT5 text encoder's folder.")

    def folder(self, name: str) -> Path:
        if name not in OFFICIAL_FILES:
            raise KeyError(f"unknown checkpoint folder {name!r} (expected one of {sorted(OFFICIAL_FILES)})")
        return self.root / name

    def config_path(self, name: str) -> Path:
        return self.folder(name) / CONFIG_FILE

    def weights_path(self, name: str) -> Path:
        weights = TRANSFORMERS_WEIGHTS if name == TEXT_ENCODER_DIR else DIFFUSERS_WEIGHTS
        return self.folder(name) / weights

    def read_config(self, name: str) -> dict[str, Any]:
        path = self.config_path(name)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError as e:
            raise CheckpointError(f"{path}: missing (is {self.root} an ACE-Step checkpoint?)") from e
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from e

    def required_files(self) -> list[Path]:
        return [self.root / d / f for d, files in OFFICIAL_FILES.items() for f in files]

    def missing_files(self) -> list[Path]:
        return [p for p in self.required_files() if not p.is_file()]

    def validate(self) -> None:
        """Fail early, naming every missing file, rather than deep inside one model's loader."""
        if not self.root.is_dir():
            raise CheckpointError(f"checkpoint folder {self.root} does not exist "
                                  "(`python -m acestep_triton.checkpoint download DIR` fetches it)")
        missing = self.missing_files()
        if missing:
            listed = "\n  ".join(str(p.relative_to(self.root)) for p in missing)
            raise CheckpointError(f"checkpoint {self.root} is incomplete; missing:\n  {listed}")

    def find_vocab(self, vocab_path: str | Path | None = None) -> Path:
        """The lyric vocabulary: ``vocab_path`` if given, else a known file name in ``root``.

        The vocab is not part of the Hub checkpoint (upstream ships it in its source tree), so
        the error says where to put it and how to get it.
        """
        if vocab_path is not None:
            path = Path(vocab_path)
            if not path.is_file():
                raise CheckpointError(f"lyric vocabulary {path} does not exist")
            return path
        for name in VOCAB_FILENAMES:
            path = self.root / name
            if path.is_file():
                return path
        names = " or ".join(VOCAB_FILENAMES)
        raise CheckpointError(
            f"lyric vocabulary not found: pass its path, or place upstream's "
            f"acestep/models/lyrics_utils/vocab.json as {names} in {self.root} "
            f"(`python -m acestep_triton.checkpoint download DIR` fetches it from {VOCAB_URL})")


# ---------------------------------------------------------------------------------------------
# Loading every component


@dataclass
class Components:
    """Everything a generation needs, built from one checkpoint folder.

    ``configs`` maps each official folder name to its ``config.json`` dict (the served layer
    counts and widths are read from there by export and serving code).
    """

    layout: CheckpointLayout
    configs: dict[str, dict[str, Any]]
    vocab_path: Path
    text_tokenizer: PromptTokenizer
    text_encoder: Any  # models.text_encoder.TextEncoder
    transformer: Any  # models.transformer.ACEStepTransformer
    dcae_encoder: Any  # models.dcae.DCAEEncoder
    dcae_decoder: Any  # models.dcae.DCAEDecoder
    vocoder: Any  # models.vocoder.Vocoder
    lyric_tokenizer: Any  # lyrics.tokenizer.LyricTokenizer

    def modules(self) -> dict[str, nn.Module]:
        """The torch modules by component name (to move them to a device or dtype together)."""
        return {"text_encoder": self.text_encoder, "transformer": self.transformer,
                "dcae_encoder": self.dcae_encoder, "dcae_decoder": self.dcae_decoder,
                "vocoder": self.vocoder}


def _finish(module: nn.Module) -> nn.Module:
    """Inference mode: eval (no dropout) and no gradients, so export and serving see constants."""
    module.eval()
    module.requires_grad_(False)
    return module


def _all_or_none(*steps: Callable[[], Any]) -> list[Any]:
    """Run every step even if some fail, then raise one error with all their messages, so a
    user fixing a checkpoint sees every problem at once rather than one per attempt."""
    results: list[Any] = []
    errors: list[str] = []
    for step in steps:
        try:
            results.append(step())
        except CheckpointError as e:
            errors.append(str(e))
    if errors:
        raise CheckpointError("\n".join(errors))
    return results


def load_text_encoder(layout: CheckpointLayout, dtype: torch.dtype = torch.float32) -> nn.Module:
    # deferred: transformers takes seconds to import; layout-only importers never need it
    from .models.text_encoder import load_text_encoder as load_umt5

    return _finish(load_umt5(layout.text_encoder_dir, dtype))


def load_transformer(layout: CheckpointLayout, dtype: torch.dtype = torch.float32, *,
                     drop: Sequence[str] = ()) -> nn.Module:
    """The DiT; the official file is bf16, cast here to ``dtype`` (fp32 by default).

    ``drop`` names top-level submodules to leave out (the condition encoder never runs the
    decoder blocks and vice versa): their tensors are checked against the file but never read.
    """
    config = layout.read_config(TRANSFORMER_DIR)
    state = read_safetensors(layout.weights_path(TRANSFORMER_DIR))
    return materialize(lambda: ACEStepTransformer.from_config(config), state, TRANSFORMER_UNUSED_KEYS,
                       f"transformer ({TRANSFORMER_DIR})", dtype=dtype, drop=drop)


def meta_transformer(ckpt_dir: str | Path) -> nn.Module:
    """The checkpoint's transformer on the meta device: every shape, no weights (for checks)."""
    config = CheckpointLayout(Path(ckpt_dir)).read_config(TRANSFORMER_DIR)
    return build_on_meta(lambda: ACEStepTransformer.from_config(config))


DCAE_HALVES = ("encoder", "decoder")
"""The two halves of the official DCAE file, each served by its own model."""


def load_dcae_half(layout: CheckpointLayout, half: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """One DCAE half from the single official file, reading only that half's tensors. It is
    checked against every key of the file minus the other half's, so a stray key fails in both."""
    # deferred: diffusers takes seconds to import; layout-only importers never need it
    from .models import dcae

    if half not in DCAE_HALVES:
        raise ValueError(f"DCAE half must be one of {DCAE_HALVES}, got {half!r}")
    config = layout.read_config(DCAE_DIR)
    state = read_safetensors(layout.weights_path(DCAE_DIR))
    factory, foreign = ((lambda: dcae.DCAEEncoder(config), dcae.ENCODER_FOREIGN_KEYS) if half == "encoder"
                        else (lambda: dcae.DCAEDecoder(config), dcae.DECODER_FOREIGN_KEYS))
    return materialize(factory, state, (*dcae.UNUSED_KEYS, *foreign), f"DCAE {half} ({DCAE_DIR})", dtype=dtype)


def load_dcae(layout: CheckpointLayout, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    """Both DCAE halves (every problem of both reported together)."""
    encoder, decoder = _all_or_none(*(lambda h=h: load_dcae_half(layout, h, dtype) for h in DCAE_HALVES))
    return encoder, decoder


def load_vocoder(layout: CheckpointLayout, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The vocoder with its official ``weight_g``/``weight_v`` pairs (fold them before export)."""
    config = layout.read_config(VOCODER_DIR)
    state = read_safetensors(layout.weights_path(VOCODER_DIR))
    return materialize(lambda: Vocoder(config), state, VOCODER_UNUSED_KEYS, f"vocoder ({VOCODER_DIR})", dtype=dtype)


def load_components(ckpt_dir: str | Path, vocab_path: str | Path | None = None,
                    dtype: torch.dtype = torch.float32) -> Components:
    """Build and strictly load every component of the checkpoint at ``ckpt_dir``.

    ``vocab_path`` is the lyric vocabulary (default: ``lyrics_vocab.json``/``vocab.json`` in
    ``ckpt_dir``). The layout and the vocab are checked before any weight is read.
    """
    layout = CheckpointLayout(Path(ckpt_dir))
    layout.validate()
    vocab = layout.find_vocab(vocab_path)
    configs = {name: layout.read_config(name) for name in OFFICIAL_FILES}
    text_encoder, transformer, (dcae_encoder, dcae_decoder), vocoder = _all_or_none(
        lambda: load_text_encoder(layout, dtype),
        lambda: load_transformer(layout, dtype),
        lambda: load_dcae(layout, dtype),
        lambda: load_vocoder(layout, dtype),
    )
    return Components(
        layout=layout, configs=configs, vocab_path=vocab,
        text_tokenizer=PromptTokenizer(layout.text_encoder_dir),
        text_encoder=text_encoder, transformer=transformer,
        dcae_encoder=dcae_encoder, dcae_decoder=dcae_decoder, vocoder=vocoder,
        lyric_tokenizer=LyricTokenizer(vocab),
    )


# ---------------------------------------------------------------------------------------------
# Download


class CheckpointDownloadError(RuntimeError):
    """The official checkpoint or the vocabulary could not be fetched (typically: offline)."""


_OFFLINE_HELP = (
    "This command needs internet access to huggingface.co and raw.githubusercontent.com. "
    "Offline, copy a downloaded checkpoint instead: the four folders of {repo} "
    "({folders}) into {out}, and upstream's acestep/models/lyrics_utils/vocab.json as "
    "{out}/lyrics_vocab.json. Behind a proxy, set HTTPS_PROXY; for a Hub mirror, HF_ENDPOINT.")


def _offline_help(out_dir: Path) -> str:
    return _OFFLINE_HELP.format(repo=HF_REPO_ID, folders=", ".join(OFFICIAL_FILES), out=out_dir)


def download_vocab(dest: str | Path, url: str = VOCAB_URL, timeout_s: float = 60.0) -> Path:
    """Fetch upstream's lyric vocabulary (pinned commit) to ``dest`` and verify its SHA-256."""
    dest = Path(dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise CheckpointDownloadError(
            f"could not download the lyric vocabulary from {url} ({e}).\n{_offline_help(dest.parent)}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise CheckpointDownloadError(f"{url}: unexpected content (sha256 {digest}, expected {VOCAB_SHA256})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return dest


def download_checkpoint(out_dir: str | Path, repo_id: str = HF_REPO_ID, revision: str | None = None) -> Path:
    """Download the official checkpoint into ``out_dir`` (official layout) plus the vocab.

    Returns ``out_dir``, ready for :func:`load_components`. Network failures become a
    :class:`CheckpointDownloadError` that says what to do offline.
    """
    out = Path(out_dir)
    try:
        from huggingface_hub import snapshot_download  # optional dependency: the `download` extra
    except ImportError as e:
        raise CheckpointDownloadError(
            "downloading needs huggingface_hub: pip install 'acestep-triton[download]'") from e
    try:
        snapshot_download(repo_id=repo_id, revision=revision, local_dir=str(out),
                          allow_patterns=[f"{d}/*" for d in OFFICIAL_FILES])
    except Exception as e:  # huggingface_hub raises many types for "no network"; all mean the same here
        raise CheckpointDownloadError(
            f"could not download {repo_id} from the Hugging Face Hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}).\n{_offline_help(out)}") from e
    download_vocab(out / VOCAB_FILENAMES[0])
    CheckpointLayout(out).validate()
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """``download OUT [--revision R]``: the official checkpoint and the lyric vocabulary.

    The random checkpoints have their own command (``python -m acestep_triton.synthetic``);
    ``acestep-triton checkpoint`` offers both.
    """
    parser = argparse.ArgumentParser(prog="python -m acestep_triton.checkpoint",
                                     description="ACE-Step checkpoints in the official layout.")
    sub = parser.add_subparsers(dest="command", required=True)
    download = sub.add_parser("download", help=f"download {HF_REPO_ID} and the lyric vocabulary")
    download.add_argument("out", type=Path)
    download.add_argument("--revision", default=None, help="Hub revision (default: main)")
    args = parser.parse_args(argv)
    return print_written(lambda: download_checkpoint(args.out, revision=args.revision),
                         (CheckpointError, CheckpointDownloadError))


if __name__ == "__main__":
    sys.exit(main())
