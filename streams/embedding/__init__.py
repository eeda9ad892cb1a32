"""The embedding stage: sampled texts to embeddings to drift detection.

:mod:`.sampling` (pure: reservoirs per slot of a few seconds, the rate controller,
reassembly of a sub-sample), :mod:`.encoder` (all-MiniLM-L6-v2 on torch, or its int8 ONNX
graph) and :mod:`.stage` (the Faust stages between them over ``<prefix>.embed-requests``;
the encoder can run in a process of its own, ``genmon worker --role embed``).
"""
