"""Everything that touches Kafka: the Faust app, ingest, aggregates, feedback join,
embedding stage, detector runner and incidents."""
