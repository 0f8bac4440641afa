"""Honest health for a tritonserver with Python-backend models: stub processes, recovery, probes.

Why this exists (measured on tritonserver 2.51.0, the pip wheel; the NGC 24.10+ images carry
the same Python backend, whose ``TRITONBACKEND_ModelInstanceExecute`` reads "TODO: Implement
restart on decoupled"): every Python-backend model instance runs in its own
``triton_python_backend_stub`` process. When one dies (``kill -9``, the OOM killer), the
backend never restarts it. The dead stub stays a zombie child of the server, every request to
that instance fails after about 1 s with ``Stub process '<instance>' is not healthy.``, and
``/v2/health/ready`` and ``/v2/models/<m>/ready`` keep answering 200. Once requests have
reached the dead instance, unloading it can hang for good: the zombie is never reaped, and a
server shutdown waits out ``--exit-timeout-secs`` (30 s by default; seen every time with two
failed requests and no reload).

What brings it back is a reload of the model through model control (``POST
/v2/repository/models/<m>/load``, which needs ``--model-control-mode=explicit``): the new
version starts fresh stubs and replaces the broken one. :class:`Watchdog` does that from the
process that launched the server (``acestep-triton serve``), and publishes what it sees in a
small status file, so that a probe (:func:`check_health`, used by ``docker/healthcheck.py``
and the Kubernetes probes) can say "not ready" from the moment a stub dies until the reload
has finished, and "not live" when recovery failed.

Everything here reads ``/proc`` (Linux) and talks HTTP to the server; no torch, no Triton
client, so a probe starts in a few tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acestep_client.auth import ADMIN_HEADER

from .drain import stale_folders
from .procfs import proc_stat, process_alive

STUB_BINARY = "triton_python_backend_stub"
STUB_COMM = STUB_BINARY[:15]
"""The kernel keeps 15 characters of a process name (``/proc/<pid>/stat``), also for zombies."""
SHM_FAMILY = "acestep_"
"""Every server we start names its Python-backend shared-memory regions ``acestep_<token>_<uuid>``
(``--backend-config=python,shm-region-prefix-name=acestep_<token>_``), so leftovers of a killed
server can be recognised as ours and removed, without touching other servers' regions."""
SHM_DIR = Path("/dev/shm")
# ADMIN_HEADER unlocks the model-repository API (load/unload: the watchdog's reloads) and the
# other admin protocols (acestep_client.auth): Triton's load request can carry model files (code).
HEALTH_FILE_ENV = "ACESTEP_HEALTH_FILE"
STATUS_STALE_S = 15.0
"""A watchdog status older than this means the watchdog itself stopped: not healthy."""

OK, RECOVERING, FAILED = "ok", "recovering", "failed"
RECYCLE_INTERVAL_S = 60.0
"""The fewest seconds between two recycles of one model's instances (see :class:`Watchdog`):
a client that keeps sending oversized uploads costs at most one model load a minute."""
RELOAD_PARAMETER = "acestep_reload"
"""Config parameter the watchdog adds (a counter) to force a real reload; models ignore it."""


# ----------------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class StubProcess:
    """One live ``triton_python_backend_stub`` process, from its command line.

    The Python backend starts it as ``stub <model.py> <shm region> <shm size> <growth>
    <server pid> <backend dir> <ipc handle> <instance name> <runtime dir>``.
    """

    pid: int
    instance: str
    """Triton's instance name, ``<model>_<group>_<index>`` (e.g. ``dit_decoder_0_0``)."""
    model: str
    shm_region: str
    server_pid: int


def is_live_stub(pid: int) -> bool:
    """True when ``pid`` is a running stub process, judged by its name (``comm``), which, unlike
    its command line, stays readable while the process is being torn down."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] == STUB_COMM and stat[1] not in ("Z", "X")


def _pids() -> Iterable[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def model_of_instance(instance: str) -> str:
    """``dit_decoder_0_0`` -> ``dit_decoder`` (Triton appends ``_<group>_<index>``)."""
    match = re.fullmatch(r"(.+)_\d+_\d+", instance)
    return match.group(1) if match else instance


def stub_processes(server_pid: int | None = None, *, region_prefix: str | None = None) -> list[StubProcess]:
    """The live stub processes of the server ``server_pid`` (every server's when None), or those
    whose shared-memory region starts with ``region_prefix``."""
    found = []
    for pid in _pids():
        argv = _cmdline(pid)
        if len(argv) < 9 or os.path.basename(argv[0]) != STUB_BINARY or not process_alive(pid):
            continue
        try:
            parent = int(argv[5])
        except ValueError:
            continue
        if server_pid is not None and parent != server_pid:
            continue
        if region_prefix is not None and not argv[2].startswith(region_prefix):
            continue
        found.append(StubProcess(pid=pid, instance=argv[8], model=model_of_instance(argv[8]),
                                 shm_region=argv[2], server_pid=parent))
    return sorted(found, key=lambda s: (s.instance, s.pid))


def region_bytes(region: str) -> int:
    """The size of a stub's shared-memory region (0 when it is gone)."""
    try:
        return (SHM_DIR / region).stat().st_size
    except OSError:
        return 0


def dead_stub_children(server_pid: int) -> list[int]:
    """Zombie stub processes of a server: stubs that died and that the server never reaped."""
    return [pid for pid in _pids()
            if (stat := proc_stat(pid)) is not None and stat[0] == STUB_COMM and stat[1] == "Z"
            and stat[2] == server_pid]


def find_server_pid(http_port: int) -> int | None:
    """The live ``tritonserver`` serving HTTP on ``http_port`` (by its command line)."""
    for pid in _pids():
        argv = _cmdline(pid)
        if (argv and os.path.basename(argv[0]) == "tritonserver" and f"--http-port={http_port}" in argv
                and process_alive(pid)):
            return pid
    return None


# ----------------------------------------------------------------------------------- orphans
def _region_owner_prefix(region: str) -> str | None:
    """``acestep_1a2b3c4d_<uuid>`` -> ``acestep_1a2b3c4d_``."""
    match = re.match(rf"({re.escape(SHM_FAMILY)}[0-9a-f]+_)", region)
    return match.group(1) if match else None


def _live_prefixes() -> set[str]:
    """Region prefixes of live servers (named on their command line)."""
    prefixes = set()
    for pid in _pids():
        for arg in _cmdline(pid):
            if "shm-region-prefix-name=" in arg and process_alive(pid):
                prefixes.add(arg.split("shm-region-prefix-name=", 1)[1])
    return prefixes


def orphaned_stubs() -> list[StubProcess]:
    """Our stubs (region family :data:`SHM_FAMILY`) whose server is gone: they hold memory and
    their region, and nothing will ever send them work."""
    return [s for s in stub_processes() if s.shm_region.startswith(SHM_FAMILY) and not process_alive(s.server_pid)]


def stale_regions(prefix: str | None = None, *, min_age_s: float = 0.0) -> list[Path]:
    """Our shared-memory regions that no live server owns (``prefix``: only that server's, owner
    gone or not). A server names its prefix on its command line from its first instant, before
    it creates a region, so "owned" needs no grace period; ``min_age_s`` can add one."""
    if not SHM_DIR.is_dir():
        return []
    live = _live_prefixes() if prefix is None else set()
    now = time.time()
    stale = []
    for path in SHM_DIR.iterdir():
        owner = _region_owner_prefix(path.name)
        if owner is None or (prefix is not None and owner != prefix) or owner in live:
            continue
        with contextlib.suppress(OSError):
            if prefix is not None or now - path.stat().st_mtime >= min_age_s:
                stale.append(path)
    return sorted(stale)


def kill_stubs(pids: Iterable[int], timeout: float = 5.0) -> list[int]:
    """SIGKILL those of ``pids`` that are live stubs (:func:`is_live_stub`: never a process that
    took a freed pid) and wait up to ``timeout`` until none of them runs: a stub in the middle of
    dying still runs for a moment, with an empty ``/proc/<pid>/cmdline`` (so it is no longer
    listed as a stub), and a caller that checks right after would still see it. The pids
    signalled."""
    killed = []
    for pid in pids:
        if is_live_stub(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    deadline = time.monotonic() + timeout
    while any(is_live_stub(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


def cleanup_orphans(prefix: str | None = None) -> tuple[list[int], list[Path]]:
    """Kill orphaned stubs and remove stale regions (all of ours, or those of ``prefix``):
    (pids killed, regions removed). Run before a server starts and after one stopped."""
    killed = kill_stubs([s.pid for s in orphaned_stubs() if prefix is None or s.shm_region.startswith(prefix)])
    removed = []
    for path in stale_regions(prefix):
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    if prefix is None:  # the drain folders (serving/drain.py) of servers that are gone
        for folder in stale_folders(_live_prefixes()):
            shutil.rmtree(folder, ignore_errors=True)
    return killed, removed


# ----------------------------------------------------------------------------------- HTTP
def _http_json(url: str, *, method: str = "GET", timeout: float = 3.0,
               headers: Mapping[str, str] | None = None, body: bytes | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method, data=body, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read()
            return response.status, json.loads(data) if data else None
    except urllib.error.HTTPError as exc:
        data = exc.read()
        try:
            return exc.code, json.loads(data) if data else None
        except ValueError:
            return exc.code, data.decode(errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return 0, str(exc)


def python_instances(base_url: str, models: Iterable[str], timeout: float = 3.0) -> dict[str, list[str]]:
    """Instance names of the Python-backend models among ``models`` (from the served configs)."""
    return read_instances(base_url, models, timeout)[0]


def read_instances(base_url: str, models: Iterable[str],
                   timeout: float = 3.0) -> tuple[dict[str, list[str]], list[str]]:
    """Instance names of the Python-backend models among ``models``, and the models whose config
    could not be read (not loaded, mid-reload, or the server too busy to answer in ``timeout``):
    a caller must not take those for "no Python instances"."""
    out: dict[str, list[str]] = {}
    unread: list[str] = []
    for model in models:
        code, config = _http_json(f"{base_url}/v2/models/{model}/config", timeout=timeout)
        if code != 200 or not isinstance(config, dict):
            unread.append(model)
            continue
        if config.get("backend") != "python":
            continue
        names = []
        for index, group in enumerate(config.get("instance_group", [])):
            group_name = group.get("name") or f"{model}_{index}"
            count = int(group.get("count", 1))
            if group.get("kind") == "KIND_GPU" and group.get("gpus"):
                count *= len(group["gpus"])  # ``count`` instances on each listed GPU
            names += [f"{group_name}_{i}" for i in range(count)]
        out[model] = names
    return out, unread


def repository_models(repository: Path) -> list[str]:
    """Model folders (with a ``config.pbtxt``) of a model repository."""
    return sorted(p.name for p in Path(repository).iterdir() if (p / "config.pbtxt").is_file())


def upload_models(repository: Path) -> set[str]:
    """Models a client sends free-form bytes to: those whose config declares a ``TYPE_STRING``
    input (the task endpoints and the LoRA registry). Only their stubs' regions can be grown by a
    request from outside; a component's inputs are bounded by the pipeline."""
    found = set()
    for model in repository_models(repository):
        with contextlib.suppress(OSError):
            if "TYPE_STRING" in (repository / model / "config.pbtxt").read_text():
                found.add(model)
    return found


def server_repository(server_pid: int) -> Path | None:
    for arg in _cmdline(server_pid):
        if arg.startswith("--model-repository="):
            return Path(arg.split("=", 1)[1])
    return None


# ----------------------------------------------------------------------------------- status
def default_status_file(http_port: int) -> Path:
    """Where the watchdog of the server on ``http_port`` writes its status (``$ACESTEP_HEALTH_FILE``
    overrides), so a probe that knows only the port finds it."""
    explicit = os.environ.get(HEALTH_FILE_ENV)
    if explicit:
        return Path(explicit)
    return Path(tempfile.gettempdir()) / f"acestep-triton-{http_port}.health.json"


@dataclass
class Status:
    """What the watchdog last saw (the status file's content)."""

    state: str = OK
    server_pid: int = 0
    updated: float = 0.0
    recovering: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    recoveries: int = 0
    last_recovery_s: float | None = None
    recycles: int = 0
    """Models reloaded because a stub's shared-memory region outgrew the limit (a refused upload)."""
    message: str = ""
    draining: bool = False
    """``serve`` is draining before a stop (:mod:`acestep_triton.serving.drain`): not ready, still live."""

    def write(self, path: Path) -> None:
        """Atomically (a probe never reads half a file)."""
        self.updated = time.time()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.__dict__))
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> Status | None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# ----------------------------------------------------------------------------------- the check
@dataclass(frozen=True)
class HealthReport:
    healthy: bool
    problems: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.healthy


def check_health(http_port: int, *, host: str = "127.0.0.1", mode: str = "ready",
                 server_pid: int | None = None, status_file: Path | None = None,
                 timeout: float = 3.0) -> HealthReport:
    """Whether the server on ``http_port`` can serve (``mode="ready"``) or is worth keeping
    (``mode="live"``), beyond what Triton's own health endpoints say.

    * ``ready``: ``/v2/health/ready`` is 200 (``--strict-readiness``: every model loaded), every
      instance of every Python-backend model has a live stub process, no zombie stub is left
      unrecovered, the watchdog (when one runs: its status file) is not recovering anything,
      and ``serve`` is not draining for a stop;
    * ``live``: ``/v2/health/live`` is 200 and the watchdog has not given up; with no watchdog,
      a missing stub also fails it (nothing else would bring it back), so an orchestrator's
      liveness probe restarts the server after its failure budget.
    """
    if mode not in ("ready", "live"):
        raise ValueError(f"mode must be 'ready' or 'live', got {mode!r}")
    base = f"http://{host}:{http_port}"
    problems: list[str] = []
    code, _ = _http_json(f"{base}/v2/health/{mode}", timeout=timeout)
    if code != 200:
        return HealthReport(False, (f"GET /v2/health/{mode} answered {code or 'nothing'}",))
    server_pid = server_pid or find_server_pid(http_port)
    status_file = status_file or default_status_file(http_port)
    status = Status.read(status_file)
    if status is not None and (not process_alive(status.server_pid)
                               or (server_pid is not None and status.server_pid != server_pid)):
        status = None  # left by an earlier server on this port
    if status is not None:
        if status.state == FAILED:
            problems.append(f"recovery failed for {', '.join(status.failed)}: {status.message}")
        elif time.time() - status.updated > STATUS_STALE_S:
            problems.append(f"watchdog status {status_file} not updated for "
                            f"{time.time() - status.updated:.0f} s (the watchdog stopped)")
        elif mode == "ready" and status.state == RECOVERING:
            problems.append(f"restarting {', '.join(status.recovering)} after its process died")
        if mode == "ready" and status.draining:
            problems.append("draining: the server is shutting down and accepts no new requests")
    if server_pid is None:  # not on this machine / PID namespace: the HTTP answers are all we have
        return HealthReport(not problems, tuple(problems))
    watched = status is not None and not problems
    if mode == "live" and watched:
        return HealthReport(True)
    repository = server_repository(server_pid)
    models = repository_models(repository) if repository is not None and repository.is_dir() else []
    expected = python_instances(base, models, timeout=timeout)
    running = {s.instance for s in stub_processes(server_pid)}
    missing = sorted(i for names in expected.values() for i in names if i not in running)
    if missing:
        problems.append(f"no live process for model instance(s) {', '.join(missing)}")
    if mode == "ready" and status is None and dead_stub_children(server_pid):
        # Without a watchdog nobody reloads; a zombie means a dead instance may still get requests.
        problems.append(f"dead stub process(es) {dead_stub_children(server_pid)} of server {server_pid}")
    return HealthReport(not problems, tuple(problems))


# ----------------------------------------------------------------------------------- watchdog
class Watchdog(threading.Thread):
    """Reloads every Python-backend model whose stub process died, and publishes the state.

    Runs in the process that launched the server. Every ``poll_s`` it lists the server's live
    stubs and compares them with the instances the loaded models should have; a stub that died
    (its pid is gone, or an expected instance has no process) puts its model into recovery:
    ``POST /v2/repository/models/<model>/load`` (blocking until the new version replaced the
    old one). A failed reload is retried ``attempts`` times; when that or ``recovery_timeout``
    runs out the state becomes ``failed`` and ``on_give_up`` is called (``acestep-triton serve``
    then stops the server and exits non-zero, so Docker/Kubernetes restart the container).

    It also gives back the shared memory of refused uploads. The Python backend copies every
    input into the instance's ``/dev/shm`` region before the model sees it, grows the region to
    fit and never shrinks it (2.51): one refused 500 MiB upload kept 506 MiB of ``/dev/shm`` for
    good. With ``region_limit`` set, a stub of an :func:`upload_models` model whose region is
    larger is recycled: the same reload, so the new version takes new requests at once while the
    old one finishes those in flight and then exits with its region. At most once per
    :data:`RECYCLE_INTERVAL_S` per model.
    """

    def __init__(self, *, server_pid: int, http_port: int, repository: Path, admin_token: str,
                 status_file: Path, poll_s: float = 0.5, recovery_timeout: float = 600.0,
                 attempts: int = 3, on_give_up: Callable[[str], None] | None = None,
                 log: Callable[[str], None] | None = None, region_limit: int | None = None) -> None:
        super().__init__(name=f"acestep-watchdog-{server_pid}", daemon=True)
        self.server_pid = server_pid
        self.base = f"http://127.0.0.1:{http_port}"
        self.repository = Path(repository)
        self.admin_token = admin_token
        self.status_file = Path(status_file)
        self.poll_s = poll_s
        self.recovery_timeout = recovery_timeout
        self.attempts = attempts
        self.on_give_up = on_give_up
        self.log = log or (lambda message: None)
        self.status = Status(server_pid=server_pid)
        self._stop_event = threading.Event()
        self._expected: dict[str, list[str]] = {}
        self._unread: set[str] = set()  # models whose config the last refresh could not read
        self._known: dict[str, int] = {}  # instance -> pid of the stub serving it
        self._generation = 0
        self.region_limit = region_limit
        self._upload_models = upload_models(self.repository) if region_limit is not None else set()
        self._recycled: dict[str, float] = {}  # model -> monotonic time of its last recycle
        self.recycle_interval_s = RECYCLE_INTERVAL_S
        self.stale_pids: set[int] = set()
        """Stubs of replaced model versions that never exit: when one instance of a model with
        several died, the reload replaces the version, but the old version's unload hangs on
        the dead instance, so its live instances stay (idle: requests go to the new version).
        A stop must not wait for them (it used to wait out Triton's 30 s exit timeout)."""

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
        with contextlib.suppress(OSError):
            self.status_file.unlink()

    def refresh_expected(self, replaced: set[int] | frozenset[int] = frozenset()) -> None:
        """What should run now; ``replaced``: stubs of versions a reload replaced, which may still
        finish requests under the same instance names.

        A model whose config cannot be read now (the server busy right after a reload) keeps
        what was expected of it and is read again at the next poll: dropping it would stop the
        watch on it for good (its next death would go unnoticed, and health stay false).
        """
        fresh, unread = read_instances(self.base, repository_models(self.repository))
        for model in unread:
            if model in self._expected:
                fresh[model] = self._expected[model]
        self._expected, self._unread = fresh, set(unread)
        live = {s.instance: s.pid for s in stub_processes(self.server_pid) if s.pid not in replaced}
        self._known = {i: live[i] for names in self._expected.values() for i in names if i in live}

    @property
    def unread(self) -> frozenset[str]:
        """Models whose config the last reading could not get (read again at every poll)."""
        return frozenset(self._unread)

    def read_unread(self) -> None:
        """Read the configs that the last refresh could not; a model seen for the first time
        is bound to its live stubs."""
        fresh, unread = read_instances(self.base, sorted(self._unread))
        live = {s.instance: s.pid for s in stub_processes(self.server_pid)}
        for model, names in fresh.items():
            if model not in self._expected:
                self._known.update({i: live[i] for i in names if i in live})
            self._expected[model] = names
        self._unread = set(unread)

    def broken_models(self) -> list[str]:
        """Models with an instance whose stub is gone (died, or never seen alive)."""
        live: dict[str, set[int]] = {}
        for stub in stub_processes(self.server_pid):  # a replaced version may share instance names
            live.setdefault(stub.instance, set()).add(stub.pid)
        broken = []
        for model, names in self._expected.items():
            for name in names:
                known = self._known.get(name)
                if known is None or not process_alive(known) or known not in live.get(name, ()):
                    broken.append(model)
                    break
        return broken

    def reload(self, model: str) -> tuple[bool, str]:
        """Replace ``model`` by a freshly loaded version (new stub processes).

        A plain load request is a no-op for a model whose files did not change, and one that
        repeats the served config only "updates" its (unchanged) instances in place; neither
        starts a new stub (both seen on 2.51). So the served config goes back with one more
        parameter, :data:`RELOAD_PARAMETER` (a counter no model reads), which makes it a
        modified model: Triton loads a new version and unloads the broken one.
        """
        code, config = _http_json(f"{self.base}/v2/models/{model}/config")
        if code != 200 or not isinstance(config, dict):
            return False, f"GET /v2/models/{model}/config answered {code}: {config}"
        self._generation += 1
        config.setdefault("parameters", {})[RELOAD_PARAMETER] = {"string_value": str(self._generation)}
        body = json.dumps({"parameters": {"config": json.dumps(config)}}).encode()
        code, answer = _http_json(f"{self.base}/v2/repository/models/{model}/load", method="POST", body=body,
                                  headers={ADMIN_HEADER: self.admin_token, "Content-Type": "application/json"},
                                  timeout=self.recovery_timeout)
        return code == 200, "" if code == 200 else f"load answered {code}: {answer}"

    def run(self) -> None:
        try:
            self.refresh_expected()
            self.status.write(self.status_file)
            while not self._stop_event.wait(self.poll_s):
                if not process_alive(self.server_pid):
                    return
                if self._unread:
                    self.read_unread()
                broken = self.broken_models()
                if broken:
                    self._recover(broken)
                    if self.status.state == FAILED:
                        return
                else:
                    self._recycle(self.oversized_models())
                self.status.write(self.status_file)
        except Exception as exc:  # a broken watchdog must show in the probes, not vanish silently
            self.status.state, self.status.message = FAILED, f"watchdog crashed: {type(exc).__name__}: {exc}"
            with contextlib.suppress(OSError):
                self.status.write(self.status_file)
            self.log(f"acestep watchdog: {self.status.message}")
            if self.on_give_up is not None:
                self.on_give_up(self.status.message)

    def oversized_models(self) -> list[str]:
        """Upload-taking models with a serving stub whose region outgrew ``region_limit`` and that
        were not recycled in the last ``recycle_interval_s`` (:data:`RECYCLE_INTERVAL_S`)."""
        if self.region_limit is None:
            return []
        now = time.monotonic()
        serving = set(self._known.values())
        return sorted({s.model for s in stub_processes(self.server_pid)
                       if s.model in self._upload_models and s.pid in serving
                       and now - self._recycled.get(s.model, -math.inf) >= self.recycle_interval_s
                       and region_bytes(s.shm_region) > self.region_limit})

    def _recycle(self, models: list[str]) -> None:
        if not models:
            return
        before = {s.pid for s in stub_processes(self.server_pid) if s.model in models}
        for model in models:
            self._recycled[model] = time.monotonic()
            started = time.monotonic()
            ok, error = self.reload(model)
            if ok:
                self.status.recycles += 1
                self.log(f"acestep watchdog: {model}'s shared memory outgrew {self.region_limit / 2**20:.0f} MiB "
                         f"(a refused upload); replaced it in {time.monotonic() - started:.1f} s")
            else:  # the old version still serves; the next interval tries again
                self.log(f"acestep watchdog: could not recycle {model}: {error}")
        self.refresh_expected(replaced=before)

    def _recover(self, models: list[str]) -> None:
        started = time.monotonic()
        self.status.state, self.status.recovering = RECOVERING, list(models)
        self.status.write(self.status_file)
        self.log(f"acestep watchdog: stub process of {', '.join(models)} died; reloading")
        failed: dict[str, str] = {}
        before = {s.pid for s in stub_processes(self.server_pid) if s.model in models}
        for model in models:
            error = ""
            for _attempt in range(self.attempts):
                if self._stop_event.is_set() or time.monotonic() - started > self.recovery_timeout:
                    error = error or f"not recovered within {self.recovery_timeout:.0f} s"
                    break
                ok, error = self.reload(model)
                if ok:
                    break
                self._stop_event.wait(1.0)
            else:
                ok = False
            if not ok:
                failed[model] = error
        if self._stop_event.is_set():
            return
        self.refresh_expected()
        serving = set(self._known.values())
        self.stale_pids |= {pid for pid in before if pid not in serving and process_alive(pid)}
        # Only the models this round reloaded: one that broke meanwhile is the next round's work.
        still = [m for m in self.broken_models() if m in models and m not in failed]
        for model in still:
            failed[model] = "its instances have no live process after the reload"
        elapsed = time.monotonic() - started
        if failed:
            self.status.state, self.status.failed = FAILED, sorted(failed)
            self.status.message = "; ".join(f"{m}: {e}" for m, e in failed.items())
            self.status.write(self.status_file)
            self.log(f"acestep watchdog: giving up: {self.status.message}")
            if self.on_give_up is not None:
                self.on_give_up(self.status.message)
            return
        self.status.state, self.status.recovering = OK, []
        self.status.recoveries += 1
        self.status.last_recovery_s = round(elapsed, 2)
        self.status.write(self.status_file)
        self.log(f"acestep watchdog: {', '.join(models)} reloaded in {elapsed:.1f} s")
