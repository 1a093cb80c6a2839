"""STREAMREC_SESSION_RULES: the worker and serving build the session model the same way; with
``written`` the worker counts next-item rules in Redis and serving reads them, with the
default (``read``) nothing is counted and serving scores the rules from the sessions."""

import pytest

from infra.settings import Settings
from serving.feeds import FeedBuilder
from state.redis_store import RedisStore
from schemas.events import Interaction
from stream.state import LiveState, SourceMessage


def apply_sessions(settings: Settings) -> None:
    """Ten sessions a → b → c, applied by the worker's state."""
    events = [Interaction(event_id=f"e{s}{n}", user_id=f"u{s}", item_id=item, type="click",
                          timestamp=1.7e9 + 10 * s + n, session_id=f"s{s}")
              for s in range(10) for n, item in enumerate("abc")]
    LiveState.for_worker(settings).apply_messages([SourceMessage("interactions", 0, 0, events)])


@pytest.mark.parametrize("rules", ["read", "written"])
def test_the_setting_reaches_worker_and_serving(settings, redis_client, rules):
    settings = settings.model_copy(update={"session_rules": rules})
    apply_sessions(settings)
    counted = RedisStore(redis_client, settings.key_prefix, "session").get_rows("sr", ["a"])[0]
    assert counted == ({} if rules == "read" else {"b": 10.0, "c": 5.0})
    served = FeedBuilder(settings, redis_client).recommender.session
    assert served.rules == rules
    assert served.rule_rows(["a"])[0] == pytest.approx({"b": 10.0, "c": 5.0})
