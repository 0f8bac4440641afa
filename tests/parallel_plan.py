"""How the suite shares CI's two cores: which tests run together, and in what order.

``scripts/test.sh`` runs pytest-xdist with two workers (``-n 2 --dist loadscope
--no-loadscope-reorder``). Nearly all of the suite's time is real tritonservers starting and
serving, and a serial run keeps one of the two cores busy (102 % CPU over a 20.6 min run), so
two workers side by side roughly halve it. This plugin decides the units of work that the
workers take, one at a time:

* **A module is one unit.** Its module-scoped server starts once, in one worker.
* **The modules that use a session server or deployment shared across modules**
  (:data:`SHARED_MODULES`, checked against the fixtures they use) make up one unit,
  ``shared_servers``: each of those is built and started in one worker only. Inside it the
  modules of one server run together, and each server stops after its last user
  (``fixtures_serving``): at most three are up at once. Every server holds ~20 stub processes
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

The units are made by a scheduler of our own (:class:`PlanScheduling`) from the node ids: the
``xdist_group`` marks of ``--dist loadgroup`` do not reach the scheduler under pytest 9 (xdist
3.8 renames ``item._nodeid``, which pytest 9 no longer reads). A serial run (``-n 0``) keeps
pytest's own order; the plan applies only under xdist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fixtures_serving import SHARED_SERVERS

SHARED_FIXTURES = frozenset({*SHARED_SERVERS, "tiny_deployment"})
"""What several modules share and only one worker should build: the session servers, and the
tiny deployment (the soak serves it from a server of its own; it runs ``alone`` at present)."""
SHARED_UNIT = "shared_servers"
SHARED_MODULES = frozenset({
    "test_benchmarks_smoke", "test_cli_task_chain", "test_frontend", "test_frontend_browser",
    "test_input_defects", "test_lora_fused_variants_triton", "test_lora_live_adapters_triton", "test_metrics",
    "test_soak", "test_tasks_end_to_end", "test_torch_runtime", "test_triton_text2music",
})
"""The modules whose tests use one of :data:`SHARED_FIXTURES` (the scheduler sees only node
ids, so the list is written out; every worker checks it against the fixtures)."""

LONGEST_FIRST = (
    SHARED_UNIT,  # ~530 s (on two busy cores): the shared servers and their modules
    "test_full_size",  # ~80 s
    "test_lifecycle",  # ~50 s (its stub-killing tests run alone)
    "test_gpu_serving_check",  # ~45 s
    "test_access_control",  # ~35 s
    "test_weights",  # ~27 s
    "test_docker",  # ~26 s
    "test_lora_live_adapters_fast_path",  # ~22 s
    "test_onnx_export",  # ~21 s
    "test_transformer",  # ~15 s
    "test_export_scripts",  # ~14 s
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


def shared_phase(servers: frozenset[str]) -> int:
    """Where a module runs inside the shared unit, so that few servers are up at once: the
    tiny-only modules (0), those with golden (1), torch with tiny (2), torch alone (3), then
    the soak's server of its own once the shared ones have stopped (4)."""
    if "torch_server" in servers:
        return 2 if "tiny_server" in servers else 3
    if "golden_server" in servers:
        return 1
    return 0 if "tiny_server" in servers else 4


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        import torch  # after pytest's start-up, as the test modules import it anyway

        # one core per worker: two threads per worker on two busy cores made OpenMP wait on
        # each other (an in-process test went from 4 s to 29 s)
        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # the controller or a serial run
        return
    servers = servers_of(items)
    using = {module for module, used in servers.items() if used}
    if not using <= SHARED_MODULES:
        raise pytest.UsageError(f"tests/parallel_plan.py: add {sorted(using - SHARED_MODULES)} to SHARED_MODULES "
                                f"(they use a shared session server)")
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
