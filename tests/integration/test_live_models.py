"""Every role that builds the live models refuses one trained in versions (PyTorch), in one
place: the worker's and serving's builder."""

import pytest

from online_models.registry import NotALiveModelError
from state.redis_store import build_live_models


def test_live_state_and_serving_refuse_a_model_trained_in_versions(settings, redis_client):
    bad = settings.model_copy(update={"live_models": "session,user_blend"})
    with pytest.raises(NotALiveModelError, match="'user_blend' holds two_tower"):
        build_live_models(bad, redis_client)
    good = build_live_models(settings, redis_client)
    assert set(good) == set(settings.live_model_names)
