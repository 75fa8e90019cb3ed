"""The demo layer: a simulated agent fleet to watch the whole pipeline work.

* ``fleet``: a seeded fleet (agents, spawn tree, ring changes, sagas) fed to the in-process bus,
  and the report ``hvobs demo`` prints;
* ``over_redis``: the same fleet with its agents as separate producer processes on a Redis bus
  (``hvobs demo --redis``);
* ``simulate``: a long-running fleet simulator for the deployable stack
  (``python -m hypervisor.observability.demo.simulate``).
"""

from hypervisor.observability.demo.fleet import (
    DEFAULT_AGENTS,
    DEFAULT_SAGAS,
    DEFAULT_SEED,
    DemoAgent,
    DemoResult,
    Fleet,
    feed_in_process,
    generate_fleet,
    render_report,
)

__all__ = [
    "DEFAULT_AGENTS",
    "DEFAULT_SAGAS",
    "DEFAULT_SEED",
    "DemoAgent",
    "DemoResult",
    "Fleet",
    "feed_in_process",
    "generate_fleet",
    "render_report",
]
