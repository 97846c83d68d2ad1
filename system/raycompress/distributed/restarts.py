"""When a failed actor is worth replacing: the one restart policy of the compress and eval stages.

An actor that *died* (its process, its node, or an object it held went with it) is replaced and the
work resumes; that is what a restart cures. An exception the actor's own code raised (in its
constructor, e.g. a bad weight file, or in a method, e.g. a disk that is full) would be raised again
by a replacement, so it is not retried: it ends the stage at once as a `StageFailed` that carries the
remote error's type and message without Ray's wrapping and traceback.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """An actor's code raised an error a restart would not cure. `remote_type` is the name of the
    exception class raised in the actor; the message is `<what>: <RemoteType>: <its message>`."""

    def __init__(self, what: str, remote_type: str, message: str) -> None:
        super().__init__(f"{what}: {remote_type}: {message}")
        self.remote_type = remote_type


def lost_worker(exc: BaseException) -> bool:
    """True when `exc` says an actor, its worker process or its node died, or an object it held was
    lost with it (directly or as the cause of a task error), and not because its constructor raised."""
    from ray import exceptions as rex

    lost = (rex.RayActorError, rex.ObjectLostError, rex.NodeDiedError, rex.WorkerCrashedError)
    for e in (exc, getattr(exc, "cause", None)):
        if isinstance(e, lost) and not getattr(e, "actor_init_failed", False):
            return True
    return False


def deterministic_failure(exc: BaseException, what: str) -> StageFailed | None:
    """The `StageFailed` for an error the actor's own code raised (constructor or method), else None."""
    from ray import exceptions as rex

    if isinstance(exc, rex.RayActorError) and exc.actor_init_failed:
        # Ray keeps only the text: "... creation task, <traceback> ... \nTypeName: message"
        last = exc.error_msg.rstrip().rsplit("\n", 1)[-1].strip()
        kind, _, message = last.partition(": ")
        return StageFailed(what, kind.rsplit(".", 1)[-1] or "Error", message or last)  # module path dropped
    if isinstance(exc, rex.RayTaskError) and not lost_worker(exc):
        cause = exc.cause
        return StageFailed(what, type(cause).__name__, str(cause))
    return None


class RestartBudget:
    """Counts restarts of one stage's actors against `max_restarts`.

    `absorb(exc)` returns normally when `exc` is a lost worker and a restart is left (the caller
    replaces the actor and resumes); otherwise it raises: `StageFailed` for an error the actor's
    code raised, `exc` itself when no restart is left or it is not a Ray failure at all.
    """

    def __init__(self, what: str, max_restarts: int) -> None:
        self.what, self.max_restarts, self.used = what, max_restarts, 0

    def absorb(self, exc: BaseException, where: str = "") -> None:
        failed = deterministic_failure(exc, f"{self.what}{' ' + where if where else ''}")
        if failed is not None:
            raise failed from exc
        if not lost_worker(exc) or self.used >= self.max_restarts:
            raise exc
        self.used += 1
        log.warning("%s: an actor died%s (%s); restart %d/%d", self.what, f" on {where}" if where else "",
                    type(exc).__name__, self.used, self.max_restarts)
