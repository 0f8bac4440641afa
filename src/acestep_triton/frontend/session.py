"""Per-session memory of results, and where repaint/edit/extend find their source audio.

Upstream let repaint, edit and extend start from "the last text2music result" (or the tab's own
last result) by reading the ``audio_path`` out of the parameters JSON shown in the UI. We keep
that, per browser/API session: every result is remembered under its kind (``text2music``,
``retake``, ``repaint``, ``edit``, ``extend``), and a parameters JSON passed explicitly is
honoured when its ``audio_path`` is a file this front end wrote. Nothing else on the server's
disk is ever read on a client's say-so.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from acestep_client.params import ParamError

from .upstream import parse_json_data

Memory = dict[str, dict[str, Any]]
"""kind -> {"audio_path": str, "params": dict}: plain data, so Gradio can keep it in a gr.State."""


def remember(memory: Memory | None, kind: str, audio_path: str | Path, params: Mapping[str, Any]) -> Memory:
    """A copy of ``memory`` with the latest result of ``kind``."""
    updated = dict(memory or {})
    updated[kind] = {"audio_path": str(audio_path), "params": dict(params)}
    return updated


def recall(memory: Memory | None, kind: str) -> dict[str, Any] | None:
    """The latest result of ``kind`` in this session, if any."""
    return (memory or {}).get(kind)


def own_output(path: Any, output_dir: Path) -> Path | None:
    """``path`` if it names an existing file inside ``output_dir`` (our results), else None."""
    if not isinstance(path, (str, Path)) or not str(path):
        return None
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError):
        return None
    root = output_dir.resolve()
    if resolved.is_file() and resolved.is_relative_to(root):
        return resolved
    return None


def pick_source(*, kind: str, choice: str, explicit: str | None, upload: str | None,
                text2music_json: Any, own_json: Any, memory: Memory | None, output_dir: Path) -> str:
    """The source audio file of a repaint/edit/extend request; errors name the tab's fields as
    upstream's endpoints call them (``<kind>_source``, ``<kind>_source_audio_upload``).

    ``explicit`` (the API's ``source_audio``) always wins: passing a file says where the source
    is. Otherwise ``choice`` decides as upstream's radio did: ``upload`` takes ``upload``;
    ``text2music`` takes the audio of ``text2music_json`` (when it is one of our files) or this
    session's last text2music result; ``last_<kind>`` the same with the tab's own results.
    """
    choice_field, upload_field = f"{kind}_source", f"{kind}_source_audio_upload"
    if explicit:
        return explicit
    if choice == "upload":
        if not upload:
            raise ParamError(upload_field, f"{choice_field} is 'upload' but no audio file was given")
        return upload
    if choice == "text2music":
        json_field, remembered, label = "text2music_json_data", "text2music", "Text2Music"
    elif choice == f"last_{kind}":
        json_field, remembered, label = f"{kind}_input_params_json", kind, f"{kind} result"
    else:
        raise ParamError(choice_field, f"{choice!r} is not one of text2music, last_{kind}, upload")
    data = parse_json_data(text2music_json if remembered == "text2music" else own_json, json_field)
    if data is not None:
        path = own_output(data.get("audio_path"), output_dir)
        if path is not None:
            return str(path)
    last = recall(memory, remembered)
    if last is not None and own_output(last["audio_path"], output_dir) is not None:
        return last["audio_path"]
    raise ParamError(choice_field, f"no {label} in this session yet: generate one first, or pass "
                                   f"source_audio (or choose 'upload')")
