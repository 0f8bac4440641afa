"""Config parameters of the Python-backend models: one reader for all of them.

Triton hands a Python model its ``config.pbtxt`` as JSON, where each entry of ``parameters`` is
``{"string_value": "..."}``. Every model body here (components, endpoints, the LoRA registry)
reads them as a flat ``{key: string}`` dict, and every boolean parameter accepts the same words,
so a deployment's settings mean the same thing whichever model reads them. Imports nothing
heavy: the ONNX component stubs stay torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def model_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """The config's ``parameters`` block as a plain ``{key: string_value}`` dict."""
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def read_model_config(args: Mapping[str, str]) -> tuple[str, dict[str, Any], dict[str, str]]:
    """What every model's ``initialize`` reads first: its name, its whole config (Triton's JSON
    in ``args["model_config"]``) and its :func:`model_parameters`."""
    config = json.loads(args["model_config"])
    return config["name"], config, model_parameters(config)


def parse_flag(value: str | bool | None, default: bool, name: str) -> bool:
    """A boolean config parameter: ``true``/``false`` (or ``1``/``0``, ``yes``/``no``, ``on``/
    ``off``); ``auto`` or empty means ``default``. Anything else is an error naming ``name``."""
    if isinstance(value, bool):
        return value
    text = (value or "auto").strip().lower()
    if text in ("auto", ""):
        return default
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(f"config parameter {name}: expected true, false or auto, got {value!r}")
