"""The ingress's pure half: a request checked against the pool's facts and planned (no Ray; unit-testable).

:class:`Planner` holds what the pool is (members and their layouts, tokenizers, the space's sink, what it was trained
for: :class:`~serve_apps.limits.TrainedLimits`, the served modules) and the ingress's context store, and turns a
request into a :class:`~serve_apps.requests.Prepared` generation or a :class:`~serve_apps.requests.RequestError`
(HTTP 4xx naming the field) before any model work starts:

* **validation**: :meth:`Planner.model`, :meth:`~Planner.ids` (text tokenized by the model that reads it, token ids
  checked against its vocabulary), :meth:`~Planner.check_length`, :meth:`~Planner.new_tokens`;
* **planning** (:meth:`Planner.plan`): what the source hands over and how. Latent hand-off ``source -> target``:
  the source reads the first ``positions`` prompt tokens (default: all but the last) and sends Σ; ``text``: the
  target re-reads the prompt; ``identity``: the raw source cache (equal layouts only). A stored context (named, or
  matched as the prompt's start) or a module goes through Σ too. Outside the pool's training a latent hand-off falls
  back to text, saying why (``strict``: 400).
* **members that tokenize differently** (:mod:`serve_apps.crosstok`): each model reads the prompt with its own
  tokenizer (a request's ids are the target's); a latent hand-off or a stored context read from text reaches the
  target along the token map. Token-id prompts and the identity hand-off need one tokenizer (else 400), and so does
  the automatic prefix match of stored contexts.

:class:`~serve_apps.router.Router` then runs the plan on the replicas.
"""
from __future__ import annotations

from dataclasses import replace

from kvlingua.align import text_ends
from kvlingua.context_store import ContextStore, StoredContext, adapters_digest
from kvlingua.generate import check_identity
from kvlingua.pool import LoadedPool
from serve_apps.crosstok import Mapped, PoolTokenizers, context_request, handoff_map
from serve_apps.limits import TrainedLimits
from serve_apps.modules import module_library
from serve_apps.options import ServeOptions
from serve_apps.requests import HandoffAsk, Prepared, RequestError, sampling_params
from serve_apps.schemas import GenerateRequest, ModelInfo, ModelList


class Planner:
    """The pool's facts and the request checks and plans over them.

    Args:
        pool: the served pool (``load_pool(..., load_models=False)``: no weights needed).
        opts: the served options (request limits, modules directory).
        store: the ingress's context store (read here: a named or matching context; written by
            :class:`~serve_apps.contexts.ContextService`).
    """

    def __init__(self, pool: LoadedPool, opts: ServeOptions, store: ContextStore):
        self.opts = opts
        self.store = store
        self.members = {m.name: m for m in pool.members}
        self.q_dim = pool.space.cfg.q_dim
        self.tokenizer = pool.tokenizer  # the first member's where members tokenize differently
        self.tokenizers = PoolTokenizers(list(self.members), pool.tokenizers, pool.tokenizer, pool.mixed_tokenizers)
        self.mixed = self.tokenizers.mixed
        self.sink = pool.space.cfg.sink_tokens
        self.vocab = min(m.summary.vocab_size for m in pool.members)
        self.limits = TrainedLimits.from_meta(pool.meta)
        self.adapters = adapters_digest(e.get("adapter_sha256", "") for e in pool.meta["members"])
        self.modules = module_library(pool, opts.modules_dir)  # listed and planned here, computed by replicas

    # ------------------------------------------------------------ the pool's facts
    def model_list(self) -> ModelList:
        infos = [ModelInfo(name=m.name, width=m.summary.width, fingerprint=m.fingerprint, **m.summary.to_dict())
                 for m in self.members.values()]
        return ModelList(models=infos, q_dim=self.q_dim, tokenizer=self.tokenizer is not None,
                         max_prompt_tokens=self.opts.max_prompt_tokens, max_new_tokens=self.opts.max_new_tokens)

    def model(self, name: str, field: str) -> str:
        """``name`` if the pool serves it; 404 naming the members otherwise."""
        if name not in self.members:
            raise RequestError(404, f"{field}: unknown model {name!r}; this pool serves {sorted(self.members)}",
                               param=field, code="model_not_found")
        return name

    def module_model(self, name: str, field: str) -> str:
        """The model module ``name`` was learned on; 404 naming the known modules otherwise."""
        known = sorted(self.modules.modules) if self.modules is not None else []
        if name not in known:
            where = f"known modules: {known[:20]}" if known else "this server serves no modules (kvlingua serve --modules DIR)"
            raise RequestError(404, f"{field}: unknown module {name!r}; {where}; see GET /v1/modules", param=field,
                               code="module_not_found")
        return self.modules.modules[name].model

    def tokenizer_of(self, model: str | None, field: str = "model"):
        """The tokenizer ``model`` reads text with: the pool's where its members share one (``model`` unread);
        where they tokenize differently, ``model``'s own (400 without a model, 404 for an unknown one)."""
        if not self.mixed:
            return self.tokenizer
        if model is None:
            raise RequestError(400, f"{field}: this pool's members tokenize differently; name the model whose "
                                    f"tokenizer to use (one of {sorted(self.members)})", param=field)
        return self.tokenizers.of(self.model(model, field))

    def vocab_of(self, model: str | None) -> int:
        """Token ids ``model`` reads: ``[0, vocab)`` (every member's where they share a tokenizer)."""
        return self.members[model].summary.vocab_size if self.mixed and model in self.members else self.vocab

    def text(self, tokens: list[int], model: str | None = None) -> str | None:
        """``tokens`` of ``model`` as text, by its tokenizer (the pool's where its members share one)."""
        tokenizer = self.tokenizers.of(model) if self.mixed else self.tokenizer
        return tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None

    # ------------------------------------------------------------ validation
    def encode(self, text: str, field: str = "prompt", special: bool = True, model: str | None = None) -> list[int]:
        """``text`` as ``model`` reads it (see :meth:`tokenizer_of`); where members tokenize differently, its leading
        specials (with ``special``) then its tokens (:func:`kvlingua.align.text_ends`), as a hand-off maps them."""
        tokenizer = self.tokenizer_of(model) if self.mixed else self.tokenizer
        if tokenizer is None:
            raise RequestError(400, f"{field}: this pool has no tokenizer; send token ids", param=field)
        if len(text) > self.opts.max_prompt_chars:
            raise RequestError(400, f"{field}: {len(text)} characters; this server reads at most "
                                    f"{self.opts.max_prompt_chars}", param=field, code="prompt_too_long")
        if self.mixed:
            return text_ends(tokenizer, text, specials=special)[0]
        return list(tokenizer.encode(text, add_special_tokens=special))

    def ids(self, prompt: str | list[int], field: str = "prompt", allow_empty: bool = False,
            model: str | None = None) -> list[int]:
        """``prompt`` as ``model``'s token ids (text tokenized by its tokenizer, see :meth:`encode`)."""
        if isinstance(prompt, str):
            ids = self.encode(prompt, field, model=model)
        else:
            ids = list(prompt)
            vocab = self.vocab_of(model)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise RequestError(400, f"{field}: token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
                                   param=field, code="invalid_token")
        if not ids and not allow_empty:
            raise RequestError(400, f"{field}: empty; give at least one token of text", param=field)
        return ids

    def check_length(self, ids: list[int], field: str = "prompt") -> None:
        if len(ids) > self.opts.max_prompt_tokens:
            raise RequestError(400, f"{field}: {len(ids)} tokens; this server accepts at most "
                                    f"{self.opts.max_prompt_tokens} (max_prompt_tokens)", param=field,
                               code="prompt_too_long")

    def new_tokens(self, n: int, field: str) -> int:
        """``n`` if within ``max_new_tokens``; 400 otherwise."""
        if n > self.opts.max_new_tokens:
            raise RequestError(400, f"{field}: {n} exceeds this server's limit of {self.opts.max_new_tokens}",
                               param=field)
        return n

    def _nonempty(self, ids: list[int]) -> None:
        if not ids:
            raise RequestError(400, "prompt: empty; give at least one token of text", param="prompt")
        self.check_length(ids)

    def _latent_or_text(self, ask: HandoffAsk, positions: int, why: str | None, f: str) -> tuple[str, str | None]:
        """The hand-off used for a latent ask of ``positions`` and why not latent (None: latent)."""
        reason = self.limits.why_not_latent(ask.source, ask.target, positions) or why
        if reason is None:
            return "latent", None
        if ask.strict:
            raise RequestError(400, f"{f}handoff: latent refused: {reason} (strict); drop strict to fall back to "
                                    "text", param=f"{f}handoff", code="outside_trained_limits")
        return "text", reason

    # ------------------------------------------------------------ planning
    def prepare(self, req: GenerateRequest) -> Prepared:
        """A ``/v1/generate`` request checked and planned."""
        params = sampling_params(self.new_tokens(req.max_new_tokens, "max_new_tokens"), req.temperature, req.top_p,
                                 req.seed, req.ignore_eos)
        if self.mixed:
            self.model(req.target, "target")
        ids = self.ids(req.prompt, allow_empty=req.context_id is not None, model=req.target)
        ask = HandoffAsk(target=req.target, source=req.source, handoff=req.handoff, strict=req.strict,
                         context_id=req.context_id, handoff_tokens=req.handoff_tokens, use_store=req.use_store,
                         module=req.module)
        return self.plan(ask, ids, params, "/v1/generate", text=req.prompt if isinstance(req.prompt, str) else None)

    def plan(self, ask: HandoffAsk, ids: list[int], params: dict, route: str, field_prefix: str = "",
             text: str | None = None) -> Prepared:
        """Check models, context, module, hand-off and limits; decide what the source hands over.

        ``ids`` are the target's tokens of the prompt; ``text`` the prompt as text where it was sent as text (what a
        source or stored context of another tokenizer reads). Raises :class:`RequestError`."""
        f, target, source, handoff = field_prefix, ask.target, ask.source, ask.handoff
        plan = dict(target=target, params=params, route=route)
        self.model(target, "model" if f else "target")
        if ask.module is not None:
            learned_on = self.module_model(ask.module, f"{f}module")
            if source is not None or ask.context_id is not None or ask.handoff_tokens is not None or handoff != "latent":
                raise RequestError(400, f"{f}module: the target reads the module through Σ, then the whole prompt; "
                                        "leave source, context_id, handoff_tokens and handoff unset",
                                   param=f"{f}module")
            self._nonempty(ids)
            return Prepared(**plan, source=learned_on, handoff="latent", handoff_used="latent", reason=None, ids=ids,
                            positions=0, module=ask.module)
        if source is not None:
            self.model(source, f"{f}source")
        ctx = None
        if ask.context_id is not None:
            ctx = self._context(ask, f)
            source = ctx.source
            if not self.tokenizers.same(source, target):
                return self._across(replace(ask, source=source), text, ctx, plan, f)
            ids = ctx.token_ids + ids
        elif source is not None and not self.tokenizers.same(source, target):
            return self._across(ask, text, None, plan, f)
        self._nonempty(ids)
        if source is None:
            return Prepared(**plan, source=None, handoff="none", handoff_used="none", reason=None, ids=ids, positions=0)
        if ctx is None and handoff == "latent" and ask.use_store and ask.handoff_tokens is None and len(self.store):
            ctx = self.store.match(ids, self.members[source].fingerprint, self.adapters)
        positions = len(ids) - 1
        if ctx is not None:
            positions = min(ctx.positions, positions)
        elif ask.handoff_tokens is not None:
            if ask.handoff_tokens > positions:
                raise RequestError(400, f"{f}handoff_tokens: {ask.handoff_tokens}, but the prompt has {len(ids)} "
                                        "tokens and the target must read at least the last", param=f"{f}handoff_tokens")
            positions = ask.handoff_tokens
        used, reason = handoff, None
        if handoff == "latent":
            used, reason = self._latent_or_text(replace(ask, source=source), positions, None, f)
            ctx = ctx if used == "latent" else None
        elif handoff == "identity":
            try:
                check_identity(self.members[source].summary, self.members[target].summary, source, target)
            except ValueError as e:
                raise RequestError(400, f"{f}handoff: {e}", param=f"{f}handoff") from e
        return Prepared(**plan, source=source, handoff=handoff, handoff_used=used, reason=reason, ids=ids,
                        positions=positions, context=ctx)

    def _context(self, ask: HandoffAsk, f: str) -> StoredContext:
        """The stored context ``ask`` names, checked against its source and hand-off."""
        ctx = self.store.get(ask.context_id)
        if ctx is None:
            raise RequestError(404, f"{f}context_id: no stored context {ask.context_id!r} (never stored, deleted or "
                                    "evicted); see GET /v1/contexts", param=f"{f}context_id", code="context_not_found")
        if ask.source is not None and ask.source != ctx.source:
            raise RequestError(400, f"{f}context_id: context {ask.context_id!r} was read by {ctx.source!r}, not "
                                    f"{ask.source!r}; leave source unset or name {ctx.source!r}", param=f"{f}source")
        if ask.handoff != "latent" or ask.handoff_tokens is not None:
            raise RequestError(400, f"{f}context_id: a stored context is handed over in Σ: use handoff 'latent' "
                                    "and no handoff_tokens", param=f"{f}handoff")
        return ctx

    def _across(self, ask: HandoffAsk, text: str | None, ctx: StoredContext | None, plan: dict, f: str) -> Prepared:
        """:meth:`plan` where ``ask.source`` (or the stored context's) and the target tokenize differently: the target's
        tokens of the prompt ``text``, and what reaches it through Σ along the token map
        (:func:`~serve_apps.crosstok.handoff_map`, :func:`~serve_apps.crosstok.context_request`).

        ``handoff_tokens`` counts the target's tokens; limits count the target's positions. Token ids (``text`` None),
        the identity hand-off and a context stored as token ids are refused (400)."""
        source, target, handoff = ask.source, ask.target, ask.handoff
        if handoff == "identity":
            raise RequestError(400, f"{f}handoff: identity from {source!r} to {target!r}: they tokenize differently; "
                                    "use 'latent' or 'text'", param=f"{f}handoff")
        if text is None:
            raise RequestError(400, f"prompt: token ids are one tokenizer's, and {source!r} and {target!r} tokenize "
                                    "differently; send the prompt as text", param="prompt", code="invalid_token")
        tok = self.tokenizers.of(target)
        mapped, why = None, None
        if ctx is not None:
            if getattr(ctx, "text", None) is None:
                raise RequestError(400, f"{f}context_id: context {ctx.key.id!r} was stored as token ids of {source!r}, "
                                        f"which {target!r} cannot read (another tokenizer); store it as text",
                                   param=f"{f}context_id")
            ids, positions, extras = context_request(ctx, tok, text, self.sink)
            mapped = Mapped([], extras["index"], extras["sink_ids"], extras["ids"])
        else:
            ids = text_ends(tok, text)[0] if text else []
        self._nonempty(ids)
        if ctx is None:
            if ask.handoff_tokens is not None and ask.handoff_tokens > len(ids) - 1:
                raise RequestError(400, f"{f}handoff_tokens: {ask.handoff_tokens}, but the prompt has {len(ids)} "
                                        f"tokens of {target!r} and the target must read at least the last",
                                   param=f"{f}handoff_tokens")
            if handoff == "text":
                return Prepared(**plan, source=source, handoff=handoff, handoff_used="text", reason=None, ids=ids,
                                positions=ask.handoff_tokens or len(ids) - 1)
            mapped, positions = handoff_map(self.tokenizers.of(source), tok, text, ask.handoff_tokens, self.sink)
            if mapped is None:
                why = f"{source!r} reads the handed-over text within its own sink: nothing for Σ to carry"
        used, reason = self._latent_or_text(ask, positions, why, f)
        if used == "text":
            ctx, mapped = None, None
        return Prepared(**plan, source=source, handoff=handoff, handoff_used=used, reason=reason, ids=ids,
                        positions=positions, context=ctx, mapped=mapped)
