"""Kafka → models wiring: the Faust app, its topics, agents, and the producer SDK."""
