"""Schemathesis against the served OpenAPI (real PostgreSQL, real broker), with an admin
token: every operation fuzzed on its own (ingest included, on topics of the test's own),
then stateful sequences over the API's OpenAPI links (list -> detail -> action). No 5xx,
no answer outside its documented status codes and schema, and at least 80 % of the
operations reach a 2xx, counted per operation, so the run cannot pass on 401s or 404s.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from api_support import MODEL, DatabaseSnapshot, Seeded, Served, seeded_app, uvicorn_thread
from hypothesis import HealthCheck, given
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from genmon.settings import Settings

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]

CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
]
#: Examples per operation, and stateful runs: small, so the test stays well under 90 s.
EXAMPLES = 12
STATEFUL_EXAMPLES = 50


@pytest.fixture
def served(
    postgres_url: str, kafka_settings: Settings, free_port: Any, unique_name: str
) -> Iterator[tuple[Served, str]]:
    with (
        seeded_app(postgres_url, kafka_settings, unique_name) as app,
        uvicorn_thread(app.app, free_port()) as base_url,
    ):
        yield app, base_url


def with_seeded_examples(spec: dict[str, Any], seeded: Seeded) -> dict[str, Any]:
    """The served OpenAPI with the seeded ids as the examples of the path parameters, so
    the explicit phase calls each operation on a resource that exists once (generated ids
    then find nothing, and the stateful phase follows the links)."""
    ids = {
        "incident_id": seeded.open_incident,
        "job_id": seeded.pending_job,
        "model_id": MODEL,
        "silence_id": seeded.silence,
    }
    for operations in spec["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] in ids:
                    parameter["example"] = ids[parameter["name"]]
    return spec


def test_openapi_fuzzed_and_stateful(served: tuple[Served, str]) -> None:
    app, base_url = served
    headers = {"Authorization": f"Bearer {app.seeded.tokens['admin']}"}
    spec = httpx.get(f"{base_url}/openapi.json", timeout=30).raise_for_status().json()
    schema = schemathesis.openapi.from_dict(with_seeded_examples(spec, app.seeded))
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 20, [op.label for op in operations]
    statuses: dict[str, Counter[int]] = defaultdict(Counter)
    run = hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )

    failures: list[str] = []

    def check(case: Any, response: Any) -> None:
        """Count the answer; keep a failed check (all of them are reported at the end)."""
        statuses[case.operation.label][response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except Exception as exc:  # schemathesis' FailureGroup and its kin
            failures.append(f"{case.operation.label} -> {response.status_code}: {exc}")

    def fuzzer(operation: Any) -> Any:
        @run
        @given(case=operation.as_strategy())
        def fuzz(case: Any) -> None:
            check(case, case.call(base_url=base_url, headers=headers))

        return fuzz

    for operation in operations:
        fuzzer(operation)()

    labels = {op.label for op in operations}
    snapshot = DatabaseSnapshot(app.engine)

    class Links(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            snapshot.restore()  # every scenario starts from the same rows (see the class)

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": base_url, "headers": headers}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            if case.operation.label in labels:
                check(case, response)

    Links.run(
        settings=hypothesis.settings(
            max_examples=STATEFUL_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            stateful_step_count=6,
            suppress_health_check=list(HealthCheck),
        )
    )

    reached = sorted(label for label in labels if any(200 <= s < 300 for s in statuses[label]))
    missed = {label: dict(statuses[label]) for label in sorted(labels - set(reached))}
    assert not failures, "\n".join(failures[:20])
    assert not any(s >= 500 for counts in statuses.values() for s in counts), statuses
    assert len(reached) >= 0.8 * len(labels), f"no 2xx for {missed}"
