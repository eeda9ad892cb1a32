"""Detection wiring: the detectors of :mod:`genmon.detectors` applied to closed windows.

:class:`~genmon.streams.detection.runner.DetectorRunner` judges each window's series
(:mod:`.observations`) against the model's baselines within the false-alarm budget, keeps
a model's detector state bounded (:mod:`.model_state`) and embedding series bounded
(:mod:`.embedding_series`), and builds findings with their evidence (:mod:`.findings`,
:mod:`.error_evidence`). Pure over plain dicts: the worker stores them in Faust tables.
"""
