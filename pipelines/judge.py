"""Judge pass: a model grades each output row against a rubric, on a whole-number scale.

The judge's answer is constrained by vLLM's structured outputs to one of the scale's numbers, so it
always parses; the raw text is kept beside the score.
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa

from llmbatch.pipelines.scorer_specs import JudgeScorerBase

from llmbatch.pipelines.columns import (INFERENCE_ERROR, JUDGED_ROW, JUDGE_SKIPPED, PROMPT_COLUMN, ROW_ERROR_COLUMN,
                                        TOKENS_COLUMN, StageColumns)
from llmbatch.pipelines.render import RowError, TextTokenizer, template_fields
from llmbatch.pipelines.scorers import JUDGE_TEXT_SUFFIX, add_error



def judge_choices(scale: list[int]) -> list[str]:
    return [str(n) for n in range(scale[0], scale[1] + 1)]


def judge_sampling_params(scale: list[int]) -> dict[str, Any]:
    digits = max(len(c) for c in judge_choices(scale))
    return dict(max_tokens=digits + 2, temperature=0.0, logprobs=None,
                structured_outputs={"choice": judge_choices(scale)})


def judge_messages(row: dict[str, Any], scorer: JudgeScorerBase) -> list[dict[str, str]]:
    lo, hi = scorer.scale
    try:
        rubric = scorer.rubric.format_map(row)
    except KeyError as exc:
        raise RowError(f"rubric: the row has no column {exc}") from None
    except (IndexError, ValueError, AttributeError, TypeError) as exc:
        raise RowError(f"rubric: {exc}") from None
    messages = [{"role": "user", "content": f"{rubric}\n\nAnswer with one whole number from {lo} to {hi}."}]
    if scorer.system_prompt:
        messages.insert(0, {"role": "system", "content": scorer.system_prompt})
    return messages


class JudgeRenderStage:
    """Ray Data stage (actor): the judge prompt for each output row, tokenized with the judge's tokenizer.

    Nests the output row under `_judged_row`; rows without a generation are marked to skip the engine.
    """

    columns = StageColumns("judge render", needs=("generated_text", "prompt"),
                           adds=(JUDGED_ROW, PROMPT_COLUMN, TOKENS_COLUMN, ROW_ERROR_COLUMN), keeps=False)

    def __init__(self, model_path: str, scorer: JudgeScorerBase, input_columns: dict[str, str],
                 max_model_len: int | None, trust_remote_code: bool = False, ensure_model=None):
        from transformers import AutoTokenizer

        if ensure_model is not None:  # on a cluster: this node's copy of the config and tokenizer
            model_path = ensure_model(weights=False)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.text = TextTokenizer(self.tokenizer)  # the judged row's values (its answer too) are text
        self.scorer = scorer
        self.renamed = {output: name for name, output in input_columns.items() if output != name}
        self.max_model_len = max_model_len

    def __call__(self, batch: pa.Table) -> dict[str, list]:
        rows = batch.to_pylist()
        prompts, tokens, skips = [], [], []
        for row in rows:
            prompt, ids, skip = None, None, None
            if row.get("generated_text") is None:  # failed before scoring; other scorers' errors still get judged
                skip = JUDGE_SKIPPED
            else:
                try:
                    prompt, ids = self.render(row)
                except RowError as exc:
                    skip = f"{self.scorer.column}: {exc}"
            prompts.append(prompt)
            tokens.append(ids)
            skips.append(skip)
        return {JUDGED_ROW: rows, PROMPT_COLUMN: prompts, TOKENS_COLUMN: tokens, ROW_ERROR_COLUMN: skips}

    def render(self, row: dict[str, Any]) -> tuple[str, list[int]]:
        fields = dict(row)
        for output_name, input_name in self.renamed.items():
            fields.setdefault(input_name, row.get(output_name))
        fields["prompt"] = row.get("prompt")
        messages = judge_messages(fields, self.scorer)
        data = [str(fields[name]) for name in template_fields(self.scorer.rubric) if fields.get(name) is not None]
        if getattr(self.tokenizer, "chat_template", None) is not None:
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.text.encode(prompt, data, add_special_tokens=False)
        else:
            prompt = "\n\n".join(m["content"] for m in messages) + "\n"
            ids = self.text.encode(prompt, data, add_special_tokens=True)
        if self.max_model_len is not None and len(ids) + 4 > self.max_model_len:
            raise RowError(f"judge prompt is {len(ids)} tokens; the judge's max_model_len is {self.max_model_len}")
        return prompt, ids


def parse_judgement(text: str | None, scale: list[int]) -> int:
    value = (text or "").strip()
    if value not in judge_choices(scale):
        raise ValueError(f"judge answered {value!r}, not a number from {scale[0]} to {scale[1]}")
    return int(value)


def after_judge_columns(scorer: JudgeScorerBase, output_names: list[str]) -> StageColumns:
    """after_judge rebuilds the judged output row (`output_names`) with the judge's two columns."""
    return StageColumns(f"after judge {scorer.name}", needs=(JUDGED_ROW, INFERENCE_ERROR, "generated_text"),
                        adds=tuple(dict.fromkeys([*output_names, *(f.name for f in scorer.output_fields())])),
                        keeps=False)


def after_judge(row: dict[str, Any], *, scorer: JudgeScorerBase, inference_error: str) -> dict[str, Any]:
    """The judged output row with score_<name> and score_<name>_raw filled in (or the reason in `error`)."""
    out = dict(row[JUDGED_ROW])
    column = scorer.column
    out[column] = None
    out[column + JUDGE_TEXT_SUFFIX] = None
    failure = row.get(inference_error) or row.get(ROW_ERROR_COLUMN) or ""
    if failure == JUDGE_SKIPPED:
        return out
    if failure:
        add_error(out, failure if failure.startswith(column) else f"{column}: judge failed: {failure}")
        return out
    text = row.get("generated_text")
    out[column + JUDGE_TEXT_SUFFIX] = text
    try:
        out[column] = float(parse_judgement(text, scorer.scale))
    except ValueError as exc:
        add_error(out, f"{column}: {exc}")
    return out
