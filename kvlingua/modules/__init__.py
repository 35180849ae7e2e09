"""Portable task modules (paper §6): soft prompts learned on one pool model, used by another through Σ.

Reading order:

* :mod:`~kvlingua.modules.prompt` — a soft prompt (``p`` virtual tokens, trainable input
  embeddings ``[p, H]`` of a frozen model), its KV block (the model's cache after reading
  them), batched prompt tuning, and the module file (safetensors: prompt + fingerprint).
* :mod:`~kvlingua.modules.tasks` — prompt-recovery tasks: a corpus chapter is a task, its
  verses the examples, a few held out for scoring; meta-train and meta-test tasks come from
  disjoint chapters (corpus splits). A task is text: each pool member reads it with its own
  tokenizer, so a pool that mixes tokenizers learns, ports and scores modules like any other.
* :mod:`~kvlingua.modules.module_store` — every task's module learned once per model and kept on
  disk with its KV block, so meta-training, evaluation and sweeps reuse it.
* :mod:`~kvlingua.modules.port` — porting: ``OUT_j(IN_i(block_i))``, the fingerprint and
  prompt-length checks, and the cache of ported blocks a server keeps.
* :mod:`~kvlingua.modules.meta` — meta-training (§6.1): :func:`kvlingua.train.fit` over
  batches of tasks, with the modules' blocks as the sources' prefixes.
* :mod:`~kvlingua.modules.conditions` — the config of a modules run, its setup (pool, tasks,
  every model's modules), the conditions scored (no prompt, random, direct, ported) and the
  meta-training run; the Figure-5 experiment over them is ``experiments.modules``.

Nothing here imports Ray; ``workers.meta_worker`` runs meta-training on Ray Train.
"""
