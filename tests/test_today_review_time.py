"""Second review of today's clock-step and worker-restart changes.

``KeyHealth.cooling()`` is the cheap test made on every request of a route
with several targets before any key is looked at: while it says True, each
such request scans every target's pool (``Selector._cooling_targets``). It
compared the end of the latest cool-down with the wall clock, so after a
step back it kept saying True for as long as the step, although ``_ended``
(today's fix) already treats every cool-down begun before the step as over.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from lectr.policy.health import MAX_COOLDOWN, KeyHealth

DAY = 86_400.0
HOUR = 3_600.0


def test_the_cheap_cooling_test_is_off_again_after_a_step_back_once_every_cooldown_ended():
    """Two keys set aside (5 minutes, 30 s), then NTP steps the clock back a
    day. The one key a request looks at comes back at once; the other (a
    quiet org's) is not looked at. ``cooling()`` used to stay True for the
    whole day (every multi-target request of every org paying for a scan of
    the pools); it is False as soon as no cool-down is on."""
    clock = Clock()
    clock.rightNow = 1_800_000_000.0
    health = KeyHealth(clock)
    health.cool("a", "openai", 401, None)
    health.cool("b", "openai", 429, 30.0)
    clock.rightNow -= DAY
    assert health.healthy("a")
    assert not health.cooling()
    # and a cool-down set after the step still turns it on, for its length
    health.cool("c", "openai", 429, 30.0)
    assert health.cooling()
    clock.advance(29.0)
    assert health.cooling()
    clock.advance(2.0)
    assert not health.cooling()


_op = st.one_of(
    st.tuples(
        st.just("cool"),
        st.sampled_from("abc"),
        st.sampled_from([401, 429]),
        st.one_of(st.none(), st.floats(0, 2 * MAX_COOLDOWN)),
    ),
    st.tuples(st.just("step"), st.floats(-2 * DAY, 2 * DAY)),
    st.tuples(st.just("elapse"), st.floats(0, 2 * HOUR)),
    st.tuples(st.just("look"), st.sampled_from("abc")),
    st.tuples(st.just("check")),
)


@settings(max_examples=300, deadline=None, database=None)
@given(ops=st.lists(_op, max_size=25))
@example(ops=[("cool", "a", 401, None), ("step", -DAY), ("elapse", MAX_COOLDOWN + 2.0)])
@example(ops=[("cool", "a", 401, None), ("step", -2.0)])
# a cool-down set after a step back nobody checked: cooling() stayed on for
# the step (3302 s), not for the new cool-down's 300 s
@example(ops=[("cool", "a", 401, None), ("step", -3302.0), ("cool", "a", 401, None)])
# a step back shorter than an hour ends a's 5 minutes; b's 30 s end: nothing
# cools, and cooling() must not wait for the 400 s a's end is now away
@example(
    ops=[
        ("cool", "a", 401, None),
        ("step", -100.0),
        ("cool", "b", 429, None),
        ("elapse", 31.0),
        ("check",),
    ]
)
def test_cooling_says_true_whenever_a_key_cools_and_not_long_after_none_does(ops):
    """Whatever the clock does, ``cooling()`` says whether some key is
    cooling down: True whenever one is (it gates the scan: a False there
    would send a request to a set-aside key first), False when none is (no
    scan for nothing), and False once the longest cool-down asked for (and
    a second) of wall-clock time has passed since a request looked after
    the last step."""
    clock = Clock()
    clock.rightNow = 1_800_000_000.0
    health = KeyHealth(clock)
    for op in ops:
        if op[0] == "cool":
            health.cool(op[1], "openai", op[2], op[3])
        elif op[0] == "step":
            clock.rightNow += op[1]
        elif op[0] == "elapse":
            clock.advance(op[1])
        elif op[0] == "look":
            health.healthy(op[1])
        else:  # a multi-target request
            said = health.cooling()
            # (cooldown() may forget an ended one: asked after cooling())
            assert said == any(health.cooldown(k) is not None for k in "abc"), ops
    # once a request has looked after the last step (a step back nobody
    # sees can hide in the time that passes: it is noticed by the first
    # request while more is left than the cool-down's length), nothing
    # cools longer than the longest cool-down asked for, and a second
    health.cooling()
    last = max((op[3] for op in ops if op[0] == "cool" and op[3] is not None), default=0.0)
    clock.advance(max(min(last, MAX_COOLDOWN), 300.0) + 1.5)
    assert not health.cooling()
