"""Render stage: turn an input row into the exact prompt the model sees, and its tokens."""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from llmbatch.pipelines.columns import (CHOICES_COLUMN, ID_COLUMN, INPUT_COLUMN, PROMPT_COLUMN, ROW_ERROR_COLUMN,
                                        TOKENS_COLUMN, StageColumns)


CHOICES_TYPE = pa.list_(pa.struct([("text", pa.string()), ("tokens", pa.list_(pa.int32()))]))



class RowError(ValueError):
    """This row cannot be processed; the message goes into its `error` column."""


@dataclass(frozen=True)
class RenderSettings:
    prompt_column: str = "prompt"
    messages_column: str | None = None
    template: str | None = None
    system_prompt: str | None = None
    max_model_len: int | None = None
    task: str = "generate"                 # score: plain text prompt, plus completions to score
    completion_column: str | None = None
    choices_column: str | None = None
    trust_remote_code: bool = False        # model.engine.trust_remote_code
    special_tokens: str = "text"           # input.special_tokens: how such text in the input's values is tokenized


def template_fields(template: str) -> list[str]:
    """The column names a format template refers to (`{question}` -> question)."""
    fields = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        head = name.split(".", 1)[0].split("[", 1)[0]
        if not head or head.isdigit():
            raise ValueError(f"template fields must name columns, got '{{{name}}}'")
        fields.append(head)
    return fields


def build_messages(row: dict[str, Any], settings: RenderSettings) -> list[dict[str, str]]:
    """The chat messages for a row: its messages column, or one user turn from the prompt or template."""
    if settings.messages_column:
        messages = _check_messages(row.get(settings.messages_column), settings.messages_column)
    else:
        messages = [{"role": "user", "content": build_text(row, settings)}]
    if settings.system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": settings.system_prompt}] + messages
    return messages


def build_text(row: dict[str, Any], settings: RenderSettings) -> str:
    if settings.template is not None:
        nulls = [name for name in template_fields(settings.template) if name in row and row[name] is None]
        if nulls:
            raise RowError(f"template: column(s) {', '.join(repr(n) for n in nulls)} null in this row")
        try:
            text = settings.template.format_map(row)
        except KeyError as exc:
            raise RowError(f"template: the row has no column {exc}") from None
        except (IndexError, ValueError, AttributeError, TypeError) as exc:
            raise RowError(f"template: {exc}") from None
    else:
        value = row.get(settings.prompt_column)
        if value is None:
            raise RowError(f"prompt column '{settings.prompt_column}' is null")
        if not isinstance(value, str):
            raise RowError(f"prompt column '{settings.prompt_column}' holds {type(value).__name__}, expected text")
        text = value
    if not text.strip():
        raise RowError("prompt is empty")
    return text


def _check_messages(value: Any, column: str) -> list[dict[str, str]]:
    if value is None:
        raise RowError(f"messages column '{column}' is null")
    if not isinstance(value, (list, tuple)) or not value:
        raise RowError(f"messages column '{column}' must be a non-empty list of {{role, content}}")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError(f"messages column '{column}': item {i} must be {{role: text, content: text}}")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def data_texts(row: dict[str, Any], settings: RenderSettings) -> list[str]:
    """The row's own texts that go into its prompt (the job file's system prompt and template text do not)."""
    if settings.messages_column:
        value = row.get(settings.messages_column) or []
        return [m.get(k) for m in value if isinstance(m, dict) for k in ("role", "content")
                if isinstance(m.get(k), str)]
    if settings.template is not None:
        return [str(row[name]) for name in template_fields(settings.template) if row.get(name) is not None]
    value = row.get(settings.prompt_column)
    return [value] if isinstance(value, str) else []


class TextTokenizer:
    """Tokenizes a prompt so that special-token text from the input's values (`<|im_start|>`, `</s>`) stays
    the characters it is, while the chat template's own special tokens stay control tokens. A row's values
    seldom hold such text; those that do are found in the rendered prompt and tokenized apart, as text."""

    def __init__(self, tokenizer, special_tokens: str = "text"):
        self.tokenizer = tokenizer
        added = sorted(tokenizer.get_added_vocab(), key=len, reverse=True) if special_tokens == "text" else []
        self.added = re.compile("|".join(re.escape(t) for t in added)) if added else None
        probe = "a"
        bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        framed = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
        at = next((i for i in range(len(framed)) if framed[i:i + len(bare)] == bare), 0)
        self.prefix, self.suffix = framed[:at], framed[at + len(bare):]

    def encode_many(self, items: list[tuple[str, list[str], bool]]) -> list[list[int] | Exception]:
        """encode() of each (prompt, data, add_special_tokens), the plain ones in one call of the tokenizer per
        add_special_tokens value (a fast tokenizer encodes a batch in parallel); an item that fails is its
        exception."""
        out: list[list[int] | Exception | None] = [None] * len(items)
        plain: dict[bool, list[int]] = {True: [], False: []}
        for i, (prompt, data, add) in enumerate(items):
            if self.added is not None and any(self.added.search(d) for d in data):
                out[i] = self._encode_or_error(prompt, data, add)
            else:
                plain[add].append(i)
        for add, indexes in plain.items():
            if not indexes:
                continue
            try:
                encoded = self.tokenizer([items[i][0] for i in indexes], add_special_tokens=add)["input_ids"]
            except Exception:  # one prompt the tokenizer rejects: find it, and keep the others
                encoded = [self._encode_or_error(items[i][0], [], add) for i in indexes]
            for i, ids in zip(indexes, encoded):
                out[i] = ids if isinstance(ids, Exception) else list(ids)
        return out  # type: ignore[return-value]

    def _encode_or_error(self, prompt: str, data: list[str], add: bool) -> list[int] | Exception:
        try:
            return self.encode(prompt, data, add)
        except Exception as exc:
            return exc

    def encode(self, prompt: str, data: list[str], add_special_tokens: bool) -> list[int]:
        risky = [d for d in data if self.added is not None and self.added.search(d)]
        if not risky:
            return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        spans = _spans(prompt, risky)
        ids: list[int] = []
        at = 0
        for start, end in spans + [(len(prompt), len(prompt))]:
            if start > at:
                ids += self.tokenizer(prompt[at:start], add_special_tokens=False)["input_ids"]
            if end > start:
                ids += self.tokenizer(prompt[start:end], add_special_tokens=False,
                                      split_special_tokens=True)["input_ids"]
            at = end
        return (self.prefix + ids + self.suffix) if add_special_tokens else ids


def _spans(prompt: str, texts: list[str]) -> list[tuple[int, int]]:
    """Where `texts` sit in `prompt`, each found after the one before it (the template renders a row's values
    in order, between its own text), so a value that is only a special token never claims the template's own."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for text in texts:
        start = prompt.find(text, cursor)
        if start < 0:
            start = prompt.find(text)
        if start < 0:
            raise RowError("the row holds special-token text that the chat template changed, so it cannot be "
                           "kept as text; set input.special_tokens: control to let it act as control tokens")
        spans.append((start, start + len(text)))
        cursor = start + len(text)
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def render_plain(row: dict[str, Any], settings: RenderSettings) -> str:
    """The prompt for a model without a chat template: system prompt, blank line, text."""
    if settings.messages_column:
        raise RowError("the model has no chat template, so messages cannot be rendered; use prompt_column")
    text = build_text(row, settings)
    return f"{settings.system_prompt}\n\n{text}" if settings.system_prompt else text


def render_columns(task: str) -> StageColumns:
    return StageColumns("render", needs=(ID_COLUMN, INPUT_COLUMN, ROW_ERROR_COLUMN),
                        adds=(PROMPT_COLUMN, TOKENS_COLUMN, ROW_ERROR_COLUMN) + ((CHOICES_COLUMN,) if task == "score"
                                                                                 else ()))


class RenderStage:
    """Ray Data stage (actor): loads the tokenizer once, renders and tokenizes each row (render_columns).

    Rows that cannot be rendered keep a null prompt and get `_row_error`.
    """

    def __init__(self, model_path: str, settings: RenderSettings, ensure_model=None):
        from transformers import AutoTokenizer

        if ensure_model is not None:  # on a cluster: this node's copy of the config and tokenizer
            model_path = ensure_model(weights=False)

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=settings.trust_remote_code)
        self.settings = settings
        self.chat = getattr(self.tokenizer, "chat_template", None) is not None
        self.text = TextTokenizer(self.tokenizer, settings.special_tokens)

    def __call__(self, batch: pa.Table) -> pa.Table:
        render_columns(self.settings.task).check(batch.column_names)
        rows = batch.column(INPUT_COLUMN).to_pylist()
        errors = batch.column(ROW_ERROR_COLUMN).to_pylist()
        prompts: list[str | None] = []
        tokens: list[list[int] | None] = []
        choices: list[list[dict[str, Any]] | None] = []
        if self.settings.task == "score":
            for i, row in enumerate(rows):
                prompt, ids, completions = None, None, None
                if errors[i] is None:
                    try:
                        prompt, ids, completions = self.render_for_scoring(row or {})
                    except RowError as exc:
                        errors[i] = str(exc)
                    except Exception as exc:  # a template the tokenizer rejects, odd unicode, ...
                        errors[i] = f"render: {type(exc).__name__}: {exc}"
                prompts.append(prompt)
                tokens.append(ids)
                choices.append(completions)
        else:
            prompts, tokens = self.render_batch(rows, errors)
        out = batch.drop_columns([ROW_ERROR_COLUMN]).append_column(
            PROMPT_COLUMN, pa.array(prompts, pa.string())
        ).append_column(TOKENS_COLUMN, pa.array(tokens, pa.list_(pa.int32())))
        if self.settings.task == "score":
            out = out.append_column(CHOICES_COLUMN, pa.array(choices, CHOICES_TYPE))
        return out.append_column(ROW_ERROR_COLUMN, pa.array(errors, pa.string()))

    def render_for_scoring(self, row: dict[str, Any]) -> tuple[str, list[int], list[dict[str, Any]]]:
        """The prompt as plain text (no chat template, the way evaluation harnesses score continuations)
        and each completion's tokens as they follow the prompt."""
        settings = self.settings
        if settings.completion_column:
            texts = [row.get(settings.completion_column)]
            where = f"completion column '{settings.completion_column}'"
        else:
            texts = row.get(settings.choices_column)
            where = f"choices column '{settings.choices_column}'"
            if not isinstance(texts, (list, tuple)) or not texts:
                raise RowError(f"{where} must hold a non-empty list of texts")
        if any(not isinstance(t, str) or not t for t in texts):
            raise RowError(f"{where} must hold non-empty text")
        context = render_plain(row, settings)
        stripped = context.rstrip()
        data = data_texts(row, settings)
        context_ids = self.text.encode(stripped, data, add_special_tokens=True)
        completions = []
        for text in texts:
            continuation = context[len(stripped):] + text
            whole = self.text.encode(stripped + continuation, data + [text], add_special_tokens=True)
            if whole[:len(context_ids)] == context_ids and len(whole) > len(context_ids):
                ids = whole[len(context_ids):]
            else:
                ids = self.text.encode(continuation, [text], add_special_tokens=False)
            limit = settings.max_model_len
            if limit is not None and len(context_ids) + len(ids) > limit:
                raise RowError(f"prompt plus completion is {len(context_ids) + len(ids)} tokens; "
                               f"model.engine.max_model_len is {limit}")
            completions.append({"text": text, "tokens": ids})
        return stripped, context_ids, completions

    def render_batch(self, rows: list[dict[str, Any] | None], errors: list[str | None]
                     ) -> tuple[list[str | None], list[list[int] | None]]:
        """Each row's prompt and tokens (tokenized in one batch); a row that cannot be rendered gets its error in
        `errors` and None."""
        prompts: list[str | None] = [None] * len(rows)
        tokens: list[list[int] | None] = [None] * len(rows)
        items: list[tuple[str, list[str], bool]] = []
        placed: list[int] = []
        for i, row in enumerate(rows):
            if errors[i] is not None:
                continue
            try:
                prompt, add_special_tokens = self.prompt_of(row or {})
            except RowError as exc:
                errors[i] = str(exc)
                continue
            except Exception as exc:  # a template the tokenizer rejects, odd unicode, ...
                errors[i] = f"render: {type(exc).__name__}: {exc}"
                continue
            prompts[i] = prompt
            items.append((prompt, data_texts(row or {}, self.settings), add_special_tokens))
            placed.append(i)
        limit = self.settings.max_model_len
        for i, ids in zip(placed, self.text.encode_many(items)):
            if isinstance(ids, RowError):
                errors[i], prompts[i] = str(ids), None
            elif isinstance(ids, Exception):
                errors[i], prompts[i] = f"render: {type(ids).__name__}: {ids}", None
            elif limit is not None and len(ids) >= limit:
                errors[i], prompts[i] = (f"prompt is {len(ids)} tokens; model.engine.max_model_len is {limit} "
                                         "(prompt plus at least one generated token must fit)"), None
            else:
                tokens[i] = ids
        return prompts, tokens

    def prompt_of(self, row: dict[str, Any]) -> tuple[str, bool]:
        """The row's prompt text, and whether tokenizing it adds the tokenizer's special tokens (a chat
        template writes its own)."""
        if self.chat:
            messages = build_messages(row, self.settings)
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
        return render_plain(row, self.settings), True

    def render(self, row: dict[str, Any]) -> tuple[str, list[int]]:
        """One row's prompt and tokens (render_batch for a batch); raises RowError."""
        errors: list[str | None] = [None]
        prompts, tokens = self.render_batch([row], errors)
        if errors[0] is not None:
            raise RowError(errors[0])
        return prompts[0], tokens[0]
