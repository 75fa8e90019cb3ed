"""Property-based API testing of ``hvobs serve`` with schemathesis against its /openapi.json.

Schemathesis generates requests from the document (valid and invalid parameters) and checks
every response: no server error, the status and content type documented, the body valid
against the documented schema, invalid input refused with a 4xx. The server is a real uvicorn
over an in-process log holding the demo fleet, so ids in responses are real ones.
``/api/stream`` never ends by design and is tested in test_serve_api.py instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings, strategies as st

from hypervisor.observability._bus.bus import RedisEventBus
from hypervisor.observability._core.events import EventType
from hypervisor.observability.demo import generate_fleet
from hypervisor.observability.web.openapi import openapi_document
from hypervisor.observability.web.runtime import ServeRuntime
from serve_support import ServerThread, recent

FLEET = generate_fleet(seed=3, agents=8, sagas=6)
SAGA_IDS = sorted(
    {e.payload["saga_id"] for e in FLEET.events if e.event_type is EventType.SAGA_CREATED}
)
TRACE_IDS = [FLEET.agents[0].trace.trace_id]


def _runtime() -> ServeRuntime:
    return ServeRuntime(RedisEventBus.in_memory(max_events=10_000), source="schemathesis")


@pytest.fixture(scope="module")
def served() -> Iterator[ServerThread]:
    """One server for the module, holding the demo fleet's events."""
    with ServerThread(_runtime) as running:
        running.emit(recent(FLEET))
        yield running


# The document is built here as the server builds it (schemathesis' lazy fixture loader does
# not run on this pytest); the fixture checks that the server serves exactly this document.
DOCUMENT = openapi_document(token=False)
schema = schemathesis.openapi.from_dict(DOCUMENT).exclude(path="/api/stream")


@schema.hook
def before_generate_path_parameters(
    context: schemathesis.HookContext, strategy: st.SearchStrategy[dict[str, Any]]
) -> st.SearchStrategy[dict[str, Any]]:
    """Mix the fleet's real saga and trace ids into the generated ones (which are almost
    never known), so the 200 answers of the by-id operations are checked too."""
    operation = context.operation
    path = "" if operation is None else operation.path
    if path == "/api/sagas/{saga_id}":
        return strategy | st.sampled_from(SAGA_IDS).map(lambda saga: {"saga_id": saga})
    if path == "/api/traces/{trace_id}":
        return strategy | st.sampled_from(TRACE_IDS).map(lambda trace: {"trace_id": trace})
    return strategy


@pytest.fixture(scope="module")
def base_url(served: ServerThread) -> str:
    """The server's URL, once its /openapi.json is checked to be the tested document."""
    with served.client() as http:
        assert http.get("/openapi.json").json() == DOCUMENT
    return served.url


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case[Any], base_url: str) -> None:
    """Every generated request gets a documented status, content type and body; malformed
    parameters get 4xx and never a server error."""
    case.call_and_validate(base_url=base_url)
