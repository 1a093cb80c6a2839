"""The Faust application, configured from :class:`infra.settings.Settings` (env vars).

JSON only: topics use the raw codec and the agents decode with :mod:`schemas.events`; the
pickle codec is never used. Faust's web server binds to 127.0.0.1.
"""

from __future__ import annotations

import os
import tempfile

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from infra.logs import logging_config
from infra.settings import Settings

settings = Settings()


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust hard-codes ``fetch_max_wait_ms=1500``. Apache Kafka answers a fetch as soon as data
    is there, but some brokers (Tansu, the embedded one) hold every fetch for the full wait,
    which adds ~0.5 s to freshness; the wait is ``STREAMREC_KAFKA_FETCH_MAX_WAIT_MS``."""

    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = settings.kafka_fetch_max_wait_ms  # read by start()
        return consumer


faust_aiokafka.Consumer._new_consumer_thread = (  # the driver's documented factory hook
    lambda self: _ConsumerThread(self, loop=self.loop, beacon=self.beacon))


def _broker_credentials(s: Settings):
    if s.kafka_sasl_mechanism:
        context = s.kafka_ssl_context() if s.kafka_security_protocol == "SASL_SSL" else None
        return faust.SASLCredentials(username=s.kafka_sasl_username,
                                     password=s.kafka_sasl_password,
                                     mechanism=s.kafka_sasl_mechanism, ssl_context=context)
    if s.kafka_security_protocol == "SSL":
        return faust.SSLCredentials(s.kafka_ssl_context())
    return None


app = faust.App(
    settings.app_id,
    broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",") if host]
    or "kafka://localhost:9092",
    broker_credentials=_broker_credentials(settings),
    store="memory://",
    datadir=settings.worker_data_dir or os.path.join(tempfile.gettempdir(),
                                                     f"streamrec-{settings.app_id}"),
    autodiscover=False,
    topic_partitions=settings.topic_partitions,
    topic_replication_factor=1,
    consumer_auto_offset_reset="earliest",
    broker_session_timeout=settings.kafka_session_timeout_s,
    broker_rebalance_timeout=settings.kafka_rebalance_timeout_s,
    consumer_group_instance_id=settings.kafka_group_instance_id or None,
    broker_heartbeat_interval=1.0,
    consumer_max_fetch_size=4 * settings.max_message_bytes,
    producer_max_request_size=settings.max_message_bytes + 65_536,
    # item vectors go out in bursts of thousands of small records: batch them into few requests
    producer_linger=settings.kafka_producer_linger_ms / 1000.0,
    producer_max_batch_size=256 * 1024,
    stream_buffer_maxsize=4 * settings.worker_batch_max,
    web_bind="127.0.0.1",
    web_port=settings.worker_web_port,
    web_enabled=settings.worker_web_port != 0,
    logging_config=logging_config(os.environ.get("STREAMREC_LOGLEVEL", "info"))
    if settings.log_format == "json" else None,
)
