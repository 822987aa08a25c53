"""Tests against a three-node RabbitMQ cluster started for the session: ``pytest -m cluster``."""
