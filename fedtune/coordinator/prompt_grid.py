"""A Grid that asks the SuperLink for replies often and gives SecAgg+'s key stages a short
deadline: the ServerApp's share of a deployed round's fixed cost, and of what a dead node costs.

Flower 1.41's ``Grid.send_and_receive`` (``flwr.superlink.grid.http_grid``) pulls replies and
then sleeps 3 s before it asks again: every exchange of a round waited 1.5 s on average for
nothing, four times in a SecAgg+ round. :class:`PromptGrid` pushes the messages and pulls
every :data:`POLL_S` instead (the cost: one small request to the SuperLink per 0.1 s while a
round waits, on the coordinator's own host).

A node that dies is only reported by the SuperLink once its heartbeat has expired (two 10 s
intervals, ``fedtune.platform.runtime.supernode_entry``), and only for the messages it still
held. SecAgg+'s ``setup``, ``share_keys`` and ``unmask`` stages train nothing: a node answers
them in well under a second, so a node silent for ``key_stage_timeout_s`` there is left out of
the stage (the workflow treats it as dropped, as a node that failed). The cost: a live node
that is slower than that at a key stage (a machine loaded beyond reason) drops out of the
round. The stage that trains (``collect_masked_vectors``) and every other exchange keep the
caller's deadline: the SuperLink's expiry notices a node that dies while training.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import Stage
from flwr.serverapp import Grid

from fedtune.coordinator.grid_wrapper import WrappedGrid, secaggplus_stage

POLL_S = 0.1  # Flower: 3 s between requests for replies
KEY_STAGES = frozenset({Stage.SETUP, Stage.SHARE_KEYS, Stage.UNMASK})


class PromptGrid(WrappedGrid):
    """``grid`` with replies pulled every ``poll_s`` and SecAgg+'s key stages ended after
    ``key_stage_timeout_s`` (or the caller's deadline, if shorter)."""

    def __init__(self, grid: Grid, *, poll_s: float = POLL_S, key_stage_timeout_s: float = 10.0):
        super().__init__(grid)
        self.poll_s = poll_s
        self.key_stage_timeout_s = key_stage_timeout_s

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if any(secaggplus_stage(message) in KEY_STAGES for message in messages):
            timeout = min(timeout or self.key_stage_timeout_s, self.key_stage_timeout_s)
        waiting = set(self.grid.push_messages(messages))
        del messages
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while True:
            pulled = list(self.grid.pull_messages(waiting))
            replies += pulled
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                return replies
            pause = self.poll_s
            if deadline is not None:
                pause = min(pause, max(deadline - time.monotonic(), 0.0))
            time.sleep(pause)
