"""Chat data: the base's chat template frames the turns before the response, and the loss
falls on the assistant's response only (issue #16's acceptance: a test inspects the labels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from genmon.exceptions import ConfigurationError
from genmon.retrain.examples import SftExample
from genmon.retrain.lm import encode_chat, encode_example, token_ids
from genmon.retrain.preference import dpo_rows, kto_rows
from genmon.retrain.trainer import LoraTrainer, NullContext, TrainingParams, encode_sft

CONVERSATION = [
    {"role": "system", "content": "You are the bank's support agent."},
    {"role": "user", "content": "Hi, I ordered a card last week."},
    {"role": "assistant", "content": "Thanks, how can I help?"},
    {"role": "user", "content": "When will it arrive?"},
]
REPLY = "New cards arrive within 7 working days."
CHATML = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm_path)


def labelled(ids: list[int], labels: list[int]) -> list[int]:
    return [i for i, label in zip(ids, labels, strict=True) if label != -100]


def test_only_the_assistant_reply_is_labelled(tokenizer: Any) -> None:
    ids, labels = encode_chat(tokenizer, CONVERSATION, REPLY, 128)
    assert len(ids) == len(labels)
    prompt = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    prompt_ids = token_ids(tokenizer, prompt)
    # Every system, user and earlier assistant token, and the template's own text: -100.
    assert ids[: len(prompt_ids)] == prompt_ids
    assert set(labels[: len(prompt_ids)]) == {-100}
    # The reply (after the template's space) and its end of turn: labelled with their ids.
    reply = [*token_ids(tokenizer, " " + REPLY), tokenizer.eos_token_id]
    assert ids[len(prompt_ids) :] == reply and labels[len(prompt_ids) :] == reply
    assert tokenizer.decode(labelled(ids, labels)) == f" {REPLY}<|endoftext|>"
    # The earlier assistant turn is context, not target.
    assert "Thanks" not in tokenizer.decode(labelled(ids, labels))


def test_one_user_turn_trains_exactly_like_a_plain_prompt(tokenizer: Any) -> None:
    # The tiny model's template frames one user turn as the plain prompt template does.
    one = [{"role": "user", "content": "When will my card arrive?"}]
    assert encode_chat(tokenizer, one, REPLY, 128) == encode_example(
        tokenizer, "When will my card arrive?", REPLY, 128
    )
    chat = SftExample(prompt="When will it arrive?", completion=REPLY, messages=CONVERSATION)
    assert encode_sft(tokenizer, chat, 128) == encode_chat(tokenizer, CONVERSATION, REPLY, 128)


def test_a_template_with_its_own_end_of_turn_token_is_learnt_to_stop(tokenizer: Any) -> None:
    chatml = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chatml.chat_template = CHATML
    ids, labels = encode_chat(chatml, CONVERSATION, REPLY, 128)
    end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert labelled(ids, labels) == [*token_ids(chatml, REPLY), end]
    assert chatml.decode(ids[: labels.index(next(x for x in labels if x != -100))]).endswith(
        "<|im_start|>assistant\n"
    )


def test_a_long_history_loses_its_start_never_the_reply(tokenizer: Any) -> None:
    history = [{"role": "user", "content": "blah " * 200}, *CONVERSATION[1:]]
    ids, labels = encode_chat(tokenizer, history, REPLY, 64)
    assert len(ids) == 64
    assert tokenizer.decode(labelled(ids, labels)) == f" {REPLY}<|endoftext|>"
    assert tokenizer.decode(ids).endswith("When will it arrive?\nAgent: " + REPLY + "<|endoftext|>")


def test_a_base_without_a_chat_template_is_named(tokenizer: Any) -> None:
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(ConfigurationError, match=r"tiny-lm has no chat template.*set one"):
        encode_chat(bare, CONVERSATION, REPLY, 128)


def test_preference_prompts_are_the_templated_turns(tokenizer: Any) -> None:
    prompt = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    thumb = SftExample("When?", REPLY, messages=CONVERSATION, desirable=False)
    fix = SftExample("When?", REPLY, rejected="I can't help.", messages=CONVERSATION)
    assert kto_rows(tokenizer, [thumb], 128) == [
        {"prompt": prompt, "completion": f" {REPLY}<|endoftext|>", "label": False}
    ]
    (pair,) = dpo_rows(tokenizer, [fix], 128)
    assert pair["prompt"] == prompt and pair["rejected"] == " I can't help.<|endoftext|>"


def test_the_sft_loop_trains_on_chat_examples(tiny_lm_path: Path, tmp_path: Path) -> None:
    from genmon.retrain.lm import load_lm

    examples = [SftExample("When?", REPLY, messages=CONVERSATION)] * 4
    params = TrainingParams(max_steps=8, checkpoint_every=0, batch_size=4)
    result = LoraTrainer().train(str(tiny_lm_path), examples, params, NullContext(), tmp_path)
    base = load_lm(str(tiny_lm_path), device="cpu")
    tuned = load_lm(str(tiny_lm_path), str(result.adapter_dir), device="cpu")

    def reply_nll(lm: Any) -> float:
        import torch

        from genmon.retrain.lm import pad_right, per_example_nll

        row = encode_chat(lm.tokenizer, CONVERSATION, REPLY, 128)
        with torch.inference_mode():
            input_ids, labels, mask = pad_right([row], lm.pad_id, "cpu")
            logits = lm.model(input_ids=input_ids, attention_mask=mask).logits
        return float(per_example_nll(logits, labels)[0])

    assert reply_nll(tuned) < reply_nll(base) - 0.5


def test_the_gate_scores_a_chat_example_through_its_template(tiny_lm_path: Path) -> None:
    """The gate's NLL of a chat example is the NLL of the tokens it was trained on (the
    reply after the templated turns), not of the reply after the last user turn alone."""
    import numpy as np
    import torch

    from genmon.retrain.lm import load_lm, per_example_nll

    lm = load_lm(str(tiny_lm_path), device="cpu")
    prompt = CONVERSATION[-1]["content"]
    chat = lm.completion_nll([prompt], [REPLY], messages=[CONVERSATION])
    plain = lm.completion_nll([prompt], [REPLY])
    ids, labels = encode_chat(lm.tokenizer, CONVERSATION, REPLY, lm.max_length)
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids])).logits.float()
    expected = per_example_nll(logits, torch.tensor([labels])).numpy()
    np.testing.assert_allclose(chat, expected, rtol=1e-5)
    assert abs(float(chat[0]) - float(plain[0])) > 1e-3


def test_a_chat_prompt_is_answered_through_the_chat_template(tiny_lm_path: Path) -> None:
    """The gate's behaviour check asks a chat model the way it is served: the turns through
    its chat template, ending with the assistant's turn marker."""
    from genmon.retrain.lm import chat_prompt, load_lm

    lm = load_lm(str(tiny_lm_path), device="cpu")
    prompt = CONVERSATION[-1]["content"]
    framed = token_ids(lm.tokenizer, chat_prompt(lm.tokenizer, CONVERSATION))
    assert lm._prompt_ids(prompt, 16, CONVERSATION) == framed
    assert lm._prompt_ids(prompt, 16) != framed
    answers = lm.generate([prompt, prompt], max_new_tokens=8, messages=[CONVERSATION, None])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
