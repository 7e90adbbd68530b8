"""Seq2seq engine stage: encoder-decoder families (T5, mT5, CPM-2) with batched Hugging Face `generate`.

vLLM no longer runs encoder-decoder models, so these families get this engine behind the same infer stage.
It takes the rows the render stage produced and returns the columns `to_output_row` reads from an engine
row, the way pipelines/infer.py's vLLM stage does: rows with a row error or a result cache hit skip
generation and pass through with `__inference_error__` set; a row the model fails on gets its own error.
"""
from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from llmbatch.pipelines.columns import (ENGINE_RESULT_COLUMNS, HIT_COLUMN, HIT_MARKER, INFERENCE_ERROR, PROMPT_COLUMN,
                                        RENDERED_PROMPT, ROW_ERROR_COLUMN, TOKENS_COLUMN, TOKEN_LOGPROBS_COLUMN,
                                        StageColumns)


TOP_LOGPROBS_TYPE = pa.list_(pa.list_(pa.struct([("token", pa.string()), ("logprob", pa.float64())])))
SUPPORTED_SAMPLING = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "logprobs"}
_DTYPES = {"float32", "bfloat16", "float16"}
LOGITS_BUDGET_BYTES = 2 << 30  # memory for the per-step logits one generate call keeps (see rows_per_generate)


def torch_dtype(name: str | None, cuda: bool):
    """engine.dtype -> torch dtype; `auto` is float32 on CPU (no native bf16 here) and the checkpoint's own
    dtype on CUDA."""
    import torch

    name = name or "auto"
    if name == "auto":
        return "auto" if cuda else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"Seq2SeqEngineStage: unsupported dtype {name!r} (auto, float32, bfloat16, float16)")
    return getattr(torch, name)


class Seq2SeqEngineStage:
    """Ray Data stage (actor): loads an encoder-decoder model once, generates each batch with HF `generate`.

    Needs columns `tokenized_prompt` (encoder input ids), `prompt` and `_row_error`; `_cached_result` is read
    when present. Adds `_rendered_prompt`, `__inference_error__`, `generated_text`, `num_input_tokens`,
    `num_generated_tokens`, `generated_tokens`, `token_logprobs`, and `top_logprobs` when
    sampling_params["logprobs"] > 0. One output row per input row, in order.

    Greedy and unseeded sampling run as padded batches (longest prompts first, as many rows per generate
    call as `logits_budget_bytes` allows). Seeded sampling (`seed` set, temperature > 0) generates each row
    on its own after `torch.manual_seed(seed)`, so a row's text depends on its prompt and the seed only, not
    on which rows share its batch (the result cache relies on that).
    """

    columns = StageColumns("seq2seq engine", needs=(TOKENS_COLUMN, PROMPT_COLUMN, ROW_ERROR_COLUMN),
                           adds=(RENDERED_PROMPT, INFERENCE_ERROR, *ENGINE_RESULT_COLUMNS, TOKEN_LOGPROBS_COLUMN))

    def __init__(self, model_path: str, engine_kwargs: dict, sampling_params: dict,
                 progress_actor: str | None = None, ensure_model=None):
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        if ensure_model is not None:  # on a cluster: the weights, fetched once per node, at this node's path
            model_path = ensure_model()
        unknown = sorted(k for k, v in sampling_params.items() if k not in SUPPORTED_SAMPLING and v is not None)
        if unknown:
            raise ValueError(f"Seq2SeqEngineStage: sampling parameter(s) {unknown} are not supported "
                             "by the seq2seq engine")
        self.params = dict(sampling_params)
        self.max_tokens = int(self.params["max_tokens"])
        self.temperature = float(self.params.get("temperature") or 0.0)
        self.top_k_logprobs = int(self.params.get("logprobs") or 0)
        self.stop = [s for s in (self.params.get("stop") or []) if s]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        remote = bool(engine_kwargs.get("trust_remote_code"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=remote)
        dtype = torch_dtype(engine_kwargs.get("dtype"), self.device.type == "cuda")
        self.model = AutoModelForSeq2SeqLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=remote).to(self.device).eval()
        generation = self.model.generation_config
        eos = generation.eos_token_id if generation.eos_token_id is not None else self.model.config.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        pad = generation.pad_token_id if generation.pad_token_id is not None else self.model.config.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.pad_token_id or 0))
        self._decoded: dict[int, str] = {}
        self.logits_budget_bytes = LOGITS_BUDGET_BYTES
        self._progress = None
        if progress_actor:
            import ray

            context = ray.get_runtime_context()
            self._replica = context.get_actor_id()
            self._node = context.get_node_id()
            self._progress = ray.get_actor(progress_actor)
            self._progress.replica_started.remote(self._replica, self._node)

    # ---- the batch ---------------------------------------------------------------------------------

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.columns.check(batch.column_names)
        started = time.time()
        n = batch.num_rows
        prompts = batch.column(PROMPT_COLUMN).to_pylist()
        tokens = batch.column(TOKENS_COLUMN).to_pylist()
        row_errors = batch.column(ROW_ERROR_COLUMN).to_pylist()
        hits = batch.column(HIT_COLUMN).to_pylist() if HIT_COLUMN in batch.column_names else [None] * n

        errors: list[str | None] = [None] * n
        results: list[dict[str, Any] | None] = [None] * n
        todo = []
        for i in range(n):
            if row_errors[i]:
                errors[i] = row_errors[i]
            elif hits[i] is not None:
                errors[i] = HIT_MARKER
            elif not tokens[i]:
                errors[i] = "Seq2SeqEngineStage: the row has no prompt tokens"
            else:
                todo.append(i)
        if todo:
            ids = {i: [int(t) for t in tokens[i]] for i in todo}
            if self.temperature > 0 and self.params.get("seed") is not None:
                groups = [[i] for i in todo]
            else:  # longest first, in sub-batches whose kept logits fit the budget
                todo_by_length = sorted(todo, key=lambda i: -len(ids[i]))
                size = self.rows_per_generate()
                groups = [todo_by_length[at:at + size] for at in range(0, len(todo_by_length), size)]
            for group in groups:
                for i, outcome in self._generate_or_retry(group, ids).items():
                    if isinstance(outcome, BaseException):
                        errors[i] = f"{type(outcome).__name__}: {outcome}"
                    else:
                        results[i] = outcome
                        errors[i] = ""

        def column(name: str, kind: pa.DataType) -> pa.Array:
            return pa.array([r[name] if r is not None else None for r in results], kind)

        added = {
            RENDERED_PROMPT: pa.array(prompts, pa.string()),
            INFERENCE_ERROR: pa.array(errors, pa.string()),
            "generated_text": column("generated_text", pa.string()),
            "num_input_tokens": pa.array([len(tokens[i]) if results[i] is not None else None for i in range(n)],
                                         pa.int64()),
            "num_generated_tokens": column("num_generated_tokens", pa.int64()),
            "generated_tokens": column("generated_tokens", pa.list_(pa.int64())),
            TOKEN_LOGPROBS_COLUMN: column(TOKEN_LOGPROBS_COLUMN, pa.list_(pa.float64())),
        }
        if self.top_k_logprobs > 0:
            added["top_logprobs"] = column("top_logprobs", TOP_LOGPROBS_TYPE)
        out = batch
        for name, values in added.items():
            if name in out.column_names:
                out = out.set_column(out.column_names.index(name), name, values)
            else:
                out = out.append_column(name, values)
        if self._progress is not None:
            generated = sum(r["num_generated_tokens"] for r in results if r is not None)
            self._progress.replica_batch.remote(self._replica, len(todo), generated, started, time.time())
        return out

    def rows_per_generate(self) -> int:
        """Rows per generate call: generate keeps every step's logits (steps x vocab floats per row), which for
        mT5's 250k vocabulary is ~1 MB per row and step."""
        vocab = int(getattr(self.model.config, "vocab_size", 0) or len(self.tokenizer))
        per_row = max(1, self.max_tokens * vocab * 4)
        return max(1, self.logits_budget_bytes // per_row)

    def _generate_or_retry(self, rows: list[int], ids: dict[int, list[int]]) -> dict[int, Any]:
        """Generate `rows` together; if that raises, each row alone, so one bad row fails only itself."""
        try:
            return dict(zip(rows, self._generate([ids[i] for i in rows])))
        except Exception as exc:  # noqa: BLE001 - a model failure is a per-row error, never the job's
            if len(rows) == 1:
                return {rows[0]: exc}
        outcomes: dict[int, Any] = {}
        for i in rows:
            try:
                outcomes[i] = self._generate([ids[i]])[0]
            except Exception as exc:  # noqa: BLE001
                outcomes[i] = exc
        return outcomes

    # ---- one generate call -------------------------------------------------------------------------

    def _generate(self, prompts: list[list[int]]) -> list[dict[str, Any]]:
        import torch

        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            attention[row, :len(prompt)] = 1
        kwargs: dict[str, Any] = dict(
            max_new_tokens=self.max_tokens, min_new_tokens=0, num_beams=1, num_return_sequences=1,
            repetition_penalty=1.0, no_repeat_ngram_size=0,
            return_dict_in_generate=True, output_logits=True,  # scores (processed logits) are not needed
        )
        if self.temperature > 0:
            top_k = self.params.get("top_k")
            kwargs.update(do_sample=True, temperature=self.temperature,
                          top_p=float(self.params.get("top_p") if self.params.get("top_p") is not None else 1.0),
                          top_k=int(top_k) if top_k is not None and int(top_k) > 0 else 0)  # 0: no top-k (vLLM -1)
        else:
            kwargs.update(do_sample=False)
        if self.stop:
            kwargs.update(stop_strings=list(self.stop), tokenizer=self.tokenizer)
        if self.temperature > 0 and self.params.get("seed") is not None:
            torch.manual_seed(int(self.params["seed"]))  # global RNG of this actor; one row per call (see class)
        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids.to(self.device),
                                         attention_mask=attention.to(self.device), **kwargs)
        # Logprobs from the raw logits, not `scores`: when sampling, scores are after temperature/top-k/top-p,
        # while vLLM reports the model's own distribution.
        sequences = output.sequences[:, 1:]                           # drop the decoder start token
        chosen_steps, top_values, top_indices = [], [], []
        for step, step_logits in enumerate(output.logits):           # one (batch, vocab) step at a time
            logprobs = torch.log_softmax(step_logits.float(), dim=-1)
            chosen_steps.append(logprobs.gather(-1, sequences[:, step:step + 1]).squeeze(-1))
            if self.top_k_logprobs > 0:
                values, indices = logprobs.topk(self.top_k_logprobs, dim=-1)
                top_values.append(values)
                top_indices.append(indices)
        chosen = torch.stack(chosen_steps, dim=1)                     # (batch, steps)
        top = (torch.stack(top_values, dim=1), torch.stack(top_indices, dim=1)) if top_values else None
        results = []
        for row in range(len(prompts)):
            generated = [int(t) for t in sequences[row].tolist()]
            count = self._generated_count(generated)
            generated = generated[:count]
            result = {
                "generated_tokens": generated,
                "num_generated_tokens": count,
                "generated_text": self._text(generated),
                TOKEN_LOGPROBS_COLUMN: [float(v) for v in chosen[row, :count].tolist()],
            }
            if top is not None:
                values, indices = top[0][row, :count].tolist(), top[1][row, :count].tolist()
                result["top_logprobs"] = [
                    [{"token": self._token_text(t), "logprob": max(float(v), -1e9)} for t, v in zip(ts, vs)]
                    for ts, vs in zip(indices, values)]
            results.append(result)
        return results

    def _generated_count(self, generated: list[int]) -> int:
        """Tokens this row generated: up to and including the first EOS (vLLM counts it) or the token that
        completed a stop string, whichever came first, else all of them. A finished row is padded after."""
        count = next((p + 1 for p, t in enumerate(generated) if t in self.eos_ids), len(generated))
        if self.stop:
            for end in range(1, count):
                if any(s in self.tokenizer.decode(generated[:end], skip_special_tokens=True) for s in self.stop):
                    return end
        return count

    def _text(self, generated: list[int]) -> str:
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stop if s in text]
        return text[:min(cuts)] if cuts else text  # vLLM leaves the stop string out of the text

    def _token_text(self, token: int) -> str:
        if token not in self._decoded:
            self._decoded[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self._decoded[token]
