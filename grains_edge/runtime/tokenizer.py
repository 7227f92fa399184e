"""An export's tokenizer and chat template, read without transformers (so the runtime never imports torch).

An export folder holds what `tokenizer.save_pretrained` wrote: `tokenizer.json` (run by the `tokenizers`
library, which transformers' fast tokenizers wrap), `tokenizer_config.json` (the special tokens) and the
chat template, in `chat_template.jinja` or in the config. The template is rendered the way transformers'
`apply_chat_template` renders it: a sandboxed Jinja2 environment with trim_blocks, lstrip_blocks and
loop controls, the `raise_exception` and `strftime_now` globals, a `tojson` that does not HTML-escape,
the special tokens as variables; the text is then encoded without adding special tokens (the template
writes them). Importing transformers pulls in torch, about 220 MB of resident memory that an engine
which only runs ONNX Runtime does not need.

A model without a chat template gets the plain-completion prompt of `grains_edge.prompts`.

Sources: transformers `utils/chat_template_utils.py` (`_compile_jinja_template`, `render_jinja_template`);
tokenizers' `Tokenizer.from_file` and `decoders.DecodeStream`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from grains_edge.errors import GrainsError
from grains_edge.prompts import has_chat_template, plain_prompt

SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
FIX_TEMPLATE = "fix the model's chat_template.jinja, or re-export the model"


def token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def raise_exception(message: str):
    raise GrainsError(f"the chat template refused the conversation: {message}")


def tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def damaged(path: Path, error: Exception) -> GrainsError:
    reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return GrainsError(f"{path} is damaged ({reason}); fix: re-run 'grains-edge export'")


class ChatTokenizer:
    """encode / decode / chat_ids over an export folder's tokenizer files."""

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise GrainsError(f"{folder} has no tokenizer.json; fix: re-run 'grains-edge export'")
        try:
            self.backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as error:  # tokenizers raises a bare Exception for any unreadable file
            raise damaged(folder / "tokenizer.json", error) from None
        config_path = folder / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except (OSError, ValueError) as error:
            raise damaged(config_path, error) from None
        if not isinstance(config, dict):
            raise damaged(config_path, TypeError("not a JSON object"))
        self.special = {name: token_text(config.get(name)) for name in SPECIAL_TOKENS}
        if not all(text is None or isinstance(text, str) for text in self.special.values()):
            raise damaged(config_path, TypeError("a special token is neither text nor {'content': text}"))
        template_path = folder / "chat_template.jinja"
        try:
            self.chat_template = template_path.read_text() if template_path.is_file() else config.get("chat_template")
        except (OSError, ValueError) as error:
            raise damaged(template_path, error) from None
        if not isinstance(self.chat_template, (str, type(None))):
            raise damaged(config_path, TypeError("its chat_template is not text"))
        self._template = None

    def token_id(self, name: str) -> int | None:
        """Id of a special token by its role (eos_token, pad_token, …), None when the model has none."""
        text = self.special.get(name)
        return None if text is None else self.backend.token_to_id(text)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id("pad_token")

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self) -> TextStream:
        """A new answer's text, decoded token by token."""
        return TextStream(self.backend)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as text under the chat template."""
        from jinja2 import TemplateError

        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            environment = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            environment.filters["tojson"] = tojson
            environment.globals["raise_exception"] = raise_exception
            environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._template = environment.from_string(self.chat_template)
            except TemplateError as error:
                raise GrainsError(f"the export's chat template does not parse ({error}); fix: {FIX_TEMPLATE}") from None
        specials = {name: text for name, text in self.special.items() if text is not None}
        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **specials
            )
        except TemplateError as error:
            raise GrainsError(f"the export's chat template failed ({error}); fix: {FIX_TEMPLATE}") from None

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of a conversation, ending with the assistant prompt; models without a chat template
        get `plain_prompt`."""
        if has_chat_template(self):
            return self.encode(self.render(messages), add_special_tokens=False)
        return self.encode(plain_prompt(messages))


class TextStream:
    """The text of an answer's tokens, special tokens skipped, decoded as they come: tokenizers' DecodeStream
    decodes a short tail each token, where decoding the whole answer again took time growing with it (0.1 ms a
    token at 1000 tokens, on every row of a server's batch). A character whose bytes are not all in yet stays
    out of `text` until they are; a byte that never completes one comes out as U+FFFD, as a whole decode has it."""

    def __init__(self, backend) -> None:
        from tokenizers.decoders import DecodeStream

        self.backend = backend
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.text = ""

    def add(self, token: int) -> str:
        """The text so far, with `token`."""
        piece = self.decoder.step(self.backend, token)
        if piece:
            self.text += piece
        return self.text
