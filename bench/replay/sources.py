"""The real public data sets a replay is built from, read from ``data_dir``.

Data sets lie in ``../shared/datasets`` next to the checkout (:data:`DEFAULT_DATA_DIR`;
``GENMON_DATA_DIR`` overrides); nothing from them is copied into the repository. Every
loader is cached: a file is read once per process.

**Traces** (:func:`load_trace`): arrival offsets and (prompt, completion) token counts of
``azure_code``, ``azure_conv`` (azure_llm_inference_trace_2023) and ``mooncake``
(mooncake_conversation_trace; stamped mostly to the second).

**Latencies** (:func:`load_provider`): the healthy records of one LLMPerf leaderboard
provider (``llmperf_leaderboard_latency``); :mod:`bench.replay.latency` turns them into
timings.

**Texts** (:func:`load_texts`; English, ``locale=en``):

- PandaLM's human-annotated test set: instruction (+ input) as prompt, one of the two
  model responses as answer, ``segment.app`` = its ``motivation_app`` (spelling variants
  merged; the ``PANDALM_APPS`` most common apps only, so that each app segment gets enough
  traffic to be tested). Thumbs from the 3 annotators' majority: up when they preferred
  this response, down when they preferred the other; tied pairs (no majority for either)
  and empty responses are left out so that every answer carries a real verdict.
- XSTest's 250 safe prompts with GPT-4's completions, ``segment.app`` = ``XSTEST_APP``,
  ``XSTEST_SHARE`` of the traffic. Thumbs up when the human label is full compliance, down
  for a (partial) refusal of a safe prompt.

**Utterances** (:func:`load_utterances`): replacement prompts for the injected changes,
xSID's multilingual intents, CLINC150's domains and BANKING77.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The repository's convention: data sets lie next to the checkout; GENMON_DATA_DIR overrides.
DEFAULT_DATA_DIR = Path(
    os.environ.get("GENMON_DATA_DIR") or REPO_ROOT.parent / "shared" / "datasets"
)

TRACES = ("azure_code", "azure_conv", "mooncake")
LOCALE = "en"
#: PandaLM apps kept (most common first): few enough for every app to see traffic.
PANDALM_APPS = 8
#: The app name of XSTest's prompts and their share of the traffic.
XSTEST_APP = "assistant"
XSTEST_SHARE = 0.25


@dataclass(frozen=True, eq=False)
class Trace:
    """One production trace: arrival offsets (s since its first request) and token counts."""

    name: str
    offsets_s: np.ndarray
    prompt_tokens: np.ndarray
    completion_tokens: np.ndarray

    @property
    def span_s(self) -> float:
        return float(self.offsets_s[-1])

    @property
    def rate_per_s(self) -> float:
        """Requests per second over the whole trace."""
        return len(self.offsets_s) / self.span_s


@lru_cache(maxsize=8)
def load_trace(data_dir: Path, name: str) -> Trace:
    """Read one trace (cached: traces are read once per process)."""
    if name in ("azure_code", "azure_conv"):
        offsets, tokens = _azure(data_dir, name.removeprefix("azure_"))
    elif name == "mooncake":
        offsets, tokens = _mooncake(data_dir)
    else:
        raise ValueError(f"unknown trace {name!r}; one of {', '.join(TRACES)}")
    if np.any(np.diff(offsets) < 0):
        raise ValueError(f"trace {name}: arrivals are not in time order")
    return Trace(name, offsets, tokens[:, 0], tokens[:, 1])


def _azure(data_dir: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Arrival offsets (s) and (ContextTokens, GeneratedTokens) of one Azure 2023 trace."""
    path = data_dir / "azure_llm_inference_trace_2023" / f"AzureLLMInferenceTrace_{kind}.csv"
    with _open(path) as handle:
        rows = list(csv.reader(handle))[1:]
    stamps = np.array([r[0].replace(" ", "T") for r in rows], dtype="datetime64[ns]")
    offsets = (stamps - stamps[0]).astype(np.int64) / 1e9
    return offsets, np.array([(int(r[1]), int(r[2])) for r in rows], dtype=np.int64)


def _mooncake(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Arrival offsets (s; stamped mostly to the second) and (input, output) lengths."""
    path = data_dir / "mooncake_conversation_trace" / "conversation_trace.jsonl"
    with _open(path) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    stamps_ms = np.array([r["timestamp"] for r in rows], dtype=np.float64)
    offsets = (stamps_ms - stamps_ms[0]) / 1e3
    return offsets, np.array([(r["input_length"], r["output_length"]) for r in rows], np.int64)


@dataclass(frozen=True, eq=False)
class Provider:
    """The healthy (no error) LLMPerf records of one provider, as arrays."""

    name: str
    positions: np.ndarray  # each record's index in the provider's file
    ttft_s: np.ndarray
    tpot_s: np.ndarray
    input_tokens: np.ndarray

    def row(self, position: int) -> int:
        """The array row of the record at ``position`` in the file."""
        return int(np.searchsorted(self.positions, position))


@lru_cache(maxsize=32)
def load_provider(data_dir: Path, name: str) -> Provider:
    path = data_dir / "llmperf_leaderboard_latency" / "individual" / f"{name}.json"
    with _open(path) as handle:
        records = json.load(handle)
    ok = [(i, r) for i, r in enumerate(records) if not r["error_code"] and r["ttft_s"]]
    if not ok:
        raise ValueError(f"{path}: no request without error")
    return Provider(
        name,
        np.array([i for i, _ in ok]),
        np.array([r["ttft_s"] for _, r in ok], dtype=np.float64),
        np.array([r["inter_token_latency_s"] for _, r in ok], dtype=np.float64),
        np.array([r["number_input_tokens"] for _, r in ok], dtype=np.int64),
    )


@dataclass(frozen=True)
class Text:
    """One real prompt/answer pair with its app and the humans' verdict on the answer."""

    source: str  # provenance, e.g. "pandalm:17:1" (row idx, response 1)
    prompt: str
    response: str
    app: str
    thumbs: str  # "up" / "down"


@dataclass(frozen=True, eq=False)
class TextPool:
    texts: tuple[Text, ...]
    weights: np.ndarray  # draw probabilities


@lru_cache(maxsize=8)
def load_texts(data_dir: Path) -> TextPool:
    """PandaLM's top apps and XSTest's safe prompts, weighted so XSTest gets XSTEST_SHARE."""
    pandalm = _pandalm_texts(data_dir)
    xstest = tuple(_xstest_texts(data_dir, "gpt4").values())
    weights = np.concatenate(
        [
            np.full(len(pandalm), (1 - XSTEST_SHARE) / len(pandalm)),
            np.full(len(xstest), XSTEST_SHARE / len(xstest)),
        ]
    )
    return TextPool(pandalm + xstest, weights / weights.sum())


def _pandalm_texts(data_dir: Path) -> tuple[Text, ...]:
    path = data_dir / "pandalm_human_annotated_testset" / "testset-v1.json"
    with _open(path) as handle:
        rows = json.load(handle)
    apps = _pandalm_app_names(rows)
    counts = Counter(apps[r["motivation_app"]] for r in rows)
    keep = {name for name, _ in counts.most_common(PANDALM_APPS)}
    texts = []
    for row in rows:
        app, winner = apps[row["motivation_app"]], _majority(row)
        if app not in keep or winner is None:
            continue
        prompt = row["instruction"].strip()
        if isinstance(row["input"], str) and row["input"].strip():
            prompt = f"{prompt}\n\n{row['input'].strip()}"
        for which in (1, 2):
            response = row[f"response{which}"]
            if isinstance(response, str) and response.strip():
                thumbs = "up" if winner == which else "down"
                source = f"pandalm:{row['idx']}:{which}"
                texts.append(Text(source, prompt, response.strip(), app, thumbs))
    return tuple(texts)


def _pandalm_app_names(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Raw app name -> its most common spelling ("(Wolfram alpha)?" and "yelp" are variants)."""
    raw = Counter(r["motivation_app"] for r in rows)
    spelling: dict[str, str] = {}
    for name, _ in raw.most_common():
        spelling.setdefault(name.strip(" ()?").casefold(), name.strip(" ()?"))
    return {name: spelling[name.strip(" ()?").casefold()] for name in raw}


def _majority(row: Mapping[str, Any]) -> int | None:
    """The response (1 or 2) most annotators preferred; None for a tie or no majority."""
    votes = Counter(str(row[f"annotator{i}"]) for i in (1, 2, 3))
    (label, count), *_ = votes.most_common(1)
    return int(label) if count >= 2 and label in ("1", "2") else None


@lru_cache(maxsize=8)
def _xstest_texts(data_dir: Path, model: str) -> dict[str, Text]:
    """XSTest's safe prompts (by prompt) with one model's completion and the human label."""
    path = data_dir / "xstest" / f"xstest_v2_completions_{model}.csv"
    with _open(path, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if not r["type"].startswith("contrast")]
    return {
        r["prompt"]: Text(
            f"xstest_{model}:{r['id']}",
            r["prompt"],
            r["completion"].strip(),
            XSTEST_APP,
            "up" if r["final_label"].startswith("1_") else "down",
        )
        for r in rows
    }


@lru_cache(maxsize=16)
def load_utterances(data_dir: Path, source: str) -> tuple[tuple[str, str], ...]:
    """(provenance, text) of replacement prompts: ``xsid:<lang>``, ``clinc150:<domain>``
    or ``banking77``."""
    kind, _, arg = source.partition(":")
    if kind == "xsid":
        return _xsid(data_dir, arg)
    if kind == "clinc150":
        return _clinc(data_dir, arg)
    if kind == "banking77":
        with _open(data_dir / "banking77" / "test.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        return tuple((f"banking77:{i}", r["text"]) for i, r in enumerate(rows))
    raise ValueError(f"unknown utterance source {source!r}")


def _xsid(data_dir: Path, language: str) -> tuple[tuple[str, str], ...]:
    out = []
    for split in ("test", "valid"):
        path = data_dir / "xsid_multilingual_intents" / f"{language}.{split}.conll"
        with _open(path) as handle:
            texts = [ln[len("# text = ") :].strip() for ln in handle if ln.startswith("# text = ")]
        if language in ("ja", "zh"):  # xSID writes these tokenised, with spaces
            texts = [t.replace(" ", "") for t in texts]
        out += [(f"xsid:{language}.{split}:{i}", t) for i, t in enumerate(texts)]
    return tuple(out)


def _clinc(data_dir: Path, domain: str) -> tuple[tuple[str, str], ...]:
    with _open(data_dir / "clinc150" / "domains.json") as handle:
        domains = json.load(handle)
    if domain not in domains:
        raise ValueError(f"unknown clinc150 domain {domain!r}; one of {', '.join(domains)}")
    with _open(data_dir / "clinc150" / "data_full.json") as handle:
        data = json.load(handle)
    intents = set(domains[domain])
    return tuple(
        (f"clinc150:{split}:{i}", text)
        for split in ("train", "val", "test")
        for i, (text, intent) in enumerate(data[split])
        if intent in intents
    )


def _open(path: Path, newline: str | None = None) -> Any:
    """Open a data set file, saying where the data sets are expected when it is missing."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: point data_dir (or GENMON_DATA_DIR) at shared/datasets"
        )
    return path.open(encoding="utf-8", newline=newline)
