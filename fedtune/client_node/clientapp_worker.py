"""A deployed node's ClientApp worker: serves the SuperNode's ClientApp tasks with fedtune's
installed ClientApp (:data:`fedtune.client_node.deployed_app.app`), never code from a run.

Why: in Flower 1.41's default ``--isolation subprocess`` the SuperNode starts Flower's
SuperExec, which starts ``flwr-clientapp`` for every message; its ``run_clientapp`` installs
the run's app bundle (FAB) under ``$FLWR_HOME/apps`` and imports the ClientApp the bundle's
pyproject names, with the bundle's folder on ``sys.path``. Whoever can submit a run would run
code inside every node, and the bundle would stay installed. So `fedtune node start` runs the
SuperNode with ``--isolation process`` (it then starts no SuperExec) and a SuperExec secret
(only a holder may acquire tasks on its runtime API), and this worker takes Flower's place:
it acquires each task as Flower's ``run_superexec`` does, pulls its input as
``run_clientapp`` does, checks the run's bundle in memory
(:func:`fedtune.platform.wire.run_bundle.check_bundle`) and calls
fedtune's ClientApp in this process. A refused bundle gets Flower's error reply
(``ErrorCode.INVALID_FAB``, as the SuperNode's own FAB verification), which the coordinator
sees in place of the node's answer. Nothing of a bundle is written to disk or imported.

A long-lived worker also saves the 3-5 s start of a ClientApp process per message. It asks
for a task every ``poll_s`` (0.1 s: a request to the SuperNode on loopback; Flower's SuperExec
asks every ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, 1 s by default).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    SendTaskHeartbeatRequest,
)
from flwr.proto.task_pb2 import Task
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

from fedtune.client_node.failure_reason import coordinator_reason
from fedtune.platform.wire.run_bundle import UntrustedBundleError, check_bundle

ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"  # the call Flower's SuperExec signs
RETRYABLE = (httpx.TransportError, httpx.HTTPStatusError)
RETRYABLE_STATUS = frozenset({502, 503, 504})


def _retry_invoker(max_time_s: float) -> RetryInvoker:
    """Retries for ``max_time_s`` while the SuperNode is unreachable or busy. Flower's own
    invoker (``make_simple_http_retry_invoker``) retries forever and sends its process SIGINT
    on a 401: right for a one-task process, fatal for a node's long-lived worker."""

    def give_up(exc: Exception) -> bool:
        return (
            isinstance(exc, httpx.HTTPStatusError)
            and exc.response.status_code not in RETRYABLE_STATUS
        )

    return RetryInvoker(
        lambda: exponential(max_delay=5),
        RETRYABLE,
        max_tries=None,
        max_time=max_time_s,
        should_giveup=give_up,
    )


def _heartbeat_fn(client: RuntimeHttpClient, lost: threading.Event) -> Callable[[], bool]:
    """Flower's task heartbeat (``make_task_heartbeat_fn_http``) without its SIGINT to the
    whole process when the SuperNode has forgotten the task: here the task is marked lost."""

    def beat() -> bool:
        try:
            answer = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.HTTPError:
            return False  # HeartbeatSender retries with backoff
        if not answer.success:
            lost.set()
        return True

    return beat


class ClientAppWorker:
    """Serves the ClientApp tasks of the SuperNode whose runtime API is ``address``
    (loopback, plain HTTP as Flower's own node-side SuperExec), with ``app``."""

    def __init__(
        self,
        address: str,
        secret: bytes,
        *,
        say: Callable[[str], None] = print,
        app: Callable[[Message, Context], Message] | None = None,
        poll_s: float = 0.1,
        max_tasks: int = 4,
        retry_s: float = 60.0,
    ):
        if app is None:
            from fedtune.client_node.deployed_app import app as deployed_app

            app = deployed_app
        self.address = address
        self.secret = secret
        self.say = say
        self.app = app
        self.poll_s = poll_s
        self.retry_s = retry_s
        self._slots = threading.BoundedSemaphore(max_tasks)

    def _client(self, auth: ProtobufClientInterceptor, *, retry_s: float) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,
            root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), auth],
            retry_invoker=_retry_invoker(retry_s),
        )

    def serve(self, stop: threading.Event) -> None:
        """Acquire and run tasks until ``stop`` is set (tasks under way finish on their own)."""
        auth = SuperExecAuthHttpInterceptor(
            master_secret=self.secret, protected_methods={ACQUIRE_METHOD}
        )
        client = self._client(auth, retry_s=0)  # the loop itself retries
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        refused = False
        try:
            while not stop.is_set():
                if not self._slots.acquire(timeout=self.poll_s):
                    continue  # all slots busy
                try:
                    acquired = client.AcquireTask(request)
                except httpx.HTTPStatusError as exc:  # e.g. another SuperExec secret
                    if not refused:
                        self.say(f"the SuperNode refused the ClientApp worker: {exc}")
                    acquired, refused = None, True
                except httpx.TransportError:  # the SuperNode is starting or gone
                    acquired = None
                if acquired is not None and acquired.HasField("task") and acquired.token:
                    threading.Thread(
                        target=self._serve_task,
                        args=(acquired.token, acquired.task),
                        name=f"clientapp-task-{acquired.task.task_id}",
                        daemon=True,
                    ).start()
                    continue  # look for the next at once
                self._slots.release()
                stop.wait(self.poll_s if acquired is not None else 2.0)
        finally:
            client.close()

    def _serve_task(self, token: str, task: Task) -> None:
        try:
            self.run_task(token, task)
        except Exception as exc:  # a task's failure never ends the worker
            self.say(f"ClientApp task {task.task_id} of run {task.run_id} failed: {exc}")
        finally:
            self._slots.release()

    def run_task(self, token: str, task: Task) -> None:
        """One task, as Flower's ``run_clientapp`` runs it, with fedtune's ClientApp."""
        client = self._client(RuntimeTokenHttpInterceptor(token), retry_s=self.retry_s)
        lost = threading.Event()
        heartbeat = HeartbeatSender(_heartbeat_fn(client, lost))
        context: Context | None = None
        status, details = SubStatus.FAILED, "the task's input could not be pulled"
        try:
            heartbeat.start()
            message, context, run, fab = pull_task_input(client)
            reply, details = self._reply(message, context, run, fab)
            status = SubStatus.FAILED if reply.has_error() else SubStatus.COMPLETED
            if lost.is_set():
                self.say(f"run {run.run_id}: the SuperNode gave up task {task.task_id}")
            push_message(client, reply, context)
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            push_task_output(client, context, status, details)
            client.close()

    def _reply(self, message: Message, context: Context, run: Run, fab: Fab) -> tuple[Message, str]:
        """The reply to ``message`` and the task's details ("" when it succeeded)."""
        try:
            check_bundle(fab.content, run_id=run.run_id, fab_hash=fab.hash_str)
        except UntrustedBundleError as refusal:
            self.say(str(refusal))
            error = Error(code=ErrorCode.INVALID_FAB, reason=str(refusal))
            return Message(error, reply_to=message), str(refusal)
        try:
            return self.app(message, context), ""
        except Exception as exc:
            self.say(f"run {run.run_id}: the ClientApp raised {type(exc).__name__}: {exc}")
            return error_reply(message, exc)


def error_reply(message: Message, exc: Exception) -> tuple[Message, str]:
    """The error reply to ``message`` when the ClientApp raised ``exc``, and its reason: the
    type and, for fedtune's own errors, the text (:func:`coordinator_reason`; the egress
    manifest's error reply). The caller logs the whole text on the node."""
    reason = coordinator_reason(exc)
    error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
    return Message(error, reply_to=message), reason
