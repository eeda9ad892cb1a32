"""Encoder benchmark: torch fp32 vs the int8 ONNX graph of all-MiniLM-L6-v2, one thread each.

    .venv/bin/python bench/encoder/run.py                 # the recorded run
    .venv/bin/python bench/encoder/run.py --texts 64 --rounds 1   # a quick look

Real texts from the shared datasets (``--data-dir``, default ``../shared/datasets``):
clinc150 and banking77 utterances for 16 tokens, MT-Bench questions and XSTest answers for
64, Anthropic HH dialogues for 128. Each source is tokenised with the model's tokenizer,
its tokens concatenated and cut into texts of exactly ``length - 2`` word pieces (the
model adds [CLS] and [SEP]), decoded back to text.

Both encoders run in this process with one intra-op thread (torch and onnxruntime), as
the embedding worker does, on batches of ``embedding.batch_size`` texts. Rounds
alternate the backends so load from other jobs hits both alike; the median round is
reported. Also reported: the cosine similarity of each text's two embeddings (mean and
least), and for reference plain dynamic int8 quantisation (onnxruntime
``quantize_dynamic``, per-channel weights, per-tensor activations), which genmon does
not use.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from genmon.settings import Settings
from genmon.streams.embedding.encoder import TextEncoder, bundled_model_path

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
LENGTHS = (16, 64, 128)


# -- texts -------------------------------------------------------------------------------------
def clinc_and_banking(data: Path) -> Iterator[str]:
    clinc = json.loads((data / "clinc150" / "data_full.json").read_text())
    with open(data / "banking77" / "test.csv", newline="") as handle:
        banking = [row["text"] for row in csv.DictReader(handle)]
    utterances = [text for split in ("train", "val", "test") for text, _ in clinc[split]]
    # Interleaved so every text mixes both sets.
    for a, b in zip(utterances, itertools.cycle(banking), strict=False):
        yield a
        yield b


def mt_bench_and_xstest(data: Path) -> Iterator[str]:
    with open(data / "mt_bench_questions" / "question.jsonl") as handle:
        questions = [turn for line in handle for turn in json.loads(line)["turns"]]
    with open(data / "xstest" / "xstest_v2_completions_gpt4.csv", newline="") as handle:
        answers = [row["completion"] for row in csv.DictReader(handle)]
    for question, answer in zip(itertools.cycle(questions), answers, strict=False):
        yield question
        yield answer


def hh_dialogues(data: Path) -> Iterator[str]:
    with gzip.open(data / "hh_rlhf_harmless_test" / "harmless-base_test.jsonl.gz", "rt") as f:
        for line in f:
            yield json.loads(line)["chosen"].strip()


def texts_of_length(sources: Iterable[str], tokens: int, count: int) -> list[str]:
    """``count`` texts of ``tokens`` model tokens each ([CLS] and [SEP] included)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundled_model_path() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    piece = tokens - 2
    stream: list[int] = []
    out: list[str] = []
    for source in sources:
        stream += tokenizer.encode(source, add_special_tokens=False).ids
        while len(stream) >= piece and len(out) < count:
            out.append(tokenizer.decode(stream[:piece]))
            stream = stream[piece:]
        if len(out) == count:
            return out
    raise SystemExit(f"the datasets hold fewer than {count} texts of {tokens} tokens")


def corpus(data: Path, count: int) -> dict[int, list[str]]:
    return {
        16: texts_of_length(clinc_and_banking(data), 16, count),
        64: texts_of_length(mt_bench_and_xstest(data), 64, count),
        128: texts_of_length(hh_dialogues(data), 128, count),
    }


# -- encoders ----------------------------------------------------------------------------------
def dynamic_int8(reference: TextEncoder, workdir: Path) -> TextEncoder:
    """The rejected recipe: the same ONNX runner on a ``quantize_dynamic`` graph."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from genmon.streams.embedding.encoder import _export_fp32

    fp32, int8 = workdir / "fp32.onnx", workdir / "dynamic-int8.onnx"
    _export_fp32(bundled_model_path(), fp32)
    quantize_dynamic(
        str(fp32),
        str(int8),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    encoder = TextEncoder.__new__(TextEncoder)
    encoder.__dict__.update(reference.__dict__)
    encoder._session = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    return encoder


def timed(encoder: TextEncoder, texts: list[str]) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    vectors = encoder.encode(texts)
    return time.perf_counter() - started, vectors


def run(data: Path, count: int, rounds: int, with_dynamic: bool) -> list[dict[str, Any]]:
    settings = Settings()
    batch = settings.embedding.batch_size
    cache = settings.embedding.cache_dir
    encoders = {
        "torch-fp32": TextEncoder(backend="torch", threads=1, batch_size=batch, cache_dir=cache),
        "onnx-int8": TextEncoder(backend="onnx", threads=1, batch_size=batch, cache_dir=cache),
    }
    workdir = tempfile.TemporaryDirectory()
    if with_dynamic:
        encoders["onnx-int8-dynamic"] = dynamic_int8(encoders["onnx-int8"], Path(workdir.name))
    texts = corpus(data, count)
    rows = []
    for length, batch_texts in texts.items():
        for encoder in encoders.values():  # warm-up: first calls allocate
            encoder.encode(batch_texts[:batch])
        seconds: dict[str, list[float]] = {name: [] for name in encoders}
        vectors: dict[str, np.ndarray] = {}
        for _ in range(rounds):
            for name, encoder in encoders.items():
                took, vectors[name] = timed(encoder, batch_texts)
                seconds[name].append(took)
        fp32 = vectors["torch-fp32"]
        base = count / statistics.median(seconds["torch-fp32"])
        for name in encoders:
            cosine = np.sum(fp32 * vectors[name], axis=1)
            speed = count / statistics.median(seconds[name])
            rows.append(
                {
                    "tokens": length,
                    "encoder": name,
                    "texts": count,
                    "sentences_per_s": round(speed, 1),
                    "ratio_vs_fp32": round(speed / base, 2),
                    "cosine_mean": round(float(cosine.mean()), 4),
                    "cosine_min": round(float(cosine.min()), 4),
                }
            )
    workdir.cleanup()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="the shared datasets folder")
    parser.add_argument("--texts", type=int, default=128, help="texts per length")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per encoder")
    parser.add_argument(
        "--no-dynamic", action="store_true", help="skip the plain dynamic-int8 reference row"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    data = args.data_dir or Path(os.environ.get("GENMON_BENCH_DATA", str(DEFAULT_DATA)))
    started = time.perf_counter()
    rows = run(data, args.texts, args.rounds, not args.no_dynamic)
    import onnxruntime
    import torch

    print(
        f"python {platform.python_version()}, torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, {os.cpu_count()} CPUs, 1 thread per encoder, "
        f"batch {Settings().embedding.batch_size}, {args.texts} texts x {args.rounds} rounds"
    )
    header = ["tokens", "encoder", "sentences_per_s", "ratio_vs_fp32", "cosine_mean", "cosine_min"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[key]) for key in header) + " |")
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
