"""TextEncoder on the real bundled all-MiniLM-L6-v2: torch fp32, ONNX int8 and the auto choice.

The int8 graph is exported once into ``embedding.cache_dir`` (the worker's cache) and
reused by later runs, so only a cold cache pays the export.
"""

from __future__ import annotations

import numpy as np
import pytest

from genmon.exceptions import ConfigurationError
from genmon.settings import Settings
from genmon.streams.embedding import encoder as encoder_module
from genmon.streams.embedding.encoder import (
    AGREEMENT_MIN_COSINE,
    PROBE_TEXTS,
    TextEncoder,
    bundled_model_path,
    export_int8_onnx,
)

CACHE = Settings().embedding.cache_dir

# Not in the probe set: the agreement must hold beyond the texts it was checked on.
HELD_OUT = [
    "Where can I find the nearest ATM that doesn't charge a fee?",
    "My package was supposed to arrive on Monday but the tracking hasn't updated.",
    "Give me a vegetarian lasagne recipe that serves six people.",
    "What is the capital of Australia?",
    "Can you explain how photosynthesis converts light into chemical energy?",
    "thanks!",
    "Refactor this Python function so it no longer mutates its argument.",
    "The defendant's lawyer requested a postponement of the hearing until next month.",
    "Play some relaxing jazz in the living room.",
    "Why does my laptop fan get so loud when I open a video call?",
    "Tell me a joke about penguins.",
    "I want to cancel my gym membership and get a refund for this month.",
]


@pytest.fixture(scope="module")
def torch_encoder() -> TextEncoder:
    return TextEncoder(backend="torch", cache_dir=CACHE)


@pytest.fixture(scope="module")
def onnx_encoder() -> TextEncoder:
    return TextEncoder(backend="onnx", cache_dir=CACHE)


@pytest.fixture(params=["torch", "onnx"])
def encoder(request: pytest.FixtureRequest) -> TextEncoder:
    found: TextEncoder = request.getfixturevalue(f"{request.param}_encoder")
    assert found.backend == request.param
    return found


def test_embeddings_are_unit_length_384_d_float32(encoder: TextEncoder) -> None:
    vectors = encoder.encode(HELD_OUT)
    assert vectors.shape == (len(HELD_OUT), 384) == (len(HELD_OUT), encoder.dimension)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_paraphrases_are_closer_than_unrelated_sentences(encoder: TextEncoder) -> None:
    pin, pin_again, weather, recipe = encoder.encode(
        [
            "How do I change the PIN of my debit card?",
            "I'd like to set a new PIN code for my bank card.",
            "Will it rain in Berlin this weekend?",
            "How many eggs go into a sponge cake?",
        ]
    )
    assert pin @ pin_again > 0.6
    assert pin @ pin_again > pin @ weather + 0.3
    assert pin @ pin_again > pin @ recipe + 0.3


def test_a_text_embeds_the_same_alone_or_in_a_padded_batch(encoder: TextEncoder) -> None:
    batch = encoder.encode(HELD_OUT)
    alone = np.stack([encoder.encode([text])[0] for text in HELD_OUT[:4]])
    np.testing.assert_allclose(np.sum(batch[:4] * alone, axis=1), 1.0, atol=1e-3)


def test_empty_input_gives_an_empty_matrix(encoder: TextEncoder) -> None:
    assert encoder.encode([]).shape == (0, 384)


def test_int8_agrees_with_fp32_on_held_out_and_long_texts(
    torch_encoder: TextEncoder, onnx_encoder: TextEncoder
) -> None:
    long_text = " ".join(HELD_OUT * 12)  # far past 256 tokens: both cut it the same way
    texts = [*HELD_OUT, long_text]
    cosine = np.sum(torch_encoder.encode(texts) * onnx_encoder.encode(texts), axis=1)
    assert cosine.min() >= AGREEMENT_MIN_COSINE
    np.testing.assert_allclose(
        torch_encoder.encode([long_text]), torch_encoder.encode([long_text + " extra words"])
    )


def test_auto_takes_int8_when_it_agrees_on_the_probe_set() -> None:
    encoder = TextEncoder(backend="auto", cache_dir=CACHE)
    assert encoder.backend == "onnx"
    assert encoder.agreement is not None and encoder.agreement >= AGREEMENT_MIN_COSINE
    assert encoder.encode(list(PROBE_TEXTS[:2])).shape == (2, 384)


def test_auto_falls_back_to_torch_when_int8_disagrees(monkeypatch: pytest.MonkeyPatch) -> None:
    # No int8 graph reaches a cosine above 1: the check must then refuse it.
    monkeypatch.setattr(encoder_module, "AGREEMENT_MIN_COSINE", 1.0 + 1e-6)
    encoder = TextEncoder(backend="auto", cache_dir=CACHE)
    assert encoder.backend == "torch"
    assert encoder.agreement is not None and encoder.agreement < 1.0 + 1e-6


def test_the_exported_graph_is_cached_and_reused() -> None:
    first = export_int8_onnx(bundled_model_path(), CACHE)
    stamp = first.stat().st_mtime_ns
    again = export_int8_onnx(bundled_model_path(), CACHE)
    assert again == first and again.stat().st_mtime_ns == stamp
    assert first.parent == CACHE and "int8" in first.name


def test_from_settings_uses_the_embedding_section() -> None:
    settings = Settings(embedding={"backend": "torch", "device": "auto", "batch_size": 7})
    encoder = TextEncoder.from_settings(settings.embedding)
    assert (encoder.backend, encoder.batch_size, encoder.threads) == ("torch", 7, 1)
    assert encoder.device in ("cpu", "cuda")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "tensorflow"}, "torch, onnx or auto"),
        ({"device": "tpu"}, "cpu, cuda or auto"),
        ({"threads": 0}, "threads"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_options_are_refused_with_what_to_do(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        TextEncoder(**kwargs)
