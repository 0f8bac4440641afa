"""Command line of the repository renderer: ``acestep-triton render`` (and ``export/render_repository.py``).

``python -m acestep_triton.export.render_cli render --out R [--target cpu|gpu] [--runtime ...]``
renders with :func:`acestep_triton.export.repository.render_repository`. The parser of
``--endpoint-instances`` (:func:`parse_endpoint_instances`) is shared with ``acestep-triton build``,
so both commands refuse the same bad values with the same words.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from acestep_triton.export.model_configs import DEFAULT_MAX_ITEMS, RUNTIMES, TARGETS, load_endpoints
from acestep_triton.export.project_files import PROJECT_ROOT_ENV
from acestep_triton.export.repository import render_repository

DESCRIPTION = "The one ``config.pbtxt`` renderer and model-repository writer."
"""The ``--help`` description (unchanged from when the CLI lived with the writer)."""


def add_render_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``render`` options (``acestep-triton render`` hands its arguments to :func:`main`)."""
    parser.add_argument("--out", required=True, type=Path, help="repository folder to (re)write")
    parser.add_argument("--target", choices=TARGETS, default="cpu")
    parser.add_argument("--runtime", choices=sorted({r for rs in RUNTIMES.values() for r in rs}), default=None,
                        help="component runtime: cpu onnx (default) | torch; gpu torch (default) | tensorrt")
    parser.add_argument("--checkpoint", type=Path, default=None, help="runtime torch: the checkpoint folder")
    parser.add_argument("--onnx-dir", type=Path, default=None, help="exported <component>.onnx files")
    parser.add_argument("--engine-dir", type=Path, default=None, help="gpu: built <component>.plan files")
    parser.add_argument("--assets", type=Path, default=None,
                        help="folder with the checkpoint and vocab, substituted for {assets} in endpoints")
    parser.add_argument("--endpoints", default=None,
                        help="comma-separated endpoint names (default: every ensemble_configs/*.json)")
    parser.add_argument("--endpoints-dir", type=Path, default=None,
                        help=f"endpoint definitions (default: ensemble_configs/ of the project, "
                             f"${PROJECT_ROOT_ENV} when set)")
    parser.add_argument("--sources", type=Path, default=None,
                        help=f"model_repository/ sources (default: the project's, ${PROJECT_ROOT_ENV} when set)")
    parser.add_argument("--components", default=None,
                        help="comma-separated component names (default: all six; '' for endpoints only)")
    parser.add_argument("--max-items", type=int, default=DEFAULT_MAX_ITEMS,
                        help="songs per request the components are sized for (0: no Triton batching)")
    parser.add_argument("--instances", type=int, default=1, help="instances per component")
    parser.add_argument("--gpus", default="", help="gpu: comma-separated GPU ids for the instances")
    parser.add_argument("--queue-delay-us", type=int, default=1000,
                        help="dynamic batching: how long a batch may wait for more requests")
    parser.add_argument("--threads", type=int, default=0, help="cpu: onnxruntime intra-op threads (0: all)")
    parser.add_argument("--endpoint-instances", default=None, type=parse_endpoint_instances,
                        help="instances per endpoint: one count for all (8), or per endpoint "
                             "(text2music=8,repaint=2); a decoupled endpoint instance serves one request at a time. "
                             "Default: each ensemble_configs/*.json's instance_count")
    parser.add_argument("--memory-budget-mb", default=None,
                        help="endpoints' admission budget per instance: auto (free memory at the first request "
                             "minus memory_margin_mb: GPU cudaMemGetInfo, CPU MemAvailable), off, or MiB "
                             "(see serving/admission.py)")


def parse_endpoint_instances(text: str | int | None) -> int | dict[str, int] | None:
    """``--endpoint-instances``: ``"8"`` → 8 (every endpoint), ``"text2music=8,repaint=2"`` →
    ``{"text2music": 8, "repaint": 2}`` (the others keep their definition's count), None/'' → None.

    Why an option: a decoupled endpoint instance runs one request at a time, so the concurrency
    a deployment serves is its endpoint instance count; it depends on the GPU, not the task.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, int) or "=" not in text:
        return _instance_count(text.strip() if isinstance(text, str) else text, "the count")
    counts: dict[str, int] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--endpoint-instances: expected NAME=COUNT, got {item!r}")
        counts[name.strip()] = _instance_count(value.strip(), name.strip())
    return counts


def _instance_count(value: str | int, where: str) -> int:
    """One count of ``--endpoint-instances``, refused with the option's name unless a whole number >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"--endpoint-instances: {where} must be a whole number, got {value!r}") from None
    if number < 1:
        raise ValueError(f"--endpoint-instances: {where} must be >= 1, got {number}")
    return number


def memory_parameters(budget_mb: str | None) -> dict[str, str]:
    """``--memory-budget-mb`` as endpoint parameters, checked now rather than at server load."""
    if budget_mb is None:
        return {}
    value = str(budget_mb).strip().lower()
    if value not in ("auto", "off"):
        try:
            if float(value) < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"--memory-budget-mb must be auto, off or MiB >= 0, got {budget_mb!r}") from None
    return {"memory_budget_mb": value}


def run_render(args: argparse.Namespace) -> int:
    """Render the repository the parsed ``render`` options describe and name the models written."""
    names = [n for n in args.endpoints.split(",") if n] if args.endpoints is not None else None
    out = render_repository(
        args.out, args.target, args.onnx_dir, load_endpoints(names, args.endpoints_dir),
        components=None if args.components is None else [c for c in args.components.split(",") if c],
        assets=args.assets, engine_dir=args.engine_dir,
        sources_root=args.sources, max_items=args.max_items, instance_count=args.instances,
        gpus=[int(g) for g in args.gpus.split(",") if g], max_queue_delay_us=args.queue_delay_us,
        intra_op_threads=args.threads, runtime=args.runtime, checkpoint=args.checkpoint,
        endpoint_parameters=memory_parameters(getattr(args, "memory_budget_mb", None)),
        endpoint_instances=getattr(args, "endpoint_instances", None))
    models = sorted(p.name for p in out.iterdir() if p.is_dir())
    print(f"rendered {len(models)} models for target {args.target} into {out}: {', '.join(models)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``render --onnx-dir D --out R --target cpu|gpu --assets A``."""
    parser = argparse.ArgumentParser(prog="acestep-triton-render", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    add_render_arguments(sub.add_parser("render", help="render a model repository"))
    args = parser.parse_args(argv)
    try:
        return run_render(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
