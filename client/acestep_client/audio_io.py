"""Writing generated audio to wav / flac / ogg / mp3 with soundfile (libsndfile).

The encodings are chosen once here: WAV keeps the model's float32 samples untouched (as
upstream's float WAV did); FLAC stores 24-bit PCM (it has no float mode), OGG is Vorbis and MP3
is MPEG layer III. Integer and lossy encodings get samples clipped to [-1, 1] first, because
libsndfile would otherwise wrap overshooting peaks into loud clicks.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf

from acestep_client.limits import MAX_AUDIO_BYTES
from acestep_client.params import (
    AUDIO_FORMATS,
    MAX_AUDIO_SAMPLE_RATE,
    MIN_AUDIO_SAMPLE_RATE,
    ParamError,
)

ENCODINGS: dict[str, tuple[str, str]] = {
    "wav": ("WAV", "FLOAT"),
    "flac": ("FLAC", "PCM_24"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}
"""format -> (libsndfile container, subtype)."""
assert set(ENCODINGS) == set(AUDIO_FORMATS), "the schema's formats and the encodings must agree"


def format_from_path(path: str | Path, default: str = "wav") -> str:
    """The audio format named by a file suffix (``song.flac`` -> ``flac``), else ``default``."""
    suffix = Path(path).suffix.lower().lstrip(".")
    return suffix if suffix in ENCODINGS else default


def write_audio(path: str | Path, audio: np.ndarray, sample_rate: int, format: str | None = None) -> Path:
    """Write one item, ``audio`` shaped [channels, samples], to ``path`` in ``format``.

    ``format`` defaults to the path's suffix. The suffix is not changed: callers pick names.
    """
    fmt = (format or format_from_path(path)).lower()
    if fmt not in ENCODINGS:
        raise ValueError(f"format: {fmt!r} is not one of {', '.join(ENCODINGS)}")
    data = np.asarray(audio, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"audio must be [channels, samples], got shape {list(data.shape)}")
    container, subtype = ENCODINGS[fmt]
    if subtype != "FLOAT":
        data = np.clip(data, -1.0, 1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.ascontiguousarray(data.T), int(sample_rate), subtype=subtype, format=container)
    return path


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """``(audio [channels, samples] float32, sample_rate)`` of an audio file."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return np.ascontiguousarray(data.T), int(rate)


def _checked_size(data: bytes, field: str) -> bytes:
    if len(data) > MAX_AUDIO_BYTES:
        raise ValueError(f"{field}: {len(data) / 2**20:.0f} MiB; the limit is {MAX_AUDIO_BYTES / 2**20:.0f} MiB")
    return data


def audio_file_bytes(source: str | Path | bytes | tuple[np.ndarray, int], field: str = "src_audio") -> bytes:
    """The bytes of an audio file to send as ``src_audio``/``ref_audio``.

    ``source`` is a path (sent as it is: the server decodes wav/flac/ogg/mp3 itself), raw file
    bytes, or ``(audio [channels, samples], sample_rate)`` such as a previous result's item,
    which is encoded losslessly as float WAV. Errors are ``ParamError`` (a ``ValueError``) naming
    ``field``.
    """
    if isinstance(source, bytes):
        return _checked_size(source, field)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{field}: {path} is not a file")
        return _checked_size(path.read_bytes(), field)
    audio, rate = source
    data = np.asarray(audio, dtype=np.float32)
    if data.ndim == 1:
        data = data[None]
    if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] == 0:
        raise ParamError(field, f"audio must be [channels, samples] with both > 0, got shape {list(data.shape)}")
    # The server refuses other rates (see its decode); refusing here saves the upload.
    if not MIN_AUDIO_SAMPLE_RATE <= int(rate) <= MAX_AUDIO_SAMPLE_RATE:
        raise ParamError(field, f"sample rate {int(rate)} Hz is outside the supported "
                                f"{MIN_AUDIO_SAMPLE_RATE}–{MAX_AUDIO_SAMPLE_RATE} Hz")
    buffer = io.BytesIO()
    try:
        sf.write(buffer, np.ascontiguousarray(data.T), int(rate), subtype="FLOAT", format="WAV")
    except sf.LibsndfileError as exc:  # its str() shows "<_io.BytesIO object at 0x…>", not the reason
        raise ParamError(field, f"cannot encode the audio as WAV: {exc.error_string}") from None
    return buffer.getvalue()


def audio_tensor(source: str | Path | bytes | tuple[np.ndarray, int], field: str = "src_audio") -> np.ndarray:
    """A BYTES [1] array holding the file bytes (the wire form of ``src_audio``/``ref_audio``)."""
    return np.array([audio_file_bytes(source, field)], dtype=object)
