"""Admission alone, on a session table without an engine: rate limit, quotas per owner, capacity by sessions and
by bytes, and what refuse and evict decide. Deciding never changes the table: the engine acts on the answer."""

import pytest

from server.engine.admission import Admission, Eviction, SharedQuotas
from server.engine.errors import LimitExceeded
from server.engine.sessions import Session, SessionTable
from tests.limits import limits_with

pytestmark = pytest.mark.unit

SLOT_BYTES = 24  # (h, c) of one layer of 3 float32


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def admission(**limits) -> Admission:
    return Admission(limits_with(**limits), SLOT_BYTES, Clock())


def table(*owners: str) -> tuple[SessionTable, list[Session]]:
    """A table with one session per owner given, least recently used first."""
    sessions = SessionTable(Clock())
    return sessions, [sessions.add(slot, owner) for slot, owner in enumerate(owners)]


def test_a_session_that_fits_needs_no_room_made():
    sessions, _ = table("alice", "bob")
    assert admission(max_sessions=3, max_sessions_per_owner=2).room_for_session("bob", sessions) == []


def test_the_owner_quota_refuses_that_owner_only_and_names_the_limit():
    sessions, _ = table("alice", "alice", "bob")
    decide = admission(max_sessions_per_owner=2)
    with pytest.raises(LimitExceeded) as refused:
        decide.room_for_session("alice", sessions)
    assert str(refused.value) == ("this client already has 2 sessions (max_sessions_per_owner=2); "
                                  "close one first")
    assert refused.value.limit == "max_sessions_per_owner"
    assert decide.room_for_session("bob", sessions) == []
    assert len(sessions) == 3


def test_capacity_by_sessions_refuses_and_names_max_sessions():
    sessions, _ = table("alice", "bob", "carol")
    decide = admission(max_sessions=3)
    assert decide.capacity == 3
    with pytest.raises(LimitExceeded) as refused:
        decide.room_for_session("dave", sessions)
    assert str(refused.value) == ("the server holds its most sessions, 3 (max_sessions=3); close unused sessions "
                                  "or retry later")
    assert refused.value.limit == "max_sessions"


def test_capacity_by_bytes_refuses_and_names_max_state_bytes():
    sessions, _ = table("alice", "bob")
    decide = admission(max_sessions=10, max_state_bytes=3 * SLOT_BYTES - 1)
    assert decide.capacity == 2
    with pytest.raises(LimitExceeded, match=rf"most sessions, 2 \(max_state_bytes={3 * SLOT_BYTES - 1}\)") as refused:
        decide.room_for_session("carol", sessions)
    assert refused.value.limit == "max_state_bytes"


def test_a_budget_smaller_than_one_session_is_refused_at_once():
    with pytest.raises(LimitExceeded, match="cannot hold one session's state") as refused:
        admission(max_state_bytes=SLOT_BYTES - 1)
    assert refused.value.limit == "max_state_bytes"


def test_evict_at_capacity_picks_the_least_recently_used_idle_session_of_anyone():
    sessions, (oldest, busy, used, newest) = table("alice", "bob", "carol", "dave")
    busy.in_flight = True
    sessions.touch(oldest)  # now the most recently used
    decide = admission(max_sessions=4, full_policy="evict")
    assert decide.room_for_session("erin", sessions) == [Eviction(used, "max_sessions")]
    assert len(sessions) == 4  # deciding closes nothing


def test_evict_for_the_owner_quota_picks_that_owners_oldest_idle_session():
    sessions, (bobs, alices_busy, alices_idle, alices_newest) = table("bob", "alice", "alice", "alice")
    alices_busy.pending = [object()]
    decide = admission(max_sessions_per_owner=3, full_policy="evict")
    assert decide.room_for_session("alice", sessions) == [Eviction(alices_idle, "max_sessions_per_owner")]


def test_one_eviction_for_the_quota_also_makes_room_in_a_full_server():
    sessions, (bobs, alices) = table("bob", "alice")
    decide = admission(max_sessions=2, max_sessions_per_owner=1, full_policy="evict")
    assert decide.room_for_session("alice", sessions) == [Eviction(alices, "max_sessions_per_owner")]


def test_evict_with_nobody_idle_refuses_naming_the_limit():
    sessions, owned = table("alice", "bob")
    for session in owned:
        session.in_flight = True
    decide = admission(max_sessions=2, full_policy="evict")
    with pytest.raises(LimitExceeded, match=r"\(max_sessions=2\)") as refused:
        decide.room_for_session("carol", sessions)
    assert refused.value.limit == "max_sessions"


def test_the_refuse_policy_never_evicts_even_with_idle_sessions():
    sessions, _ = table("alice")
    with pytest.raises(LimitExceeded):
        admission(max_sessions=1, full_policy="refuse").room_for_session("bob", sessions)


def test_restored_sessions_fit_all_or_none_and_the_refusal_names_the_capacity_limit():
    decide = admission(max_sessions=5)
    decide.room_for(3, live=2)
    with pytest.raises(LimitExceeded) as refused:
        decide.room_for(4, live=2)
    assert str(refused.value) == "4 sessions do not fit: max_sessions allows 5"
    assert refused.value.limit == "max_sessions"
    with pytest.raises(LimitExceeded, match="max_state_bytes allows 1"):
        admission(max_state_bytes=SLOT_BYTES).room_for(2, live=0)


def test_each_owner_has_a_rate_limit_of_its_own():
    clock = Clock()
    decide = Admission(limits_with(rate_limit=1.0, rate_limit_burst=2), SLOT_BYTES, clock)
    decide.admit_request("alice"), decide.admit_request("alice")
    with pytest.raises(LimitExceeded, match=r"rate_limit=1/s, rate_limit_burst=2") as refused:
        decide.admit_request("alice")
    assert refused.value.limit == "rate_limit"
    decide.admit_request("bob")
    clock.now += 1.0
    decide.admit_request("alice")


def test_shared_quotas_count_an_owners_sessions_and_the_servers_on_every_model():
    shared = SharedQuotas(limits_with())
    one, _ = table("alice", "bob")
    other, _ = table("alice")
    shared.count_in(one)
    stop_counting = shared.count_in(other)
    on_one = Admission(limits_with(max_sessions=10, max_sessions_per_owner=2), SLOT_BYTES, Clock(), shared)
    with pytest.raises(LimitExceeded) as refused:
        on_one.room_for_session("alice", one)
    assert refused.value.limit == "max_sessions_per_owner" and "already has 2 sessions" in str(refused.value)
    capped = Admission(limits_with(max_sessions=3), SLOT_BYTES, Clock(), shared)
    with pytest.raises(LimitExceeded, match="most sessions, 3") as full:
        capped.room_for_session("carol", one)
    assert full.value.limit == "max_sessions"
    stop_counting()
    assert on_one.room_for_session("alice", one) == [] and capped.room_for_session("carol", one) == []


def test_shared_quotas_share_each_owners_rate_limit():
    shared = SharedQuotas(limits_with(rate_limit=1.0, rate_limit_burst=1), Clock())
    first, second = (Admission(limits_with(rate_limit=1.0, rate_limit_burst=1), SLOT_BYTES, Clock(), shared)
                     for _ in range(2))
    first.admit_request("alice")
    with pytest.raises(LimitExceeded, match="too many requests"):
        second.admit_request("alice")
