"""Whose feedback may train a model, and how much of it.

- **Opt-out.** A data subject in table ``subject_opt_out`` asked that their feedback never
  train a model: their rows are left out before anything else is done with them (merged,
  embedded, hashed or stored).
- **Per-subject cap.** Each subject gives a dataset at most ``max_per_subject`` examples of
  each class (the label for SFT and DPO; desirable / undesirable for KTO), so that one user
  cannot steer the model. The latest ones are kept: they say what the user wants now.
  Rows without a subject are not capped: there is no one to count them against (a
  pipeline that wants them capped sends a subject id).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from genmon.exceptions import ConfigurationError
from genmon.retrain.examples import SftExample
from genmon.retrain.preference_data import order_key

if TYPE_CHECKING:
    from sqlmodel import Session

    from genmon.schemas.tables import LabelledExample


def load_opted_out(session: Session) -> frozenset[str]:
    """Every data subject who opted out of training."""
    from sqlmodel import select

    from genmon.schemas.governance import SubjectOptOut

    return frozenset(session.exec(select(SubjectOptOut.subject_id)).all())


def without_opted_out(
    rows: Iterable[LabelledExample], opted_out: frozenset[str]
) -> tuple[list[LabelledExample], int]:
    """``rows`` less those of an opted-out subject, and how many those were."""
    rows = list(rows)
    kept = [row for row in rows if row.subject_id is None or row.subject_id not in opted_out]
    return kept, len(rows) - len(kept)


def cap_per_subject(
    examples: Sequence[SftExample],
    max_per_subject: int | None,
    class_of: Callable[[SftExample], str],
) -> tuple[list[SftExample], int]:
    """``examples`` (in their order) with at most ``max_per_subject`` per (subject, class),
    the latest by :func:`~genmon.retrain.preference_data.order_key`; and how many were cut.
    ``None`` caps nothing."""
    if max_per_subject is None:
        return list(examples), 0
    if max_per_subject < 1:
        raise ConfigurationError(
            f"max_per_subject must be at least 1 or None, got {max_per_subject}"
            " (retrain.max_examples_per_subject)"
        )
    by_subject: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        if example.subject_id is not None:
            by_subject[(example.subject_id, class_of(example))].append(index)
    cut: set[int] = set()
    for indexes in by_subject.values():
        latest_first = sorted(indexes, key=lambda i: (order_key(examples[i]), i), reverse=True)
        cut.update(latest_first[max_per_subject:])
    return [e for i, e in enumerate(examples) if i not in cut], len(cut)
