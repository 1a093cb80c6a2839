"""The nearline trainer against the real broker: versions as checkpoints (weights only),
vector topics with model and version, a rollback, and serving the CURRENT version."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import msgspec
import pytest

from online_models.base import Query
from online_models.two_tower import TwoTowerModel
from schemas import vectors
from schemas.items import ItemRecord
from serving.feeds import FeedBuilder
from serving.nearline import NearlineSource
from stream.producer import InteractionProducer, ItemPublisher
from stream.simulator import UserSimulator
from stream.state import LiveState
from stream.trainer import Checkpoints, Trainer, rollback, vector_topic
from tests.conftest import ROOT, settings_env, wait_for
from tests.integration.kafka_helpers import read_topic

NEW_ITEM = "brand-new"  # described, never clicked


def _publish(settings, events, descriptions=(), events_per_record=500):
    if descriptions:
        with ItemPublisher(settings.kafka_bootstrap, settings.topic_items) as publisher:
            publisher.send_many(list(descriptions))
            publisher.flush()
    with InteractionProducer(settings.kafka_bootstrap, settings.topic_interactions,
                             max_batch_events=events_per_record) as producer:
        producer.send_many(events)
        producer.flush()


def _run(trainer, until_version, timeout_s=120):
    done = threading.Event()
    thread = threading.Thread(target=lambda: (trainer.run(until_version=until_version),
                                              done.set()), daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert done.is_set(), f"no version {until_version} within {timeout_s} s " \
        f"(versions {trainer.published}, events {trainer.events})"


@pytest.fixture
def trained(settings, tmp_path):
    s = settings.model_copy(update={"trainer_dir": str(tmp_path / "ckpt"), "trainer_keep": 2})
    sim = UserSimulator(50, 150, seed=8)
    now = time.time()
    descriptions = sim.item_descriptions(now - 4000)
    like = descriptions[0]
    descriptions.append(ItemRecord(item_id=NEW_ITEM, timestamp=now - 4000,
                                   categories=list(like.categories), tags=list(like.tags),
                                   title="A new item"))
    events = list(sim.events(1500, now - 3000, events_per_s=1.0))
    _publish(s, events, descriptions)
    model = TwoTowerModel(retrain_every=400, min_examples=300, epochs=2)
    trainer = Trainer(s, "two_tower", model=model)
    _run(trainer, 1)
    yield s, trainer, events, sim
    trainer.close()


def _latest_per_item(s, count: int, model: str = "two_tower"
                     ) -> dict[bytes, vectors.ItemVector]:
    """Each item's last vector record on a model's topic (``count``: records to wait for)."""
    latest = {}  # per item, its last record (one partition per key: in order)
    for record in read_topic(s.kafka_bootstrap, vector_topic(s, model), count):
        latest[record.key] = vectors.decode(record.value)
    return latest


def test_a_version_is_a_weights_only_checkpoint_and_vectors_with_model_and_version(trained):
    s, trainer, events, _ = trained
    version = trainer.model.version
    checkpoints = Checkpoints(s.trainer_dir, "two_tower")
    assert checkpoints.versions() == list(range(1, version + 1))[-2:]  # keep = 2
    assert checkpoints.current() == version == trainer.published[-1]
    state, meta = checkpoints.load(version)  # torch.load(weights_only=True): tensors only
    assert meta["model"] == "two_tower" and meta["version"] == version
    assert NEW_ITEM in meta["items"]
    latest = _latest_per_item(s, trainer.vectors_published)
    assert {k.decode() for k in latest} == set(meta["items"])
    assert {(v.model, v.version, len(v.vector)) for v in latest.values()} == \
        {("two_tower", version, 64)}
    assert NEW_ITEM.encode() in latest  # an item nobody clicked, known by its description


def test_serving_loads_current_follows_new_versions_and_rollbacks(trained):
    s, trainer, events, sim = trained
    source = NearlineSource(s.trainer_dir, check_s=0.0)
    source.wait_loaded()  # loads on its own thread from the start
    user = events[-1].user_id
    history = tuple(e.item_id for e in events if e.user_id == user)[-10:]
    [rec] = source.recommend([Query(user, history, exclude=frozenset(history[-1:]))], 20)
    assert source.version == trainer.model.version
    assert len(rec.items) == 20 and history[-1] not in rec.items
    _, found = source._index.vectors([NEW_ITEM])
    assert found[0]  # retrievable in the serving index from the first version on

    target = trainer.model.version + 2
    for _ in range(2):  # a burst trains one version once learned (the trainer's module doc)
        _publish(s, list(sim.events(1000, time.time() - 2000, events_per_s=1.0)))
        _run(trainer, trainer.model.version + 1)
    checkpoints = Checkpoints(s.trainer_dir, "two_tower")
    newest = trainer.model.version
    assert newest >= target and checkpoints.versions() == [newest - 1, newest]
    with source._lock:  # as while a load takes long: requests are answered meanwhile
        [before] = source.recommend([Query(user, history)], 5)  # starts the load
        assert source.version < newest and before.items  # from the version it holds
    source.wait_loaded()
    assert source.version == newest
    republished = rollback(s, "two_tower", newest - 1)
    source.recommend([Query(user, history)], 5)
    source.wait_loaded()
    assert checkpoints.current() == newest - 1 and source.version == newest - 1
    latest = {}
    for record in read_topic(s.kafka_bootstrap, vector_topic(s, "two_tower"),
                             trainer.vectors_published + republished):
        latest[record.key.decode()] = record.value and vectors.decode(record.value).version
    rolled_back = set(Checkpoints(s.trainer_dir, "two_tower").load(newest - 1)[1]["items"])
    assert {latest[i] for i in rolled_back} == {newest - 1}
    assert all(latest[i] is None for i in set(latest) - rolled_back)  # newer items retired
    with pytest.raises(ValueError, match=rf"no kept version 1 .*kept: \[{newest - 1}, "):
        rollback(s, "two_tower", 1)


def test_the_feed_builder_serves_the_current_version_as_a_source(trained, redis_client):
    s, _, events, _ = trained
    LiveState(s, redis_client).apply_sync(events)
    builder = FeedBuilder(s, redis_client)
    try:
        for source in builder.nearline:
            source.wait_loaded()
        users = sorted({e.user_id for e in events})[:5]
        from serving.recommender import Request

        requests = [Request(u, h, 10) for u, h in zip(users, builder.histories(users))]
        rows = builder.recommender.candidates(requests)
        assert all(row["ann_two_tower"] for row in rows)
        assert {why for row in rows for _, _, why in row["ann_two_tower"]} == \
            {"for you (two-tower)"}
    finally:
        builder.close()


def test_a_restarted_trainer_rebuilds_its_window_then_numbers_on_from_its_kept_versions(
        trained):
    s, first, events, sim = trained
    # the first version was trained on the whole rebuilt window, not on its first chunk
    assert first.published == [1]
    assert Checkpoints(s.trainer_dir, "two_tower").meta(1)["events_seen"] == len(events)
    source = NearlineSource(s.trainer_dir, check_s=0.0)
    source.wait_loaded()
    assert source.version == 1
    first.close()

    _publish(s, list(sim.events(300, time.time() - 500, events_per_s=1.0)))
    restarted = Trainer(s, "two_tower", model=TwoTowerModel(retrain_every=400,
                                                            min_examples=300, epochs=2))
    try:
        _run(restarted, 2)
    finally:
        restarted.close()
    checkpoints = Checkpoints(s.trainer_dir, "two_tower")
    assert restarted.published == [2] and checkpoints.versions() == [1, 2]
    assert checkpoints.current() == 2  # the old version 1 is still there to roll back to
    assert checkpoints.meta(2)["events_seen"] == len(events) + 300  # the window, rebuilt
    source.recommend([Query(events[-1].user_id, (events[-1].item_id,))], 5)
    source.wait_loaded()
    assert source.version == 2


def test_trainer_cli_refuses_without_a_checkpoint_folder_a_kept_version_or_a_device(settings,
                                                                                   tmp_path):
    env = settings_env(settings)
    run = subprocess.run([sys.executable, "-m", "infra.cli", "trainer"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "STREAMREC_TRAINER_DIR" in run.stderr
    env["STREAMREC_TRAINER_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-m", "infra.cli", "trainer", "--rollback", "4"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "no kept version 4" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    env["STREAMREC_TRAINER_DEVICE"] = "cuda:99"
    run = subprocess.run([sys.executable, "-m", "infra.cli", "trainer"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "CUDA GPU" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name,finetune_every", [("gru4rec", 0), ("sasrec", 0), ("sasrec", 200)],
                         ids=["gru4rec", "sasrec", "sasrec-finetuned"])
def test_a_sequential_model_is_trained_and_served_the_same_as_where_it_trained(
        name, finetune_every, settings, tmp_path):
    """A version (and, fine-tuned, the next one: trained on events that came after, with items
    new since) is served as where it trained, its vectors published with its number."""
    from online_models.registry import build

    s = settings.model_copy(update={"trainer_dir": str(tmp_path / "ckpt")})
    events = list(UserSimulator(40, 120, seed=9).events(1200, time.time() - 1200, 1.0))
    _publish(s, events)
    model = build(name, hidden=32, epochs=2, n_sample=64, min_examples=300,
                  finetune_every=finetune_every, finetune_epochs=1)
    trainer = Trainer(s, name, model=model)
    try:
        _run(trainer, 1)
        if finetune_every:
            later = [msgspec.structs.replace(  # the same sessions again, on new items
                e, item_id=f"later-{e.item_id}", event_id=f"later-{e.event_id}",
                session_id=f"later-{e.session_id or e.user_id}") for e in events[-400:]]
            _publish(s, later)
            events += later
            _run(trainer, 2)
    finally:
        trainer.close()
    assert Checkpoints(s.trainer_dir, name).current() == model.version
    served_items = model.export_version()[2]
    assert any(i.startswith("later-") for i in served_items) == bool(finetune_every)
    source = NearlineSource(s.trainer_dir, name, check_s=0.0)
    source.wait_loaded()
    sessions: dict[str, list[str]] = {}
    for e in events:
        sessions.setdefault(e.session_id or e.user_id, []).append(e.item_id)
    queries = [Query("q", tuple(items[-5:])) for items in list(sessions.values())[-20:]]
    served, trained_here = source.recommend(queries, 10), model.recommend(queries, 10)
    assert [r.items for r in served] == [r.items for r in trained_here]
    assert sum(bool(r.items) for r in served) >= 15
    latest = _latest_per_item(s, trainer.vectors_published, name)
    assert {(v.model, v.version, len(v.vector)) for v in latest.values()} == \
        {(name, model.version, 32)}


@pytest.mark.parametrize("catch_up_max_s", [600.0, 0.0], ids=["catches-up", "overdue"])
def test_a_trainer_that_fell_behind_catches_up_before_it_trains(catch_up_max_s, settings,
                                                                 tmp_path):
    """3,000 events arrive at once after the first version (300 records of 10), a version due
    every 300: the trainer (20 records a poll) learns them all before it trains again — one
    version for the burst, not ten it could not keep up with — and that version knows the
    burst's items. Past ``CATCH_UP_MAX_S`` behind, a due version trains after a poll."""
    from online_models.registry import build

    s = settings.model_copy(update={"trainer_dir": str(tmp_path / "ckpt")})
    sim = UserSimulator(40, 120, seed=5)
    _publish(s, list(sim.events(600, time.time() - 3000, 1.0)))
    model = build("sasrec", hidden=16, epochs=1, n_sample=32, min_examples=300,
                  retrain_every=300)
    trainer = Trainer(s, "sasrec", model=model)
    trainer.POLL_RECORDS, trainer.CATCH_UP_MAX_S = 20, catch_up_max_s
    burst = [msgspec.structs.replace(e, item_id=f"burst-{n % 50}", event_id=f"burst-{n}",
                                     session_id=f"burst-{n // 5}")
             for n, e in enumerate(sim.events(3000, time.time() - 2000, 1.0))]
    stop = threading.Event()
    try:
        _run(trainer, 1)
        _publish(s, burst, events_per_record=10)
        thread = threading.Thread(target=trainer.run, args=(stop,), daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (trainer.events < 3600 or model.version < 2):
            time.sleep(0.2)
        time.sleep(2)  # a few more empty polls: nothing more is due
        stop.set()
        thread.join(30)
    finally:
        trainer.close()
    assert trainer.events == 3600
    if catch_up_max_s:
        assert trainer.published == [1, 2]
    else:  # ~15 polls of 200 events: a version every second poll
        assert len(trainer.published) >= 5
    assert {f"burst-{n}" for n in range(50)} <= set(model.export_version()[2])


def test_the_trainer_drops_an_erased_users_sessions_from_its_window(settings, tmp_path):
    """An erasure request on the interactions topic: the trainer forgets the user's and the
    named sessions' examples (its next version is trained without them)."""
    from online_models.registry import build

    s = settings.model_copy(update={"trainer_dir": str(tmp_path / "ckpt")})
    events = list(UserSimulator(40, 120, seed=9).events(1200, time.time() - 1200, 1.0))
    _publish(s, events)
    model = build("gru4rec", hidden=16, epochs=1, n_sample=32, min_examples=300)
    trainer = Trainer(s, "gru4rec", model=model)
    stop = threading.Event()
    try:
        _run(trainer, 1)
        victim = next(e for e in reversed(events) if e.session_id)
        sessions = sorted({e.session_id for e in events if e.user_id == victim.user_id})
        assert victim.session_id in model._sessions
        held = model.examples_held
        with InteractionProducer(s.kafka_bootstrap, s.topic_interactions) as producer:
            producer.erase_user(victim.user_id, sessions)
        thread = threading.Thread(target=trainer.run, args=(stop,), daemon=True)
        thread.start()
        wait_for(lambda: not set(sessions) & set(model._sessions), 60,
                 "the trainer to drop the erased sessions")
        stop.set()
        thread.join(30)
        assert model.examples_held < held
        assert set(model._sessions)  # the other users' sessions stay
    finally:
        stop.set()
        trainer.close()
