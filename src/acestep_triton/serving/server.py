"""Run a real ``tritonserver`` process: locate it, prepare it, start it, wait for it, stop it.

On a CPU-only machine the server comes from the ``nvidia-pytriton`` wheel, which bundles a
complete ``tritonserver`` (with its shared libraries and the Python backend) under
``site-packages/pytriton/tritonserver``. A bare ``tritonserver`` from that wheel needs three
things pytriton normally does for it at run time, and this module does them once, here:

* the Python-backend stub built for the running interpreter must sit next to the backend
  library (otherwise the server logs ``triton_python_backend_stub is not found`` and exits);
* ``LD_LIBRARY_PATH`` must name the wheel's ``nvidia_pytriton.libs`` and the interpreter's
  ``LIBDIR`` (the stub loads ``libpython3.x.so``; the system one may be missing or wrong);
* ``PATH`` must start with the virtualenv's ``bin`` so the stub's ``python3`` sees the
  virtualenv's packages (torch, onnxruntime, this project).

In the NGC image (``/opt/tritonserver``) all of that is already in place; :class:`TritonInstall`
handles both layouts. We do not import ``pytriton`` itself: its ``__init__`` pulls optional
dependencies (gevent) that serving does not need.

Every server gets its own shared-memory region prefix (``acestep_<token>_``), so that what a
killed server leaves in ``/dev/shm`` (and stub processes that outlive it) can be recognised and
removed: on :meth:`TritonServer.stop` for its own, and before every :meth:`TritonServer.start`
for those of any dead server. With ``recover=True`` (the default of ``acestep-triton serve``) a
:class:`~acestep_triton.serving.health.Watchdog` reloads a model whose stub process died, which
Triton's Python backend never does itself (facts in :mod:`acestep_triton.serving.health`).
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from acestep_client.auth import (
    ADMIN_KEY_ENV,
    API_KEY_ENV,
    API_KEY_HEADER,
    GRPC_HEADER_PREFIX,
    check_key,
    env_key,
)
from acestep_client.limits import MAX_AUDIO_BYTES, MAX_UPLOAD_ENV

from . import drain as drain_files
from .health import (
    ADMIN_HEADER,
    SHM_FAMILY,
    Status,
    Watchdog,
    cleanup_orphans,
    dead_stub_children,
    default_status_file,
    kill_stubs,
    stub_processes,
)
from .procfs import cpu_ticks

NGC_ROOT = Path("/opt/tritonserver")
ROOT_ENV = "ACESTEP_TRITON_ROOT"
"""Environment variable naming a tritonserver install root (``bin/``, ``backends/``, ``caches/``)."""

_ADDRESS_IN_USE = ("address already in use", "failed to start grpc", "failed to start http",
                   "failed to bind")
ADMIN_PROTOCOLS = ("model-repository", "shared-memory", "logging", "trace")
"""Triton protocols only the admin secret unlocks (gRPC and HTTP alike). Model loading can carry
code; shared memory would let any client register any ``/dev/shm`` key (the Python backend's own
regions included) and read or write it; logging lets a client turn on verbose logs for every
request; trace writes trace files. Health, metadata, model config, statistics and metrics stay open
(probes, Prometheus); inference is restricted separately by the API key."""
API_PROTOCOLS = ("inference",)
"""Protocols the optional API key restricts."""
HUNG_UNLOAD_GRACE_S = 2.0
"""On stop: once every live stub has exited and only dead (zombie) ones are left, the server is
waiting for the unload of an instance whose stub died, which never finishes (Python backend
2.51): after this grace it is killed instead of waiting out ``--exit-timeout-secs`` (30 s)."""
IDLE_UNLOAD_GRACE_S = 5.0
"""On stop: live stubs that used no CPU for this long, while no endpoint served a request (no
drain marker of a live process), are not unloading: Triton holds a reference to their model that
it never lets go, and would wait out its whole exit timeout (30 s) for it. Seen on 2.51 for an
endpoint after error responses and client disconnects (a repaint instance after
``tests/test_tasks_end_to_end.py``; text2music after a client dropped its stream), with nothing in
flight. A stub that unloads, or serves a request (a direct component call too), uses CPU: 5 s is
past any unload measured here (under 2 s)."""
IDLE_UNLOAD_TICKS = 5
"""CPU clock ticks (50 ms at the usual 100 per second) that the idle stubs may use together in
that window and still count as idle: a waiting stub wakes now and then."""
REQUEST_POOL_ARGS = ("--grpc-infer-allocation-pool-size=0",)
"""Triton's gRPC front end keeps up to 8 request/response objects for reuse (the default), each
with the capacity of the largest message it ever held: after one 300 MiB upload (refused by the
endpoint) tritonserver kept +426 MiB of heap for good; with no pool, +64 MiB (measured on 2.51,
benchmarks/RESULTS.md). Allocating them per request costs nothing next to a generation."""
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1"}
"""glibc malloc settings of tritonserver (and, inherited, its stubs). gRPC receives a message in
small slices, allocated on its threads' malloc arenas; after a large upload each such arena kept
its 64 MiB heap touched for good: tritonserver held +62 to +465 MiB after one refused 300 MiB
upload, depending on how many threads had taken part. With one arena the free memory sits at the
top of one heap and goes back to the system: -1 MiB after four such uploads (RESULTS.md). A
generation takes seconds, so the lock that threads now share costs nothing measurable; the
stubs also give pages back themselves (:class:`~acestep_triton.serving.memory.MemoryReleaser`)."""
REGION_HEADROOM_BYTES = 64 * 2**20
"""Room in an endpoint stub's ``/dev/shm`` region beyond two uploads: responses (a 240 s stereo
float32 response is 92 MB) and the small inputs."""
NO_STUBS_GRACE_S = 3.0
"""On stop: a server that had stub processes when it was signalled and has none left for this
long has unloaded every Python model; if it still runs it waits for the unload of a version the
watchdog replaced after its stub died (that old version's unload never finishes, and its zombie
stub was reaped by the reload, so the rule above does not see it). Triton checks its models once
a second while stopping, so 3 s is past its own exit."""


class TritonServerError(RuntimeError):
    """The server could not be found, prepared, started or stopped. Carries the log tail."""


@dataclass(frozen=True)
class TritonInstall:
    """Where a tritonserver installation keeps its binary, backends, caches and libraries."""

    root: Path
    binary: Path
    backend_dir: Path
    cache_dir: Path
    stubs_dir: Path | None = None
    """``python_backend_stubs/<major.minor>/`` folders (pip wheel only)."""
    libs_dir: Path | None = None
    """Bundled shared libraries (pip wheel only: ``site-packages/nvidia_pytriton.libs``)."""

    @classmethod
    def from_root(cls, root: Path, libs_dir: Path | None = None) -> TritonInstall:
        root = Path(root)
        stubs = root / "python_backend_stubs"
        return cls(root=root, binary=root / "bin" / "tritonserver", backend_dir=root / "backends",
                   cache_dir=root / "caches", stubs_dir=stubs if stubs.is_dir() else None,
                   libs_dir=libs_dir)

    @classmethod
    def locate(cls, root: str | Path | None = None) -> TritonInstall:
        """Find tritonserver: ``root`` > ``$ACESTEP_TRITON_ROOT`` > the pytriton wheel > NGC.

        The wheel is found through its import spec without importing it.
        """
        explicit = root or os.environ.get(ROOT_ENV)
        if explicit:
            install = cls.from_root(Path(explicit))
        else:
            install = cls._from_wheel() or (cls.from_root(NGC_ROOT) if NGC_ROOT.is_dir() else None)
        if install is None or not install.binary.is_file():
            where = install.binary if install is not None else "nvidia-pytriton wheel, /opt/tritonserver"
            raise TritonServerError(
                f"tritonserver not found ({where}). Install the serve extra "
                f"(pip install 'acestep-triton[serve]', which brings nvidia-pytriton==0.7.0), "
                f"use the NGC tritonserver image, or set {ROOT_ENV} to an install root.")
        return install

    @classmethod
    def _from_wheel(cls) -> TritonInstall | None:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            return None
        package = Path(next(iter(spec.submodule_search_locations)))
        root = package / "tritonserver"
        if not root.is_dir():
            return None
        libs = package.parent / "nvidia_pytriton.libs"
        return cls.from_root(root, libs_dir=libs if libs.is_dir() else None)

    # ------------------------------------------------------------------------- preparation
    @property
    def python_stub(self) -> Path:
        return self.backend_dir / "python" / "triton_python_backend_stub"

    def ensure_python_stub(self, version: str | None = None) -> Path:
        """Put the stub built for ``version`` (default: the running Python) beside the backend.

        Done once: an identical stub already in place is left alone. The copy goes through a
        temporary file and ``os.replace`` so a concurrently starting server never sees half a
        binary.
        """
        target = self.python_stub
        if self.stubs_dir is None:  # NGC layout: the stub ships in place for the image's Python
            if not target.is_file():
                raise TritonServerError(f"Python backend stub missing: {target}")
            return target
        version = version or f"{sys.version_info.major}.{sys.version_info.minor}"
        source = self.stubs_dir / version / "triton_python_backend_stub"
        if not source.is_file():
            available = sorted(p.name for p in self.stubs_dir.iterdir() if p.is_dir())
            raise TritonServerError(f"no Python backend stub for Python {version} in {self.stubs_dir} "
                                    f"(available: {', '.join(available)})")
        if target.is_file() and filecmp.cmp(source, target, shallow=False):
            return target
        try:
            fd, tmp = tempfile.mkstemp(prefix=".stub-", dir=target.parent)
            os.close(fd)
            shutil.copy2(source, tmp)
            os.replace(tmp, target)
        except OSError as exc:
            raise TritonServerError(f"cannot install the Python backend stub into {target}: {exc}") from exc
        return target

    def supports(self, option: str) -> bool:
        """Whether this tritonserver has a command-line ``option`` (read once from its ``--help``):
        newer releases add options (request size limits) that 2.51 refuses to start with."""
        return option in self._options()

    def _options(self) -> frozenset[str]:
        cached = _OPTIONS_CACHE.get(self.binary)
        if cached is None:
            try:
                result = subprocess.run([str(self.binary), "--help"], capture_output=True, text=True, timeout=30,
                                        env=self.environment())
                text = result.stdout + result.stderr
            except (OSError, subprocess.TimeoutExpired):
                text = ""
            cached = _OPTIONS_CACHE[self.binary] = frozenset(re.findall(r"(--[a-z][a-z0-9-]+)", text))
        return cached

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The server's environment: bundled libraries + libpython first, virtualenv bin on PATH,
        and glibc's malloc on one arena (:data:`MALLOC_ENV`) unless the caller chose otherwise."""
        env = dict(os.environ if base is None else base)
        for name, value in MALLOC_ENV.items():
            env.setdefault(name, value)
        lib_dirs = [str(p) for p in (self.libs_dir, _python_libdir()) if p is not None]
        env["LD_LIBRARY_PATH"] = _prepend(lib_dirs, env.get("LD_LIBRARY_PATH", ""))
        env["PATH"] = _prepend([sysconfig.get_path("scripts")], env.get("PATH", ""))
        return env


_OPTIONS_CACHE: dict[Path, frozenset[str]] = {}


def _python_libdir() -> Path | None:
    libdir = sysconfig.get_config_var("LIBDIR")
    return Path(libdir) if libdir and Path(libdir).is_dir() else None


def _prepend(first: Sequence[str], rest: str) -> str:
    parts = list(first) + [p for p in rest.split(os.pathsep) if p and p not in first]
    return os.pathsep.join(parts)


def free_ports(count: int = 3) -> list[int]:
    """``count`` distinct TCP ports that were free a moment ago (held open together while chosen)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tail(path: Path | None, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file (empty when there is none), without the ASCII
    tables Triton prints at start-up, which would crowd out the error lines."""
    if path is None or not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    kept = [line for line in text.splitlines() if not line.startswith(("|", "+-"))]
    return "\n".join(kept[-lines:])


@dataclass(frozen=True)
class DrainReport:
    """What :meth:`TritonServer.drain` saw: requests in flight when it began, those still
    running when it ended (0: every one finished), and how long it waited."""

    in_flight: int
    unfinished: int
    seconds: float


class TritonServer:
    """One ``tritonserver`` process serving a model repository.

    Use as a context manager, or ``start()`` / ``stop()``. Ports left as ``None`` are chosen
    free at start (and re-chosen once more if the server loses a race for them). Start-up is
    judged by ``/v2/health/ready``, not by log lines: the server logs harmless errors on CPU
    (pinned memory, CUDA driver). A server that has not become ready within
    ``startup_timeout`` is stopped and :class:`TritonServerError` carries its log tail.
    """

    def __init__(self, repository: str | Path, *, grpc_port: int | None = None,
                 http_port: int | None = None, metrics_port: int | None = None,
                 log_path: str | Path | None = None, log_verbose: int = 0,
                 startup_timeout: float = 120.0, stop_timeout: float = 30.0,
                 extra_args: Sequence[str] = (), install: TritonInstall | None = None,
                 env: dict[str, str] | None = None, recover: bool = False,
                 recovery_timeout: float = 600.0, status_file: str | Path | None = None,
                 on_give_up: Callable[[str], None] | None = None, api_key: str | None = None,
                 admin_key: str | None = None, max_upload_mb: float | None = None) -> None:
        """``log_path``: file for the server's stdout/stderr (``None``: a new temporary file,
        ``"-"``: inherit this process's streams, as a container entry point wants).

        ``recover``: serve with explicit model control (every model loaded at start, the
        model-repository API locked behind a per-server secret header) and run a
        :class:`~acestep_triton.serving.health.Watchdog` that reloads a model whose stub died,
        within ``recovery_timeout`` s, publishing its state in ``status_file`` (default
        :func:`~acestep_triton.serving.health.default_status_file` of the HTTP port) for the
        health probes. ``on_give_up(message)`` is called when a recovery fails.

        ``api_key``: restrict inference (gRPC and HTTP) to requests carrying it
        (:mod:`acestep_client.auth`); None serves inference openly. ``admin_key``: the secret of
        the admin protocols (:data:`ADMIN_PROTOCOLS`, always restricted) and of the LoRA registry's
        load/unload/reload; None makes a random one for this start, known only to this object.

        ``max_upload_mb``: the largest audio upload the endpoints accept (``ACESTEP_MAX_UPLOAD_MB``
        in the server's environment; None: theirs, or 128 MiB), and the HTTP request size limit
        where this tritonserver has one (``--http-max-input-size``; 2.51 has none, nor one for
        gRPC, so there the endpoint refuses the upload once it arrived: see :data:`REQUEST_POOL_ARGS`
        for what keeps that from costing memory afterwards)."""
        self.repository = Path(repository).resolve()
        self._requested_ports = (grpc_port, http_port, metrics_port)
        self.grpc_port, self.http_port, self.metrics_port = grpc_port, http_port, metrics_port
        self.log_verbose = log_verbose
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.extra_args = list(extra_args)
        self._install = install
        self._env = env
        self._inherit_log = str(log_path) == "-"
        self.log_path: Path | None = None if log_path is None or self._inherit_log else Path(log_path)
        self._owns_log = log_path is None
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self.recover = recover
        self.recovery_timeout = recovery_timeout
        self._status_file = Path(status_file) if status_file is not None else None
        self.on_give_up = on_give_up
        self.shm_prefix = f"{SHM_FAMILY}{secrets.token_hex(4)}_"
        """This server's Python-backend shared-memory region prefix (see :data:`health.SHM_FAMILY`)."""
        self.max_upload_mb = max_upload_mb
        self.api_key = check_key("api_key", api_key)
        self._admin_token = check_key("admin_key", admin_key) or secrets.token_hex(16)
        self.watchdog: Watchdog | None = None
        self.drain_dir = drain_files.folder_for(self.shm_prefix)
        """Where the endpoints mark requests in flight and see the drain flag (:mod:`.drain`)."""
        self._wrote_status = False

    # ------------------------------------------------------------------------- addresses
    @property
    def grpc_url(self) -> str:
        """``host:port`` for ``tritonclient.grpc`` / :class:`acestep_client.AceStepClient`."""
        return f"localhost:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://localhost:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def status_file(self) -> Path:
        """Where the watchdog publishes its state (see :func:`health.check_health`)."""
        return self._status_file or default_status_file(int(self.http_port or 0))

    @property
    def admin_headers(self) -> dict[str, str]:
        """HTTP headers that unlock the model-repository API of a ``recover=True`` server."""
        return {ADMIN_HEADER: self._admin_token}

    @property
    def grpc_admin_headers(self) -> dict[str, str]:
        """The same for gRPC (Triton expects the key prefixed with ``triton-grpc-protocol-``)."""
        return {f"{GRPC_HEADER_PREFIX}{ADMIN_HEADER}": self._admin_token}

    @property
    def admin_key(self) -> str:
        """The admin secret of this server (the configured key, or this start's random one): what
        :class:`acestep_client.AceStepClient` needs as ``admin_key`` to load or unload adapters."""
        return self._admin_token

    def _backend_args(self) -> list[str]:
        args = []
        if not any("shm-region-prefix-name" in a for a in self.extra_args):
            args.append(f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}")
        if self.recover:
            # Reloading a model is the only way back from a dead stub, and it needs explicit
            # model control (the model-repository protocol is restricted below, always).
            args += ["--model-control-mode=explicit", "--load-model=*"]
        return args + self._restriction_args()

    def _restriction_args(self) -> list[str]:
        """Triton's per-protocol header checks: the admin protocols behind the admin secret, and
        inference behind the API key when there is one (both for gRPC and HTTP)."""
        groups = [(ADMIN_PROTOCOLS, ADMIN_HEADER, self._admin_token)]
        if self.api_key:
            groups.append((API_PROTOCOLS, API_KEY_HEADER, self.api_key))
        args = []
        for protocols, header, value in groups:
            secret = f"{','.join(protocols)}:{header}={value}"
            args += [f"--http-restricted-api={secret}", f"--grpc-restricted-protocol={secret}"]
        return args

    def command(self, install: TritonInstall) -> list[str]:
        return [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={install.backend_dir}",
            f"--cache-directory={install.cache_dir}",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--log-verbose={self.log_verbose}",
            *REQUEST_POOL_ARGS,
            *self._size_limit_args(install),
            *self._backend_args(),
            *self.extra_args,
        ]

    def _size_limit_args(self, install: TritonInstall) -> list[str]:
        """Triton's own request size limit, where the binary has one (not 2.51): the upload limit
        plus room for the other inputs."""
        if self.max_upload_mb is None or not install.supports("--http-max-input-size"):
            return []
        return [f"--http-max-input-size={int((self.max_upload_mb + 16) * 2**20)}"]

    # ------------------------------------------------------------------------- lifecycle
    def start(self) -> TritonServer:
        """Launch the server and block until it is ready (or raise with the log tail)."""
        if self.running:
            return self
        if not self.repository.is_dir():
            raise TritonServerError(f"model repository not found: {self.repository}")
        install = self._install or TritonInstall.locate()
        install.ensure_python_stub()
        if self.recover and any(a.startswith("--model-control-mode") for a in self.extra_args):
            raise TritonServerError("recover=True sets --model-control-mode=explicit itself; "
                                    "drop it from extra_args or serve without recovery")
        cleanup_orphans()  # what killed servers left behind: their stubs and /dev/shm regions
        auto_ports = any(p is None for p in self._requested_ports)
        attempts = 3 if auto_ports else 1
        for attempt in range(attempts):
            self._assign_ports()
            try:
                self._launch(install)
                self._wait_ready()
                if self.recover:
                    self._start_watchdog()
                return self
            except TritonServerError as exc:
                lost_port_race = any(s in str(exc).lower() for s in _ADDRESS_IN_USE)
                if not (lost_port_race and attempt + 1 < attempts):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _assign_ports(self) -> None:
        chosen = iter(free_ports(3))
        self.grpc_port, self.http_port, self.metrics_port = (
            p if p is not None else next(chosen) for p in self._requested_ports)

    def _launch(self, install: TritonInstall) -> None:
        if self._finalizer is not None:  # from an attempt that lost a port race
            self._finalizer.detach()
        if self._inherit_log:
            out = None
        else:
            if self.log_path is None:
                fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
                os.close(fd)
                self.log_path = Path(name)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            # A new session: Ctrl-C in a terminal reaches us, not the server directly, so that
            # shutdown is always the orderly SIGTERM below; its group lets SIGKILL reach the stubs.
            env = install.environment(self._env)
            env[ADMIN_KEY_ENV] = self._admin_token  # the lora_registry model checks load/unload against it
            env[drain_files.DRAIN_DIR_ENV] = str(self.drain_dir)  # the endpoints' drain gate
            if self.max_upload_mb is not None:
                env[MAX_UPLOAD_ENV] = f"{self.max_upload_mb:g}"  # the endpoints' upload limit
            drain_files.reset(self.drain_dir)  # a new server: not draining, nothing in flight
            env.pop(API_KEY_ENV, None)  # Triton checks the API key; no model needs to see it
            self._process = subprocess.Popen(
                self.command(install), env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT if out is not None else None,
                start_new_session=True)
        except OSError as exc:
            raise TritonServerError(f"cannot start {install.binary}: {exc}") from exc
        finally:
            if out is not None:
                out.close()
        self._finalizer = weakref.finalize(self, _terminate, self._process, self.stop_timeout, self.shm_prefix)

    def _start_watchdog(self) -> None:
        assert self._process is not None and self.http_port is not None
        self.watchdog = Watchdog(server_pid=self._process.pid, http_port=self.http_port,
                                 repository=self.repository, admin_token=self._admin_token,
                                 status_file=self.status_file, recovery_timeout=self.recovery_timeout,
                                 on_give_up=self.on_give_up, region_limit=self.region_limit_bytes,
                                 log=lambda message: print(message, file=sys.stderr, flush=True))
        self.watchdog.start()

    @property
    def region_limit_bytes(self) -> int:
        """The largest ``/dev/shm`` region an upload-taking endpoint stub keeps (the watchdog
        recycles a larger one): room for two uploads at the limit (one being refused while an
        accepted one is served) plus the responses."""
        upload = int(self.max_upload_mb * 2**20) if self.max_upload_mb else MAX_AUDIO_BYTES
        return 2 * upload + REGION_HEADROOM_BYTES

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://127.0.0.1:{self.http_port}/v2/health/ready"
        while time.monotonic() < deadline:
            assert self._process is not None
            code = self._process.poll()
            if code is not None:
                self._process = None
                raise TritonServerError(f"tritonserver exited with status {code} during start-up"
                                        f"{self._log_excerpt()}")
            if _http_ok(url):
                return
            time.sleep(0.2)
        self.stop()
        raise TritonServerError(f"tritonserver not ready after {self.startup_timeout:.0f} s"
                                f"{self._log_excerpt()}")

    def _log_excerpt(self) -> str:
        if self.log_path is None:
            return " (server log went to this process's output)"
        return f"; log {self.log_path}, last lines:\n{tail(self.log_path)}"

    def is_ready(self) -> bool:
        return self.running and _http_ok(f"http://127.0.0.1:{self.http_port}/v2/health/ready")

    def wait(self) -> int:
        """Block until the server exits on its own; its exit status."""
        if self._process is None:
            return 0
        return self._process.wait()

    def drain(self, timeout: float, poll_s: float = 0.2) -> DrainReport:
        """Stop taking new requests and wait up to ``timeout`` s for those in flight to finish.

        Readiness fails at once (the health file says ``draining``), every endpoint refuses a
        new request with ``[unavailable]`` (clients resend it elsewhere), and this returns when
        no endpoint serves a request any more. The server keeps running: call :meth:`stop` next.
        Why Triton's own SIGTERM handling is not enough: :mod:`acestep_triton.serving.drain`.
        """
        started = time.monotonic()
        drain_files.begin(self.drain_dir)
        self._publish_draining()
        at_start = left = drain_files.in_flight(self.drain_dir)
        while left and self.running and time.monotonic() - started < timeout:
            time.sleep(poll_s)
            self._publish_draining()
            left = drain_files.in_flight(self.drain_dir)
        return DrainReport(in_flight=at_start, unfinished=left, seconds=time.monotonic() - started)

    def _publish_draining(self) -> None:
        """Write the health file with ``draining`` (the watchdog's, or one of our own)."""
        if self.watchdog is not None and self.watchdog.is_alive():
            self.watchdog.status.draining = True
            status = self.watchdog.status
        elif self._process is not None:
            status = Status(server_pid=self._process.pid, draining=True)
            self._wrote_status = True
        else:
            return
        with contextlib.suppress(OSError):
            status.write(self.status_file)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (Triton drains in-flight requests), then SIGKILL after ``timeout`` seconds, or
        as soon as only dead stubs are left (their unload never finishes). Then its leftover
        stubs and shared-memory regions are removed."""
        stale: set[int] = set()
        if self.watchdog is not None:
            self.watchdog.stop()
            stale = set(self.watchdog.stale_pids)
            self.watchdog = None
        process, self._process = self._process, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if process is None:
            cleanup_orphans(self.shm_prefix)
            return None
        code = _terminate(process, self.stop_timeout if timeout is None else timeout, self.shm_prefix, stale)
        if self._wrote_status:  # the draining status of a server without a watchdog
            self._wrote_status = False
            with contextlib.suppress(OSError):
                self.status_file.unlink()
        if self._owns_log and self.log_path is not None and code == 0:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
        return code

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.is_file() else ""

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class _UnloadWatch:
    """Tells, while a signalled server stops, whether it only waits for an unload that never
    ends (:data:`HUNG_UNLOAD_GRACE_S`, :data:`NO_STUBS_GRACE_S`, :data:`IDLE_UNLOAD_GRACE_S`
    say when each case arises), so that :func:`_terminate` kills it then instead of waiting out
    Triton's exit timeout."""

    def __init__(self, server_pid: int, stale: set[int] | frozenset[int], drain_dir: Path | None) -> None:
        self.server_pid, self.stale, self.drain_dir = server_pid, stale, drain_dir
        self.had_stubs = bool(self._live())
        self.only_dead_since: float | None = None
        self.no_stubs_since: float | None = None
        self.idle_since: float | None = None
        self.idle_ticks = 0

    def _live(self) -> list[int]:
        return [s.pid for s in stub_processes(self.server_pid) if s.pid not in self.stale]

    def _idle(self, live: list[int]) -> int | None:
        """The live stubs' CPU ticks when no endpoint serves a request (no drain marker), else None."""
        if not live or self.drain_dir is None or drain_files.in_flight(self.drain_dir):
            return None
        return sum(cpu_ticks(pid) or 0 for pid in live)

    def hung(self, now: float) -> bool:
        live = self._live()
        if live or not (dead_stub_children(self.server_pid) or self.stale):
            self.only_dead_since = None
        elif self.only_dead_since is None:
            self.only_dead_since = now
        if live or not self.had_stubs:
            self.no_stubs_since = None
        elif self.no_stubs_since is None:
            self.no_stubs_since = now
        ticks = self._idle(live)
        if ticks is None or (self.idle_since is not None and ticks - self.idle_ticks > IDLE_UNLOAD_TICKS):
            self.idle_since = None  # a request in flight, or a stub at work: a new window from here
        if ticks is not None and self.idle_since is None:
            self.idle_since, self.idle_ticks = now, ticks

        def past(since: float | None, grace: float) -> bool:
            return since is not None and now - since >= grace

        return (past(self.only_dead_since, HUNG_UNLOAD_GRACE_S) or past(self.no_stubs_since, NO_STUBS_GRACE_S)
                or past(self.idle_since, IDLE_UNLOAD_GRACE_S))


def _terminate(process: subprocess.Popen[bytes], timeout: float, shm_prefix: str | None = None,
               stale: set[int] | frozenset[int] = frozenset()) -> int:
    """Stop one server process we started; kill its process group if it does not stop in time
    (or when it only waits for an unload that never ends: :class:`_UnloadWatch`); then remove
    the stubs and shared-memory regions it left (``shm_prefix``). ``stale``: stubs of model
    versions the watchdog replaced (:attr:`Watchdog.stale_pids`), which never exit on their own."""
    try:
        if process.poll() is not None:
            return process.returncode
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        watch = _UnloadWatch(process.pid, stale, drain_files.folder_for(shm_prefix) if shm_prefix else None)
        while True:
            try:
                return process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now >= deadline or watch.hung(now):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)  # the server and its Python stubs
                return process.wait()
    finally:
        kill_stubs(stale)  # a reload's leftovers: gone before stop() returns
        if shm_prefix is not None:
            cleanup_orphans(shm_prefix)
            shutil.rmtree(drain_files.folder_for(shm_prefix), ignore_errors=True)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


# ----------------------------------------------------------------------------------------- CLI
def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` options (shared with the top-level ``acestep-triton`` command)."""
    parser.add_argument("--repository", required=True, type=Path, help="rendered model repository")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log-file", default="-",
                        help="server log file ('-', the default: this process's output)")
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=600.0,
                        help="seconds to wait for every model to load")
    parser.add_argument("--triton-root", default=None,
                        help=f"tritonserver install root (default: ${ROOT_ENV}, the pip wheel, NGC)")
    parser.add_argument("--no-recover", dest="recover", action="store_false",
                        help="do not reload a model whose backend process died (and serve without "
                             "explicit model control)")
    parser.add_argument("--recovery-timeout", type=float, default=600.0,
                        help="seconds a model reload may take before the server is given up on "
                             f"(exit status {EXIT_UNRECOVERABLE}, so the container is restarted)")
    parser.add_argument("--api-key", default=None,
                        help=f"require this key for inference, gRPC and HTTP (default: ${API_KEY_ENV}; "
                             "unset: inference is open). Clients send it as api_key= / ACESTEP_API_KEY")
    parser.add_argument("--admin-key", default=None,
                        help=f"admin secret (default: ${ADMIN_KEY_ENV}; unset: a random one per start, so "
                             "nobody can use the admin APIs): unlocks the model-repository, shared-memory, "
                             "logging and trace protocols and the LoRA registry's load/unload/reload")
    parser.add_argument("--drain-timeout", type=float, default=_env_float(DRAIN_TIMEOUT_ENV, 90.0),
                        help="on SIGTERM/SIGINT: seconds to let generations in flight finish (new requests "
                             "are refused as unavailable and readiness fails meanwhile) before tritonserver "
                             f"is stopped; a second signal stops at once (default: ${DRAIN_TIMEOUT_ENV} or 90)")
    parser.add_argument("--max-restarts", type=int, default=int(_env_float(MAX_RESTARTS_ENV, 5)),
                        help="restart a tritonserver that died this many times within "
                             f"{RESTART_WINDOW_S:.0f} s (with growing waits) before serve gives up and exits "
                             f"(default: ${MAX_RESTARTS_ENV} or 5; 0: never restart)")
    parser.add_argument("--max-upload-mb", type=float, default=_env_float(MAX_UPLOAD_ENV, 0.0) or None,
                        help=f"largest src_audio/ref_audio upload in MiB (default: ${MAX_UPLOAD_ENV} or 128: a 240 s "
                             "stereo source as FLAC, or as a float WAV at 48 kHz); larger ones are refused naming "
                             "the field, and so are files of more than 2 channels or 240 s")
    parser.add_argument("extra", nargs="*", help="extra tritonserver options after '--'")


EXIT_UNRECOVERABLE = 3
"""``serve``'s exit status when a dead model could not be brought back."""
DRAIN_TIMEOUT_ENV = "ACESTEP_DRAIN_TIMEOUT_S"
MAX_RESTARTS_ENV = "ACESTEP_MAX_RESTARTS"
RESTART_WINDOW_S = 600.0
"""Restarts of a dead tritonserver are counted over this window (``--max-restarts``)."""
RESTART_BACKOFF_S = (1.0, 30.0)
"""First and longest wait before restarting a dead tritonserver (doubling in between), so a
server that dies at once on every start does not spin."""


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    try:
        return float(value) if value else default
    except ValueError:
        print(f"warning: ignoring {name}={value!r} (not a number); using {default:g}", file=sys.stderr)
        return default


def _restart_delay(recent: int) -> float:
    first, longest = RESTART_BACKOFF_S
    return min(longest, first * 2 ** recent)


def run_serve(args: argparse.Namespace) -> int:
    """Serve in the foreground until SIGINT/SIGTERM; then stop the server in order."""
    recover = getattr(args, "recover", True)
    if recover and any(a.startswith("--model-control-mode") for a in args.extra):
        print("warning: a --model-control-mode was given: serving without recovery of dead models",
              file=sys.stderr)
        recover = False
    gave_up: list[str] = []

    def _give_up(message: str) -> None:
        # Called on the watchdog's thread: stop the server so that ``wait`` below returns and
        # the container exits non-zero (Docker/Kubernetes restart it).
        gave_up.append(message)
        print(f"error: cannot recover: {message}; stopping", file=sys.stderr, flush=True)
        process = server._process
        if process is not None:
            _terminate(process, server.stop_timeout)

    try:  # the environment rather than argv where possible: argv is visible to every local user
        api_key = check_key("--api-key", getattr(args, "api_key", None) or env_key(API_KEY_ENV))
        admin_key = check_key("--admin-key", getattr(args, "admin_key", None) or env_key(ADMIN_KEY_ENV))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = TritonServer(args.repository, grpc_port=args.grpc_port, http_port=args.http_port,
                          metrics_port=args.metrics_port, log_path=args.log_file,
                          log_verbose=args.log_verbose, startup_timeout=args.startup_timeout,
                          extra_args=args.extra, install=TritonInstall.locate(args.triton_root),
                          recover=recover, recovery_timeout=getattr(args, "recovery_timeout", 600.0),
                          on_give_up=_give_up, api_key=api_key, admin_key=admin_key,
                          max_upload_mb=getattr(args, "max_upload_mb", None))

    def _on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, _on_signal)
    drain_timeout = float(getattr(args, "drain_timeout", 90.0))
    max_restarts = int(getattr(args, "max_restarts", 0))
    try:
        server.start()
        print(f"tritonserver ready: grpc {server.grpc_url}, http {server.http_url}, "
              f"metrics {server.metrics_url}; inference {'needs the API key' if api_key else 'open'}, "
              f"admin APIs {'need the admin key' if admin_key else 'locked (no admin key set)'}",
              file=sys.stderr, flush=True)
        return _supervise(server, max_restarts, gave_up)
    except KeyboardInterrupt as signalled:
        try:
            if server.running and drain_timeout > 0:
                print(f"{signalled or 'signal'}: draining (up to {drain_timeout:g} s; a second signal stops now)",
                      file=sys.stderr, flush=True)
                report = server.drain(drain_timeout)
                print(f"drained: {report.in_flight - report.unfinished} of {report.in_flight} request(s) in flight "
                      f"finished in {report.seconds:.1f} s; stopping tritonserver", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            print("second signal: stopping now", file=sys.stderr, flush=True)
        return 0
    except TritonServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


def _supervise(server: TritonServer, max_restarts: int, gave_up: list[str]) -> int:
    """Wait for ``server``; when tritonserver dies on its own (a crash, an abort in the Python
    backend, the OOM killer), restart it with growing waits, at most ``max_restarts`` times per
    :data:`RESTART_WINDOW_S`. Readiness fails while it is down (nothing answers on its port).

    Returns the exit status for ``serve``: :data:`EXIT_UNRECOVERABLE` after the watchdog gave up
    (a dead model that could not be reloaded: the container is restarted instead), the dead
    server's status when the restarts ran out. A signal raises ``KeyboardInterrupt`` out of it.
    """
    restarts: list[float] = []
    while True:
        code = server.wait()
        if gave_up:
            return EXIT_UNRECOVERABLE
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < RESTART_WINDOW_S]
        if len(restarts) >= max_restarts:
            print(f"error: tritonserver exited with status {code}; {len(restarts)} restart(s) in the last "
                  f"{RESTART_WINDOW_S:.0f} s (--max-restarts {max_restarts}): giving up", file=sys.stderr, flush=True)
            return code or 1
        delay = _restart_delay(len(restarts))
        print(f"error: tritonserver exited with status {code}; restarting it in {delay:g} s "
              f"(restart {len(restarts) + 1} of at most {max_restarts} per {RESTART_WINDOW_S:.0f} s)",
              file=sys.stderr, flush=True)
        server.stop()  # reap it, remove its stubs and /dev/shm regions; the health file goes too
        time.sleep(delay)
        restarts.append(time.monotonic())
        try:
            server.start()
        except TritonServerError as exc:  # counts as a restart; the loop waits on the dead process
            print(f"error: restart failed: {exc}", file=sys.stderr, flush=True)
            continue
        print(f"tritonserver restarted: grpc {server.grpc_url}", file=sys.stderr, flush=True)


def run_prepare(args: argparse.Namespace) -> int:
    """Install the Python-backend stub now (e.g. while building an image as root) and show where
    everything is, so a later non-root ``serve`` needs no write access to site-packages."""
    try:
        install = TritonInstall.locate(args.triton_root)
        stub = install.ensure_python_stub()
    except TritonServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"tritonserver: {install.binary}\nbackends: {install.backend_dir}\npython stub: {stub}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``serve --repository DIR [--grpc-port P ...]``: run tritonserver in the foreground;
    ``prepare``: install the Python-backend stub for this interpreter and exit."""
    parser = argparse.ArgumentParser(prog="acestep-triton-server", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(sub.add_parser("serve", help="serve a rendered model repository"))
    prepare = sub.add_parser("prepare", help="install the Python-backend stub and exit")
    prepare.add_argument("--triton-root", default=None)
    args = parser.parse_args(argv)
    return run_prepare(args) if args.command == "prepare" else run_serve(args)


if __name__ == "__main__":
    sys.exit(main())
