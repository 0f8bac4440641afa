"""Python-backend model body of ``lora_registry``: the commands that change the live LoRA adapters.

``list`` (open), ``load NAME`` / ``unload NAME`` / ``reload`` (the admin key, as the request
parameter ``acestep_admin_key``): each runs on the one :class:`~acestep_triton.lora.live_control.
LiveAdapterControl` of the deployment, which writes the state file the component instances read.
Like the other model bodies it lives in ``serving/``; ``model_repository/lora_registry/model.py``
re-exports it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from acestep_client.auth import ADMIN_KEY_ENV, ADMIN_KEY_PARAMETER, keys_match
from acestep_client.errors import ErrorCategory, tag_message
from acestep_client.params import ParamError

from ..checkpoint import meta_transformer
from ..lora.live import parse_budget_mb
from ..lora.live_control import ADMIN_COMMANDS, MAX_MESSAGE_CHARS, LiveAdapterControl, clip
from .config_params import read_model_config


class TritonPythonModel:
    """``lora_registry``: one instance (commands run one at a time, the state has one writer)."""

    def initialize(self, args: dict[str, Any]) -> None:
        # only importable inside Triton's Python-backend stub process
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.name, _, params = read_model_config(args)
        for key in ("lora_dir", "lora_state", "checkpoint_dir"):
            if not params.get(key):
                raise ValueError(f"{self.name}: config parameter {key!r} is required")
        self.admin_key = os.environ.get(ADMIN_KEY_ENV) or None  # set by `acestep-triton serve`
        self.control = LiveAdapterControl(params["lora_dir"], params["lora_state"],
                                          meta_transformer(params["checkpoint_dir"]),
                                          budget_bytes=parse_budget_mb(params.get("lora_memory_mb")),
                                          scaling=params.get("lora_scaling") or "upstream")
        pb_utils.Logger.log_info(f"{self.name}: registry {self.control.root}, "
                                 f"{len(self.control.state.loaded)} adapter(s) loaded")

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        responses = []
        for request in requests:
            def text(name: str, request: Any = request) -> str | None:
                tensor = pb.get_input_tensor_by_name(request, name)
                if tensor is None:
                    return None
                value = tensor.as_numpy().reshape(-1)[0]
                return value.decode() if isinstance(value, bytes) else str(value)

            try:
                command = text("command") or "list"
                denied = self._refusal(command, request)
                if denied is not None:
                    message = tag_message(ErrorCategory.PERMISSION_DENIED, denied)
                    responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message)))
                    continue
                listing = self.control.command(command, text("lora_name_or_path"))
            except ParamError as e:
                message = tag_message(ErrorCategory.INVALID_ARGUMENT, clip(str(e), MAX_MESSAGE_CHARS))
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message)))
                continue
            except Exception as e:  # never take the control model down
                text_ = clip(f"{self.name}: {type(e).__name__}: {e}", MAX_MESSAGE_CHARS)
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(
                    tag_message(ErrorCategory.INTERNAL, text_))))
                continue
            out = pb.Tensor("loras_json", np.array([json.dumps(listing).encode()], dtype=object))
            responses.append(pb.InferenceResponse(output_tensors=[out]))
        return responses


    def _refusal(self, command: str, request: Any) -> str | None:
        """Why ``command`` may not run for this request (None: it may): load/unload/reload need
        the admin key as the request parameter ``acestep_admin_key``."""
        if command.strip().lower() not in ADMIN_COMMANDS:
            return None
        what = f"{command.strip().lower()} changes the adapters every user gets and needs the admin key"
        if self.admin_key is None:
            return (f"{what}, and this server has none ({ADMIN_KEY_ENV} is not set in its environment: "
                    "serve with `acestep-triton serve --admin-key` or set it)")
        try:
            given = json.loads(request.parameters() or "{}").get(ADMIN_KEY_PARAMETER)
        except (ValueError, AttributeError):
            given = None
        if keys_match(self.admin_key, given if isinstance(given, str) else None):
            return None
        return f"{what} (admin_key): {'the key sent is wrong' if given else 'none was sent'}"
