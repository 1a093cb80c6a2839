"""Model names used by ``streamrec replay --models`` and the worker configuration."""

from __future__ import annotations

import functools
import importlib
from typing import Callable

from online_models.als import OnlineALS
from online_models.base import NearlineModel, OnlineModel
from online_models.content import ContentModel
from online_models.cooccurrence import CooccurrenceModel
from online_models.mf import OnlineMF
from online_models.mixture import ContextualMixture, MixtureModel
from online_models.popularity import PopularityModel, RandomModel
from online_models.river_baseline import RiverBiasedMF
from online_models.session import SessionCooccurrence, SessionModel
from online_models.trending import TrendingModel

#: Models the trainer runs (``streamrec trainer --model``; versions exported as checkpoints and
#: vector topics, served by ``serving.nearline``): name → (module, class), imported lazily
#: (torch loads in ~1 s).
NEARLINE_MODELS = {"two_tower": ("online_models.two_tower", "TwoTowerModel"),
                   "gru4rec": ("online_models.gru4rec", "GRU4RecModel"),
                   "sasrec": ("online_models.sasrec", "SASRecModel")}


def _torch_model(name: str, **options) -> OnlineModel:
    module, cls = NEARLINE_MODELS[name]
    return getattr(importlib.import_module(module), cls)(**options)


MODELS: dict[str, Callable[[], OnlineModel]] = {
    "session": SessionModel,
    "cooc": CooccurrenceModel,
    # co-occurrence scored at read time from the session model's state (nothing per pair)
    "cooc_read": SessionCooccurrence,
    "mf": OnlineMF,
    # returning users: neighbours over each user's history (scope="user")
    "itemknn": lambda: user_knn(recency=1.0),  # reference peer: last 20 positives, flat
    "history": lambda: user_knn(query="history", history=50, recency=0.8),  # tuned (docs)
    "isgd": lambda: OnlineMF(  # reference peer: ISGD (Vinagre et al. 2014), k=10, positives only
        factors=10, learning_rate=0.05, regularisation=0.01, negatives=0, epochs=1),
    "als": OnlineALS,
    "content": ContentModel,  # item descriptions (the items topic): reaches items nobody touched
    # PyTorch, trained nearline in versions: two-tower on a rolling window, and the sequential
    # gru4rec and sasrec
    **{name: functools.partial(_torch_model, name) for name in NEARLINE_MODELS},
    # session + the sequential model, weight chosen on the validation split
    "session_seq": lambda: MixtureModel({"session": (SessionModel, 1.0),
                                         "sasrec": (lambda: _torch_model("sasrec"), 1.0)}),
    "user_blend": lambda: MixtureModel(USER_BLEND_PARTS),
    "user_blend_ctx": lambda: ContextualMixture(USER_CONTEXT_PARTS, USER_CONTEXT_WEIGHTS),
    "popularity": PopularityModel,
    "trending": TrendingModel,  # as live, at the live settings' defaults
    "random": RandomModel,
    "river_mf": RiverBiasedMF,
    # the serving pipeline (serving/blended.py), imported lazily: serving builds on this package
    "blend": lambda: _blended(rerank=True),
    "blend_raw": lambda: _blended(rerank=False),
    # the same with the returning users' sources (history, als, content, two-tower versions)
    "blend_user": lambda: _blended(rerank=True, long_term=True),
    "blend_user_raw": lambda: _blended(rerank=False, long_term=True),
}
BASELINES = ("random", "popularity")

#: Returning users: the recent session's next-item scores, the user's history neighbours, the
#: user's ALS factors, the content model and the two-tower versions, weights chosen on the
#: validation split of ``bench/tune_user.py`` (validation HR@10 0.1098; without content 0.1006,
#: without ALS 0.0957; popularity's best weight became 0 once content joined). Session 18,
#: with the two-tower's fresher defaults: these four parts 0.1048, with two-tower at 1.0 0.1123
#: (the grid's best, 0.1133, moves three other weights for +0.001: not taken).
USER_BLEND_PARTS = {
    "session": (SessionModel, 1.0),
    "history": (lambda: build("history"), 0.75),
    "als": (OnlineALS, 1.0),
    "content": (ContentModel, 1.5),
    "two_tower": (lambda: build("two_tower"), 1.0),
}
#: The same parts (and popularity) weighted per context bucket, the user's learned events
#: (< 10, < 50, < 200, more: ``online_models.mixture.context_bucket``), chosen per bucket by
#: ``bench/tune_user.py --by-context``: validation HR@10 0.1103 against the global weights'
#: 0.1098 — the best weights barely depend on how long the history is, on this log.
#: (Tuned before two-tower joined ``user_blend``: its parts stay the four it was tuned with.)
USER_CONTEXT_PARTS = {**{name: part for name, part in USER_BLEND_PARTS.items()
                         if name != "two_tower"}, "popularity": (PopularityModel, 0.0)}
_LONG_TERM = {"session": 1.0, "history": 0.75, "als": 1.0, "content": 1.5}
USER_CONTEXT_WEIGHTS = {0: {**_LONG_TERM, "popularity": 0.05}, 1: {**_LONG_TERM},
                        2: {**_LONG_TERM}, 3: {**_LONG_TERM}}


def user_knn(**options) -> CooccurrenceModel:
    """Cosine item neighbours over each user's last 300 positives, across sessions, without
    decay (``itemknn``, ``history`` and their tuning variants differ only in ``options``)."""
    return CooccurrenceModel(**{"scope": "user", "window": 300, "max_gap_s": float("inf"),
                                "neighbours": 500, "half_life_s": None,
                                "normalisation": "cosine", **options})


class UnknownModelError(ValueError):
    """A model name that is not in :data:`MODELS`."""


class NotALiveModelError(UnknownModelError):
    """A model that trains in versions (PyTorch), named where per-event models go."""


def nearline_parts(model: OnlineModel) -> list[str]:
    """The parts of ``model`` (itself, or a mixture's parts) that train in versions."""
    if isinstance(model, NearlineModel):
        return [model.name]
    return [name for part in getattr(model, "parts", {}).values()
            for name in nearline_parts(part)]


def build_live(name: str, **options) -> OnlineModel:
    """The named model (:func:`build`) if it can learn per event in a worker; else
    NotALiveModelError (UnknownModelError for a name not known)."""
    model = build(name, **options)
    parts = nearline_parts(model)
    if parts:
        raise NotALiveModelError(
            f"STREAMREC_LIVE_MODELS: {name!r} holds {' and '.join(parts)}, trained in "
            f"versions by `streamrec trainer` (serving reads the CURRENT version), not learnt "
            f"per event by the worker")
    return model


def resolve_names(spec: str) -> list[str]:
    """``"session,cooc"`` → the names in order, without repeats, baselines appended; ``"all"``
    is every registered model. Raises :class:`UnknownModelError` naming the known ones."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    names = [n for name in names for n in (MODELS if name == "all" else [name])]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise UnknownModelError(f"unknown model {', '.join(map(repr, unknown))}; known: "
                                f"{', '.join(MODELS)} (or all)")
    return list(dict.fromkeys(names + list(BASELINES)))


def _blended(rerank: bool, long_term: bool = False) -> OnlineModel:
    from serving.blended import BlendedModel

    return BlendedModel(rerank=rerank, long_term=long_term)


def build(name: str, **options) -> OnlineModel:
    """The named model, built with ``options`` (its constructor's keyword arguments)."""
    try:
        model = MODELS[name](**options)
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None
    model.name = name
    return model
