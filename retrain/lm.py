"""One causal language model as training, scoring and serving see it.

Every part of the loop (the trainer, the gate, the follower, the demo service) goes through
this module, so a prompt is framed by one template (:data:`PROMPT_TEMPLATE`) and tokenized
one way (:func:`encode_example`): a model fine-tuned on one framing and judged on another
would be judged on text it never saw. Loss and NLL count the completion tokens only (and
the end-of-sequence token that ends them): the prompt is given, not learnt.

Base weights live in a local folder or in the local Hugging Face cache; nothing downloads
(``HF_HUB_OFFLINE`` or not, :func:`resolve_base` only looks). An adapter is a PEFT LoRA
folder stored as safetensors, local or under any fsspec URL.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from genmon.exceptions import ConfigurationError
from genmon.retrain.exceptions import ModelLoadError

if TYPE_CHECKING:
    import torch

#: The one framing of a prompt; the completion follows after a space.
PROMPT_TEMPLATE = "Customer: {prompt}\nAgent:"
#: Files whose bytes are the weights (hashed by :func:`fingerprint_weights`).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
#: Positions assumed when a config names no context length.
DEFAULT_MAX_POSITIONS = 1024


def format_prompt(prompt: str) -> str:
    """Frame ``prompt`` for the model; whitespace runs collapse so a newline in a prompt
    cannot end the turn early (generation stops at the first newline)."""
    return PROMPT_TEMPLATE.format(prompt=" ".join(prompt.split()))


def completion_text(completion: str) -> str:
    """The completion as it follows the template: one leading space, no trailing space."""
    return " " + " ".join(completion.split())


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` without special tokens; long texts are cut by the caller, so the
    tokenizer's "longer than the maximum" log line would be noise."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def encode_example(
    tokenizer: Any, prompt: str, completion: str, max_length: int
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for one pair; labels are -100 on the prompt.

    Prompt and completion are tokenized apart so the boundary never moves between
    training and scoring; too long, they are cut as :func:`_join` says.
    """
    prompt_ids = token_ids(tokenizer, format_prompt(prompt))
    target = [*token_ids(tokenizer, completion_text(completion)), int(tokenizer.eos_token_id)]
    return _join(prompt_ids, target, max_length)


def _join(prompt_ids: list[int], target: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Prompt then target, at most ``max_length`` ids: the prompt loses its start (its end
    holds the turn marker), then the target its end. Labels are -100 on the prompt."""
    target = target[: max(1, max_length - 1)]
    prompt_ids = prompt_ids[-max(1, max_length - len(target)) :]
    return prompt_ids + target, [-100] * len(prompt_ids) + target


def chat_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The turns before the response, rendered by the base model's chat template and
    ending with the assistant's turn marker (``add_generation_prompt``).

    A base without a chat template is an error rather than a guessed framing: a model
    tuned on one framing and served with another learns nothing it is asked."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the base model"
        raise ConfigurationError(
            f"{name} has no chat template, so its chat examples (with messages) cannot be "
            "framed: set one (tokenizer.chat_template, saved as chat_template.jinja beside "
            "the tokenizer) or send feedback without messages"
        )
    return str(
        tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
        )
    )


def chat_parts(
    tokenizer: Any, messages: Sequence[dict[str, str]], completion: str
) -> tuple[str, str, int]:
    """``(prompt, target, end_id)`` of a chat example.

    ``prompt`` is :func:`chat_prompt`; ``target`` the assistant turn as the template frames
    it after that prompt (the text between its turn marker and the response -- a space, a
    newline, nothing -- then the response), found by rendering the whole conversation;
    ``end_id`` the token the template closes the turn with when that is a special token
    (``<|im_end|>``, ``<|eot_id|>``), else end of sequence, so the model learns to stop.
    A template that renders history differently once a reply follows gets the bare reply.
    """
    reply = completion.strip()
    prompt = chat_prompt(tokenizer, messages)
    turns = [*map(dict, messages), {"role": "assistant", "content": reply}]
    whole = str(tokenizer.apply_chat_template(turns, tokenize=False))
    target, tail = reply, ""
    if whole.startswith(prompt) and (at := whole.find(reply, len(prompt))) >= 0:
        target = whole[len(prompt) : at + len(reply)]
        tail = whole[at + len(reply) :]
    tail_ids = token_ids(tokenizer, tail)
    special = set(getattr(tokenizer, "added_tokens_decoder", None) or {})
    end = tail_ids[0] if tail_ids and tail_ids[0] in special else int(tokenizer.eos_token_id)
    return prompt, target, end


def encode_chat(
    tokenizer: Any, messages: Sequence[dict[str, str]], completion: str, max_length: int
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for a chat example: ``messages`` (every turn before the
    response) through the base's chat template, then the assistant's response.

    Labels are -100 on every system, user and earlier assistant token and on the
    template's own text; the loss falls on the response and the token that ends its
    turn only. Truncated as :func:`encode_example` does.
    """
    if not messages:
        raise ConfigurationError("a chat example needs at least one message before the response")
    prompt, target, end = chat_parts(tokenizer, messages, completion)
    return _join(token_ids(tokenizer, prompt), [*token_ids(tokenizer, target), end], max_length)


def encode_pair(
    tokenizer: Any,
    prompt: str,
    completion: str,
    messages: Sequence[dict[str, str]] | None,
    max_length: int,
) -> tuple[list[int], list[int]]:
    """A chat example (with ``messages``) as :func:`encode_chat` frames it, else a plain
    one as :func:`encode_example` does: scored the way it was trained."""
    if messages:
        return encode_chat(tokenizer, messages, completion, max_length)
    return encode_example(tokenizer, prompt, completion, max_length)


def pick_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigurationError(
            f"device {device!r} asked for but no CUDA GPU is visible; use auto or cpu"
        )
    return device


def dtype_for(device: str) -> torch.dtype:
    """bf16 on CUDA (half the memory, no loss scaling), fp32 on CPU (exact resumes)."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def quiet_transformers() -> None:
    """No progress bars on loads and saves: they would flood worker logs and the demo."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def resolve_base(base_uri: str) -> Path:
    """The local folder of a base model: a path (or ``file://`` URL) or a model id already
    in the local Hugging Face cache. Offline only: a model that is not here is an error."""
    local = Path(base_uri.removeprefix("file://")).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelLoadError(
                f"{local} has no config.json: point --base at a saved model folder"
            )
        return local
    if "/" in base_uri and "://" not in base_uri and not base_uri.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=base_uri, local_files_only=True))
        except Exception as exc:
            raise ModelLoadError(
                f"model {base_uri!r} is not in the local Hugging Face cache and genmon does not "
                "download: fetch it once with `huggingface-cli download` or give a local folder"
            ) from exc
    raise ModelLoadError(
        f"base model {base_uri!r} not found: give a local folder with config.json "
        "or a model id (owner/name) already in the local Hugging Face cache"
    )


def fingerprint_weights(base_uri: str) -> str:
    """sha256 over the weight files (name and bytes, in sorted order): the identity of a
    base that an adapter is only valid on."""
    root = resolve_base(base_uri)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ModelLoadError(f"{root} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def local_adapter(adapter_uri: str) -> Path:
    """A local folder holding the adapter: the path itself, or a download of a remote URI."""
    local = Path(adapter_uri.removeprefix("file://")).expanduser()
    if local.is_dir():
        return local
    if "://" in adapter_uri:
        from genmon.retrain.artifacts import ArtifactStore

        target = Path(tempfile.mkdtemp(prefix="genmon-adapter-"))
        return ArtifactStore.for_uri(adapter_uri).get_dir(adapter_uri, target)
    raise ModelLoadError(f"adapter {adapter_uri!r} not found: give a folder or a URL of one")


def max_positions(model: Any) -> int:
    """The context length the model's config allows."""
    config = model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_POSITIONS


class CausalLM:
    """A loaded model with its tokenizer: scores completions and answers prompts."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: str,
        base_path: Path,
        adapter_path: Path | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.base_path = base_path
        self.adapter_path = adapter_path
        self.max_length = max_positions(model)
        self._stop_ids: list[int] | None = None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def stop_ids(self) -> list[int]:
        """End of sequence and every token that contains a newline: one answer is one line."""
        if self._stop_ids is None:
            ids = {int(self.tokenizer.eos_token_id)}
            for token_id in range(len(self.tokenizer)):
                if "\n" in self.tokenizer.decode([token_id]):
                    ids.add(token_id)
            self._stop_ids = sorted(ids)
        return self._stop_ids

    def completion_nll(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        batch_size: int = 16,
        messages: Sequence[Sequence[dict[str, str]] | None] | None = None,
    ) -> np.ndarray:
        """Mean negative log-likelihood per completion token (end of sequence included),
        one value per pair, in nats. A pair with chat ``messages`` is framed by the chat
        template (:func:`encode_pair`)."""
        import torch

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        turns = list(messages) if messages is not None else [None] * len(prompts)
        out = np.zeros(len(prompts), dtype=np.float64)
        encoded = [
            encode_pair(self.tokenizer, p, c, m, self.max_length)
            for p, c, m in zip(prompts, completions, turns, strict=True)
        ]
        with torch.inference_mode():
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start : start + batch_size]
                input_ids, labels, mask = pad_right(chunk, self.pad_id, self.device)
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
                out[start : start + len(chunk)] = per_example_nll(logits, labels).cpu().numpy()
        return out

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 48,
        batch_size: int = 16,
        messages: Sequence[Sequence[dict[str, str]] | None] | None = None,
    ) -> list[str]:
        """Greedy answers (deterministic), cut at the end of sequence or the first newline.
        A prompt with chat ``messages`` is framed by the chat template (:func:`chat_prompt`)."""
        import torch
        from transformers import GenerationConfig

        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_ids(),
            pad_token_id=self.pad_id,
        )
        turns = list(messages) if messages is not None else [None] * len(prompts)
        framed = [
            self._prompt_ids(p, max_new_tokens, m) for p, m in zip(prompts, turns, strict=True)
        ]
        answers: list[str] = []
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                chunk = framed[start : start + batch_size]
                input_ids, mask = pad_left(chunk, self.pad_id, self.device)
                output = self.model.generate(
                    input_ids=input_ids, attention_mask=mask, generation_config=config
                )
                for row in output[:, input_ids.shape[1] :].tolist():
                    text = self.tokenizer.decode(row, skip_special_tokens=True)
                    answers.append(text.split("\n", 1)[0].strip())
        return answers

    def _prompt_ids(
        self, prompt: str, max_new_tokens: int, messages: Sequence[dict[str, str]] | None = None
    ) -> list[int]:
        text = chat_prompt(self.tokenizer, messages) if messages else format_prompt(prompt)
        ids = token_ids(self.tokenizer, text)
        return ids[-max(1, self.max_length - max_new_tokens) :]


def pad_right(
    rows: Sequence[tuple[list[int], list[int]]], pad_id: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch ``(input_ids, labels)`` pairs: padded on the right, labels -100 on padding."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return input_ids.to(device), labels.to(device), mask.to(device)


def pad_left(
    rows: Sequence[list[int]], pad_id: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch prompts for generation: padded on the left so every row ends where it grows."""
    import torch

    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        mask[i, width - len(ids) :] = 1
    return input_ids.to(device), mask.to(device)


def per_example_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over the labelled (non -100) tokens of each row; logits predict the next token."""
    import torch

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    token_nll = torch.nn.functional.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels.clamp(min=0), reduction="none"
    )
    return (token_nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def load_lm(base_uri: str, adapter_uri: str | None = None, device: str = "auto") -> CausalLM:
    """Load a base (and optionally a LoRA adapter on it) for scoring and generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    device = pick_device(device)
    base = resolve_base(base_uri)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=dtype_for(device))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the model in {base}: {exc}") from exc
    adapter_path = None
    if adapter_uri is not None:
        from peft import PeftModel

        adapter_path = local_adapter(adapter_uri)
        if not (adapter_path / "adapter_model.safetensors").exists():
            raise ModelLoadError(
                f"{adapter_uri} holds no adapter_model.safetensors: "
                "genmon loads adapters saved as safetensors only"
            )
        model = PeftModel.from_pretrained(model, str(adapter_path))
    model.to(device)
    model.eval()
    return CausalLM(model, tokenizer, device, base, adapter_path)
