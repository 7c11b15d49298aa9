"""Property-based tests of the served OpenAPI document against a real `homepage serve` (schemathesis):
schema-valid requests get a documented answer, schema-invalid ones a 4xx, every response matches its
documented status, content type and schema, and nothing is a 5xx; once without and once with the
operator token. The example count is kept modest so that the module runs in well under a minute.

Each operation's cases come from ``APIOperation.as_strategy`` run by Hypothesis here (schemathesis's
pytest plugin reads pytest internals that pytest 9 no longer has).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any
from unittest import mock

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import positive_data_acceptance

from .test_api import Server

pytestmark = pytest.mark.slow

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # schemathesis sends made-up tokens too: no throttling here (test_hostile tests it)
    with mock.patch.dict(os.environ, {"HOMEPAGE_TOKEN_FAILURES": "1000000"}):
        s = Server(tmp_path_factory.mktemp("schemathesis"), workers=1)
    yield s
    s.stop()
    log = (s.dir / "server.log").read_text()
    for sign in ("unhandled error", "error outside the app", "Error handling request"):  # the API's own
        assert sign not in log, log[-3000:]


def run(server: Server, op: Any, mode: schemathesis.GenerationMode, headers: dict[str, str] | None,
        statuses: Counter[tuple[str, int]]) -> None:
    """Hypothesis over one operation's cases in one generation mode; raises what schemathesis finds."""
    # a config's body is TOML text: any non-empty string is schema-valid, few are configs
    excluded = [positive_data_acceptance] if op.label in ("PUT /config", "POST /config/dry-run") else None

    @SETTINGS
    @given(case=op.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        r = case.call_and_validate(base_url=server.url, headers=headers, timeout=20, excluded_checks=excluded)
        statuses[op.label, r.status_code] += 1

    check()


def failures(server: Server, headers: dict[str, str] | None) -> tuple[list[str], Counter[tuple[str, int]]]:
    """Every operation's failures, and the statuses seen per operation."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    # invalid data refused by the front server (a URL over 4 KiB, too many headers) is refused too
    schema.config.checks.negative_data_rejection.expected_statuses += ["408", "413", "414", "431"]
    found = []
    statuses: Counter[tuple[str, int]] = Counter()
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in schemathesis.GenerationMode:
            try:
                run(server, op, mode, headers, statuses)
            except Unsatisfiable:  # no parameters, no body: nothing can be made invalid
                pass
            except (Exception, BaseExceptionGroup) as e:  # collect them all: one report for every operation
                found.append(f"{op.label} ({mode.value}): {type(e).__name__}: {str(e)[:1500]}")
    return found, statuses


@pytest.mark.parametrize("token", [None, "sesame"], ids=["anonymous", "operator"])
def test_api_conforms_to_its_openapi_document(server, token):
    got, statuses = failures(server, {"Authorization": f"Bearer {token}"} if token else None)
    assert not got, "\n\n".join(got)
    # it did call the server: answers of each kind, none of them a 5xx
    total = Counter[int]()
    for (_, status), n in statuses.items():
        total[status] += n
    assert total[200] > 10 and total[400] > 10 and not any(s >= 500 for s in total), statuses
    put = {status for (label, status) in statuses if label == "PUT /config"}
    # without the token PUT /config is only ever refused as such; with it, its body is read (400: not a config)
    assert put == {401} if token is None else 400 in put, statuses
