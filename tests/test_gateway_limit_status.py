"""The status the gateway's rate limit answers with (gateway_files/nginx.conf.j2) is one that
Flower's SuperNode retries: an honest node over the limit must slow down, not stop. This
fails when Flower's HTTP retry policy changes (flwr/supercore/retry/http_retry.py);
tests/test_gateway.py shows the gateway answering a flood with 503."""

from __future__ import annotations

import httpx
import pytest
from flwr.supercore.retry import make_simple_http_retry_invoker


def answers(*statuses: int):
    """A Fleet call that gets ``statuses`` in turn, then 200; and the list of its tries."""
    tries: list[int] = []

    def call() -> str:
        status = statuses[len(tries)] if len(tries) < len(statuses) else 200
        tries.append(status)
        if status != 200:
            request = httpx.Request("POST", "https://coordinator:9092/v1/fleet/pull-messages")
            raise httpx.HTTPStatusError(
                "refused", request=request, response=httpx.Response(status, request=request)
            )
        return "messages"

    return call, tries


def supernode_invoker():
    invoker = make_simple_http_retry_invoker()  # what fleet_http_connection.py uses
    invoker.wait_gen_factory = lambda: iter(lambda: 0.0, None)  # no waiting in a test
    return invoker


def test_flowers_supernode_retries_the_limits_503_until_it_gets_through():
    call, tries = answers(503, 503)

    assert supernode_invoker().invoke(call) == "messages"
    assert tries == [503, 503, 200]


def test_flowers_supernode_would_give_up_on_429():
    call, tries = answers(429)

    with pytest.raises(httpx.HTTPStatusError):
        supernode_invoker().invoke(call)
    assert tries == [429]
