"""What a TensorRT plan is tied to, and the JSON sidecar that records it.

Its own module so the renderer (which checks a plan's batch size against its config) and the
engine builder can both use it without importing each other; it needs TensorRT only to ask the
running machine what it has (:meth:`RuntimeInfo.current`). :func:`check_engine_dir` checks a whole
engine folder (``acestep-triton trt --check``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SIDECAR_SUFFIX = ".json"


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build a component (the message carries the parser's errors)."""


class EngineMismatchError(RuntimeError):
    """A plan was built by another TensorRT version, for another GPU, or lacks its sidecar."""


def import_tensorrt() -> Any:
    """``import tensorrt`` with an error that says how to get it."""
    try:
        import tensorrt  # function-local: the optional gpu extra; the renderer reads sidecars without it
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise EngineBuildError(
            "TensorRT is not installed: pip install 'acestep-triton[gpu]' on a machine with an NVIDIA "
            "GPU, or build inside the NGC TensorRT / Triton image") from exc
    return tensorrt


@dataclass(frozen=True)
class RuntimeInfo:
    """What a plan is tied to: the TensorRT version and the GPU."""

    tensorrt: str
    gpu: str
    compute_capability: str

    @classmethod
    def current(cls, trt: Any = None, device: int = 0) -> RuntimeInfo:
        """This machine's TensorRT and GPU ``device`` (needs CUDA)."""
        import torch  # function-local: heavy, and only asking the machine needs it (not reading sidecars)

        trt = trt or import_tensorrt()
        if not torch.cuda.is_available():
            raise EngineMismatchError("TensorRT engines need an NVIDIA GPU; torch sees none")
        major, minor = torch.cuda.get_device_capability(device)
        return cls(tensorrt=str(trt.__version__), gpu=torch.cuda.get_device_name(device),
                   compute_capability=f"{major}.{minor}")


@dataclass
class EngineMeta:
    """The JSON sidecar written next to every plan (``<component>.plan.json``)."""

    component: str
    tensorrt: str
    gpu: str
    compute_capability: str
    precision: str
    profile: dict[str, list[list[int]]]
    max_batch: int
    onnx: str
    onnx_sha256: str
    built_at: str = ""
    build_s: float = 0.0
    lora: str | None = None
    precision_report: dict[str, Any] = field(default_factory=dict)
    keep_fp32: list[str] = field(default_factory=list)

    @staticmethod
    def path_for(plan: str | Path) -> Path:
        plan = Path(plan)
        return plan.with_name(plan.name + SIDECAR_SUFFIX)

    def write(self, plan: str | Path) -> Path:
        path = self.path_for(plan)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, plan: str | Path) -> EngineMeta:
        path = cls.path_for(plan)
        if not path.is_file():
            raise EngineMismatchError(
                f"{plan}: no sidecar {path.name}, so its TensorRT version and GPU are unknown; rebuild it "
                f"with `acestep-triton trt` (or skip the check if you built it yourself)")
        data = json.loads(path.read_text())
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def differences(self, runtime: RuntimeInfo, *, strict_gpu_name: bool = True) -> list[str]:
        """What differs between the machine the plan was built on and ``runtime``."""
        diffs = []
        if self.tensorrt != runtime.tensorrt:
            diffs.append(f"TensorRT {self.tensorrt} (engine) vs {runtime.tensorrt} (here)")
        if self.compute_capability != runtime.compute_capability:
            diffs.append(f"compute capability {self.compute_capability} (engine) vs "
                         f"{runtime.compute_capability} (here)")
        if strict_gpu_name and self.gpu != runtime.gpu:
            diffs.append(f"GPU {self.gpu!r} (engine) vs {runtime.gpu!r} (here)")
        return diffs


def check_engine(plan: str | Path, runtime: RuntimeInfo | None = None, *,
                 strict_gpu_name: bool = True) -> EngineMeta:
    """Raise :class:`EngineMismatchError` naming every difference unless ``plan`` was built by this
    TensorRT for this GPU; return its metadata. A plan built on another model of GPU with the same
    compute capability deserialises, but its kernels were tuned for the other chip, so that is an
    error too unless ``strict_gpu_name=False``."""
    meta = EngineMeta.read(plan)
    runtime = runtime or RuntimeInfo.current()
    diffs = meta.differences(runtime, strict_gpu_name=strict_gpu_name)
    if diffs:
        raise EngineMismatchError(
            f"{plan} was built by another TensorRT or for another GPU: {'; '.join(diffs)}. "
            f"Rebuild it on this machine: acestep-triton trt --onnx-dir <onnx> --out {Path(plan).parent} "
            f"--precision {meta.precision}")
    return meta


def check_engine_dir(engine_dir: str | Path, runtime: RuntimeInfo | None = None, *,
                     strict_gpu_name: bool = True) -> dict[str, EngineMeta]:
    """:func:`check_engine` for every ``*.plan`` in ``engine_dir``; all problems reported together."""
    plans = sorted(Path(engine_dir).glob("*.plan"))
    if not plans:
        raise EngineMismatchError(f"no *.plan files in {engine_dir}")
    runtime = runtime or RuntimeInfo.current()
    metas, problems = {}, []
    for plan in plans:
        try:
            metas[plan.stem] = check_engine(plan, runtime, strict_gpu_name=strict_gpu_name)
        except EngineMismatchError as exc:
            problems.append(str(exc))
    if problems:
        raise EngineMismatchError("\n".join(problems))
    return metas
