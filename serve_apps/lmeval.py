"""lm-evaluation-harness against a served pool: local tasks from a text source, one model name per path.

Needs the optional extra ``pip install kvlingua[eval]`` (``lm-eval[api]==0.4.13``); nothing here
imports ``lm_eval`` until a function needs it; ``bench/bench_lm_eval.py`` runs it all.

* :func:`build_tasks` writes two tasks reading local JSONL (``dataset_path: json``):
  ``kvlingua_cloze`` (multiple choice: a passage, then its true next word among four; the three
  others drawn from the text's running words, so as frequent as words of the text are; scored by
  log-likelihood, ``acc``) and ``kvlingua_nextword`` (``generate_until`` with stop strings: the
  first word generated after the passage, ``exact_match``). Passages are at most
  ``context_tokens`` tokens, so that a latent hand-off stays inside what the pool was trained
  for (past it the server falls back to text and the Σ column would measure text).
* Model names: a pool model reads its own text; ``TARGET@SOURCE`` reads through Σ;
  ``TARGET@SOURCE:text`` is the text hand-off (the target re-reads the prompt).
* lm-eval's stock ``local-completions`` sends loglikelihood requests without saying where the
  context ends, and the server needs it on a path (the continuation must be scored by the target:
  ``kvlingua.handoff_tokens = ctxlen - 1``, see :mod:`serve_apps.openai_plan`).
  :func:`register_model` adds ``kvlingua-completions``: ``local-completions`` plus exactly that
  field on loglikelihood requests to a path alias (one prompt per request); generation requests
  are unchanged.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

CLOZE, NEXTWORD = "kvlingua_cloze", "kvlingua_nextword"
METRICS = {CLOZE: "acc,none", NEXTWORD: "exact_match,first_word"}
MODEL = "kvlingua-completions"

_CLOZE_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_NEXTWORD_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: {max_gen_toks}
  do_sample: false
  temperature: 0
filter_list:
  - name: first_word
    filter:
      - function: regex
        regex_pattern: "(\\\\w+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
metadata:
  version: 1.0
"""


def _n_tokens(tokenizer, words: list[str]) -> int:
    return len(tokenizer.encode(" ".join(words), add_special_tokens=False))


def passages(docs: list[str], tokenizer, n: int, context_tokens: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` ``(context, next word)`` pairs from ``docs``: a run of words of at most ``context_tokens``
    tokens, then the word that follows it (letters only). Seeded, deterministic."""
    rng = random.Random(seed)
    words_of = [d.split() for d in docs if len(d.split()) > 8]
    if not words_of:
        raise ValueError("no document has more than 8 words; give more text")
    out, tries = [], 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        words = rng.choice(words_of)
        i = rng.randrange(4, len(words))
        if not words[i].isalpha():
            continue
        start = i
        while start > 0 and _n_tokens(tokenizer, words[start - 1:i]) <= context_tokens:
            start -= 1
        if i - start >= 3:
            out.append((" ".join(words[start:i]), words[i]))
    if len(out) < n:
        raise ValueError(f"found {len(out)} passages of <= {context_tokens} tokens, not {n}")
    return out


def build_tasks(docs: list[str], tokenizer, out_dir: str | Path, n: int = 40, context_tokens: int = 16,
                max_gen_toks: int = 8, seed: int = 0) -> Path:
    """Write ``kvlingua_cloze`` and ``kvlingua_nextword`` (JSONL + task YAML) under ``out_dir``; returns it."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    pairs = passages(docs, tokenizer, n, context_tokens, seed)
    stream = [w for d in docs for w in d.split() if w.isalpha()]  # distractors as frequent as the text's words
    cloze, nextword = [], []
    for context, word in pairs:
        choices = [word]
        while len(choices) < 4:
            w = rng.choice(stream)
            if w.lower() not in {c.lower() for c in choices}:
                choices.append(w)
        rng.shuffle(choices)
        cloze.append({"context": context, "choices": choices, "label": choices.index(word)})
        nextword.append({"context": context, "answer": word})
    for task, rows, template in ((CLOZE, cloze, _CLOZE_YAML), (NEXTWORD, nextword, _NEXTWORD_YAML)):
        path = out / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        (out / f"{task}.yaml").write_text(template.format(task=task, path=path, max_gen_toks=max_gen_toks))
    return out


def register_model() -> str:
    """Register ``kvlingua-completions`` with lm-eval (once); returns its name."""
    from lm_eval.api.registry import MODEL_REGISTRY, register_model as register
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    if MODEL in MODEL_REGISTRY:
        return MODEL

    class KvlinguaCompletions(LocalCompletionsAPI):
        """``local-completions`` that tells a path alias where each scored continuation starts."""

        def __init__(self, **kwargs):
            if int(kwargs.get("batch_size", 1)) != 1 or int(kwargs.get("num_concurrent", 1)) != 1:
                raise ValueError(f"{MODEL}: one prompt per request (batch_size=1, num_concurrent=1)")
            super().__init__(**kwargs)
            self._ctxlens: list[int] = []

        def batch_loglikelihood_requests(self, chunks):
            inputs, ctxlens, keys = super().batch_loglikelihood_requests(chunks)
            self._ctxlens = ctxlens
            return inputs, ctxlens, keys

        def _create_payload(self, messages, generate=False, gen_kwargs=None, seed=1234, eos=None, **kwargs):
            payload = super()._create_payload(messages, generate=generate, gen_kwargs=gen_kwargs, seed=seed,
                                              eos=eos, **kwargs)
            if not generate and "@" in self.model and self._ctxlens and self._ctxlens[0] > 1:
                payload["kvlingua"] = {"handoff_tokens": self._ctxlens[0] - 1}
            return payload

    register(MODEL)(KvlinguaCompletions)
    return MODEL


def run_lm_eval(base_url: str, model: str, tokenizer_dir: str | Path | None, task_dir: str | Path,
                tasks: tuple[str, ...] = (CLOZE, NEXTWORD), client: str = MODEL, limit: int | None = None) -> dict:
    """lm-eval ``simple_evaluate`` of ``model`` served at ``base_url`` on ``tasks``; ``{task: metric}``
    (``acc`` for the cloze, ``exact_match`` for the next word). ``client``: ``local-completions`` or
    :data:`MODEL`; ``tokenizer_dir`` None: the server's tokenizer routes."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if client == MODEL:
        register_model()
    args = {"model": model, "base_url": f"{base_url}/v1/completions", "tokenized_requests": True, "max_retries": 1,
            "timeout": 120}
    if tokenizer_dir is None:  # the server's /tokenize, /detokenize, /tokenizer_info (found by "auto")
        args["tokenizer_backend"] = "auto"
    else:
        args |= {"tokenizer": str(tokenizer_dir), "tokenizer_backend": "huggingface"}
    out = lm_eval.simple_evaluate(model=client, model_args=args, tasks=list(tasks), limit=limit,
                                  task_manager=TaskManager(include_path=str(task_dir)), log_samples=False,
                                  bootstrap_iters=0)
    return {t: float(out["results"][t][METRICS[t]]) for t in tasks}


def table(scores: dict[str, dict[str, float]], members: list[str], paths: list[tuple[str, str]],
          n: int) -> str:
    """Markdown: per path ``source -> target``, each task's score reading its own text, through Σ and
    through text hand-off. ``scores``: model name -> {task: score}."""
    def cell(name: str, task: str) -> str:
        return f"{scores[name][task]:.3f}" if name in scores else "-"

    lines = [f"| target | source | cloze acc: own | Σ | text | next word exact: own | Σ | text |",
             "|---|---|---|---|---|---|---|---|"]
    for source, target in paths:
        row = [target, source]
        for task in (CLOZE, NEXTWORD):
            row += [cell(target, task), cell(f"{target}@{source}", task), cell(f"{target}@{source}:text", task)]
        lines.append("| " + " | ".join(row) + " |")
    se = max((v * (1 - v) / n) ** 0.5 for per in scores.values() for v in per.values()) if scores else 0.0
    chance = "chance: cloze 0.25 (4 choices)"
    return "\n".join(lines) + (f"\n\n{n} examples per task (standard error of a score p: sqrt(p(1-p)/{n}), at most "
                               f"{se:.3f} here); {chance}; members: {', '.join(members)}.\n")
