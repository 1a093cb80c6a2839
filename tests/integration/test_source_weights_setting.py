"""STREAMREC_SOURCE_WEIGHTS: a deployment's source weights reach the serving blend."""

from schemas.events import Interaction
from serving.feeds import FeedBuilder
from stream.state import LiveState, SourceMessage


def test_a_deployments_weights_change_what_the_blend_ranks(settings, redis_client):
    settings = settings.model_copy(update={"explore_policy": "none", "feed_size": 2})
    # ten sessions a → b → c; "z" is clicked most (trending) but never with a, b or c
    events = [Interaction(event_id=f"e{s}{n}", user_id=f"u{s}", item_id=item, type="click",
                          timestamp=1.7e9 + 10 * s + n, session_id=f"s{s}")
              for s in range(10) for n, item in enumerate("abc")]
    events += [Interaction(event_id=f"z{n}", user_id=f"v{n}", item_id="z", type="click",
                           timestamp=1.7e9 + 200 + n) for n in range(40)]
    events.append(Interaction(event_id="q", user_id="q", item_id="a", type="click",
                              timestamp=1.7e9 + 300, session_id="sq"))
    LiveState.for_worker(settings).apply_messages([SourceMessage("interactions", 0, 0, events)])

    def first(source_weights: str) -> tuple[str, str]:
        s = settings.model_copy(update={"source_weights": source_weights})
        [feed] = FeedBuilder(s, redis_client).compute(["q"])
        return feed.items[0].item_id, feed.items[0].reason

    assert first("") == ("b", "next in your session")  # the defaults: session 1.0
    assert first("session=0,cooc=0") == ("z", "trending")  # only trending left
    policy = FeedBuilder(settings.model_copy(update={"source_weights": "content=1.5"}),
                         redis_client).recommender.config.policy
    assert policy.source_weights["content"] == 1.5 and policy.source_weights["session"] == 1.0



def test_candidates_per_source_reach_the_pipeline(settings, redis_client):
    """STREAMREC_CANDIDATES_PER_SOURCE bounds each source's list (here: trending's)."""
    settings = settings.model_copy(update={"explore_policy": "none", "feed_size": 20})
    events = [Interaction(event_id=f"e{n}", user_id=f"u{n}", item_id=f"i{n}", type="click",
                          timestamp=1.7e9 + n) for n in range(30)]
    LiveState.for_worker(settings).apply_messages([SourceMessage("interactions", 0, 0, events)])

    def listed(candidates: int) -> int:
        s = settings.model_copy(update={"candidates_per_source": candidates})
        [feed] = FeedBuilder(s, redis_client).compute(["nobody"])
        return len(feed.items)

    assert listed(100) == 20 and listed(7) == 7  # a new user: trending alone
