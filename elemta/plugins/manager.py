"""Loads the configured plugins, calls their hooks in order, and keeps each one's failures to
itself.

Isolation: a plugin with a timeout runs in a pool thread while the caller waits at most that
long.  A plugin that raises, overruns or returns something that is not a Verdict counts as
failed: fail-open plugins are skipped, fail-closed ones turn into 451 4.3.0 (RFC 3463: "other
or undefined mail system status").  A hung call keeps its thread (Python cannot stop one), so
each plugin has a cap on calls in flight: once a hung plugin has used its share, further calls
to it fail at once instead of piling up threads.  A plugin with timeout 0 runs in the caller's
thread: cheapest, but a hang there hangs the session; only for plugins that do no I/O or
whose every wait has a limit of its own, as the built-ins' have (their default_timeout is 0).

The consecutive isolated plugins of one hook run as one job in one pool thread, so a hook
costs one thread handoff whatever the number of plugins; the caller watches the job's progress
and takes over from the plugin after one that overran.
"""

from __future__ import annotations

import importlib
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from elemta import metrics
from elemta.config import PluginSpec
from elemta.errors import ConfigError
from elemta.plugins import api

BUILTINS = {
    "ratelimit": "elemta.plugins.builtin.ratelimit:RatelimitPlugin",
    "greylist": "elemta.plugins.builtin.greylist:GreylistPlugin",
    "dnsbl": "elemta.plugins.builtin.dnsbl:DnsblPlugin",
    "spf": "elemta.plugins.builtin.spf:SpfPlugin",
    "dkim": "elemta.plugins.builtin.dkim:DkimPlugin",
    "dmarc": "elemta.plugins.builtin.dmarc:DmarcPlugin",
}
ENTRY_POINT_GROUP = "elemta.plugins"

# What each hook may decide (anything else counts as a plugin error).
_CONNECTION_ACTIONS = frozenset({"continue", "accept", "reject", "defer"})
_ALL_ACTIONS = frozenset(api.ACTIONS)
ALLOWED_ACTIONS = {
    "on_connect": _CONNECTION_ACTIONS, "on_helo": _CONNECTION_ACTIONS, "on_auth": _CONNECTION_ACTIONS,
    "on_mail_from": _ALL_ACTIONS, "on_rcpt_to": _ALL_ACTIONS, "on_data": _ALL_ACTIONS,
    "on_message": _ALL_ACTIONS, "on_pre_delivery": _ALL_ACTIONS,
}
FAIL_CLOSED = api.defer(451, "4.3.0", "Temporary local problem, please try again later")


@dataclass
class HookResult:
    """What the plugins of one hook decided together.

    verdict is the first final verdict (or CONTINUE); plugin names who gave it.  Headers, auth
    results and the priority of every plugin that ran are gathered in order.
    """

    verdict: api.Verdict = api.CONTINUE
    plugin: str = ""
    add_headers: list[tuple[str, str]] = field(default_factory=list)
    remove_headers: list[str] = field(default_factory=list)
    auth_results: list[str] = field(default_factory=list)
    priority: str | None = None

    @property
    def action(self) -> str:
        return self.verdict.action

    def take(self, name: str, verdict: api.Verdict, ctx: api.Context) -> None:
        self.add_headers += verdict.add_headers
        self.remove_headers += verdict.remove_headers
        self.auth_results += verdict.auth_results
        ctx.auth_results += verdict.auth_results  # later plugins of the message read them
        if verdict.priority is not None:
            self.priority = verdict.priority
        if verdict.final and not self.verdict.final:
            self.verdict, self.plugin = verdict, name


NOTHING = HookResult()  # for hooks no plugin has; never changed


class HookStats:
    __slots__ = ("calls", "errors", "max_seconds", "seconds", "timeouts", "verdicts")

    def __init__(self):
        self.calls = self.errors = self.timeouts = 0
        self.seconds = self.max_seconds = 0.0
        self.verdicts: Counter = Counter()

    def as_dict(self) -> dict:
        return {"calls": self.calls, "errors": self.errors, "timeouts": self.timeouts,
                "seconds": round(self.seconds, 6), "max_seconds": round(self.max_seconds, 6),
                "verdicts": dict(self.verdicts)}


class Loaded:
    """One configured plugin: its instance, settings, statistics and calls in flight."""

    def __init__(self, spec: PluginSpec, plugin: api.Plugin):
        self.spec = spec
        self.name = spec.name
        self.plugin = plugin
        self.hooks = tuple(h for h in api.HOOKS if callable(getattr(plugin, h, None)))
        # config's timeout, else the class's: 30 s, or 0 (inline) for a plugin whose waits all
        # have limits of their own (the built-ins: DNS lifetime, SQLite busy timeout).
        self.timeout = spec.timeout if spec.timeout is not None else float(type(plugin).default_timeout)
        self.isolated = self.timeout > 0  # runs in a pool thread (else in the caller's)
        self.in_flight = 0  # calls running now, at most spec.max_concurrency
        self.lock = threading.Lock()  # a plain lock, not a semaphore: it is taken on every call
        self.stats = {hook: HookStats() for hook in self.hooks}
        self.last_error = ""
        self.health_call: _HealthCall | None = None  # the last health() asked (stats())


    def enter(self) -> bool:
        """Take a call slot; False if all spec.max_concurrency are in use."""
        with self.lock:
            if self.in_flight >= self.spec.max_concurrency:
                return False
            self.in_flight += 1
            return True

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def record(self, hook: str, seconds: float, action: str | None, error: str = "", timeout: bool = False):
        with self.lock:
            s = self.stats[hook]
            s.calls += 1
            s.seconds += seconds
            s.max_seconds = max(s.max_seconds, seconds)
            if timeout:
                s.timeouts += 1
            elif error:
                s.errors += 1
            if action is not None:
                s.verdicts[action] += 1
            if error:
                self.last_error = error
        # Names from the configuration, hooks and actions from fixed sets: bounded labels.
        metrics.PLUGIN_CALLS.labels(self.name, hook, action or "none").inc()
        metrics.PLUGIN_SECONDS.labels(self.name).observe(seconds)
        if timeout or error:
            metrics.PLUGIN_ERRORS.labels(self.name, "timeout" if timeout else "error").inc()


def load_class(use: str) -> type[api.Plugin]:
    """A plugin class from a built-in name, "package.module:Class", or an entry point name."""
    target = BUILTINS.get(use, use)
    if ":" not in target:
        target = _entry_point(use)
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"plugin {use!r}: cannot import {module_name}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, api.Plugin)):
        raise ConfigError(f"plugin {use!r}: {target} is not a subclass of elemta.plugins.api.Plugin")
    return cls


def _entry_point(use: str) -> str:
    from importlib.metadata import entry_points
    for ep in entry_points(group=ENTRY_POINT_GROUP):  # the group= form: Python 3.10 on
        if ep.name == use:
            return ep.value
    raise ConfigError(f"plugin {use!r}: not a built-in ({', '.join(BUILTINS)}), "
                      f"not module:Class, and no {ENTRY_POINT_GROUP} entry point has that name")


def checked_options(where: str, defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """defaults updated by given; each value of the type of its default (int for a float)."""
    merged = dict(defaults)
    for key, value in given.items():
        if key not in defaults:
            allowed = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(f"{where}.{key}: unknown option (allowed: {allowed})")
        default = defaults[key]
        ok = type(value) is type(default) or (isinstance(default, float) and type(value) is int)
        if default is None:
            ok = True
        if not ok:
            raise ConfigError(f"{where}.{key}: expected {type(default).__name__}, got {type(value).__name__}")
        merged[key] = float(value) if isinstance(default, float) else value
    return merged


class Manager:
    def __init__(self, specs: tuple[PluginSpec, ...] = (), *, clock=time.monotonic):
        self._clock = clock
        self.health_timeout = 1.0  # seconds stats() waits for one plugin's health()
        self.plugins: list[Loaded] = []
        for index, spec in enumerate(specs):
            if not spec.enabled:
                continue
            where = f"plugins[{index}].options"
            cls = load_class(spec.use)
            plugin = cls(spec.name)
            try:
                plugin.configure(checked_options(where, cls.options, spec.options))
            except api.PluginError as exc:
                raise ConfigError(f"{where}.{exc}") from None
            self.plugins.append(Loaded(spec, plugin))
        self._by_hook = {hook: [p for p in self.plugins if hook in p.hooks] for hook in api.HOOKS}
        self._pool = _Pool()
        self._started: list[Loaded] = []

    # -- life cycle --------------------------------------------------------------------------

    def start(self, services: api.Services) -> None:
        for loaded in self.plugins:
            try:
                loaded.plugin.start(services)
            except api.PluginError as exc:
                self.stop()
                raise ConfigError(f"plugin {loaded.name}: {exc}") from None
            self._started.append(loaded)

    def stop(self) -> None:
        for loaded in reversed(self._started):
            try:
                loaded.plugin.stop()
            except Exception:  # noqa: BLE001 - a broken stop must not stop the others
                loaded.last_error = "stop() failed"
        self._started = []
        self._pool.close()

    # -- calling -----------------------------------------------------------------------------

    def wants(self, hook: str) -> bool:
        return bool(self._by_hook[hook])

    def run(self, hook: str, ctx: api.Context) -> HookResult:
        """Call hook on every plugin that has it, in config order, until one decides."""
        plugins = self._by_hook[hook]
        if not plugins:
            return NOTHING
        outcome = HookResult()
        i = 0
        while i < len(plugins) and not outcome.verdict.final:
            if not plugins[i].isolated:
                self._call(plugins[i], hook, ctx, outcome, None)
                i += 1
                continue
            j = i
            while j < len(plugins) and plugins[j].isolated:
                j += 1
            i = self._run_job(_Job(self, hook, ctx, plugins[i:j], outcome)) + i
        return outcome

    def _run_job(self, job: _Job) -> int:
        """Run job's plugins in a pool thread; return how many of them are done with."""
        self._pool.submit(job.run)
        while True:
            with job.lock:
                if job.finished:
                    return job.index
                loaded, began = job.plugins[job.index], job.began
            # Measured from when the plugin began, or from now while the job waits for a thread.
            left = loaded.timeout - (self._clock() - began) if began else loaded.timeout
            if job.done.wait(max(left, 0)):
                continue
            with job.lock:
                if job.finished or job.plugins[job.index] is not loaded or (began and job.began != began):
                    continue  # it moved on meanwhile
                if began is None and job.began is None:
                    job.began = self._clock()  # the thread only just started it; give it its time
                    continue
                job.abandoned = True
                self._settle(loaded, job.hook, job.ctx, job.outcome, None, "timeout",
                             loaded.timeout, timeout=True)
                return job.index + 1

    def _call(self, loaded: Loaded, hook: str, ctx: api.Context, outcome: HookResult, job: _Job | None) -> None:
        """Call one plugin's hook and settle its result into outcome (under the job's lock
        when it runs in a job, so that a caller who gave up on it never sees it land)."""
        if not loaded.enter():
            # Its calls in flight are all stuck: fail now rather than queue behind them.
            verdict, error, seconds, timeout = None, "too many calls in flight", 0.0, True
        else:
            began, timeout = self._clock(), False
            token = api.CURRENT_QID.set(api.queue_id_of(ctx))  # for the plugin's log lines
            try:
                verdict = getattr(loaded.plugin, hook)(ctx)
                error = "" if verdict is None else _verdict_error(hook, verdict)
            except Exception as exc:  # noqa: BLE001 - isolation is the point
                verdict, error = None, f"{type(exc).__name__}: {exc}"[:200]
            finally:
                api.CURRENT_QID.reset(token)
                loaded.leave()
            seconds = self._clock() - began
        if job is None:
            self._settle(loaded, hook, ctx, outcome, verdict, error, seconds, timeout)
            return
        with job.lock:
            if not job.abandoned:  # else the caller counted a timeout and went on without us
                self._settle(loaded, hook, ctx, outcome, verdict, error, seconds, timeout)
                job.index += 1
                job.began = None

    def _settle(self, loaded, hook, ctx, outcome, verdict, error, seconds, timeout=False) -> None:
        if error:
            closed = loaded.spec.fail_closed and hook in ALLOWED_ACTIONS
            loaded.record(hook, seconds, FAIL_CLOSED.action if closed else None, error, timeout)
            if closed:
                outcome.take(loaded.name, FAIL_CLOSED, ctx)
            return
        if verdict is None:  # no opinion: nothing to take
            loaded.record(hook, seconds, "continue")
            return
        loaded.record(hook, seconds, verdict.action)
        if hook in ALLOWED_ACTIONS:
            outcome.take(loaded.name, verdict, ctx)

    # -- reporting ---------------------------------------------------------------------------

    def stats(self) -> list[dict]:
        out = []
        for loaded in self.plugins:
            with loaded.lock:
                hooks = {hook: s.as_dict() for hook, s in loaded.stats.items()}
                last_error = loaded.last_error
            problem = self._health(loaded)
            out.append({
                "name": loaded.name, "use": loaded.spec.use, "timeout": loaded.timeout,
                "fail_closed": loaded.spec.fail_closed, "health": problem or "ok",
                "last_error": last_error, "hooks": hooks,
            })
        return out


    def _health(self, loaded: Loaded) -> str | None:
        """The plugin's health(), asked in a pool thread and waited for at most health_timeout:
        the daemon's main loop writes these statistics, and a stuck health() must not stall it.
        While one call is stuck no other is started."""
        with loaded.lock:
            call = loaded.health_call
            if call is not None and not call.done.is_set():
                return f"health() has not answered for {self._clock() - call.began:.0f} s"
            call = loaded.health_call = _HealthCall(loaded.plugin, self._clock())
        self._pool.submit(call.run)
        if call.done.wait(self.health_timeout):
            return call.problem
        return f"health() did not answer within {self.health_timeout:g} s"


class _HealthCall:
    def __init__(self, plugin: api.Plugin, began: float):
        self.plugin, self.began = plugin, began
        self.problem: str | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.problem = self.plugin.health()
        except Exception as exc:  # noqa: BLE001 - isolation is the point
            self.problem = f"health() failed: {type(exc).__name__}"
        finally:
            self.done.set()


def _verdict_error(hook: str, verdict: Any) -> str:
    if verdict is None:
        return ""
    if not isinstance(verdict, api.Verdict):
        return f"returned {type(verdict).__name__}, not a Verdict"
    allowed = ALLOWED_ACTIONS.get(hook)
    if allowed is not None and verdict.action not in allowed:
        return f"{verdict.action} is not a verdict {hook} may give"
    if (verdict.add_headers and hook not in api.MESSAGE_HOOKS) or (verdict.remove_headers and hook != "on_message"):
        return f"{hook} cannot change headers"
    return ""


class _Job:
    """Consecutive isolated plugins of one hook, run in order by one pool thread."""

    def __init__(self, manager: Manager, hook: str, ctx: api.Context, plugins: list[Loaded], outcome: HookResult):
        self.manager, self.hook, self.ctx, self.plugins, self.outcome = manager, hook, ctx, plugins, outcome
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.index = 0  # the plugin running or next to run
        self.began: float | None = None  # when that plugin began
        self.abandoned = False

    @property
    def finished(self) -> bool:
        return self.index >= len(self.plugins) or self.outcome.verdict.final

    def run(self) -> None:
        while True:
            with self.lock:
                if self.abandoned or self.finished:
                    break
                loaded = self.plugins[self.index]
                self.began = self.manager._clock()
            self.manager._call(loaded, self.hook, self.ctx, self.outcome, self)
        self.done.set()


class _Pool:
    """Daemon threads, started as needed: one stuck in a hung plugin never blocks exit."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._threads = 0

    def submit(self, fn) -> None:
        with self._lock:
            if self._idle == 0:
                self._threads += 1
                threading.Thread(target=self._work, name=f"plugin-{self._threads}", daemon=True).start()
            else:
                self._idle -= 1
        self._jobs.put(fn)

    def _work(self) -> None:
        while True:
            fn = self._jobs.get()
            if fn is None:
                return
            fn()
            with self._lock:
                self._idle += 1

    def close(self) -> None:
        with self._lock:
            count = self._threads
        for _ in range(count):
            self._jobs.put(None)
