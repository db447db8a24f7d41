"""Thin constructors over kafka-python: the product's consumer, producer and topic admin."""

from streamer.kafka.clients import ensure_topics, make_consumer, make_producer

__all__ = ["ensure_topics", "make_consumer", "make_producer"]
