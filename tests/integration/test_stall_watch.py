"""The stall watch restarts a worker only when it stopped consuming: a worker that was itself
paused past the timeout (SIGSTOP: a VM freeze, a long GC) while records arrived resumes and
applies them, exactly once, without exiting."""

import os
import signal
import time

from schemas.keys import RedisKeys
from stream.producer import InteractionProducer
from stream.simulator import UserSimulator
from tests.conftest import wait_for


def applied(client, keys) -> int:
    return int(client.hget(keys.stats, "events_applied") or 0)


def test_a_paused_worker_is_not_judged_stalled_and_applies_what_arrived(settings, redis_client,
                                                                        spawn):
    s = settings.model_copy(update={"live_models": "session", "worker_stall_timeout_s": 3.0})
    keys = RedisKeys(s.key_prefix)
    worker = spawn(["worker", "--loglevel", "info"], s)
    events = list(UserSimulator(30, 80, seed=9).events(400, time.time() - 600))
    with InteractionProducer(s.kafka_bootstrap, s.topic_interactions) as producer:
        producer.send_many(events[:200])
        producer.flush()
        wait_for(lambda: applied(redis_client, keys) == 200, 60, "the first half",
                 proc=worker)
        os.kill(worker.proc.pid, signal.SIGSTOP)
        try:
            producer.send_many(events[200:])
            producer.flush()
            time.sleep(8)  # well past the 3 s timeout, with records waiting
        finally:
            os.kill(worker.proc.pid, signal.SIGCONT)
    wait_for(lambda: applied(redis_client, keys) == 400, 60, "the second half", proc=worker)
    time.sleep(5)  # checks after the resume see nothing waiting
    assert worker.proc.poll() is None, worker.log()
    assert applied(redis_client, keys) == 400
    assert "stalled:" not in worker.log()
