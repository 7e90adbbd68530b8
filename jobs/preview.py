"""`llmbatch preview`: the first rows of a job's input as the model will see them, without Ray or an engine.

For each row: the input columns its prompt is built from, the prompt after `input.template`, `system_prompt`
and the model's chat template, and the token count of each. Only the model's config and tokenizer are read.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from llmbatch.errors import UserError
from llmbatch.jobs.resolve import ResolvedJob, fetched_without_building, model_here, resolve
from llmbatch.jobs.results import printable
from llmbatch.jobs.spec import JobSpec
from llmbatch.pipelines.read import InputFile, iter_shard, stable_id
from llmbatch.pipelines.render import RenderStage, RowError, template_fields

INDENT = "      "


@dataclass
class TextField:
    label: str              # the column it comes from: 'prompt', 'messages[1] user', 'choices[0]'
    text: str | None
    tokens: int | None


@dataclass
class PreviewRow:
    id: str
    inputs: list[TextField]
    prompt: str | None = None               # the text the model is given
    prompt_token_ids: list[int] | None = None
    generated_up_to: int | None = None      # generate: tokens it may generate after this prompt
    scored: list[TextField] = field(default_factory=list)   # score: each completion, tokens as it follows the prompt
    error: str | None = None


@dataclass
class Preview:
    job: str
    task: str
    model: str
    model_path: str
    chat_template: bool                     # the model's chat template renders the prompt
    prompt_from: str
    template: str | None
    system_prompt: str | None
    max_tokens: int | None
    max_model_len: int | None
    input_path: str
    rows: list[PreviewRow]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def preview_job(spec: JobSpec, count: int, *, log=None) -> Preview:
    """The first `count` rows of the job's input (at most input.limit), rendered and tokenized."""
    job = resolve(spec, scan_input=False, fetch_models=fetched_without_building(spec.model.source),
                  fetch_judges=False, without_weights=True, log=log)
    renderer = RenderStage(str(model_here(job)), job.render)
    wanted = min(count, spec.input.limit) if spec.input.limit is not None else count
    read = list(first_rows(job.input.files, spec.input.id_column, wanted))
    rows = [preview_row(renderer, job, row_id, row, error) for row_id, row, error in read]
    scoring = spec.task == "score"
    return Preview(
        job=spec.name, task=spec.task, model=spec.model.source, model_path=str(job.model.path),
        chat_template=renderer.chat and not scoring, prompt_from=prompt_source(spec),
        template=spec.input.template, system_prompt=spec.input.system_prompt,
        max_tokens=None if scoring else spec.sampling.max_tokens, max_model_len=job.render.max_model_len,
        input_path=spec.input.path, rows=rows, notes=_notes(job, renderer, [row for _, row, _ in read], wanted))


def prompt_source(spec: JobSpec) -> str:
    given = spec.input
    if given.messages_column:
        return f"input.messages_column '{given.messages_column}'"
    if given.template is not None:
        return f"input.template over {', '.join(repr(n) for n in template_fields(given.template))}"
    return f"input.prompt_column '{given.prompt_column}'"


def first_rows(files: tuple[InputFile, ...], id_column: str | None, count: int
               ) -> Iterator[tuple[str, dict[str, Any], str | None]]:
    """(id, row, read error) of the input's first `count` rows, in the order a run reads them."""
    if count <= 0:
        return
    taken = 0
    for f in files:
        try:
            for table in iter_shard(f.uri, f.format):
                numbers = table.column("_row_number").to_pylist()
                errors = table.column("_row_error").to_pylist()
                data = table.drop_columns(["_row_number", "_row_error"]).to_pylist() \
                    if table.num_columns > 2 else [{} for _ in numbers]
                for number, error, row in zip(numbers, errors, data):
                    row_id = stable_id(f.relpath, number)
                    if id_column:
                        value = row.get(id_column)
                        row_id = row_id if value is None else str(value)
                        if value is None and error is None:
                            error = f"id column '{id_column}' is null"
                    yield row_id, row, error
                    taken += 1
                    if taken >= count:
                        return
        except (OSError, ValueError) as exc:
            raise UserError(f"input.path: cannot read {f.uri}: {exc}") from None


def preview_row(renderer: RenderStage, job: ResolvedJob, row_id: str, row: dict[str, Any],
                error: str | None) -> PreviewRow:
    out = PreviewRow(row_id, input_fields(renderer, job, row))
    if error is not None:
        out.error = error
        return out
    try:
        if job.spec.task == "score":
            out.prompt, out.prompt_token_ids, completions = renderer.render_for_scoring(row)
            out.scored = [TextField(repr(c["text"]), c["text"], len(c["tokens"])) for c in completions]
        else:
            out.prompt, out.prompt_token_ids = renderer.render(row)
            out.generated_up_to = _generation_room(job, len(out.prompt_token_ids))
    except RowError as exc:
        out.error = str(exc)
    except Exception as exc:  # a chat template the tokenizer rejects, odd unicode, ...: as the render stage says
        out.error = f"render: {type(exc).__name__}: {exc}"
    if out.error is not None:
        out.prompt = out.prompt_token_ids = None
        out.scored = []
    return out


def _generation_room(job: ResolvedJob, prompt_tokens: int) -> int:
    limit = job.render.max_model_len
    most = job.spec.sampling.max_tokens
    return most if limit is None else max(0, min(most, limit - prompt_tokens))


def input_fields(renderer: RenderStage, job: ResolvedJob, row: dict[str, Any]) -> list[TextField]:
    """The row's own values that go into its prompt (and, for task: score, the completions scored)."""
    given = job.spec.input
    fields: list[TextField] = []
    if given.messages_column:
        messages = row.get(given.messages_column)
        if isinstance(messages, (list, tuple)):
            for i, m in enumerate(messages):
                role = m.get("role") if isinstance(m, dict) else None
                content = m.get("content") if isinstance(m, dict) else m
                fields.append(_text_field(renderer, f"{given.messages_column}[{i}] {role}", content))
        else:
            fields.append(_text_field(renderer, given.messages_column, messages))
    elif given.template is not None:
        for name in dict.fromkeys(template_fields(given.template)):
            fields.append(_text_field(renderer, name, row.get(name)))
    else:
        fields.append(_text_field(renderer, given.prompt_column, row.get(given.prompt_column)))
    if given.completion_column:
        fields.append(_text_field(renderer, given.completion_column, row.get(given.completion_column)))
    if given.choices_column:
        choices = row.get(given.choices_column)
        if isinstance(choices, (list, tuple)):
            fields += [_text_field(renderer, f"{given.choices_column}[{i}]", c) for i, c in enumerate(choices)]
        else:
            fields.append(_text_field(renderer, given.choices_column, choices))
    return fields


def _text_field(renderer: RenderStage, label: str, value: Any) -> TextField:
    if value is None:
        return TextField(label, None, None)
    text = value if isinstance(value, str) else str(value)
    try:
        tokens = len(renderer.text.encode(text, [text], add_special_tokens=False))
    except Exception:  # counted for information only; the prompt's own tokenization reports real problems
        tokens = None
    return TextField(label, text, tokens)


def _notes(job: ResolvedJob, renderer: RenderStage, rows: list[dict[str, Any]], wanted: int) -> list[str]:
    notes = []
    if not rows and wanted:
        notes.append("the input holds no rows")
    if job.spec.task == "score":
        notes.append("task: score scores each completion after the plain-text prompt (no chat template)")
    elif not renderer.chat:
        notes.append("the model has no chat template: the prompt is system_prompt, a blank line, then the text")
    columns = {name for row in rows for name in row}
    if rows:
        notes += [f"{where}: column '{column}' is in none of these rows"
                  for column, where in job.required_columns if column not in columns]
    return notes


def render_preview(preview: Preview) -> str:
    chat = "the model's chat template" if preview.chat_template else "no chat template"
    lines = [f"preview of job '{preview.job}': {len(preview.rows)} row(s) of {printable(preview.input_path)}",
             f"  model        {printable(preview.model)} ({printable(preview.model_path)}), {chat}",
             f"  prompt       {printable(preview.prompt_from)}"]
    if preview.template is not None:
        lines.append(f"  template     {_inline(preview.template)}")
    if preview.system_prompt:
        lines.append(f"  system       {_inline(preview.system_prompt)}")
    limits = [f"max_model_len {preview.max_model_len}" if preview.max_model_len
              else "max_model_len not set, and not in the model's config.json"]
    if preview.max_tokens is not None:
        limits.insert(0, f"max_tokens {preview.max_tokens}")
    lines.append(f"  limits       {', '.join(limits)}")
    lines += [f"  note: {printable(n)}" for n in preview.notes]
    for number, row in enumerate(preview.rows, 1):
        lines.append("")
        lines.append(f"row {number}  id {printable(row.id)}")
        for f in row.inputs:
            count = "null" if f.text is None else _tokens(f.tokens)
            lines.append(f"  input {printable(f.label)} ({count})")
            if f.text is not None:
                lines += _block(f.text)
        if row.error is not None:
            lines.append(f"  error {printable(row.error)}")
            continue
        assert row.prompt is not None and row.prompt_token_ids is not None
        room = f"; up to {row.generated_up_to} generated" if row.generated_up_to is not None else ""
        lines.append(f"  rendered ({_tokens(len(row.prompt_token_ids))}{room})")
        lines += _block(row.prompt)
        for f in row.scored:
            lines.append(f"  scored completion {printable(f.label)} ({_tokens(f.tokens)} after the prompt)")
    return "\n".join(lines)


def _tokens(count: int | None) -> str:
    return "? tokens" if count is None else f"{count} token{'' if count == 1 else 's'}"


def _block(text: str) -> list[str]:
    """The text as it is, line by line, indented; a trailing newline shows as a last empty line."""
    return [INDENT + printable(line) for line in text.split("\n")]


def _inline(text: str) -> str:
    return printable(text).replace("\n", "\\n")
