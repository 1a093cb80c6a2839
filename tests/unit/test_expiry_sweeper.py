"""The expiry sweeper: one sweep at a time, requests joined (Redis-free: the sweep is stubbed;
tests/integration/test_write_back.py and test_owner_commits.py sweep a real Redis)."""

import threading

import state.write_back
from state.write_back import UntimedKeySweeper


def test_sweep_requests_made_while_one_waits_join_it_with_their_stores(monkeypatch):
    """A rebalance asks for the user-side stores, starting owners for theirs: requests
    made while a sweep waits to start join it, none dropped; one made while a sweep runs
    gets the next."""
    entered, release, swept = threading.Event(), threading.Event(), []

    def sweep(stores):
        swept.append(list(stores))
        entered.set()
        release.wait(10)
        return len(swept)

    monkeypatch.setattr(state.write_back, "sweep_untimed_keys", sweep)
    sweeper = UntimedKeySweeper()
    running = sweeper.request(["user-side"])
    assert entered.wait(10)  # it runs: the next requests wait together
    queued = sweeper.request(["owners 0"])
    assert sweeper.request(["owners 1", "owners 2"]) is queued is not running
    release.set()
    assert running.result(10) == 1 and queued.result(10) == 2
    assert swept == [["user-side"], ["owners 0", "owners 1", "owners 2"]]
