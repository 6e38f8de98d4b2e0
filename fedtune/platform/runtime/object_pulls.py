"""Flower's object pulls, retried sooner when an object is not there yet.

Flower 1.41 moves a message as a tree of objects: the sender pushes each one with its own
request, and the receiver, which may learn of the message before the last object is pushed,
asks again for each missing object after a back-off of 1 s, then 2 s, ... (``pull_objects``'
``initial_backoff``, ``flwr.supercore.constant.PULL_INITIAL_BACKOFF``). A SuperNode pulling a
train message while the ServerApp still pushes it, and a ServerApp pulling a reply while the
node still pushes it, each lost about a second that way on some exchanges of a deployed
round. :func:`retry_pulls_sooner` starts the back-off at :data:`FIRST_RETRY_S` in one module
that imported ``pull_objects`` by name (still doubling; Flower's cap and try limit are kept).
The cost: a few more small requests while the sender pushes.

``tests/test_supernode_heartbeat.py`` fails when Flower moves what this wraps.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any

FIRST_RETRY_S: float = 0.1  # Flower: 1 s before it asks again for a missing object


def _sooner(pull: Callable[..., dict[str, bytes]]) -> Callable[..., dict[str, bytes]]:
    @functools.wraps(pull)
    def pulled(*args: Any, **kwargs: Any) -> dict[str, bytes]:
        kwargs.setdefault("initial_backoff", FIRST_RETRY_S)
        return pull(*args, **kwargs)

    return pulled


def retry_pulls_sooner(module: ModuleType) -> None:
    """Wrap ``module.pull_objects`` (this process only); an error if Flower moved it."""
    pull = getattr(module, "pull_objects", None)
    if pull is None or "initial_backoff" not in inspect.signature(pull).parameters:
        raise RuntimeError(f"{module.__name__} no longer pulls with pull_objects(initial_backoff)")
    if not hasattr(pull, "__wrapped__"):
        module.pull_objects = _sooner(pull)  # type: ignore[attr-defined]
