"""Feedback as training examples for each strategy, and which strategy the data supports.

A labelled row (merged per request by :func:`genmon.retrain.dataset.merge_rows`) carries a
**correction** (what the answer should have been) or only a **score** (thumbs up = 1.0,
down = 0.0, already normalised by the pipeline). The strategies read them so:

- ``sft``: ``prompt -> correction``, with the logged response as ``rejected``;
- ``dpo``: the same pairs, only where the logged response is non-empty (a correction equal
  to it never gets here): chosen = correction, rejected = what was served;
- ``kto``: unpaired examples. A scored row gives ``prompt -> response`` marked
  ``desirable`` when ``score >= max(DESIRABLE_AT, negative_below)`` and undesirable when
  ``score < negative_below`` (``feedback.negative_score_below``); a score in between is
  neutral and left out. A correction gives two: ``prompt -> correction`` (desirable) and
  ``prompt -> response`` (undesirable).

:func:`choose_strategy` turns the policy's ``training.strategy`` into the one the dataset
is built for, with the reason. ``auto`` picks ``kto`` when there are thumbs or scores
without a correction and both classes reach the minimum (it is the only strategy that
learns from all of the feedback), else ``sft`` when the corrections reach it (SFT on the
same corrections is cheaper than DPO: no reference model), else nothing. ``dpo`` is
chosen only when the policy asks for it. A strategy the data cannot support is refused
with the reason, never raised: the job ends ``insufficient_evidence`` with it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from genmon.retrain.examples import SftExample

if TYPE_CHECKING:
    from genmon.schemas.tables import LabelledExample

STRATEGIES = ("sft", "kto", "dpo")
#: A score at or above this (and not below ``negative_below``) is desirable for KTO.
DESIRABLE_AT = 0.5
#: What each correction gives KTO (recorded in the manifest of a ``kto`` dataset).
KTO_FROM_CORRECTIONS = (
    "each correction gives a desirable (prompt, correction) and an undesirable "
    "(prompt, logged response) example"
)
NO_LABEL = "(none)"
_EPOCH = datetime.min.replace(tzinfo=UTC)

Clean = Callable[[str], str]


def kto_label(score: float | None, negative_below: float) -> bool | None:
    """``True`` for a good score, ``False`` for a bad one, ``None`` for none or neutral."""
    if score is None:
        return None
    if score < negative_below:
        return False
    return True if score >= max(DESIRABLE_AT, negative_below) else None


def order_key(example: SftExample) -> tuple[datetime, str, str, str, bool]:
    """Oldest first; ties broken by content so the order never depends on the rows'."""
    return (
        example.created_at or _EPOCH,
        example.request_id,
        example.prompt,
        example.completion,
        example.desirable is True,
    )


def class_of(strategy: str, example: SftExample) -> str:
    """The class the minimum and the per-subject cap count in: the label for SFT and DPO,
    ``desirable`` / ``undesirable`` for KTO."""
    if strategy == "kto":
        return "desirable" if example.desirable else "undesirable"
    return example.label if example.label is not None else NO_LABEL


def as_utc(value: datetime | None) -> datetime:
    """``value`` with UTC when naive (SQLite gives naive times); the epoch for none."""
    if value is None:
        return _EPOCH
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def to_example(
    row: LabelledExample,
    completion: str,
    clean: Clean | None,
    *,
    rejected: str | None = None,
    desirable: bool | None = None,
) -> SftExample:
    """One example of ``row`` (redacted by ``clean``) with everything the row says about
    where it came from: chat turns, data subject, segment, label, time, request."""
    scrub = clean or (lambda text: text)
    messages = row.messages
    return SftExample(
        prompt=scrub(row.prompt or ""),
        completion=scrub(completion),
        rejected=scrub(rejected) if rejected is not None and rejected.strip() else None,
        segment={str(k): str(v) for k, v in sorted((row.segment or {}).items())},
        created_at=as_utc(row.created_at),
        request_id=row.request_id,
        label=row.label,
        messages=(
            [{str(k): scrub(str(v)) for k, v in turn.items()} for turn in messages]
            if messages
            else None
        ),
        desirable=desirable,
        subject_id=row.subject_id,
    )


@dataclass
class Candidates:
    """The examples each strategy would train on, oldest first, and what was left out."""

    examples: dict[str, list[SftExample]]
    #: Request ids whose KTO examples came from a score (not a correction).
    scored: frozenset[str]
    without_rejected: int = 0
    neutral: int = 0


def candidates(
    corrections: Sequence[LabelledExample],
    scored: Sequence[LabelledExample],
    *,
    negative_below: float,
    clean: Clean | None = None,
) -> Candidates:
    """The SFT, DPO and KTO examples of merged rows (see the module docstring)."""
    sft = [to_example(r, r.correction or "", clean, rejected=r.response) for r in corrections]
    dpo = [e for e in sft if e.rejected is not None]
    kto: list[SftExample] = []
    for row in corrections:
        kto.append(to_example(row, row.correction or "", clean, desirable=True))
        if (row.response or "").strip():
            kto.append(to_example(row, row.response, clean, desirable=False))
    neutral = 0
    used: set[str] = set()
    for row in scored:
        label = kto_label(row.score, negative_below)
        if label is None:
            neutral += 1
            continue
        kto.append(to_example(row, row.response or "", clean, desirable=label))
        used.add(row.request_id)
    examples = {"sft": sft, "dpo": dpo, "kto": kto}
    return Candidates(
        {name: sorted(found, key=order_key) for name, found in examples.items()},
        frozenset(used),
        without_rejected=len(sft) - len(dpo),
        neutral=neutral,
    )


# -- choosing -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Available:
    """What each strategy could train on (after opt-outs and caps)."""

    rows: int
    corrections: dict[str, int] = field(default_factory=dict)
    """Corrections per label."""
    pairs: dict[str, int] = field(default_factory=dict)
    """Corrections with a non-empty logged response, per label (DPO's pairs)."""
    desirable: int = 0
    undesirable: int = 0
    good: int = 0
    """Thumbs up or good scores without a correction (in ``desirable``)."""
    bad: int = 0
    """Thumbs down or bad scores without a correction (in ``undesirable``)."""

    @classmethod
    def of(cls, rows: int, found: Candidates) -> Available:
        def labels(examples: list[SftExample]) -> dict[str, int]:
            return dict(sorted(Counter(class_of("sft", e) for e in examples).items()))

        kto = found.examples["kto"]
        unpaired = [e for e in kto if e.request_id in found.scored]
        return cls(
            rows=rows,
            corrections=labels(found.examples["sft"]),
            pairs=labels(found.examples["dpo"]),
            desirable=sum(1 for e in kto if e.desirable),
            undesirable=sum(1 for e in kto if not e.desirable),
            good=sum(1 for e in unpaired if e.desirable),
            bad=sum(1 for e in unpaired if not e.desirable),
        )

    def summary(self) -> str:
        """``12 rows: 0 corrections, 3 thumbs up or good scores, 0 down or bad``."""
        return (
            f"{self.rows} rows: {sum(self.corrections.values())} corrections, {self.good}"
            f" thumbs up or good scores, {self.bad} down or bad"
        )


@dataclass(frozen=True)
class StrategyChoice:
    """The strategy the dataset is built for (``None``: nothing to train on) and why."""

    strategy: str | None
    reason: str


def _labels_reach(counts: dict[str, int], least: int) -> bool:
    return bool(counts) and all(n >= least for n in counts.values())


def _short(counts: dict[str, int]) -> str:
    return ", ".join(f"{label} {n}" for label, n in counts.items()) or "none"


def choose_strategy(requested: str, available: Available, min_per_class: int = 1) -> StrategyChoice:
    """The strategy for ``requested`` (``auto``, ``sft``, ``kto`` or ``dpo``) on what is
    ``available``; each class (label, or desirable/undesirable) needs ``min_per_class``
    examples (at least one)."""
    least = max(1, min_per_class)
    kto_ok = available.desirable >= least and available.undesirable >= least
    kto_has = f"desirable {available.desirable}, undesirable {available.undesirable}"
    sft_ok = _labels_reach(available.corrections, least)
    need = f"{least} per class"
    if requested == "auto":
        if kto_ok and available.good + available.bad:
            return StrategyChoice(
                "kto",
                f"auto: kto, {available.good + available.bad} thumbs or scores without a"
                f" correction and {sum(available.corrections.values())} corrections ({kto_has};"
                f" {need}): the one strategy that learns from all of them",
            )
        if sft_ok:
            why = "no thumbs or scores without a correction"
            if available.good + available.bad:
                why = f"too few thumbs or scores for kto ({kto_has}; {need})"
            return StrategyChoice(
                "sft",
                f"auto: sft, {sum(available.corrections.values())} corrections by label:"
                f" {_short(available.corrections)} ({need}); {why}",
            )
        return StrategyChoice(
            None,
            f"no usable feedback: {available.summary()}; sft needs corrections ({least} of"
            f" each label), kto thumbs or scores ({least} desirable and {least} undesirable;"
            f" {kto_has})",
        )
    if requested == "sft":
        if sft_ok:
            return StrategyChoice(
                "sft", f"training.strategy is sft: {_short(available.corrections)}"
            )
        return StrategyChoice(
            None,
            f"training.strategy is sft, which needs corrections ({least} of each label): have"
            f" {_short(available.corrections)} ({available.summary()})",
        )
    if requested == "dpo":
        if _labels_reach(available.pairs, least):
            return StrategyChoice(
                "dpo", f"training.strategy is dpo: pairs {_short(available.pairs)}"
            )
        return StrategyChoice(
            None,
            "training.strategy is dpo, which needs correction pairs (a correction and a"
            f" different logged response, {least} of each label): have {_short(available.pairs)}"
            f" ({available.summary()})",
        )
    if requested == "kto":
        if kto_ok:
            return StrategyChoice("kto", f"training.strategy is kto: {kto_has}")
        return StrategyChoice(
            None,
            "training.strategy is kto, which needs desirable and undesirable examples"
            f" ({least} of each): have {kto_has} ({available.summary()})",
        )
    return StrategyChoice(
        None, f"unknown training.strategy {requested!r}; use one of auto, {', '.join(STRATEGIES)}"
    )
