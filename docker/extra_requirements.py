"""Print the requirements of one optional-dependency group (extra) of a ``pyproject.toml``.

The front-end image needs the ``acestep_triton.frontend`` package and the ``ui`` extra's pins,
but none of the project's core dependencies (torch, transformers...). ``pip install --no-deps .``
installs the package alone, and this script hands the extra's pins to ``pip install -r``, so the
pins keep living in one place (pyproject.toml) instead of being copied into a Dockerfile.

    python extra_requirements.py pyproject.toml ui > /tmp/ui.txt
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import tomllib


def extra_requirements(pyproject: Path, extra: str) -> list[str]:
    """The requirement strings of ``[project.optional-dependencies].<extra>``."""
    data = tomllib.loads(pyproject.read_text())
    extras = data.get("project", {}).get("optional-dependencies", {})
    if extra not in extras:
        raise KeyError(f"{pyproject} has no extra {extra!r} (it has: {', '.join(sorted(extras)) or 'none'})")
    return [str(r) for r in extras[extra]]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: extra_requirements.py PYPROJECT EXTRA", file=sys.stderr)
        return 2
    try:
        requirements = extra_requirements(Path(args[0]), args[1])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 1
    print("\n".join(requirements))
    return 0


if __name__ == "__main__":
    sys.exit(main())
