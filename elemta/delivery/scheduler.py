"""The delivery scheduler: claims due recipients and runs their deliveries on a thread pool
and the delivery loop.

One scheduler thread claims work (a lease, see queue/work.py), the most urgent and oldest
first, and never more than the pool can start soon, so mail stays in the queue where
elemtactl can see it. New mail is claimed at once: the queue's writer wakes the scheduler
after each commit, other processes' commits (elemtactl flush, other workers) are noticed
by the claim each pass makes, at least every POLL seconds, and deferred mail when its time comes.

Each claimed message is routed (DNS lookups run on the pool, never in the scheduler thread),
its recipients are grouped by route (grouping.py), and each group is one delivery to one
destination, whose verdicts recorder.py writes to the queue. A
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
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from elemta import log as logmod
from elemta.config import Config
from elemta.delivery import hooks
from elemta.delivery.attempt import Attempter
from elemta.delivery.grouping import Delivery, Grouping, everyone, merged
from elemta.delivery.loop import DeliveryLoop, Task
from elemta.delivery.outcomes import Reporting
from elemta.delivery.recorder import Recorder
from elemta.delivery.router import Router
from elemta.delivery.steps import SLOW, Steps
from elemta.delivery.wake import Wake
from elemta.queue.jobs import Job
from elemta.queue.schedule import RetrySchedule
from elemta.queue.work import WorkQueue

POLL = 0.25  # the longest sleep between two passes (claims)
# Seconds between the starts of two passes of the scheduler thread (claims). Relay at 8,000
# messages, two sets of alternating runs: the delivery process's CPU per message 0.55 -> 0.53
# and 0.55 -> 0.48 ms (bench/RESULTS.md, tenth session).
CLAIM_SPACING = 0.01
LEASE = 3600.0  # longer than any attempt; only a dead process's leases ever run out
HOUSEKEEPING = 60.0  # seconds between purges of finished messages
IDLE_SWEEP = 1.0  # seconds between looks for pooled connections gone idle (a poll() each)
PURGE_BATCH = 500  # messages deleted per transaction, keeping each write short
PURGE_BATCHES = 100  # at most 50,000 messages a minute


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
        self.log = log
        self.clock = clock
        self.recorder = Recorder(work, RetrySchedule.from_config(d), reporting, log, clock, rng or random.Random(),
                                 self.wake)
        self.grouping = Grouping(work, router, self.recorder, log, clock, self.wake)
        self.concurrency = d.concurrency
        self._pool = ThreadPoolExecutor(max_workers=d.concurrency, thread_name_prefix="delivery")
        self.loop = DeliveryLoop(self._offload, lambda exc: self.log.exception("delivery_error", error=exc))
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._wake = Wake()
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
            began = time.monotonic()
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
            self._wake.wait(timeout)
            # A wake-up comes with nearly every commit of new mail; a claim per commit was a
            # write transaction and a thread switch for one or two recipients. Passes at most
            # CLAIM_SPACING apart take what came meanwhile in one claim, and a message arriving
            # at an idle scheduler is still claimed at once.
            rest = began + CLAIM_SPACING - time.monotonic()
            if rest > 0 and not self._stopping:
                time.sleep(rest)

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
        except Exception:  # logged; the recipients were given back (Recorder.after_error)
            self.log.exception("delivery_error", task=getattr(fn, "__name__", "?"))

    def _route_job(self, job: Job, on_pool: bool = True) -> None:
        """Route each recipient; settle those that need no connection; dispatch the rest (on a
        pool thread, the first of them runs on here)."""
        try:
            if self._stopping:
                self.work.give_back(job.queue_id, job.recipients)
                groups = []
            else:
                groups = self.grouping.split(job)
        except Exception:
            # Nothing was sent: the recipients are due again soon, not when the lease ends.
            # (Those already settled by split() are no longer this lease's: left alone.)
            self.recorder.after_error(job, job.recipients)
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
            if error is not None:  # logged; the recipients were given back (Recorder.after_error)
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
            self.work.give_back(dl.job.queue_id, everyone(dl))
            return
        if plugins is not None and plugins.wants("on_pre_delivery"):
            yield SLOW  # a plugin may ask the network
        try:
            instead = hooks.pre_delivery(plugins, dl, self.clock())
            if instead is None:
                outcome = yield from self.attempter.steps(dl.job, dl.body, dl.recipients, dl.route)
        except Exception:  # no verdict: due again soon (ERROR_RETRY)
            self.recorder.after_error(dl.job, everyone(dl))
            raise
        if instead is not None:
            outcome, extra, action = instead
            self.log("plugin_verdict", qid=dl.job.queue_id, hook="on_pre_delivery", verdict=action,
                     nrcpt=len(dl.recipients))
            result, extra = merged(dl, outcome, extra, self.clock())
            self.recorder.record(dl.job, dl.body, result, extra=extra)
            return
        result, _ = merged(dl, outcome, [], self.clock())
        self.recorder.record(dl.job, dl.body, result, final_hop=dl.route.kind == "lmtp" or dl.route.kind == "maildir",
                             route=dl.route)
        if plugins is not None and (plugins.wants("on_delivery_success") or plugins.wants("on_delivery_failure")):
            yield SLOW
            hooks.notices(plugins, dl, outcome)

    def _give_back(self, dl: Delivery) -> None:
        self.work.give_back(dl.job.queue_id, everyone(dl))
        self._part_done(dl.job)

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
