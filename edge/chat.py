"""Chat prompts on the edge: render the tokenizer's own chat template with jinja2, without transformers.

A chat model expects its conversation in the exact format it was trained on (role markers, BOS, the
assistant header that asks it to answer). That format ships with the tokenizer as a jinja2 template
(``tokenizer_config.json``'s ``chat_template``, or ``chat_template.jinja`` beside it). The edge renders
it the way transformers' ``apply_chat_template`` does, so both give the same text and the same ids:

- a sandboxed, immutable jinja2 environment with ``trim_blocks`` and ``lstrip_blocks`` and the
  ``loopcontrols`` extension;
- ``tojson`` without HTML escaping, ``raise_exception(message)`` and ``strftime_now(format)``;
- variables: ``messages``, ``add_generation_prompt``, ``tools`` and ``documents`` (None), and the
  tokenizer's special tokens by name (``bos_token``, ``eos_token``, ...) as strings;
- the rendered text is then encoded WITHOUT adding special tokens again (the template already wrote them).

Messages come from a JSON file: a list of ``{"role": ..., "content": ...}`` objects.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
MAX_MESSAGES_BYTES = 1 << 20  # a messages file is a prompt, not a corpus


class ChatError(ValueError):
    """A chat template or messages file that cannot be used, with what to do about it."""


def _token_text(value) -> str | None:
    """A special token as the template sees it: tokenizer_config stores a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_from_config(config: dict, name: str | None) -> str | None:
    """``chat_template`` is a string, or a list of ``{"name", "template"}`` (``default`` unless named)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        wanted = name or "default"
        if wanted not in named:
            raise ChatError(f"the tokenizer has chat templates {sorted(named)}, not {wanted!r}")
        return named[wanted]
    if name is not None:
        raise ChatError(f"the tokenizer has a single chat template, not a named one ({name!r})")
    return template if isinstance(template, str) else None


class ChatTemplate:
    """A model folder's chat template, compiled once; ``render(messages)`` gives the prompt text."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # jinja's own tojson escapes HTML characters; templates expect plain JSON
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatError(f"the tokenizer's chat template does not compile: {exc}") from None
        self.special_tokens = dict(special_tokens)
        self._errors = (jinja2.exceptions.TemplateError,)

    @classmethod
    def from_folder(cls, folder: str | Path, name: str | None = None) -> ChatTemplate:
        """The template of a model folder (``tokenizer_config.json``, or ``chat_template.jinja``)."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        source = _template_from_config(config, name)
        jinja_file = folder / "chat_template.jinja"
        if source is None and jinja_file.is_file():
            source = jinja_file.read_text(encoding="utf-8")
        if source is None:
            raise ChatError(f"{folder} has no chat template (tokenizer_config.json 'chat_template' or "
                            "chat_template.jinja); this is not a chat model: use --prompt")
        tokens = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}
        extra = config.get("additional_special_tokens") or []
        tokens["additional_special_tokens"] = [t for t in map(_token_text, extra) if t is not None]
        return cls(source, tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages``, ending with the assistant header when asked for."""
        check_messages(messages)
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except self._errors as exc:
            raise ChatError(f"the chat template refused these messages: {exc}") from None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChatError(f"cannot read {path}: {exc}") from None


def check_messages(messages) -> None:
    """ChatError unless ``messages`` is a non-empty list of {role: str, content: str} objects."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages must be a non-empty JSON list of {\"role\": ..., \"content\": ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatError(f"message {i} must be an object with string 'role' and 'content', got {str(m)[:80]}")


def load_messages(path: str | Path) -> list[dict]:
    """A messages file: a JSON list of {role, content}; ChatError naming the problem otherwise."""
    path = Path(path)
    if path.is_file() and path.stat().st_size > MAX_MESSAGES_BYTES:
        raise ChatError(f"{path} is over {MAX_MESSAGES_BYTES} bytes; a messages file holds one conversation")
    messages = _read_json(path)
    check_messages(messages)
    return messages
