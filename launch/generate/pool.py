"""The sampler actor pool: hands shard tasks to actors and survives losing them.

The driver, not Ray, recovers from a lost actor or node: Ray's own actor restarts are off
(a restarted actor is pinned to its constructor's arguments and to Ray's retry counts, which
can give up before a replacement has room to start). Here:

- a task whose actor or node was lost goes back to the front of the queue (tasks are
  idempotent: the same samples under the same name), up to ``max_task_losses`` times;
- a lost actor is replaced at once by a new one, which Ray places wherever there is room
  (a surviving node, a replacement node, resources freed by a finished actor);
- tasks go only to actors that have loaded their model, so nothing waits on an actor that
  cannot start while another is idle;
- when no actor is ready for ``replacement_wait_s`` while work remains, the job stops with an
  error naming the wait, what one actor needs and what the cluster has free;
- an error raised by the task itself (a bug, storage that kept failing) ends the job at once
  with that error: drawing it again would fail again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)
WAIT_TICK_S = 1.0


class PoolError(RuntimeError):
    """The pool could not finish its tasks; the message says why and what to change."""


@dataclass
class _Slot:
    actor: Any
    ready_ref: Any
    ready: bool = False
    tasks: set = field(default_factory=set)


def _lost(err: BaseException) -> bool:
    """Whether ``err`` means the work was lost with its actor, worker or node (draw it again)."""
    import ray.exceptions as rex

    return isinstance(err, (rex.RayActorError, rex.WorkerCrashedError, rex.ObjectLostError, rex.OwnerDiedError,
                            rex.NodeDiedError, rex.LocalRayletDiedError))


class SamplerPool:
    """``SamplerPool(make_actor, ...).run(tasks, on_done)``: every task done once, or an error."""

    def __init__(self, make_actor: Callable[[], Any], *, actors: int, in_flight_per_actor: int,
                 max_task_losses: int, replacement_wait_s: float, needs: str, clock=time.monotonic):
        self.make_actor, self.target, self.per_actor = make_actor, actors, in_flight_per_actor
        self.max_task_losses, self.wait_s, self.needs, self.clock = max_task_losses, replacement_wait_s, needs, clock
        self.slots: dict[int, _Slot] = {}
        self.in_flight: dict[Any, tuple[int, dict]] = {}
        self.losses: dict[int, int] = {}
        self.actors_lost = 0
        self._serial = 0

    def _add_actor(self) -> None:
        actor = self.make_actor()
        self._serial += 1
        self.slots[self._serial] = _Slot(actor, actor.pid.remote())

    def _drop(self, sid: int, why: str) -> None:
        import ray

        slot = self.slots.pop(sid, None)
        if slot is None:
            return
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - it may be gone with its node already
            pass
        if why:
            self.actors_lost += 1
            log.warning("sampler actor lost (%s); %d tasks go back to the queue and a replacement is started",
                        why.splitlines()[0][:200], len(slot.tasks))

    def run(self, tasks: list[dict], on_done: Callable[[dict], None]) -> None:
        import ray

        queue = deque(tasks)
        done: set[int] = set()
        for _ in range(min(self.target, len(tasks))):
            self._add_actor()
        none_ready_since = self.clock()
        while queue or self.in_flight:
            self._fill(queue)
            waiting = list(self.in_flight) + [s.ready_ref for s in self.slots.values() if not s.ready]
            ready, _ = ray.wait(waiting, num_returns=1, timeout=WAIT_TICK_S) if waiting else ([], [])
            for ref in ready:
                if ref in self.in_flight:
                    self._finished(ref, queue, done, on_done)
                else:
                    self._started(ref)
            while queue and len(self.slots) < min(self.target, len(queue) + len(self.in_flight)):
                self._add_actor()
            if not queue:
                self._release_idle()
            if any(s.ready for s in self.slots.values()):
                none_ready_since = self.clock()
            elif self.clock() - none_ready_since > self.wait_s:
                raise PoolError(self._no_actor_message(len(queue) + len(self.in_flight)))
        for sid in list(self.slots):
            self._drop(sid, "")

    def _fill(self, queue: deque) -> None:
        for sid, slot in self.slots.items():
            while slot.ready and queue and len(slot.tasks) < self.per_actor:
                task = queue.popleft()
                ref = slot.actor.run_shard.remote(task)
                self.in_flight[ref] = (sid, task)
                slot.tasks.add(ref)

    def _started(self, ref) -> None:
        import ray

        sid = next(i for i, s in self.slots.items() if s.ready_ref == ref)
        try:
            ray.get(ref)
            self.slots[sid].ready = True
        except Exception as err:  # noqa: BLE001 - classified below
            if getattr(err, "actor_init_failed", False) or not _lost(err):
                raise PoolError(f"a sampler actor failed to start: {err}") from err
            self._drop(sid, str(err))

    def _finished(self, ref, queue: deque, done: set[int], on_done: Callable[[dict], None]) -> None:
        import ray

        sid, task = self.in_flight.pop(ref)
        slot = self.slots.get(sid)
        if slot is not None:
            slot.tasks.discard(ref)
        try:
            result = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - classified below
            if not _lost(err):
                cause = getattr(err, "cause", None) or err  # a RayTaskError's cause: the task's own error
                raise PoolError(f"shard {task['shard_index']} failed: {type(cause).__name__}: {cause}") from err
            index = task["shard_index"]
            self.losses[index] = self.losses.get(index, 0) + 1
            if self.losses[index] > self.max_task_losses:
                raise PoolError(f"shard {index} was lost with its actor {self.losses[index]} times "
                                f"(max_task_losses={self.max_task_losses}); last: {str(err).splitlines()[0]}. "
                                f"Nodes keep failing under it: check their health; re-running resumes") from err
            if index not in done:
                queue.appendleft(task)
            if slot is not None and isinstance(err, ray.exceptions.RayActorError):
                for other in slot.tasks:  # their errors will come too; requeue once, here
                    _, t = self.in_flight.pop(other)
                    if t["shard_index"] not in done:
                        queue.appendleft(t)
                slot.tasks.clear()
                self._drop(sid, str(err))
            return
        if result["shard_index"] not in done:  # a task redrawn after a spurious loss comes back twice
            done.add(result["shard_index"])
            on_done(result)

    def _release_idle(self) -> None:
        """Every task is handed out: an actor with nothing to do frees its GPU/CPUs, so that a
        replacement for a lost actor finds room on the nodes that are left."""
        for sid, slot in list(self.slots.items()):
            if not slot.tasks and self.in_flight:
                self._drop(sid, "")

    def _no_actor_message(self, remaining: int) -> str:
        import ray

        try:
            got = ray.available_resources()
            free = (f"{got.get('CPU', 0):g} CPU, {got.get('GPU', 0):g} GPU, "
                    f"{got.get('memory', 0) / 2**30:.1f} GiB memory")
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        except Exception:  # noqa: BLE001 - the message must come out even if the GCS is gone
            free, nodes = "unknown", "unknown"
        return (f"no sampler actor could start within replacement_wait_s={self.wait_s:g} s "
                f"({remaining} shards left, {self.actors_lost} actors lost); each actor needs {self.needs} "
                f"and the cluster ({nodes} alive nodes) has free {free}. Add nodes, lower workers or "
                f"cpus_per_worker, or raise replacement_wait_s; re-running the same command resumes")
