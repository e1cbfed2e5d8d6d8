"""elemta.queue.schedule: retry delays, expiry and delay warnings (formula in the module docstring)."""

import random

import pytest

from elemta import config
from elemta.queue.schedule import RetrySchedule

CREATED = 1_700_000_000.0
DAY = 86_400.0


def no_jitter(**kw):
    return RetrySchedule(jitter=0.0, **kw)


# -- delay --------------------------------------------------------------------------


@pytest.mark.parametrize(("failures", "expected"), [
    (1, 300.0),
    (2, 600.0),
    (3, 1200.0),
    (4, 2400.0),
    (5, 3600.0),  # 4800 capped at retry_max
    (6, 3600.0),
    (7, 3600.0),
    (50, 3600.0),
    (10_000, 3600.0),  # the exponent is capped too: no OverflowError
    (0, 300.0),  # "0 failures" is treated as the first
    (-3, 300.0),
])
def test_delay_without_jitter_doubles_from_retry_first_up_to_retry_max(failures, expected):
    assert no_jitter().delay(failures, random.Random(1)) == expected


@pytest.mark.parametrize(("first", "maximum", "expected"), [
    (60.0, 500.0, [60.0, 120.0, 240.0, 480.0, 500.0, 500.0]),
    (10.0, 10.0, [10.0, 10.0, 10.0, 10.0, 10.0, 10.0]),
    (1.0, 86_400.0, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]),
])
def test_delay_without_jitter_for_other_settings(first, maximum, expected):
    schedule = no_jitter(first=first, maximum=maximum)
    assert [schedule.delay(n, random.Random(1)) for n in range(1, 7)] == expected


def test_delay_without_jitter_does_not_need_an_rng():
    assert no_jitter().delay(3) == 1200.0


@pytest.mark.parametrize("seed", [0, 1, 2024])
def test_delay_is_the_formula_with_u_drawn_from_minus_one_to_one(seed):
    schedule = RetrySchedule(first=300.0, maximum=3600.0, jitter=0.25)
    rng, twin = random.Random(seed), random.Random(seed)
    for n in range(1, 9):
        u = twin.uniform(-1.0, 1.0)
        expected = min(3600.0, 300.0 * 2 ** (n - 1)) * (1 + 0.25 * u)
        assert schedule.delay(n, rng) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("jitter", [0.1, 0.5, 1.0])
def test_jitter_stays_within_its_fraction_of_the_base_and_spreads_both_ways(jitter):
    schedule = RetrySchedule(jitter=jitter)
    rng = random.Random(42)
    for n, base in [(1, 300.0), (2, 600.0), (4, 2400.0), (9, 3600.0)]:
        delays = [schedule.delay(n, rng) for _ in range(300)]
        assert all(base * (1 - jitter) <= d <= base * (1 + jitter) for d in delays)
        assert min(delays) < base * (1 - jitter / 2)  # not stuck at the base
        assert max(delays) > base * (1 + jitter / 2)


def test_jitter_without_an_rng_uses_the_module_random_and_stays_in_bounds():
    schedule = RetrySchedule(jitter=0.1)
    delays = {schedule.delay(2) for _ in range(50)}
    assert all(540.0 <= d <= 660.0 for d in delays)
    assert len(delays) > 1


def test_default_schedule_is_the_documented_one():
    assert RetrySchedule() == RetrySchedule(
        first=300.0, maximum=3600.0, jitter=0.1, lifetime=5 * DAY, delay_warning=4 * 3600.0)


# -- expiry and next_attempt --------------------------------------------------------------


@pytest.mark.parametrize(("age", "expired"), [
    (0.0, False),
    (5 * DAY - 0.001, False),
    (5 * DAY, True),
    (5 * DAY + 1, True),
    (-10.0, False),  # clock stepped back
])
def test_expired_from_arrival_plus_lifetime(age, expired):
    schedule = RetrySchedule()
    assert schedule.expires_at(CREATED) == CREATED + 5 * DAY
    assert schedule.expired(CREATED, CREATED + age) is expired


@pytest.mark.parametrize(("age", "failures", "expected_wait"), [
    (0.0, 1, 300.0),
    (10_000.0, 3, 1200.0),
    (10_000.0, 8, 3600.0),
    (5 * DAY - 1000, 1, 300.0),  # still fits before expiry
    (5 * DAY - 100, 1, 100.0),  # cut to the expiry time
    (5 * DAY - 100, 9, 100.0),
    (5 * DAY, 1, 0.0),  # at expiry: no later retry
    (6 * DAY, 4, 0.0),  # past expiry: now, never in the past
])
def test_next_attempt_is_now_plus_delay_but_never_past_expiry(age, failures, expected_wait):
    now = CREATED + age
    assert no_jitter().next_attempt(CREATED, failures, now, random.Random(1)) == now + expected_wait


def test_next_attempt_with_jitter_never_passes_expiry():
    schedule = RetrySchedule(jitter=1.0, lifetime=7200.0)
    rng = random.Random(7)
    expiry = schedule.expires_at(CREATED)
    for step in range(0, 7200, 37):
        now = CREATED + step
        for failures in (1, 3, 6):
            at = schedule.next_attempt(CREATED, failures, now, rng)
            assert now <= at <= expiry


def test_zero_lifetime_means_give_up_at_the_first_failure():
    schedule = no_jitter(lifetime=0.0)
    assert schedule.expired(CREATED, CREATED)
    assert schedule.next_attempt(CREATED, 1, CREATED + 5, random.Random(1)) == CREATED + 5


# -- delay warnings ---------------------------------------------------------------------


@pytest.mark.parametrize(("age", "warned", "delay_warning", "due"), [
    (0.0, False, 14_400.0, False),
    (14_399.9, False, 14_400.0, False),
    (14_400.0, False, 14_400.0, True),
    (3 * DAY, False, 14_400.0, True),
    (3 * DAY, True, 14_400.0, False),  # already sent
    (60.0, False, 60.0, True),
    (10 * DAY, False, 0.0, False),  # 0 = never
    (0.0, False, 0.0, False),
])
def test_warn_due(age, warned, delay_warning, due):
    schedule = RetrySchedule(delay_warning=delay_warning)
    assert schedule.warn_due(CREATED, CREATED + age, warned) is due


@pytest.mark.parametrize(("delay_warning", "warnings"), [(14_400.0, 1), (0.0, 0)])
def test_a_deferred_recipient_is_warned_at_most_once(delay_warning, warnings):
    schedule = RetrySchedule(delay_warning=delay_warning)
    warned, sent, failures, now = False, 0, 0, CREATED
    rng = random.Random(3)
    while not schedule.expired(CREATED, now):
        failures += 1
        if schedule.warn_due(CREATED, now, warned):
            warned, sent = True, sent + 1
        now = schedule.next_attempt(CREATED, failures, now, rng)
    assert failures > 100  # the loop really walked the whole lifetime
    assert sent == warnings


# -- configuration ------------------------------------------------------------------------


def test_from_config_takes_the_delivery_settings():
    cfg = config.parse({"delivery": {
        "retry_first": 60, "retry_max": 900, "retry_jitter": 0.3, "max_lifetime": 86400, "delay_warning": 0,
    }})
    assert RetrySchedule.from_config(cfg.delivery) == RetrySchedule(
        first=60.0, maximum=900.0, jitter=0.3, lifetime=86400.0, delay_warning=0.0)


def test_from_config_defaults_match_the_schedule_defaults():
    assert RetrySchedule.from_config(config.parse({}).delivery) == RetrySchedule()
