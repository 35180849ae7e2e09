"""OpenAI's response pieces, built from what a model replica returns (pure Python, no Ray).

A replica's final dict (:meth:`serve_apps.model_server.PoolModelServer.generate`) carries
``tokens``, ``finish_reason`` (``eos``, ``stop``, ``length``), ``logprobs`` (one
``{"logprob", "top": [(token, logprob), ...]}`` per generated token, when asked) and, with echo,
``prompt_logprobs`` (one entry per prompt token, ``None`` where the target did not compute the
position that predicts it). These functions turn them into OpenAI's shapes, as vLLM writes them:

* completions: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``; ``top_logprobs``
  maps token text -> log-probability for the k best and the chosen token; a ``None`` entry gives
  ``None`` in both lists;
* chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...k best]}]}``.
"""
from __future__ import annotations

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def finish_reason(done: dict) -> str:
    return FINISH.get(done["finish_reason"], "length")


def token_text(tokenizer, token: int) -> str:
    """One token as text (special tokens spelled out), as logprobs report it."""
    return tokenizer.decode([token], skip_special_tokens=False) if tokenizer is not None else f"token_id:{token}"


def completion_logprobs(tokenizer, tokens: list[int], entries: list[dict | None], offset: int = 0) -> dict:
    """Completions' ``logprobs`` object for ``tokens`` and their scores (aligned); text offsets from ``offset``."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(tokens, entries):
        text = token_text(tokenizer, token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(entry["logprob"])
        top = {token_text(tokenizer, t): lp for t, lp in entry["top"]}
        top.setdefault(text, entry["logprob"])
        out["top_logprobs"].append(top)
    return out


def merge_completion_logprobs(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def chat_logprobs(tokenizer, tokens: list[int], entries: list[dict]) -> dict:
    """Chat's ``logprobs`` object: ``{"content": [...]}`` one entry per generated token."""
    def item(token: int, lp: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [item(t, e["logprob"]) | {"top_logprobs": [item(u, lp) for u, lp in e["top"]]}
                        for t, e in zip(tokens, entries)]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
