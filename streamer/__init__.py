"""streamer: per-device LSTM forecasts and anomaly scores, live from Kafka to Kafka and Prometheus."""

__version__ = "0.1.0"
