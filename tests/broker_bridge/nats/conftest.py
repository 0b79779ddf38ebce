"""NATS engine tests: real nats-server clusters (tests.support.nats), one per module."""

from tests.support.nats import nats_cluster, nats_node  # noqa: F401  (the fixtures)
