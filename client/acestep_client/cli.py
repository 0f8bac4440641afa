"""``acestep-client generate``: one request from the command line, audio files + parameters JSON out.

Every request field of the schema is a flag, generated from ``GenerationParams.specs()`` (so a
new schema field is a new flag with no change here), with the short aliases people expect
(``--duration``, ``--steps``, ``--seeds``). ``--params-json`` starts from a saved parameters file
(e.g. ``*_params.json`` written next to a previous result); explicit flags override it.

Exit status: 0 done, 1 server error, 2 bad arguments/parameters (also when the server refused
them), 3 server unavailable (after the retries), 4 cancelled or timed out, 5 access denied (a
missing or wrong key), 130 interrupted (Ctrl-C, which also cancels the request server-side).

Keys come from the environment only (``ACESTEP_API_KEY`` for a server started with
``--api-key``, ``ACESTEP_ADMIN_KEY`` for ``loras load/unload/reload``), never from flags: a
command line is visible to every user of the machine and stays in shell histories.

A request the server cannot serve right now (down, restarting, a component coming back) is
resent up to ``--retries`` times with growing waits, each announced on stderr; ``--timeout-s``
bounds the whole request, waits included. Refused input is never resent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from acestep_client.params import GenerationParams, ParamError
from acestep_client.retry import RetryPolicy

ALIASES = {"audio_duration": ("--duration",), "infer_step": ("--steps",), "manual_seeds": ("--seeds",)}
URL_ENV = "ACESTEP_URL"


class ProgressPrinter:
    """A plain-text progress bar on stderr: redrawn in place on a terminal, otherwise one line
    per tenth so logs stay readable."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.start = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_tenth = -1

    def __call__(self, step: int, total: int) -> None:
        total = max(total, 1)
        fraction = min(max(step / total, 0.0), 1.0)
        filled = round(fraction * self.width)
        elapsed = time.monotonic() - self.start
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {step}/{total} steps "
                f"{elapsed:5.1f}s elapsed, {eta:5.1f}s left")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step >= total else ""))
        else:
            tenth = int(fraction * 10)
            if tenth == self._last_tenth:
                return
            self._last_tenth = tenth
            self.stream.write(line + "\n")
        self.stream.flush()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acestep-client", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_arguments(sub.add_parser("generate", help="generate music and write audio files"))
    add_loras_arguments(sub.add_parser("loras", help="list, load or unload the server's runtime LoRA adapters"))
    return parser


def add_generate_arguments(gen: argparse.ArgumentParser) -> None:
    """The ``generate`` options: connection, output, and one flag per schema field."""
    gen.add_argument("--url", default=os.environ.get(URL_ENV, "localhost:8001"),
                     help=f"Triton gRPC address (env {URL_ENV}; default %(default)s)")
    gen.add_argument("--endpoint", default=None, help="endpoint model (default: the task)")
    gen.add_argument("--params-json", type=Path, default=None,
                     help="start from a saved parameters JSON; flags given override its values")
    gen.add_argument("--out", type=Path, default=Path("."), help="output folder (default: current)")
    gen.add_argument("--name", default=None, help="file name stem (default: <task>_<timestamp>)")
    gen.add_argument("--timeout-s", "--timeout", dest="timeout_s", type=float, default=None,
                     help="deadline of the whole request in seconds, retries included (default: none)")
    gen.add_argument("--retries", type=int, default=RetryPolicy().attempts - 1,
                     help="resends after 'server unavailable' errors, 0 for none (default %(default)s, "
                          "within --timeout-s, or within 2 minutes of the first failure without one)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--src-audio", type=Path, default=None,
                     help="source audio file for repaint/edit/extend (wav/flac/ogg/mp3)")
    gen.add_argument("--ref-audio", type=Path, default=None, help="reference audio file for audio2audio")
    fields = gen.add_argument_group("generation parameters")
    for spec in GenerationParams.specs():
        flags = [_flag(spec.name), *ALIASES.get(spec.name, ())]
        kwargs: dict[str, Any] = {"dest": spec.name, "default": None,
                                  "help": f"{spec.help} (default: {spec.default!r})"}
        if spec.python_type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = spec.python_type
            if spec.choices:
                kwargs["choices"] = spec.choices
        fields.add_argument(*flags, **kwargs)


def params_from_args(args: argparse.Namespace) -> GenerationParams:
    """Schema defaults < ``--params-json`` < explicit flags; validated (``ParamError`` names the field)."""
    base: dict[str, Any] = {}
    if args.params_json is not None:
        try:
            base = json.loads(Path(args.params_json).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ParamError("params_json", f"cannot read {args.params_json}: {exc}") from exc
        if not isinstance(base, dict):
            raise ParamError("params_json", "must hold a JSON object")
    overrides = {s.name: getattr(args, s.name) for s in GenerationParams.specs()
                 if getattr(args, s.name) is not None}
    return GenerationParams.from_mapping({**base, **overrides})


def report_error(exc: BaseException, stderr: TextIO) -> int:
    """Print a failed command's error the way the CLI reports it; return its exit status
    (the module docstring's table)."""
    # acestep_client.client imports tritonclient, which the in-process CLI (sharing this module) lacks
    from acestep_client.client import (
        AccessDenied,
        GenerationCancelled,
        InvalidRequest,
        ServerError,
        ServerUnavailable,
    )

    if isinstance(exc, AccessDenied):
        text, status = f"access denied: {exc}", 5
    elif isinstance(exc, ServerUnavailable):
        text, status = f"server unavailable: {exc}", 3
    elif isinstance(exc, InvalidRequest):
        text, status = f"rejected by the server: {exc}", 2
    elif isinstance(exc, ServerError):
        text, status = f"server: {exc}", 1
    elif isinstance(exc, GenerationCancelled):
        text, status = str(exc), 4
    else:
        text, status = str(exc), 2
    print(f"error: {text}", file=stderr)
    return status


def run_generate(args: argparse.Namespace, stderr: TextIO | None = None) -> int:
    # Imported here: the argument and progress helpers above are shared with the in-process
    # CLI (``acestep-triton generate --local``), which must run without tritonclient.
    from acestep_client.client import AceStepClient, AceStepError

    stderr = stderr or sys.stderr
    try:
        params = params_from_args(args)
        if args.retries < 0:
            raise ParamError("retries", f"must be 0 or more, got {args.retries}")
    except ParamError as exc:
        print(f"error: {exc}", file=stderr)
        return 2
    progress = None if args.quiet else ProgressPrinter(stderr)
    client = AceStepClient(args.url, retry=RetryPolicy(attempts=args.retries + 1))

    def on_retry(attempt: int, attempts: int, error: BaseException, delay: float) -> None:
        print(f"server unavailable ({error}); retrying in {delay:.1f} s (attempt {attempt + 1} of {attempts})",
              file=stderr)

    try:
        result = client.generate(params, endpoint=args.endpoint, on_progress=progress, timeout_s=args.timeout_s,
                                 src_audio=args.src_audio, ref_audio=args.ref_audio, on_retry=on_retry)
    except (AceStepError, ValueError) as exc:  # ValueError: ParamError, an unreadable --src-audio/--ref-audio
        return report_error(exc, stderr)
    except KeyboardInterrupt:
        print("\ninterrupted; request cancelled", file=stderr)
        return 130
    stem = args.name or f"{params.task}_{time.strftime('%Y%m%d_%H%M%S')}"
    for path in result.save(args.out, params.format, stem=stem):
        print(path)
    return 0


# ----------------------------------------------------------------------------- runtime LoRA adapters
def add_loras_arguments(parser: argparse.ArgumentParser) -> None:
    """``loras [list|load NAME|unload NAME|reload]`` (a torch-runtime server's ``lora_registry``)."""
    parser.add_argument("action", nargs="?", default="list", choices=("list", "load", "unload", "reload"),
                        help="what to do (default: list)")
    parser.add_argument("name", nargs="?", default=None, help="adapter folder name (load, unload)")
    parser.add_argument("--url", default=os.environ.get(URL_ENV, "localhost:8001"),
                        help=f"Triton gRPC address (env {URL_ENV}; default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the whole listing as JSON")


def format_loras(listing: dict[str, Any]) -> str:
    """A short human-readable listing: one line per loaded adapter, then what else is there."""
    lines = [f"{len(listing.get('loaded', []))} adapter(s) loaded (budget "
             f"{listing.get('budget_bytes', 0) / 2**20:.0f} MiB per instance):"]
    for a in listing.get("loaded", []):
        parameters = sum(a.get("parameters", {}).values())
        lines.append(f"  {a['name']}: rank {a.get('ranks')}, {a.get('layers')} layers, {parameters / 1e6:.2f} M "
                     f"parameters, components {', '.join(a.get('components', []))}")
    if listing.get("available"):
        lines.append(f"not loaded: {', '.join(listing['available'])}")
    for name, reason in (listing.get("failed") or {}).items():
        lines.append(f"refused {name}: {reason}")
    for instance, status in (listing.get("instances") or {}).items():
        lines.append(f"resident in {instance}: {', '.join(status.get('resident', [])) or 'none'} "
                     f"({status.get('resident_bytes', 0) / 2**20:.1f} MiB)")
    return "\n".join(lines)


def run_loras(args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Exit status: 0 done, 1 server error, 2 bad arguments or refused, 3 server unavailable,
    5 access denied (load/unload/reload need ``ACESTEP_ADMIN_KEY``)."""
    # acestep_client.client imports tritonclient, which the in-process CLI (sharing this module) lacks
    from acestep_client.client import AceStepClient, AceStepError

    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if args.action in ("load", "unload") and not args.name:
        print(f"error: loras {args.action} needs the adapter's folder name", file=stderr)
        return 2
    client = AceStepClient(args.url)
    calls = {"list": client.list_loras, "reload": client.reload_loras,
             "load": lambda: client.load_lora(args.name), "unload": lambda: client.unload_lora(args.name)}
    try:
        listing = calls[args.action]()
    except AceStepError as exc:
        return report_error(exc, stderr)
    print(json.dumps(listing, indent=2) if args.json else format_loras(listing), file=stdout)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return run_generate(args)
    if args.command == "loras":
        return run_loras(args)
    return 2  # pragma: no cover - argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
