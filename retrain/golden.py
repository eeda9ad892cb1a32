"""The golden regression set: answers the model must keep giving, whatever it learns.

A fine-tune on this week's feedback can make a model worse at what nobody complained about
(forgetting), and the evaluation split, drawn from the same feedback, cannot see it.
``gate.golden_set`` names a JSONL file of ``{prompt, completion[, segment]}`` (a local path
or any URI the artifact store reads) that a person curated once. :func:`golden_check`
scores ``completion_loss`` on it for both models and fails when the candidate is worse by
more than ``gate.segment_tolerance`` with confidence (paired bootstrap at the gate's
confidence); it is its own comparison in the verdict (``golden_set``), never mixed with the
evaluation split's numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from genmon.exceptions import ConfigurationError
from genmon.retrain.examples import SftExample
from genmon.retrain.gate import GateConfig
from genmon.retrain.gate_stats import Comparison, compare
from genmon.retrain.segment_gate import level, worse_beyond

if TYPE_CHECKING:
    from genmon.retrain.artifacts import ArtifactStore
    from genmon.retrain.lm import CausalLM


def load_golden(source: str, store: ArtifactStore | None = None) -> list[SftExample]:
    """The golden examples at ``source`` (read with ``store``'s storage options if given)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(source, **(store.storage_options if store else {}))
        text = bytes(fs.cat_file(path)).decode("utf-8")
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"gate.golden_set {source} cannot be read ({exc}); fix the path or unset "
            "gate.golden_set in the retrain policy"
        ) from exc
    golden = [_example(source, number, line) for number, line in _lines(text)]
    if not golden:
        raise ConfigurationError(
            f"gate.golden_set {source} holds no examples; add JSONL lines of "
            '{"prompt": ..., "completion": ...} or unset gate.golden_set'
        )
    return golden


def _lines(text: str) -> list[tuple[int, str]]:
    return [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _example(source: str, number: int, line: str) -> SftExample:
    try:
        data = json.loads(line)
        prompt, completion = data["prompt"], data["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise TypeError("prompt and completion must be strings")
        segment = {str(k): str(v) for k, v in (data.get("segment") or {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigurationError(
            f"gate.golden_set {source}:{number}: not a {{prompt, completion[, segment]}} "
            f"object ({type(exc).__name__}: {exc}); fix that line"
        ) from exc
    return SftExample(prompt=prompt, completion=completion, segment=segment)


def golden_check(
    candidate: CausalLM,
    serving: CausalLM,
    golden: Sequence[SftExample],
    config: GateConfig,
    source: str | None = None,
) -> Comparison:
    """``completion_loss`` on the golden set: fails when the candidate got worse beyond
    ``config.segment_tolerance`` with confidence."""
    prompts, completions = [e.prompt for e in golden], [e.completion for e in golden]
    ours = np.asarray(candidate.completion_nll(prompts, completions), np.float64)
    theirs = np.asarray(serving.completion_nll(prompts, completions), np.float64)
    comparison = compare("completion_loss", ours, theirs, config)
    comparison.extra["source"] = source
    tolerance = config.segment_tolerance
    text = (
        f"completion_loss {comparison.serving:.3f} -> {comparison.candidate:.3f} "
        f"({level(config.confidence)} CI of the change {comparison.ci[0]:+.3f}.."
        f"{comparison.ci[1]:+.3f}, {len(golden)} examples, tolerance {tolerance:.3f})"
    )
    if worse_beyond(comparison, greater_is_better=False, tolerance=tolerance):
        comparison.status = "fail"
        comparison.reason = f"golden set got worse (the candidate forgets): {text}"
    else:
        comparison.reason = f"golden set not worse: {text}"
    return comparison
