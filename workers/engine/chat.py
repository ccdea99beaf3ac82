"""Tokenizer and chat template of an artifact folder (tokenizer.json + chat template + configs)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


def _raise(message: str) -> None:
    raise ValueError(message)


@dataclass
class ChatTokenizer:
    tokenizer: Tokenizer
    chat_template: str
    bos_token: str
    eos_token: str
    stop_ids: frozenset[int]
    pad_id: int

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTokenizer:
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json")
        tokenizer = Tokenizer.from_file(str(tok_file))
        cfg = _read_json(folder / "tokenizer_config.json")
        template = ""
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(cfg.get("chat_template"), str):
            template = cfg["chat_template"]
        if not template:
            raise ValueError(f"{folder} has no chat template (chat_template.jinja or tokenizer_config.json)")
        model_cfg = _read_json(folder / "config.json")
        gen_cfg = _read_json(folder / "generation_config.json")
        stop: set[int] = set()
        for source in (gen_cfg, model_cfg):
            eos = source.get("eos_token_id")
            if isinstance(eos, int):
                stop.add(eos)
            elif isinstance(eos, list):
                stop.update(int(e) for e in eos)
        if not stop:
            raise ValueError(f"{folder}: no eos_token_id in config.json or generation_config.json")
        pad = gen_cfg.get("pad_token_id", model_cfg.get("pad_token_id"))
        pad_id = int(pad) if isinstance(pad, int) else min(stop)
        return cls(
            tokenizer=tokenizer,
            chat_template=template,
            bos_token=_token_text(cfg.get("bos_token")),
            eos_token=_token_text(cfg.get("eos_token")),
            stop_ids=frozenset(stop),
            pad_id=pad_id,
        )

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The text the model sees for a conversation, ending with the assistant's turn opened."""
        # Same environment options as transformers' apply_chat_template, so the text matches token for token.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def render_reply(self, messages: list[dict[str, str]], reply: str) -> str:
        """The text that follows `render(messages)` when the assistant answers `reply`: the reply and the
        template's end of turn (for ChatML, "<reply><|im_end|>\\n").

        Fine-tuning trains on exactly this continuation of the evaluation prompt, so what the model learns to
        produce is what the engine reads back at generation time. A template whose full conversation does not
        begin with the generation prompt (rare) gets the reply and the end-of-sequence token instead.
        """
        prompt = self.render(messages)
        full = self.render([*messages, {"role": "assistant", "content": reply}], add_generation_prompt=False)
        if full.startswith(prompt) and reply in full[len(prompt) :]:
            return full[len(prompt) :]
        return reply + self.eos_token

    def encode(self, text: str) -> list[int]:
        # The chat template already holds every special token; like transformers' apply_chat_template, add
        # none here.
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as fh:
        data = json.load(fh)
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value or "")
