"""How each client's errors reach the loop: a leader or coordinator moving is retriable (the
loop rides it out as the broker away), configuration and fencing are not."""

import pytest
from confluent_kafka import KafkaError, KafkaException
from kafka import errors as kp_errors

from streamer.kafka import confluent, kafka_python
from streamer.kafka.abstract import BrokerTimeout, GroupMovedOn


@pytest.mark.parametrize("code", sorted(confluent.TRANSIENT))
def test_confluent_broker_errors_the_protocol_calls_retriable_are_retriable(code: int):
    # librdkafka leaves its retriable flag unset on these outside its own retry logic: the end
    # offset of a checkpoint partition answered NOT_LEADER_FOR_PARTITION after a rebalance.
    assert not KafkaError(code).retriable()
    assert confluent.client_error(KafkaException(KafkaError(code)), "end offset").retriable


@pytest.mark.parametrize("code", [
    KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError._INVALID_ARG,
    KafkaError.INVALID_PRODUCER_EPOCH,
])
def test_confluent_configuration_and_fencing_errors_are_not_retriable(code: int):
    assert not confluent.client_error(KafkaException(KafkaError(code)), "call").retriable


def test_confluent_fatal_errors_are_never_retriable():
    error = KafkaError(KafkaError.NOT_COORDINATOR, fatal=True)
    assert not confluent.client_error(KafkaException(error), "commit").retriable


def test_confluent_group_and_timeout_errors_keep_their_kinds():
    assert isinstance(confluent.client_error(KafkaException(KafkaError(KafkaError.REBALANCE_IN_PROGRESS)), "c"),
                      GroupMovedOn)
    assert isinstance(confluent.client_error(KafkaException(KafkaError(KafkaError._TRANSPORT)), "c"), BrokerTimeout)


@pytest.mark.parametrize("error, retriable", [
    (kp_errors.NotLeaderForPartitionError(), True),
    (kp_errors.CoordinatorNotAvailableError(), True),
    (kp_errors.TopicAuthorizationFailedError(), False),
])
def test_kafka_python_keeps_its_own_retriable_flags(error, retriable: bool):
    assert kafka_python.client_error(error, "call").retriable is retriable


@pytest.mark.parametrize("protocol, causes", [
    ("PLAINTEXT", "not reachable"),
    ("SSL", "not reachable or a TLS failure"),
    ("SASL_PLAINTEXT", "not reachable or a refused login (check the user and password)"),
    ("SASL_SSL", "not reachable, a TLS failure or a refused login (check the user and password)"),
])
def test_a_bootstrap_failure_names_only_causes_the_protocol_allows(protocol: str, causes: str):
    from streamer.kafka.clients import bootstrap_failure_reason

    assert bootstrap_failure_reason(protocol) == f"no broker could be used before the bootstrap timeout: {causes}"
