"""Optional backends: other libraries' detectors behind genmon's detector contract.

Kept apart from genmon's own detectors, never imported by them or by the worker's
defaults, and installed only with their extra: :mod:`~genmon.detectors.backends.alibi`
(``pip install 'genmon[alibi]'``; alibi-detect is BSL 1.1, a comparison backend only).
"""
