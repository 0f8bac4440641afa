"""Where the renderer finds the project files that are not Python modules of the package.

A rendered repository needs ``model_repository/`` (the Python-backend model sources copied into
every ``<model>/1/``) and ``ensemble_configs/`` (one endpoint definition per task). Both live at
the project root beside ``src/`` and are not part of the wheel (setuptools packages only
``src/``), so their place cannot be computed from this file's path once the package is installed
into a ``site-packages``. They are looked for, in order:

1. ``$ACESTEP_PROJECT_ROOT`` when set: the folder holding both (a wheel install pointed at a
   checkout or at a copy of the two folders);
2. the nearest folder above this file holding both: the source tree and an editable install
   (``pip install -e .``, which is how the Docker images install the project in ``/opt/acestep``);
3. the current directory when it holds both (a wheel install run from a checkout).

Nothing is looked up at import time: callers resolve a default only when they were given no
folder (``sources_root=``, ``endpoints_dir=``, ``--sources``, ``--endpoints-dir``), so importing
the renderer never fails and an explicit folder always wins.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT_ENV = "ACESTEP_PROJECT_ROOT"
"""Environment variable naming the folder that holds ``model_repository/`` and ``ensemble_configs/``."""
SOURCES_DIRNAME = "model_repository"
"""Python-backend model sources (``<source>/model.py``); copied into ``<name>/1/``."""
ENDPOINTS_DIRNAME = "ensemble_configs"
"""One endpoint definition per task (``<task>.json``)."""


def _holds_project_files(folder: Path) -> bool:
    return (folder / SOURCES_DIRNAME).is_dir() and (folder / ENDPOINTS_DIRNAME).is_dir()


def project_root() -> Path:
    """The folder holding ``model_repository/`` and ``ensemble_configs/`` (see the module docstring
    for the order it is looked for in); ``FileNotFoundError`` saying how to point at it otherwise."""
    configured = os.environ.get(PROJECT_ROOT_ENV, "").strip()
    if configured:
        root = Path(configured).expanduser().resolve()
        if not _holds_project_files(root):
            raise FileNotFoundError(f"${PROJECT_ROOT_ENV}={configured} does not hold {SOURCES_DIRNAME}/ and "
                                    f"{ENDPOINTS_DIRNAME}/")
        return root
    here = Path(__file__).resolve()
    for folder in (*here.parents, Path.cwd().resolve()):
        if _holds_project_files(folder):
            return folder
    raise FileNotFoundError(f"{SOURCES_DIRNAME}/ and {ENDPOINTS_DIRNAME}/ not found above {here.parent} nor in "
                            f"{Path.cwd()}: set ${PROJECT_ROOT_ENV} to the project checkout, or pass the folders "
                            f"(--sources, --endpoints-dir)")


def default_sources_root() -> Path:
    """``model_repository/`` of :func:`project_root`."""
    return project_root() / SOURCES_DIRNAME


def default_endpoints_dir() -> Path:
    """``ensemble_configs/`` of :func:`project_root`."""
    return project_root() / ENDPOINTS_DIRNAME
