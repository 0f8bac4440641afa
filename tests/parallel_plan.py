"""How the suite shares CI's two cores: which tests run together, and in what order.

``scripts/test.sh`` runs pytest-xdist with two workers (``-n 2 --dist loadscope
--no-loadscope-reorder``). Nearly all of the suite's time is real tritonservers starting and
serving, and a serial run keeps one of the two cores busy (102 % CPU over a 20.6 min run), so
two workers side by side roughly halve it. This plugin decides the units of work that the
workers take, one at a time:

* **A module is one unit.** Its module-scoped server starts once, in one worker.
* **The modules that share a session server or deployment with another module**
  (:data:`SHARED_MODULES`, checked against the fixtures they use) make up one unit,
  ``shared_servers``: each of those is built and started in one worker only. Inside it the
  modules of one server run together, and each server stops after its last user
  (``fixtures_serving``): at most three are up at once (the other worker serves one module at a
  time, its server being smaller). Every server holds ~20 stub processes
  (2.5-5 GB); four at once plus the other worker's servers would not fit CI's memory.
* **Longest first.** Units start in the order of :data:`LONGEST_FIRST` (seconds measured on
  CI's 2 cores), then the rest in collection order, so the units still queued at the end are
  short and both workers finish together.

**What does not run here: tests marked ``alone``** (``scripts/test.sh`` runs them after the two
workers, by themselves). Those that kill stub processes (recovery, the soak, two lifecycle
tests): under two busy workers, tritonserver 2.51 itself aborted once in about 30 such kills
(``boost::interprocess::lock_exception`` in ``libtriton_python.so`` as the killed stub's model
reloaded; upstream's open report is triton-inference-server/server#8882), while no serial run
ever did. Those that measure a server's memory or shared-memory regions against bounds
(``test_uploads``, ``test_memory_serving``): with the other worker's load, a watchdog recycle
once left a refused upload's 302 MiB region past its 90 s bound. And one that asserts on
machine-wide state: any server's start removes every orphaned stub, including the one the test
left on purpose.

**Nor the tests of** :data:`IN_PROCESS_MODULES` (marked ``in_process``): they start no server,
and ``scripts/test.sh`` runs them afterwards, beside the ``alone`` tests, under ``nice -n 19`` (in
a session of its own with autogroup nice 19: each server runs in its own session, and under
autogroup scheduling nice orders processes of one session only).
The ``alone`` tests keep about one core busy, mostly waiting for reloads and restarts; at the
lowest priority the in-process tests take only what the ``alone`` tests leave idle, so those
still run as if by themselves, and the two workers here keep the tests that start servers.

The units are made by a scheduler of our own (:class:`PlanScheduling`) from the node ids: the
``xdist_group`` marks of ``--dist loadgroup`` do not reach the scheduler under pytest 9 (xdist
3.8 renames ``item._nodeid``, which pytest 9 no longer reads). A serial run (``-n 0``) keeps
pytest's own order; the plan applies only under xdist.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from fixtures_serving import SHARED_SERVERS

SHARED_FIXTURES = frozenset({*SHARED_SERVERS, "tiny_deployment"})
"""What several modules may share, so that only one worker should build it: the session servers,
and the tiny deployment (the soak serves it from a server of its own; it runs ``alone``). One
used by a single module (``golden_torch_server``) binds nothing: that module is a unit alone."""
SHARED_UNIT = "shared_servers"
SHARED_MODULES = frozenset({
    "test_benchmarks_smoke", "test_cli_task_chain", "test_frontend", "test_frontend_browser",
    "test_input_defects", "test_lora_fused_variants_triton", "test_metrics", "test_soak",
    "test_tasks_end_to_end", "test_torch_runtime", "test_triton_text2music",
})
"""The modules that share one of :data:`SHARED_FIXTURES` with another module (the scheduler sees
only node ids, so the list is written out; every worker checks it against the fixtures)."""

IN_PROCESS_MODULES = frozenset({
    "test_admission", "test_audio_models", "test_buckets", "test_checkpoint", "test_codec", "test_decode_cancel",
    "test_gpu_render", "test_lora_files", "test_lora_fuse", "test_lora_live_adapters",
    "test_lora_live_adapters_fast_path", "test_lora_registry", "test_lora_served", "test_lora_tiny",
    "test_lora_variants", "test_lyrics", "test_onnx_export", "test_orchestrator_unit", "test_pipeline_golden",
    "test_sampling_cases", "test_sampling_conditions", "test_sampling_device", "test_sampling_guidance",
    "test_sampling_loop", "test_sampling_noise", "test_sampling_schedule", "test_sampling_schedulers",
    "test_sampling_tasks", "test_tensorrt_unit", "test_text_encoder", "test_transformer", "test_weights",
})
"""Modules that start no tritonserver, not even in a subprocess: marked ``in_process``, which
``scripts/test.sh`` runs beside the ``alone`` tests at the lowest CPU priority (``nice -n 19``),
on the core those leave idle. In modules that also serve, single tests carry the mark by hand.
:func:`pytest_configure` makes that run refuse to start a server."""
IN_PROCESS_ENV = "ACESTEP_TEST_IN_PROCESS"
"""Set by ``scripts/test.sh`` for the ``in_process`` run: a server start there is an error."""

LONGEST_FIRST = (
    SHARED_UNIT,  # ~330 s (on two busy cores): the shared servers and their modules
    "test_full_size",  # ~115 s
    "test_gpu_serving_check",  # ~55 s
    "test_lora_live_adapters_triton",  # ~50 s
    "test_torch_runtime_golden",  # ~50 s
    "test_torch_runtime_batching",  # ~45 s
    "test_lifecycle",  # ~37 s (its stub-killing tests run alone)
    "test_access_control",  # ~26 s
    "test_docker",  # ~24 s
)


def unit_of(module: str) -> str:
    return SHARED_UNIT if module in SHARED_MODULES else module


def servers_of(items: list[pytest.Item]) -> dict[str, frozenset[str]]:
    """Module name → the shared fixtures its tests use."""
    servers: dict[str, frozenset[str]] = {}
    for item in items:
        module = item.path.stem
        servers[module] = servers.get(module, frozenset()) | (SHARED_FIXTURES & set(item.fixturenames))
    return servers


def sharing_modules(servers: dict[str, frozenset[str]]) -> set[str]:
    """The modules that use a shared fixture which another module uses too."""
    users: dict[str, set[str]] = {}
    for module, used in servers.items():
        for fixture in used:
            users.setdefault(fixture, set()).add(module)
    return {module for modules in users.values() if len(modules) > 1 for module in modules}


def shared_phase(servers: frozenset[str]) -> int:
    """Where a module runs inside the shared unit, so that few servers are up at once: the
    tiny-only modules (0), those with golden (1), torch with tiny (2), torch alone (3), then
    the soak's server of its own once the shared ones have stopped (4)."""
    if "torch_server" in servers:
        return 2 if "tiny_server" in servers else 3
    if "golden_server" in servers:
        return 1
    return 0 if "tiny_server" in servers else 4


def _refuse_servers(*_: Any, **__: Any) -> None:
    raise RuntimeError("a test of the in_process run started a tritonserver: remove its module from "
                       "IN_PROCESS_MODULES (tests/parallel_plan.py)")


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        import torch  # after pytest's start-up, as the test modules import it anyway

        # one core per worker: two threads per worker on two busy cores made OpenMP wait on
        # each other (an in-process test went from 4 s to 29 s)
        torch.set_num_threads(1)
    if os.environ.get(IN_PROCESS_ENV):
        from acestep_triton.serving.server import TritonServer

        TritonServer.start = _refuse_servers  # type: ignore[method-assign]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:  # before ``-m`` deselects (this hook runs first)
        if item.path.stem in IN_PROCESS_MODULES:
            item.add_marker(pytest.mark.in_process)
    if not hasattr(config, "workerinput"):  # the controller or a serial run
        return
    servers = servers_of(items)
    sharing = sharing_modules(servers)
    if not sharing <= SHARED_MODULES:
        raise pytest.UsageError(f"tests/parallel_plan.py: add {sorted(sharing - SHARED_MODULES)} to SHARED_MODULES "
                                f"(they share a session server with another module)")
    serving = sorted(item.nodeid for item in items
                     if item.get_closest_marker("in_process") and SHARED_FIXTURES & set(item.fixturenames))
    if serving:
        raise pytest.UsageError(f"tests/parallel_plan.py: {serving[:3]} use a server fixture but are marked "
                                f"in_process (by IN_PROCESS_MODULES or by hand)")
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}

    def order(item: pytest.Item) -> tuple[int, int]:
        module = item.path.stem
        return rank.get(unit_of(module), len(rank)), shared_phase(servers[module])

    items.sort(key=order)  # stable: modules stay whole, in collection order otherwise


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling  # only under xdist (a serial run needs none)

    class PlanScheduling(LoadScopeScheduling):
        """Load-scope scheduling whose scope is :func:`unit_of` the test's module."""

        def _split_scope(self, nodeid: str) -> str:
            return unit_of(Path(nodeid.split("::", 1)[0]).stem)

    return PlanScheduling(config, log)
