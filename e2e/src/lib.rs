//! End-to-end tests of the whole pipeline live in `tests/`: producer → relay → Kafka → consumer →
//! notifier, in one process, on the real PostgreSQL and Kafka.
