"""Text-first rows for a pool whose members tokenize differently (README.md, *Your own models*).

A row is one cut in a document: the prefix text ends, and the suffix text starts, at a space
(``text[c] == " "``, so the suffix's first word keeps its space as every tokenizer here expects). Each
member tokenizes the prefix text and the suffix text itself and reads

* ``ids``: the special tokens its tokenizer puts first (Gemma's ``<bos>``; none for SmolLM2), then the
  **last** ``P - n_special`` tokens of the prefix text, then the **first** ``S`` tokens of the suffix
  text: ``[P + S]`` per row, so every member's batch is a plain rectangle;
* ``ends``: where each of its ``P`` prefix tokens' characters end, relative to the cut (``<= 0``;
  :data:`~kvlingua.align.NO_CHARS` for a special token), which :func:`kvlingua.align.token_map` reads.

A cut is kept only where **every** tokenizer agrees with it: tokenizing the prefix and the suffix
apart gives the same ids as tokenizing the two together, so no token straddles the cut and no member
reads a suffix token through its prefix. A cut that some tokenizer straddles (or a window too short
for P or S tokens) is skipped and counted (``skipped``). Windows read ``WINDOW_CHARS`` characters per
token on either side, enough for any text these tokenizers see; the members' windows all end at the
cut but start wherever their P tokens start.

Rows of one document are cut every ``(P + S)`` tokens of the member that spends the most characters per
token, so no two rows share suffix text. Cached like packed chunks, keyed by every tokenizer's hash.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from kvlingua.align import NO_CHARS, leading_specials

WINDOW_CHARS = 8
"""Characters of text read per wanted token on each side of a cut (a prefix window of ``8·P`` characters)."""


def _cuts(text: str, first: int, step: int) -> list[int]:
    """Positions of spaces, the first at or after ``first``, then each at least ``step`` characters on."""
    cuts, c = [], text.find(" ", first)
    while c != -1:
        cuts.append(c)
        c = text.find(" ", c + step)
    return cuts


def text_rows(docs: Sequence[str], tokenizers: Mapping[str, object], prefix_len: int,
              suffix_len: int) -> dict[str, torch.Tensor]:
    """Rows of ``docs`` for every tokenizer: ``{"ids/<name>": [N, P+S], "ends/<name>": [N, P], "skipped": [1]}``.

    Args:
        docs: documents (each cut on its own; a row never spans two documents).
        tokenizers: name -> fast tokenizer (offsets are read); the names key the result.
        prefix_len, suffix_len: P and S, in each member's own tokens (P includes its special tokens).

    Row ``n`` is the same cut of the same document for every tokenizer.
    """
    if prefix_len < 2 or suffix_len < 2:
        raise ValueError(f"text rows need prefix_len and suffix_len >= 2, got {prefix_len}, {suffix_len}")
    names = list(tokenizers)
    specials = {m: leading_specials(tokenizers[m]) for m in names}
    for m in names:
        if len(specials[m]) >= prefix_len:
            raise ValueError(f"tokenizer {m!r} puts {len(specials[m])} special tokens first; prefix_len "
                             f"{prefix_len} leaves no text")
    ids: dict[str, list[list[int]]] = {m: [] for m in names}
    ends: dict[str, list[list[int]]] = {m: [] for m in names}
    skipped = 0
    span_p, span_s = WINDOW_CHARS * prefix_len, WINDOW_CHARS * suffix_len
    for doc in docs:
        if not doc.strip():
            continue
        per_char = max(len(doc) / max(1, len(tokenizers[m](doc, add_special_tokens=False)["input_ids"]))
                       for m in names)  # the most characters one token spends, over members
        step = max(1, int(per_char * (prefix_len + suffix_len)))
        cuts = _cuts(doc, int(per_char * prefix_len), step)
        if not cuts:
            continue
        pre = [doc[max(0, c - span_p):c] for c in cuts]
        suf = [doc[c:c + span_s] for c in cuts]
        rows: dict[str, list] = {}
        ok = [True] * len(cuts)
        for m in names:
            tok = tokenizers[m]
            enc_p = tok(pre, add_special_tokens=False, return_offsets_mapping=True)
            enc_s = tok(suf, add_special_tokens=False)["input_ids"]
            joint = tok([p + s for p, s in zip(pre, suf)], add_special_tokens=False)["input_ids"]
            n_text = prefix_len - len(specials[m])
            out = []
            for r, c in enumerate(cuts):
                p_ids, s_ids = enc_p["input_ids"][r], enc_s[r]
                if not ok[r] or p_ids + s_ids != joint[r] or len(p_ids) < n_text or len(s_ids) < suffix_len:
                    ok[r] = False
                    out.append(None)
                    continue
                width = len(pre[r])
                tail_ends = [e - width for _, e in enc_p["offset_mapping"][r][-n_text:]]  # <= 0, relative to the cut
                out.append((specials[m] + p_ids[-n_text:] + s_ids[:suffix_len],
                            [NO_CHARS] * len(specials[m]) + tail_ends))
            rows[m] = out
        for r in range(len(cuts)):
            if not ok[r]:
                skipped += 1
                continue
            for m in names:
                ids[m].append(rows[m][r][0])
                ends[m].append(rows[m][r][1])
    n = len(ids[names[0]])
    out = {"skipped": torch.tensor([skipped], dtype=torch.long)}
    for m in names:
        out[f"ids/{m}"] = torch.tensor(ids[m], dtype=torch.long).reshape(n, prefix_len + suffix_len)  # [N, P+S]
        e = torch.tensor(ends[m], dtype=torch.long).reshape(n, prefix_len)  # [N, P]
        out[f"ends/{m}"] = e.cummax(dim=1).values if n else e  # non-decreasing, as token_map reads them
    return out
