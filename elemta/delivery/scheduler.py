"""The delivery scheduler: claims due recipients and runs their deliveries on a thread pool
and the delivery loop.

One scheduler thread claims work (a lease, see queue/work.py), the most urgent and oldest
first, and never more than the pool can start soon, so mail stays in the queue where
elemtactl can see it. New mail is claimed at once: the queue's writer wakes the scheduler
after each commit, other processes' commits (elemtactl flush, other workers) are noticed
through PRAGMA data_version within POLL seconds, and deferred mail when its time comes.

Each claimed message is routed (DNS lookups run on the pool, never in the scheduler thread),
its recipients are grouped by route, and each group is one delivery to one destination. A
destination (a set of MX hosts, a relayhost, an LMTP server) has a concurrency limit and an
optional start rate; a delivery over the limit waits in memory for a slot, holding its lease.
A delivery is steps (delivery/steps.py): it runs on a pool thread until it waits for a server,
then on the delivery loop (delivery/loop.py), which records it and starts the destination's
next one; what may block goes back to the pool. No network I/O happens inside a database
transaction.

Results are written by the queue's writer thread (WorkQueue.submit), which keeps one it cannot
write (a full disk) in memory and writes it again until it is, its recipients leased meanwhile;
the scheduler claims nothing more while too many wait (WorkQueue.backlogged). A delivery that
ends in an error of elemta's own gives its recipients back due in ERROR_RETRY seconds, and one
given back untried (a stop, no slot) goes back at once: neither waits for its lease to run out.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import random
import select
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from elemta import log as logmod
from elemta import metrics
from elemta.config import Config
from elemta.delivery import hooks
from elemta.delivery.attempt import Attempter, AttemptResult, Verdict
from elemta.delivery.dns import DnsError
from elemta.delivery.loop import DeliveryLoop, Task
from elemta.delivery.outcomes import Reporting, decide
from elemta.delivery.router import Route, Router
from elemta.delivery.steps import SLOW, Steps
from elemta.queue.jobs import Attempt, Job, Outcome, Recipient, Result
from elemta.queue.results import ERROR_RETRY
from elemta.queue.schedule import RetrySchedule
from elemta.queue.work import WorkQueue

POLL = 0.25  # seconds between looks at PRAGMA data_version
LEASE = 3600.0  # longer than any attempt; only a dead process's leases ever run out
INTERNAL_ERROR = "451 4.3.0 delivery ended in an internal error; tried again later"
HOUSEKEEPING = 60.0  # seconds between purges of finished messages
IDLE_SWEEP = 1.0  # seconds between looks for pooled connections gone idle (a poll() each)
PURGE_BATCH = 500  # messages deleted per transaction, keeping each write short
PURGE_BATCHES = 100  # at most 50,000 messages a minute


@dataclass
class Delivery:
    job: Job
    body: bytes
    route: Route
    recipients: list[Recipient]
    domain: str
    # Further recipients of the message for the same mailbox as one in `recipients` (kept id ->
    # them): not sent again, they share its verdict (issue 16, defect 9).
    duplicates: dict[int, list[Recipient]] = field(default_factory=dict)


@dataclass
class Destination:
    limit: int
    interval: float  # seconds between starts; 0 = no rate limit
    active: int = 0
    next_start: float = 0.0
    waiting: collections.deque = field(default_factory=collections.deque)


class Scheduler:
    def __init__(self, config: Config, work: WorkQueue, router: Router, attempter: Attempter,
                 reporting: Reporting, log: logmod.EventLog, *, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, plugins=None) -> None:
        d = config.delivery
        self.plugins = plugins  # plugins.manager.Manager (its delivery hooks), or None
        self.config = config
        self.work = work
        self.router = router
        self.attempter = attempter
        self.reporting = reporting
        self.log = log
        self.clock = clock
        self.rng = rng or random.Random()
        self.schedule = RetrySchedule.from_config(d)
        self.concurrency = d.concurrency
        self._pool = ThreadPoolExecutor(max_workers=d.concurrency, thread_name_prefix="delivery")
        self.loop = DeliveryLoop(self._offload, lambda exc: self.log.exception("delivery_error", error=exc))
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._wake = _Wake()
        self._stopping = False
        self._jobs = 0  # claimed messages not yet finished
        self._running = 0  # deliveries started and not finished: at most delivery.concurrency
        # The last look claimed less than it could have (no room, results unwritten): a finished
        # job wakes the scheduler then, and only then (each wake is a thread switch and a query).
        self._starved = False
        self._parts: dict[int, int] = {}  # id(job) -> its deliveries not yet finished
        self._dest: dict[tuple, Destination] = {}
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self.loop.start()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Something may be due now (new mail, an alias expanded)."""
        self._wake.set()

    def wake_on(self, fd: int) -> None:
        """Also wake when fd (the read end of the SMTP workers' wake pipe) has bytes: the
        scheduler thread waits on it itself, so a commit of new mail wakes no other thread."""
        self._wake.watch(fd)

    def stop(self, grace: float) -> bool:
        """Stop claiming; let running deliveries finish for `grace` seconds; give the rest back.

        Returns False if deliveries were still running at the deadline (their leases are
        recovered at the next start).
        """
        with self._lock:
            self._stopping = True
            waiting = [dl for dest in self._dest.values() for dl in dest.waiting]
            for dest in self._dest.values():
                dest.waiting.clear()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        for dl in waiting:
            self._give_back(dl)
        deadline = time.monotonic() + grace
        with self._lock:
            while self._jobs > 0 and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
            done = self._jobs == 0
        self.loop.stop()
        self._pool.shutdown(wait=done)
        self.attempter.pool.close_all()
        if done:  # else a delivery still running may use it; the process exit closes it
            self.attempter.close()
        self._wake.close()
        return done

    # -- the scheduler thread ---------------------------------------------------------

    def _run(self) -> None:
        last_housekeeping = last_idle_sweep = 0.0
        while True:
            with self._lock:
                if self._stopping:
                    return
                room = self.concurrency * 2 - self._jobs
                # Set with room, under one lock: a job that finishes in between sees it.
                self._starved = room <= 0 or self.work.backlogged()
                starved = self._starved
            try:
                if not starved:
                    self._claim(room)
                self._start_waiting()
                if time.monotonic() - last_housekeeping >= HOUSEKEEPING:
                    last_housekeeping = time.monotonic()
                    self._housekeeping()
                if time.monotonic() - last_idle_sweep >= IDLE_SWEEP:
                    last_idle_sweep = time.monotonic()
                    self.attempter.pool.close_idle()
                timeout = self._sleep_time()
            except Exception as exc:  # noqa: BLE001 -- a database hiccup must not end delivery
                self.log("scheduler_error", level=logmod.ERROR, error=str(exc)[:200])
                timeout = 1.0
            if not self._wake.wait(timeout) and self.work.changed():
                continue

    def _claim(self, room: int) -> None:
        jobs = self.work.claim(limit=room, lease=LEASE)
        if not jobs:
            return
        with self._lock:
            self._jobs += len(jobs)
        for job in jobs:
            if all(self.router.answers_now(r.address) for r in job.recipients):
                self._guard(self._route_job, job, False)  # no DNS to wait for: routed here
            else:
                self._pool.submit(self._guard, self._route_job, job)
        if len(jobs) >= room:
            self._wake.set()  # there may be more: look again after this batch starts

    def _sleep_time(self) -> float:
        """Until the next poll, the next due recipient, or the next rate-limited start."""
        now = self.clock()
        wake = now + POLL
        due = self.work.next_due()
        if due is not None:
            wake = min(wake, due)
        with self._lock:
            for dest in self._dest.values():
                if dest.waiting and dest.next_start > now:
                    wake = min(wake, dest.next_start)
        return max(0.0, wake - now)

    def _housekeeping(self) -> None:
        recovered = self.work.recover_expired()
        if recovered:
            self.log("recovered", recipients=recovered, level=logmod.WARNING)
        purged = 0
        for _ in range(PURGE_BATCHES):  # bounded, so a huge backlog cannot stall the scheduler
            count = self.work.purge(self.config.delivery.retention, limit=PURGE_BATCH)
            purged += count
            if count < PURGE_BATCH:
                break
        if purged:
            self.log("purged", messages=purged)
        if self.attempter.tls_reports is not None:
            self.attempter.tls_reports.housekeeping()  # writes the counts; sends the days that are over
        with self._lock:  # forget idle destinations so the table stays small
            for key in [k for k, d in self._dest.items() if not d.active and not d.waiting]:
                del self._dest[key]

    # -- on the pool -------------------------------------------------------------------

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # logged; the recipients were given back (_after_error)
            self.log.exception("delivery_error", task=getattr(fn, "__name__", "?"))

    def _route_job(self, job: Job, on_pool: bool = True) -> None:
        """Route each recipient; settle those that need no connection; dispatch the rest (on a
        pool thread, the first of them runs on here)."""
        try:
            groups = self._route(job)
        except Exception:
            # Nothing was sent: the recipients are due again soon, not when the lease ends.
            # (Those already settled by _route are no longer this lease's: left alone.)
            self._after_error(job, job.recipients)
            self._job_done(job)
            raise
        if not groups:
            self._job_done(job)
            return
        with self._lock:
            self._parts[id(job)] = len(groups)
        inline = None
        for dl in groups:
            if self._dispatch(dl, inline_ok=on_pool and inline is None):
                inline = dl
        if inline is not None:
            # This thread is free now: deliver here rather than hand the work to another thread.
            self._deliver(inline)

    def _route(self, job: Job) -> list[Delivery]:
        if self._stopping:
            self.work.give_back(job.queue_id, job.recipients)
            return []
        body = self.work.body(job.queue_id)
        if body is None:  # deleted (elemtactl) after the claim
            return []
        groups: dict[Route, list[Recipient]] = {}
        verdicts: list[Verdict] = []
        expansions: list[tuple[Recipient, tuple[str, ...]]] = []
        result = Result()
        now = self.clock()
        for r in job.recipients:
            try:
                route = self.router.route(r.address, expand=r.parent is None)
            except DnsError as exc:
                verdicts.append(Verdict(r, "permanent" if exc.permanent else "transient", exc.text,
                                        exc.enhanced))
                result.attempts.append(Attempt(r.id, now, "failed" if exc.permanent else "deferred", exc.text))
                continue
            if route.kind == "expand":
                expansions.append((r, route.targets))
            elif route.kind == "hold":
                result.outcomes.append(Outcome(r.id, "held", "held by transport map"))
            elif route.kind == "discard":
                result.outcomes.append(Outcome(r.id, "delivered", "discarded by transport map"))
                result.attempts.append(Attempt(r.id, now, "discarded", "discarded by transport map"))
                self.log("discarded", qid=job.queue_id, rcpt=f"<{r.address}>")
            elif route.kind == "error":
                permanent = route.status.startswith("5")
                verdicts.append(Verdict(r, "permanent" if permanent else "transient", f"{route.status} {route.text}",
                                        route.status))
                result.attempts.append(Attempt(r.id, now, "failed" if permanent else "deferred", route.text))
            else:
                groups.setdefault(route, []).append(r)
        if expansions:
            # The targets and the message's other final recipients are given back to the queue
            # in one transaction, so the next claim takes them together and a mailbox reached
            # twice is sent one copy (_one_copy); delivering the others now would race with
            # the targets' delivery. It costs one claim, and no attempt is counted.
            give_back = [r for rcpts in groups.values() for r in rcpts]
            self.work.expand_all(job.queue_id, expansions, job.priority, give_back)
            groups = {}
            for r, targets in expansions:
                self.log("expanded", qid=job.queue_id, rcpt=f"<{r.address}>", to=",".join(targets))
            self.wake()
        if verdicts or result.outcomes:
            self._record(job, body, AttemptResult(verdicts, result.attempts), extra=result.outcomes)
        if any(r.parent is not None for rcpts in groups.values() for r in rcpts):
            groups = self._drop_delivered(job, body, groups)
        return [self._one_copy(job, body, route, rcpts) for route, rcpts in groups.items()]

    def _drop_delivered(self, job: Job, body: bytes, groups: dict[Route, list[Recipient]]) -> dict:
        """Alias targets whose mailbox already got this message (another alias, or the address
        itself, was delivered in an earlier round): recorded as delivered, not sent again."""
        key = self.router.recipients.key
        done = {key(address): (rid, address) for rid, address in self.work.delivered_mailboxes(job.queue_id)}
        if not done:
            return groups
        left: dict[Route, list[Recipient]] = {}
        for route, rcpts in groups.items():
            verdicts, attempts = [], []
            for r in rcpts:
                first = done.get(key(r.address))
                if first is None or first[0] == r.id:
                    left.setdefault(route, []).append(r)
                    continue
                reply = f"250 2.0.0 same mailbox as <{first[1]}>, already delivered"
                verdicts.append(Verdict(r, "ok", reply, "2.0.0"))
                attempts.append(Attempt(r.id, self.clock(), "duplicate", reply))
                self.log("duplicate", qid=job.queue_id, rcpt=f"<{r.address}>", same_as=f"<{first[1]}>")
            if verdicts:
                self._record(job, body, AttemptResult(verdicts, attempts), final_hop=route.kind in ("lmtp", "maildir"))
        return left

    def _one_copy(self, job: Job, body: bytes, route: Route, rcpts: list[Recipient]) -> Delivery:
        """One delivery for the group, each mailbox once (as Postfix drops duplicate recipients).

        Several aliases of one mailbox (postmaster, abuse -> alice), or one address given twice
        at RCPT in another case (Alice@, alice@), become several final recipients of the message.
        The first is delivered; the others are kept as recipients (so `queue show` and `trace`
        still account for every address the sender used) and take its verdict, each with its
        own NOTIFY and ORCPT, so a DSN reports every original recipient truthfully.
        """
        kept: dict[str, Recipient] = {}
        duplicates: dict[int, list[Recipient]] = {}
        for r in rcpts:
            first = kept.setdefault(self.router.recipients.key(r.address), r)
            if first is not r:
                duplicates.setdefault(first.id, []).append(r)
                self.log("duplicate", qid=job.queue_id, rcpt=f"<{r.address}>", same_as=f"<{first.address}>")
        return Delivery(job, body, route, list(kept.values()), rcpts[0].domain, duplicates)

    def _dispatch(self, dl: Delivery, inline_ok: bool = False) -> bool:
        """Start dl (or queue it for its destination); True = the caller must run it itself."""
        d = self.config.delivery
        key = dl.route.destination
        with self._lock:
            if self._stopping:
                start = False
            else:
                dest = self._dest.get(key)
                if dest is None:
                    limit = int(d.domain_concurrency.get(dl.domain, d.destination_concurrency))
                    rate = d.domain_rate.get(dl.domain, d.destination_rate)
                    dest = self._dest[key] = Destination(limit, 1.0 / rate if rate else 0.0)
                start = self._may_start(dest)
                if not start:
                    dest.waiting.append(dl)
                    return False
        if not start:
            self._give_back(dl)
            return False
        if inline_ok:
            return True
        self.loop.call(self._task(dl))
        return False

    def _may_start(self, dest: Destination) -> bool:
        """Under the lock: take a slot if the limits and the rate allow it."""
        now = self.clock()
        if (dest.active >= dest.limit or self._running >= self.concurrency
                or (dest.interval and now < dest.next_start)):
            return False
        dest.active += 1
        self._running += 1
        if dest.interval:
            dest.next_start = max(now, dest.next_start) + dest.interval
        return True

    def _start_waiting(self, here: tuple | None = None) -> Delivery | None:
        """Start the deliveries whose destination has a slot now, each on the pool; with `here`
        (a pool thread whose delivery to that destination just ended), the first of that
        destination's is returned instead, for the caller to run itself."""
        ready = []
        with self._lock:
            # One start per destination and pass, and a destination that started one goes to
            # the end of the table: when delivery.concurrency is what holds mail back, the
            # destinations take turns instead of the oldest taking every free slot.
            started = True
            while started:
                started = False
                for key, dest in list(self._dest.items()):
                    if dest.waiting and self._may_start(dest):
                        ready.append(dest.waiting.popleft())
                        self._dest[key] = self._dest.pop(key)
                        started = True
        mine = None
        if here is not None:
            mine = next((dl for dl in ready if dl.route.destination == here), None)
        for dl in ready:
            if dl is not mine:
                self.loop.call(self._task(dl))
        return mine

    def _offload(self, fn: Callable[[], None]) -> None:
        """The loop's SLOW: fn on the pool."""
        try:
            self._pool.submit(self._guard, fn)
        except RuntimeError:  # the pool is shut down (a stop past its grace): the lease brings it back
            pass

    def _deliver(self, dl: Delivery) -> None:
        """Run dl here until it waits for a server; the loop has it then."""
        self.loop.run(self._task(dl))

    def _task(self, dl: Delivery) -> Task:
        """dl as the loop's task.  When it ends, its slot is free, and the next delivery waiting
        for the same destination runs on the thread that ended it (_start_waiting): draining a
        backlog to one destination costs no hand-off to another thread, and the connection
        this one just pooled is the one the next takes."""
        key = dl.route.destination

        def done(_value: object, error: BaseException | None) -> Task | None:
            if error is not None:  # logged; the recipients were given back (_after_error)
                self.log.exception("delivery_error", qid=dl.job.queue_id, error=error, task="_deliver")
            with self._lock:
                self._running -= 1
                dest = self._dest.get(key)
                if dest is not None:
                    dest.active -= 1
            self._part_done(dl.job)
            following = self._start_waiting(here=key)
            return self._task(following) if following is not None else None

        return Task(self._attempt(dl), done)

    def _attempt(self, dl: Delivery) -> Steps[None]:
        plugins = self.plugins
        if self._stopping:  # untried: due again at once (its task's end counts it done)
            self.work.give_back(dl.job.queue_id, _everyone(dl))
            return
        if plugins is not None and plugins.wants("on_pre_delivery"):
            yield SLOW  # a plugin may ask the network
        try:
            instead = hooks.pre_delivery(plugins, dl, self.clock())
            if instead is None:
                outcome = yield from self.attempter.steps(dl.job, dl.body, dl.recipients, dl.route)
        except Exception:  # no verdict: due again soon (ERROR_RETRY)
            self._after_error(dl.job, _everyone(dl))
            raise
        if instead is not None:
            outcome, extra, action = instead
            self.log("plugin_verdict", qid=dl.job.queue_id, hook="on_pre_delivery", verdict=action,
                     nrcpt=len(dl.recipients))
            merged, extra = _merged(dl, outcome, extra, self.clock())
            self._record(dl.job, dl.body, merged, extra=extra)
            return
        merged, _ = _merged(dl, outcome, [], self.clock())
        self._record(dl.job, dl.body, merged, final_hop=dl.route.kind == "lmtp" or dl.route.kind == "maildir",
                     route=dl.route)
        if plugins is not None and (plugins.wants("on_delivery_success") or plugins.wants("on_delivery_failure")):
            yield SLOW
            hooks.notices(plugins, dl, outcome)

    def _record(self, job: Job, body: bytes, outcome: AttemptResult, *, final_hop: bool = False,
                extra: list[Outcome] | None = None, route: Route | None = None) -> None:
        now = self.clock()
        try:
            result = decide(job, outcome.verdicts, outcome.attempts, schedule=self.schedule,
                            reporting=self.reporting, now=now, final_hop=final_hop, body=body, rng=self.rng)
        except Exception:
            # The remote has answered: what it took is recorded as delivered whatever else fails.
            self._after_error(job, [v.recipient for v in outcome.verdicts if v.status != "ok"],
                              delivered=[v for v in outcome.verdicts if v.status == "ok"])
            raise
        result.outcomes.extend(extra or ())
        self.work.submit(job.queue_id, result, self.wake if result.reports else None)
        destination = metrics.destination(route.describe() if route is not None else "none")
        for v, o in zip(outcome.verdicts, result.outcomes, strict=False):
            self.log(o.state, qid=job.queue_id, rcpt=f"<{v.recipient.address}>", relay=v.host or "-",
                     reply=v.reply[:200], level=logmod.INFO if o.state != "failed" else logmod.WARNING)
            metrics.DELIVERY_ATTEMPTS.labels(o.state, destination).inc()
            if o.state == "delivered":
                metrics.DELIVERY_DELAY.observe(max(0.0, now - job.created))
        addresses = {r.id: r.address for r in job.recipients}
        for o in extra or ():
            if o.state == "held":
                self.log("held", qid=job.queue_id, rcpt=f"<{addresses.get(o.recipient_id, '?')}>", reply=o.error)

    def _give_back(self, dl: Delivery) -> None:
        self.work.give_back(dl.job.queue_id, _everyone(dl))
        self._part_done(dl.job)

    def _after_error(self, job: Job, recipients, delivered: Sequence[Verdict] = ()) -> None:
        """A delivery ended in an error of elemta's own (a bug, a database error while routing):
        its recipients are due again in ERROR_RETRY seconds (no attempt counted), not
        when their hour-long lease runs out; those in `delivered` (the remote took them) are
        recorded as delivered. Written like any result: kept and retried if the write fails."""
        now = self.clock()
        result = Result()
        for v in delivered:
            result.outcomes.append(Outcome(v.recipient.id, "delivered", v.reply, counted=v.recipient.counted))
            result.attempts.append(Attempt(v.recipient.id, now, "delivered", v.reply, host=v.host))
        for r in recipients:
            result.outcomes.append(Outcome(r.id, "deferred", INTERNAL_ERROR, next_attempt=now + ERROR_RETRY,
                                                counted=False))
            result.attempts.append(Attempt(r.id, now, "deferred", INTERNAL_ERROR))
        self.work.submit(job.queue_id, result, self.wake)

    def _part_done(self, job: Job) -> None:
        with self._lock:
            left = self._parts.get(id(job), 1) - 1
            if left > 0:
                self._parts[id(job)] = left
                return
            self._parts.pop(id(job), None)
        self._job_done(job)

    def _job_done(self, job: Job) -> None:
        with self._lock:
            self._jobs -= 1
            self._idle.notify_all()
            starved, self._starved = self._starved, False
        if starved:
            self._wake.set()


class _Wake:
    """The scheduler thread's sleep: until set() from any thread, a watched pipe has bytes, or a
    timeout.  What woke it is read away, so the next wait sleeps again (threading.Event's
    set, wait and clear in one)."""

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()  # set() against close(): a closed number may be reused
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    def watch(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._poll.register(fd, select.POLLIN)

    def set(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.eventfd_write(self._fd, 1)

    def wait(self, timeout: float) -> bool:
        ready = self._poll.poll(timeout * 1000)
        for fd, _ in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(fd, 4096):  # an eventfd's counter, or the pipe's bytes
                    pass
        return bool(ready)

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)
            self._fd = -1


def _everyone(dl: Delivery) -> list[Recipient]:
    """The delivery's recipients and their duplicates."""
    return [*dl.recipients, *(d for dups in dl.duplicates.values() for d in dups)]


def _merged(dl: Delivery, outcome: AttemptResult, extra: list[Outcome],
            now: float) -> tuple[AttemptResult, list[Outcome]]:
    """The outcome with each duplicate given the verdict of the recipient it duplicates.

    Its attempt record says so ("duplicate"), so `queue trace` shows it was not sent twice.
    """
    if not dl.duplicates:
        return outcome, extra
    verdicts, attempts, more = list(outcome.verdicts), list(outcome.attempts), list(extra)
    for v in outcome.verdicts:
        for dup in dl.duplicates.get(v.recipient.id, ()):
            verdicts.append(dataclasses.replace(v, recipient=dup))
            attempts.append(Attempt(dup.id, _ended_at(outcome, v.recipient.id, now), "duplicate",
                                    f"same mailbox as <{v.recipient.address}>, sent once: {v.reply}"))
    for o in extra:
        for dup in dl.duplicates.get(o.recipient_id, ()):
            more.append(dataclasses.replace(o, recipient_id=dup.id))
            attempts.append(Attempt(dup.id, _ended_at(outcome, o.recipient_id, now), "duplicate",
                                    f"same mailbox as recipient {o.recipient_id}: {o.error}"))
    return AttemptResult(verdicts, attempts), more


def _ended_at(outcome: AttemptResult, recipient_id: int, now: float) -> float:
    """When the recipient's own attempt ended (its last record), for its duplicates' records."""
    times = [a.at for a in outcome.attempts if a.recipient_id == recipient_id]
    return max(times) if times else now
