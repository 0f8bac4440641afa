"""Container HEALTHCHECK: exit 0 when ``GET http://127.0.0.1:<port><path>`` answers 200, else 1.

Written in Python rather than ``curl`` so that every image (NGC, python-slim) runs the same check
with nothing extra installed, and so the port can follow the same environment variable the entry
point reads (a Dockerfile's exec-form HEALTHCHECK cannot expand variables itself).

    python3 healthcheck.py --path /v2/health/ready --port-env ACESTEP_HTTP_PORT --default-port 8000

The server images add ``--components ready`` (or ``live``): Triton's health endpoints keep
answering 200 after a model's backend process died, so the check then also asks
:func:`acestep_triton.serving.health.check_health` whether every Python-backend model instance
has a live process and whether the ``serve`` watchdog is still reloading one (``ready``: then
not ready) or gave up (``live``: then not live, so the container is restarted).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence


def healthy(url: str, timeout_s: float) -> bool:
    """``True`` when ``url`` answers HTTP 200 within ``timeout_s`` seconds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="/v2/health/ready", help="URL path to probe")
    parser.add_argument("--port-env", default="ACESTEP_HTTP_PORT",
                        help="environment variable holding the port (the entry point reads the same)")
    parser.add_argument("--default-port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds")
    parser.add_argument("--components", choices=("ready", "live"), default=None,
                        help="tritonserver only: also check the model processes (see the module help)")
    args = parser.parse_args(argv)
    port = os.environ.get(args.port_env) or str(args.default_port)
    url = f"http://{args.host}:{port}{args.path}"
    if not healthy(url, args.timeout):
        print(f"unhealthy: {url}", file=sys.stderr)
        return 1
    if args.components is not None:
        # Imported only here: the front-end image has no server code, and needs none.
        from acestep_triton.serving.health import check_health

        report = check_health(int(port), host=args.host, mode=args.components, timeout=args.timeout)
        if not report.healthy:
            print(f"unhealthy ({args.components}): " + "; ".join(report.problems), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
