"""Text in and out of the model: tokenizer, chat template and streaming detokenisation.

A bundle carries the model's ``tokenizer.json`` (the `tokenizers` library's own format) and its
chat template, so a client needs neither transformers nor torch to turn a conversation into the
exact token ids the exporter validated against. :class:`TextCodec` is that half of the bundle.

Why each piece is here:

* The chat template is rendered with the environment transformers uses (sandboxed, immutable,
  ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, a non-HTML-escaping ``tojson``,
  ``strftime_now``, loop controls, a pass-through ``{% generation %}`` tag), so
  ``render_chat`` and ``encode_chat`` equal ``apply_chat_template(..., add_generation_prompt=True)``.
* ``decode`` is the tokenizer's own lossless decode. It deliberately does **not** apply
  transformers' ``clean_up_tokenization_spaces`` (it rewrites " ," to "," and so changes what
  the model said, and cannot be streamed).
* :class:`IncrementalDecoder` streams text token by token without re-decoding the history and
  without ever showing half of a multi-byte UTF-8 character.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from splitllm.errors import BundleCorrupt, ConfigError, InvalidToken

__all__ = ["IncrementalDecoder", "TextCodec"]

TOKENIZER_FILE = "tokenizer.json"

# End-of-turn markers of common chat formats. A marker that the chat template writes and the
# vocabulary holds ends a reply just like eos does, so the exporter records it as a stop token.
_END_OF_TURN_MARKERS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|end_of_text|>",
)

_REPLACEMENT_CHAR = "\ufffd"


def _fallback_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    """The format used when a bundle has no chat template (base models such as GPT-2, Gemma 3 base).

    A single user message is the prompt itself, as plain text: a base model continues text, so
    the user's text is what it should see. Any other conversation is one ``"<role>: <content>"``
    line per message, and ``"assistant:"`` as the generation prompt, e.g.
    ``"system: Be brief.\\nuser: Hi\\nassistant:"``. Plain text so that any tokenizer can
    represent it; the tokenizer's own special tokens (a BOS) are added when it is encoded.
    """
    if len(messages) == 1 and messages[0]["role"] == "user":
        return str(messages[0]["content"])
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    if add_generation_prompt:
        lines.append("assistant:")
    return "\n".join(lines)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body unchanged.

    transformers uses the tag to find assistant tokens for training masks; some templates carry
    it, so it must parse, but for inference it has no effect.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _validate_messages(messages: object) -> list[Mapping[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(
            f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ConfigError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        for key in ("role", "content"):
            if key not in message:
                raise ConfigError(f"messages[{i}] has no {key!r}")
            if not isinstance(message[key], str):
                raise ConfigError(f"messages[{i}][{key!r}] must be a str, got {type(message[key]).__name__}")
        if not message["role"]:
            raise ConfigError(f"messages[{i}]['role'] is empty")
    return messages


def _token_id(value: object) -> int:
    """``value`` as an int id; accepts numpy integers, rejects bools, floats and strings."""
    if isinstance(value, bool):
        raise InvalidToken(f"token id must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidToken(f"token id must be an integer, got {value!r}") from None


class TextCodec:
    """A model's tokenizer and chat template, loaded from a bundle without transformers.

    Build one with :meth:`from_manifest` (what a bundle loader does) or :meth:`from_files`.
    Instances are immutable and safe to share between threads and sessions.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None,
        bos_token: str | None,
        eos_token: str | None,
        extra_stop_tokens: Sequence[str] = (),
        *,
        source: str = "tokenizer",
    ) -> None:
        """Prefer the ``from_*`` constructors; ``source`` names the origin in error messages.

        Raises BundleCorrupt when the template does not compile or a stop token is not in the
        vocabulary, because both come from the bundle.
        """
        self._tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        try:
            self._template = _compile_template(chat_template) if chat_template is not None else None
        except jinja2.TemplateError as exc:
            raise BundleCorrupt(f"{source}: chat template does not compile: {exc}") from exc
        stop_tokens = ([eos_token] if eos_token is not None else []) + list(extra_stop_tokens)
        ids = set()
        for token in stop_tokens:
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise BundleCorrupt(f"{source}: stop token {token!r} is not in the vocabulary")
            ids.add(token_id)
        self.stop_tokens: tuple[str, ...] = tuple(dict.fromkeys(stop_tokens))
        self.eos_ids: frozenset[int] = frozenset(ids)

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_files(
        cls,
        tokenizer_json: Path,
        chat_template: str | None,
        bos_token: str | None,
        eos_token: str | None,
        extra_stop_tokens: Sequence[str] = (),
    ) -> TextCodec:
        """Load ``tokenizer.json``; a missing or unreadable file raises BundleCorrupt naming it."""
        path = Path(tokenizer_json)
        if not path.is_file():
            raise BundleCorrupt(f"tokenizer file {path} is missing")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception for parse errors
            raise BundleCorrupt(f"tokenizer file {path} cannot be read: {exc}") from exc
        return cls(tokenizer, chat_template, bos_token, eos_token, extra_stop_tokens, source=str(path))

    @classmethod
    def from_manifest(cls, bundle_dir: Path, meta: Mapping[str, Any]) -> TextCodec:
        """Load from the manifest's ``"tokenizer"`` entry (see :meth:`save_from_transformers`).

        ``meta["file"]`` must be a relative path inside ``bundle_dir``; a malformed entry raises
        BundleCorrupt naming the key.
        """
        if not isinstance(meta, Mapping):
            raise BundleCorrupt(f"manifest 'tokenizer' must be an object, got {type(meta).__name__}")
        file = meta.get("file")
        if not isinstance(file, str) or not file:
            raise BundleCorrupt("manifest tokenizer.file must be a non-empty string")
        rel = PurePosixPath(file)
        if rel.is_absolute() or ".." in rel.parts:
            raise BundleCorrupt(f"manifest tokenizer.file {file!r} must be a path inside the bundle")
        for key in ("chat_template", "bos_token", "eos_token"):
            if not isinstance(meta.get(key), (str, type(None))):
                raise BundleCorrupt(f"manifest tokenizer.{key} must be a string or null")
        stop = meta.get("stop_tokens", [])
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BundleCorrupt("manifest tokenizer.stop_tokens must be a list of strings")
        return cls.from_files(
            Path(bundle_dir) / rel,
            meta.get("chat_template"),
            meta.get("bos_token"),
            meta.get("eos_token"),
            stop,
        )

    @staticmethod
    def save_from_transformers(
        tokenizer: Any, out_dir: Path, extra_stop_tokens: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Write ``tokenizer.json`` for a transformers *fast* tokenizer into ``out_dir``.

        Returns the manifest's ``"tokenizer"`` entry. Stop tokens are eos, the end-of-turn
        markers that the chat template writes (e.g. ``<|im_end|>``) and ``extra_stop_tokens``.
        The exporter calls this; it needs no import of transformers, only the object's methods.
        Raises ConfigError for a slow tokenizer (no ``tokenizer.json`` to carry).
        """
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ConfigError(
                f"{type(tokenizer).__name__} is not a fast tokenizer; load it with use_fast=True"
            )
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        backend.save(str(out / TOKENIZER_FILE))
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, Mapping):  # named templates: the unnamed call uses "default"
            template = template.get("default")
        if template is not None and not isinstance(template, str):
            raise ConfigError(f"unsupported chat_template of type {type(template).__name__}")
        vocab = backend.get_vocab(with_added_tokens=True)
        stop = [eos for eos in [tokenizer.eos_token] if eos is not None]
        stop += [m for m in _END_OF_TURN_MARKERS if template is not None and m in template and m in vocab]
        stop += list(extra_stop_tokens)
        return {
            "file": TOKENIZER_FILE,
            "chat_template": template,
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "stop_tokens": list(dict.fromkeys(stop)),
        }

    # -- chat -------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt string for ``messages`` (a list of ``{"role": str, "content": str}``).

        Without a chat template the documented fallback of :func:`_fallback_chat` is used.
        Raises ConfigError for a malformed message or when the template rejects the
        conversation (e.g. a template that demands alternating roles).
        """
        checked = _validate_messages(messages)
        if self._template is None:
            return _fallback_chat(checked, add_generation_prompt)
        try:
            return self._template.render(
                messages=checked,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as exc:
            raise ConfigError(f"the chat template rejected the conversation: {exc}") from exc

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the rendered chat with the generation prompt, ready to prefill.

        With a chat template, special tokens come from the template text only
        (``add_special_tokens=False``), as transformers' ``apply_chat_template(tokenize=True)``
        does. Without one the rendered text is plain text (:meth:`encode_plain`).
        """
        text = self.render_chat(messages, add_generation_prompt=True)
        return self.encode(text) if self._template is not None else self.encode_plain(text)

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` as a plain-text prompt, no chat template.

        The tokenizer's post-processor adds what the model expects in front of text (Gemma's and
        Llama's BOS; nothing for Qwen or GPT-2), as transformers' ``tokenizer(text)`` does.
        ``splitllm generate --raw`` prompts with this.
        """
        return self.encode(text, add_special_tokens=True)

    # -- tokens -----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it (``<|im_start|>``) become their ids.

        ``add_special_tokens=True`` applies the tokenizer's post-processor (e.g. a BOS).
        """
        if not isinstance(text, str):
            raise ConfigError(f"text must be a str, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (lossless: no clean-up of spaces). Raises InvalidToken for a bad id."""
        return self._tokenizer.decode(self.check_ids(ids), skip_special_tokens=skip_special_tokens)

    def check_ids(self, ids: Iterable[int]) -> list[int]:
        """``ids`` as a list of ints, or InvalidToken naming the first id outside the vocabulary.

        The tokenizer itself silently drops unknown ids, which would hide a model/bundle mismatch.
        """
        out = [_token_id(i) for i in ids]
        for token_id in out:
            if not 0 <= token_id < self.vocab_size:
                raise InvalidToken(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        return out

    def incremental(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A fresh streaming decoder for one generated sequence."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Turns generated token ids into text pieces as they arrive.

    Contract: for ids of valid UTF-8 text, ``"".join(push(i) for i in ids) + flush()`` equals
    ``codec.decode(ids)``, and ``flush()`` returns ``""`` (unless the text itself ends in
    U+FFFD, which looks like an incomplete character and is held until then). A piece never
    ends in half a character: byte-level tokens that split a multi-byte character yield ``""``
    until the character is complete. Call ``flush()`` when the sequence ends.

    How: the decoder keeps a *context* (the ids of the last emitted piece) and the *pending*
    ids after it. Each push decodes only context + pending and emits what goes beyond the
    context's own text. The context supplies the left neighbour, so decoders that treat the
    first token specially (SentencePiece's leading-space strip) act the same in both decodes;
    the cost per token is bounded by the size of one piece, not by the sequence length.
    """

    # A UTF-8 character spans at most 4 byte tokens. Beyond this many pending ids the bytes are
    # not valid text (or decode to nothing, e.g. skipped special tokens), so emit what there is.
    MAX_PENDING = 16

    def __init__(self, codec: TextCodec, skip_special_tokens: bool = False) -> None:
        self._codec = codec
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # context ids followed by pending ids
        self._n_context = 0
        self._context_text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._codec._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (often ``""``). InvalidToken for a bad id."""
        self._ids.extend(self._codec.check_ids([token_id]))
        text = self._decode(self._ids)
        pending = len(self._ids) - self._n_context
        held = text.endswith(_REPLACEMENT_CHAR) or len(text) <= len(self._context_text)
        if not held:
            return self._emit(text)
        if pending < self.MAX_PENDING:
            return ""
        if text == self._context_text:  # ids that decode to nothing: drop them, keep the context
            del self._ids[self._n_context :]
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end shows as U+FFFD); resets."""
        piece = self._emit(self._decode(self._ids)) if len(self._ids) > self._n_context else ""
        self._ids, self._n_context, self._context_text = [], 0, ""
        return piece

    def _emit(self, text: str) -> str:
        piece = text[len(self._context_text) :]
        self._ids = self._ids[self._n_context :]
        self._n_context = len(self._ids)
        self._context_text = self._decode(self._ids)
        return piece
