"""Tests use the project's private-broker helper: a real mosquitto on a free loopback port."""

from bench.broker import Mosquitto, free_port, mosquitto_binary

__all__ = ["Mosquitto", "free_port", "mosquitto_binary"]
