import pytest
from pydantic import ValidationError

from infra.settings import Settings


def test_env_vars_are_read(monkeypatch):
    monkeypatch.setenv("STREAMREC_TOPIC_PARTITIONS", "12")
    monkeypatch.setenv("STREAMREC_KAFKA_BOOTSTRAP", " h1:9092,h2:9092 ")
    s = Settings()
    assert s.topic_partitions == 12 and s.kafka_bootstrap == "h1:9092,h2:9092"


def test_invalid_values_are_refused_clearly(monkeypatch):
    monkeypatch.setenv("STREAMREC_TRENDING_HALF_LIFE_S", "-1")
    with pytest.raises(ValidationError, match="trending_half_life_s"):
        Settings()


def test_session_rules_setting_is_checked_and_reaches_the_session_model(monkeypatch):
    assert Settings().model_options == {"session": {"rules": "read"}}
    monkeypatch.setenv("STREAMREC_SESSION_RULES", "written")
    assert Settings().model_options == {"session": {"rules": "written"}}
    monkeypatch.setenv("STREAMREC_SESSION_RULES", "counted")
    with pytest.raises(ValidationError, match="session_rules"):
        Settings()


def test_group_instance_id_must_be_a_kafka_name(monkeypatch):
    monkeypatch.setenv("STREAMREC_KAFKA_GROUP_INSTANCE_ID", "worker 1")
    with pytest.raises(ValidationError, match="kafka_group_instance_id"):
        Settings()
    monkeypatch.setenv("STREAMREC_KAFKA_GROUP_INSTANCE_ID", "worker-1.zone_a")
    assert Settings().kafka_group_instance_id == "worker-1.zone_a"


def test_sasl_options_passed_through():
    s = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="PLAIN",
                 kafka_sasl_username="u", kafka_sasl_password="p")
    assert s.kafka_client_options() == {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN",
                                        "sasl_plain_username": "u", "sasl_plain_password": "p"}


def test_roles_refuse_to_start_without_services():
    from infra.settings import ServicesNotSet

    with pytest.raises(ServicesNotSet, match="STREAMREC_KAFKA_BOOTSTRAP"):
        Settings(kafka_bootstrap="", redis_url="redis://x").require_services()


def test_tls_files_reach_every_kafka_python_client():
    s = Settings(kafka_security_protocol="SSL", kafka_ssl_cafile="/etc/ca.pem",
                 kafka_ssl_certfile="/etc/client.pem", kafka_ssl_keyfile="/etc/client.key")
    assert s.kafka_client_options() == {"security_protocol": "SSL", "ssl_cafile": "/etc/ca.pem",
                                        "ssl_certfile": "/etc/client.pem",
                                        "ssl_keyfile": "/etc/client.key"}


def test_tls_reaches_aiokafka_clients_as_a_context_with_the_ca_bundle():
    import ssl

    import certifi

    s = Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=certifi.where())
    options = s.aiokafka_client_options()
    assert set(options) == {"security_protocol", "ssl_context"}  # no file names: aiokafka
    context = options["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] > 0  # the bundle given, loaded
    assert Settings().aiokafka_client_options() == {"security_protocol": "PLAINTEXT"}
    with pytest.raises(FileNotFoundError):
        Settings(kafka_security_protocol="SSL",
                 kafka_ssl_cafile="/nonexistent/ca.pem").aiokafka_client_options()


@pytest.mark.parametrize("value", [" , ", ",", "   ", "short", "a-long-enough-key-1,",
                                   "a-long-enough key-2"])
def test_api_keys_fail_closed(value):
    with pytest.raises(ValidationError, match="STREAMREC_API_KEYS"):
        Settings(api_keys=value)


def test_api_keys_parsed():
    assert Settings(api_keys="").api_key_set == frozenset()
    assert Settings(api_keys=" key-number-one-16 ,key-number-two-16").api_key_set == {
        "key-number-one-16", "key-number-two-16"}


def test_source_weights_are_parsed_and_unknown_or_malformed_ones_refused():
    assert Settings().source_weight_overrides == {}
    assert Settings(source_weights="content=1.5,ann=0").source_weight_overrides == \
        {"content": 1.5, "ann": 0.0}
    with pytest.raises(ValidationError, match="unknown source.*contnet; known: session"):
        Settings(source_weights="contnet=1.5")
    for malformed in ("content=-1", "content", "content=1.5,", "content=x"):
        with pytest.raises(ValidationError, match="source_weights"):
            Settings(source_weights=malformed)


def test_the_live_pipeline_and_the_replayed_one_offer_as_many_candidates():
    from serving.recommender import PipelineConfig

    assert Settings().candidates_per_source == PipelineConfig().candidates_per_source


def test_a_redis_cluster_url_may_name_several_seeds_and_malformed_ones_are_refused():
    from infra.redis_client import cluster_seed, cluster_seeds

    url = "rediss+cluster://user:p%40ss@h1:7000,h2:7001,[::1]:7002/0?ssl_ca_certs=/ca.pem"
    assert Settings(redis_url=url).redis_url == url
    assert cluster_seed(url) == "rediss://user:p%40ss@h1:7000/0?ssl_ca_certs=/ca.pem"
    assert cluster_seeds(url) == [("h1", 7000), ("h2", 7001), ("::1", 7002)]
    assert cluster_seed("redis+cluster://h1:7000") == "redis://h1:7000"
    assert cluster_seed("redis://h1:6379/0") is None
    for bad in ("redis+cluster://h1:7000,h2", "redis+cluster://h1:7000,", "redis+cluster://:1"):
        with pytest.raises(ValidationError, match="STREAMREC_REDIS_URL: a Redis Cluster seed "
                                                  "must be host:port"):
            Settings(redis_url=bad)
