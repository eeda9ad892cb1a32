"""The Kafka worker: the Faust app and its consumer internals, ingest, the pipeline that
runs the window state (:mod:`.windows`) and detection (:mod:`.detection`), the embedding
stage (:mod:`.embedding`), the agent that feeds findings to :mod:`genmon.incidents`, and
the native ingest path (:mod:`.native`)."""
