"""Build-time guard of the GPU image: the TensorRT that builds engines is the one that runs them.

A TensorRT plan only deserialises in the TensorRT version that built it. In the GPU image the
engines are built with the ``tensorrt`` Python package (the project's ``gpu`` extra) and run by
Triton's tensorrt backend, which links the image's own ``libnvinfer``. If the two versions
differ, every engine fails to load with an opaque deserialisation error at serve time; this
script turns that into a failed ``docker build`` that names both versions.

    python3 check_tensorrt.py                     # exit 0: versions agree (or no system TensorRT found)
    python3 check_tensorrt.py --pip-requirement   # e.g. tensorrt-cu12==10.8.0.*: what to install

The image installs the second one's output, so the builder matches the backend by construction
whatever the base tag; the first then guards the result.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/local/tensorrt/lib",
                "/opt/tritonserver/backends/tensorrt")
_LIB = re.compile(r"^libnvinfer\.so\.(\d+)\.(\d+)\.(\d+)$")
CUDA_DIRS = ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/lib/x86_64-linux-gnu")
_CUDART = re.compile(r"^libcudart\.so\.(\d+)(?:\.\d+)*$")


def system_tensorrt_version(dirs: Iterable[str | Path] = LIBRARY_DIRS) -> tuple[int, int, int] | None:
    """The newest ``libnvinfer.so.X.Y.Z`` in ``dirs`` as ``(X, Y, Z)``; ``None`` when there is none."""
    found = []
    for folder in dirs:
        folder = Path(folder)
        if folder.is_dir():
            for path in folder.glob("libnvinfer.so.*"):
                match = _LIB.match(path.name)
                if match:
                    found.append(tuple(int(g) for g in match.groups()))
    return max(found) if found else None


def python_tensorrt_version(text: str) -> tuple[int, int, int]:
    """``"10.8.0.43"`` → ``(10, 8, 0)``: the build number does not change plan compatibility."""
    parts = text.split(".")
    if len(parts) < 3 or not all(p.isdigit() for p in parts[:3]):
        raise ValueError(f"unexpected TensorRT version {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def cuda_major(env: dict[str, str] | None = None, dirs: Iterable[str | Path] = CUDA_DIRS) -> int | None:
    """The image's CUDA major version: ``$CUDA_VERSION`` (set by NGC images), else the newest
    ``libcudart.so.N`` in ``dirs``; ``None`` when neither says."""
    env = os.environ if env is None else env
    version = env.get("CUDA_VERSION", "")
    if version.split(".")[0].isdigit():
        return int(version.split(".")[0])
    majors = [int(m.group(1)) for folder in dirs if Path(folder).is_dir()
              for path in Path(folder).glob("libcudart.so.*") if (m := _CUDART.match(path.name))]
    return max(majors) if majors else None


def pip_requirement(system: tuple[int, int, int] | None, cuda: int | None) -> str:
    """The ``tensorrt-cuNN==X.Y.Z.*`` requirement whose engines this image's backend loads."""
    if system is None:
        raise ValueError("no libnvinfer.so.X.Y.Z found: cannot tell which TensorRT the backend uses")
    if cuda is None:
        raise ValueError("cannot tell the image's CUDA major version (no $CUDA_VERSION, no libcudart.so.N)")
    return f"tensorrt-cu{cuda}=={system[0]}.{system[1]}.{system[2]}.*"


def mismatch(system: tuple[int, int, int] | None, python: str | None) -> str | None:
    """Why engines built here would not load in Triton, or ``None`` when they will."""
    if python is None:
        return ("the tensorrt Python package is not installed (the project's `gpu` extra): "
                "this image could not build engines")
    if system is None:
        return None  # Triton's backend brings its own TensorRT where we cannot see it; nothing to compare
    built = python_tensorrt_version(python)
    if built != system:
        return (f"tensorrt Python package {python} builds engines that Triton's tensorrt backend "
                f"(libnvinfer {'.'.join(map(str, system))}) cannot load: pin the `gpu` extra's tensorrt "
                f"to {'.'.join(map(str, system))}.* or change the base image tag")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib-dir", action="append", default=None, help="where to look for libnvinfer")
    parser.add_argument("--pip-requirement", action="store_true",
                        help="print the tensorrt wheel requirement matching this image, then exit")
    args = parser.parse_args(argv)
    if args.pip_requirement:
        try:
            print(pip_requirement(system_tensorrt_version(args.lib_dir or LIBRARY_DIRS), cuda_major()))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        import tensorrt

        python: str | None = str(tensorrt.__version__)
    except ImportError:
        python = None
    system = system_tensorrt_version(args.lib_dir or LIBRARY_DIRS)
    problem = mismatch(system, python)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    where = "not found, not compared" if system is None else ".".join(map(str, system))
    print(f"tensorrt Python {python}; system libnvinfer {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
