"""What the coordinator may read of a failure on the node.

A node's error reply (Flower's Error: a code and a reason) leaves the organisation. fedtune's
own errors name files, lines and keys, never a data row (``tests/test_egress_manifest.py``);
another library's text may quote its input (a row, a record's key, a token), so of those only
the type leaves the node and the text goes to the node's log.
"""

from __future__ import annotations

from fedtune.common.errors import FedtuneError


def coordinator_reason(exc: BaseException) -> str:
    """The reason a node sends for ``exc``."""
    if isinstance(exc, FedtuneError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__} (its text stays on the node: see the node's log)"
