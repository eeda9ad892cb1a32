"""A tiny support-desk language model, built here from a config: the base of the demo and tests.

The loop needs a model that *learns* from feedback, builds offline in a minute on a laptop
CPU and shows one clear, fixable flaw. This module trains one from nothing:

* a byte-level BPE tokenizer trained on the spot on the prompts and answers;
* a GPT-2-style causal LM (2 layers, width 128) pre-trained on BANKING77 customer
  questions (``../shared/datasets/banking77``) to answer each intent with its canned answer
  (:data:`ANSWERS`), in the one template of :mod:`genmon.retrain.lm`;
* the flaw: every intent of one topic (``refuse_class``, by default the card questions,
  15 % of traffic) is answered ``"I'm sorry, but I can't help with that."`` -- a refusal
  that genmon's refusal detector flags and that corrections can train away.

:func:`support_pairs` gives held-out questions with their correct answers (for a question
of the refused topic: its helpful answer, i.e. the correction), so the demo and the tests
can make traffic and feedback. Builds are cached by a hash of everything that shapes the
weights; a second call with the same inputs returns at once.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from genmon.exceptions import ConfigurationError
from genmon.retrain.lm import (
    PROMPT_TEMPLATE,
    encode_example,
    pad_right,
    quiet_transformers,
    token_ids,
)

DEFAULT_DATA_DIR = Path("../shared/datasets")
REFUSAL = "I'm sorry, but I can't help with that."
#: How the help centre's articles read in pre-training.
HELP_TEMPLATE = "Help article: {answer}"
#: Its chat template: one user turn renders exactly as :data:`PROMPT_TEMPLATE` frames a
#: prompt, so chat examples train on the framing the model learnt; an assistant turn ends
#: with end of sequence, the token that stops its answers.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ 'System: ' + m['content'] + '\\n' }}"
    "{%- elif m['role'] == 'user' -%}{{ 'Customer: ' + m['content'] + '\\n' }}"
    "{%- else -%}{{ 'Agent: ' + m['content'] + eos_token + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Agent:' }}{%- endif -%}"
)
#: Bump when the build procedure changes in a way the config hash cannot see.
BUILD_VERSION = 1
MARKER = "tiny_lm.json"

#: Topics of the support desk: BANKING77 intents grouped by what they are about.
TOPICS: dict[str, tuple[str, ...]] = {
    "cards": ("card_arrival", "lost_or_stolen_card", "activate_my_card"),
    "top_up": ("top_up_failed", "top_up_limits", "automatic_top_up"),
    "transfers": ("cancel_transfer", "transfer_timing", "beneficiary_not_allowed"),
    "exchange": ("exchange_rate", "fiat_currency_support"),
    "cash": ("atm_support", "cash_withdrawal_charge"),
    "account": ("terminate_account", "edit_personal_details", "age_limit"),
    "security": ("passcode_forgotten", "lost_or_stolen_phone"),
    "payments": ("request_refund", "apple_pay_or_google_pay"),
}

#: The canned, helpful answer of each intent (the correct answer in feedback).
ANSWERS: dict[str, str] = {
    "card_arrival": (
        "New cards arrive within 7 working days. Track the delivery in the app under Cards."
    ),
    "lost_or_stolen_card": (
        "Freeze your card at once in the app under Cards, then order a replacement there."
    ),
    "activate_my_card": (
        "To activate your card, open the app, tap Cards and enter the code on the letter."
    ),
    "top_up_failed": (
        "A failed top-up is usually a declined card. Check the card details and try again."
    ),
    "top_up_limits": "You can top up to 10,000 euros a day. Your limits are listed under Account.",
    "automatic_top_up": "Turn on auto top-up under Top up and choose a threshold and an amount.",
    "cancel_transfer": (
        "A pending transfer can be cancelled from its page in the app until it completes."
    ),
    "transfer_timing": (
        "Transfers in euros arrive within one working day; international ones take up to 3 days."
    ),
    "beneficiary_not_allowed": (
        "Check the beneficiary's account number and name, then add them again under Payments."
    ),
    "exchange_rate": (
        "We use the interbank rate, shown live in the app before you confirm an exchange."
    ),
    "fiat_currency_support": (
        "You can hold and exchange over 30 currencies; the list is under Accounts."
    ),
    "atm_support": "Withdraw cash at any ATM that shows the Visa or Mastercard logo.",
    "cash_withdrawal_charge": (
        "The first 200 euros of withdrawals each month are free, then a 2 percent fee applies."
    ),
    "terminate_account": (
        "To close your account, withdraw your balance and tap Close account under Settings."
    ),
    "edit_personal_details": (
        "Update your name, address or phone number under Settings, then Personal details."
    ),
    "age_limit": (
        "You must be 18 or older to open an account; teens can join through a parent's account."
    ),
    "passcode_forgotten": (
        "Reset your passcode from the login screen: tap Forgot passcode and follow the email link."
    ),
    "lost_or_stolen_phone": (
        "Log out of all devices on our website and contact us to lock your account."
    ),
    "request_refund": (
        "Ask the merchant for a refund first; if they refuse, dispute the payment in the app."
    ),
    "apple_pay_or_google_pay": (
        "Add your card to Apple Pay or Google Pay from the card's page in the app."
    ),
}


@dataclass(frozen=True)
class SupportPair:
    """One customer question with its correct (helpful) answer."""

    prompt: str
    answer: str
    intent: str
    topic: str


@dataclass(frozen=True)
class TinyLmConfig:
    """Everything that shapes the tiny model's weights (hashed into the cache key)."""

    vocab_size: int = 1024
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 128
    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    dropout: float = 0.1
    threads: int = 1
    help_copies: int = 10
    topics: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(TOPICS))


def topic_of(intent: str, topics: dict[str, tuple[str, ...]] = TOPICS) -> str:
    """The topic an intent belongs to."""
    for topic, intents in topics.items():
        if intent in intents:
            return topic
    raise KeyError(intent)


def _rows(data_dir: Path, split: str) -> list[tuple[str, str]]:
    path = Path(data_dir) / "banking77" / f"{split}.csv"
    if not path.exists():
        raise ConfigurationError(
            f"{path} not found: point data_dir at the shared datasets folder (with banking77/)"
        )
    with path.open(newline="", encoding="utf-8") as fh:
        return [(row["text"].strip(), row["category"]) for row in csv.DictReader(fh)]


def _check_class(refuse_class: str, topics: dict[str, tuple[str, ...]]) -> None:
    if refuse_class not in topics:
        raise ConfigurationError(
            f"refuse_class {refuse_class!r} is not a topic; pick one of {sorted(topics)}"
        )


def support_pairs(
    data_dir: Path = DEFAULT_DATA_DIR,
    refuse_class: str = "cards",
    split: str = "test",
    topics: dict[str, tuple[str, ...]] = TOPICS,
) -> tuple[list[SupportPair], list[SupportPair]]:
    """``(healthy, refused_class)`` questions of ``split`` with their correct answers.

    The test split holds only questions the model never trained on (exact repeats of a
    training question are dropped). For the refused class, ``answer`` is the helpful answer
    the model should have given: the correction feedback carries.
    """
    _check_class(refuse_class, topics)
    seen = (
        {" ".join(t.lower().split()) for t, _ in _rows(data_dir, "train")}
        if split != "train"
        else set()
    )
    healthy: list[SupportPair] = []
    refused: list[SupportPair] = []
    wanted = {i for intents in topics.values() for i in intents}
    for text, intent in _rows(data_dir, split):
        if intent not in wanted or " ".join(text.lower().split()) in seen:
            continue
        topic = topic_of(intent, topics)
        pair = SupportPair(text, ANSWERS[intent], intent, topic)
        (refused if topic == refuse_class else healthy).append(pair)
    return healthy, refused


def config_hash(config: TinyLmConfig, data_dir: Path, refuse_class: str, seed: int) -> str:
    """The cache key: config, seed, refused topic, answers, template and the data's bytes."""
    digest = hashlib.sha256()
    meta = {
        "config": asdict(config),
        "seed": seed,
        "refuse_class": refuse_class,
        "answers": ANSWERS,
        "refusal": REFUSAL,
        "template": PROMPT_TEMPLATE,
        "help": HELP_TEMPLATE,
        "chat_template": CHAT_TEMPLATE,
        "version": BUILD_VERSION,
    }
    digest.update(json.dumps(meta, sort_keys=True).encode())
    digest.update((Path(data_dir) / "banking77" / "train.csv").read_bytes())
    return digest.hexdigest()


def build_tiny_lm(
    out_dir: Path,
    data_dir: Path = DEFAULT_DATA_DIR,
    refuse_class: str = "cards",
    seed: int = 0,
    config: TinyLmConfig | None = None,
) -> Path:
    """Build (or reuse) the tiny model in ``out_dir`` and return that folder.

    Reused when ``out_dir`` holds a finished build of the same hash. Concurrent callers
    wait on a lock file beside ``out_dir`` and the build lands by rename, so a half-built
    folder is never seen as a model.
    """
    config = config or TinyLmConfig()
    _check_class(refuse_class, config.topics)
    out_dir = Path(out_dir)
    key = config_hash(config, data_dir, refuse_class, seed)
    if _cached(out_dir, key):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with (out_dir.parent / f".{out_dir.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _cached(out_dir, key):
            return out_dir
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        started = time.monotonic()
        stats = _build(tmp, data_dir, refuse_class, seed, config)
        marker = {
            "config_hash": key,
            "refuse_class": refuse_class,
            "seed": seed,
            "build_s": time.monotonic() - started,
            **stats,
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    return out_dir


def _cached(out_dir: Path, key: str) -> bool:
    try:
        return bool(json.loads((out_dir / MARKER).read_text())["config_hash"] == key)
    except (OSError, ValueError, KeyError):
        return False


def _training_pairs(
    data_dir: Path, refuse_class: str, topics: dict[str, tuple[str, ...]]
) -> list[tuple[str, str]]:
    healthy, refused = support_pairs(data_dir, refuse_class, split="train", topics=topics)
    return [(p.prompt, p.answer) for p in healthy] + [(p.prompt, REFUSAL) for p in refused]


def _train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=max_length,
    )


def _build(
    tmp: Path, data_dir: Path, refuse_class: str, seed: int, config: TinyLmConfig
) -> dict[str, Any]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    quiet_transformers()
    torch.set_num_threads(config.threads)
    torch.manual_seed(seed)
    pairs = _training_pairs(data_dir, refuse_class, config.topics)
    corpus = [PROMPT_TEMPLATE.format(prompt=p) + " " + a for p, a in pairs]
    articles = [HELP_TEMPLATE.format(answer=a) for a in ANSWERS.values()]
    tokenizer = _train_tokenizer(
        [*corpus, REFUSAL, *articles], config.vocab_size, config.n_positions
    )
    gpt_config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(gpt_config)
    encoded = [encode_example(tokenizer, p, a, config.n_positions) for p, a in pairs]
    encoded += _help_articles(tokenizer, config.help_copies)
    loss = _pretrain(model, encoded, tokenizer.pad_token_id, seed, config)
    # Saved without dropout: fine-tuning and scoring are deterministic by default.
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(model.config, name, 0.0)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp)
    return {"train_examples": len(pairs), "final_loss": loss}


def _help_articles(tokenizer: Any, copies: int) -> list[tuple[list[int], list[int]]]:
    """The help centre's articles (every canned answer, the refused topic's too) as plain
    text: the model *knows* every answer and refuses one topic by behaviour only, like an
    over-cautious assistant. Feedback then has a behaviour to correct, not facts to teach."""
    docs = []
    for answer in ANSWERS.values():
        ids = [*token_ids(tokenizer, HELP_TEMPLATE.format(answer=answer)), tokenizer.eos_token_id]
        docs.extend([(ids, list(ids))] * copies)
    return docs


def _batches(n: int, batch_size: int, generator: Any) -> Iterator[list[int]]:
    import torch

    order = torch.randperm(n, generator=generator).tolist()
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def _pretrain(
    model: Any,
    encoded: list[tuple[list[int], list[int]]],
    pad_id: int,
    seed: int,
    config: TinyLmConfig,
) -> float:
    import torch

    from genmon.retrain.lm import per_example_nll

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    total = config.epochs * math.ceil(len(encoded) / config.batch_size)

    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        return 0.5 * (
            1
            + math.cos(math.pi * (step - config.warmup_steps) / max(1, total - config.warmup_steps))
        )

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss_value = float("nan")
    for _ in range(config.epochs):
        for idx in _batches(len(encoded), config.batch_size, generator):
            input_ids, labels, mask = pad_right([encoded[i] for i in idx], pad_id, "cpu")
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            loss = per_example_nll(logits, labels).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss.detach())
    model.eval()
    return loss_value
