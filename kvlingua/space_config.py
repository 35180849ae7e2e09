"""The configuration of the shared space Σ and its adapters: :class:`SpaceConfig`, its allowed values and checks.

The adapters themselves are in :mod:`kvlingua.translator`; this module is what a run config, the planner and
the pool file need without building one. Pure Python; no torch.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

ADAPTERS = ("translator", "linear")
GROUP_MODES = ("attend", "merge")
OUTPUTS = ("auto", "dense", "per_layer")
INITS = ("closed_form", "random", "match")
KEYS = ("unrotated", "rotated")
OUT_WEIGHTS = ("uniform", "attention")
Q_DIM_AUTO_PER_LAYER = 32
"""``q_dim: auto`` is this many Σ channels per layer of the deepest member (the paper's Q = 32·L)."""
EMBED_DEFAULTS = {"dense": 2.0, "per_layer": 0.5}
"""D'/D_i of each output layout when ``embed_dim_factor`` is None (see :class:`SpaceConfig`)."""


@dataclass(frozen=True)
class SpaceConfig:
    """Shape of the shared space Σ and of every adapter into and out of it."""

    q_dim: int | str = 256
    """Q: width of Σ per position; must be divisible by every member's number of layers L_i. ``auto``: the
    paper's 32·L_max, rounded up to a multiple of every member's layer count (resolved with the pool, by
    :func:`resolve_q_dim`)."""
    adapter: str = "translator"
    """``translator`` (paper §2.2 + short path) or ``linear`` (baseline: one Linear per K/V)."""
    output: str = "auto"
    """Output side of a translator: ``dense`` -- the paper's one Linear from all G*D' stack outputs to the
    whole output layout, and a dense short path (O(L^2) parameters); ``per_layer`` -- one output head per
    stack layer writing only its own layers' slices, and a per-slice short path (O(L) parameters); ``auto``
    -- ``per_layer`` where the dense translator's IN + OUT would exceed ``max_share`` of a member model,
    decided by :func:`resolve_output` once the pool's model sizes are known. A space built without
    resolving (no model sizes at hand) reads ``auto`` as ``dense``. Ignored by the linear baseline."""
    max_share: float = 0.1
    """``auto`` picks ``per_layer`` when some member's dense IN + OUT would hold more than this share of that
    model's own parameters (embeddings included)."""
    embed_dim_factor: float | None = None
    """D' = embed_dim_factor * D_i: residual width of model i's translators; None -> the output's default:
    2.0 for ``dense`` (the paper's), 0.5 for ``per_layer`` (a bottleneck: keeps IN + OUT near 0.05x real models)."""
    translation_dim_factor: float = 1.0
    """Feed-forward width of the cross-attention stack = translation_dim_factor * D'."""
    n_heads: int = 4
    """Attention heads of the cross-attention stack (at most: fewer where D' is not divisible, see :func:`stack_heads`)."""
    head_dim: int | None = None
    """Width of one attention head; None -> D' // n_heads (D' must then be divisible by n_heads)."""
    num_layers: int | None = None
    """Stack depth; None -> L_in (paper). Fewer layers group contiguous slices (latency-oriented); capped at L_in."""
    group_mode: str = "attend"
    """How a stack shallower than L_in reads its slices: ``attend`` -- layer g cross-attends to all n slices
    of its group (memory of S*n entries, causal by position); ``merge`` -- the input transform maps each
    group's n slices, concatenated, to one slice of width D' (paper footnote 2: L_i -> L~_i), so every
    layer attends to S entries (cheaper; needs L_in divisible by the depth)."""
    short_path: bool = True
    """Add a linear map from the input block straight to the output layout around the stack."""
    stack: bool = True
    """Use the input transform + cross-attention stack + output transform (off: short path only)."""
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm in the translator."""
    init: str = "closed_form"
    """How the adapters start: ``closed_form`` -- one calibration pass, no gradients: Σ from the joint principal
    directions of every member's standardized cache (keys and values apart), IN_i and OUT_j by ridge regression
    to and from it, so every path starts as the pool's linear optimum and the stack (last projection at zero)
    adds what it learns (:mod:`kvlingua.closedform`; the short path is dense then); ``random`` --
    variance-preserving weights, zero bias; ``match`` -- random, then rescaled on the first training batch so the
    translated cache has the target's own per-(layer, channel) mean and standard deviation
    (:func:`kvlingua.outinit.match_init`). ``random`` and ``match`` are kept for ablations."""
    init_batches: int = 16
    """Batches the ``closed_form`` calibration reads: the first of training, or of :attr:`init_prefix_len`."""
    init_prefix_len: int | None = None
    """Prefix length of the ``closed_form`` calibration batches; None: the first training batches themselves.
    A cache's statistics drift with position, so a closed form fitted on short prefixes carries less of a long
    one (:func:`kvlingua.job.calibration_batches`): calibrating on the longest prefix a pool will read costs no
    training step, only one pass with more positions per batch."""
    out_weights: str = "uniform"
    """How the ``closed_form`` start weighs calibration positions in OUT's regression: ``uniform`` (every position
    alike) or ``attention`` (per target layer, by the attention mass the target's suffix puts on each position, mixed
    with a uniform share; :func:`kvlingua.closedform.attention_weighted_out`): the secondary sinks a long prefix's
    attention rests on are fitted first. Costs a second calibration pass."""
    ridge: float = 1e-2
    """Ridge of the ``closed_form`` regressions, relative to the mean variance of a regressor channel."""
    sink_tokens: int = 1
    """Positions at the start of every prefix that a target computes itself (its attention sink: a real
    model's first position is unlike any other, and a translated one ruins every layer); Σ carries the
    positions after them. 0 translates every position (the paper's setting)."""
    keys: str = "unrotated"
    """``unrotated``: Σ carries keys with each model's rotary embedding undone (position-free), rotated at the
    target's own positions when a block becomes a cache (:mod:`kvlingua.rotary`); ``rotated``: keys as cached."""
    refresh: float = 0.1
    """Share of a translated prefix's positions after the sink that the target recomputes itself once it has the
    translation: the ones the next token it reads attends to most (its secondary sinks; :mod:`kvlingua.refresh`),
    each read after the translated positions before it, in one forward. Costs about this share of a re-prefill;
    0 reads the translation as is (the paper's setting). Applies wherever a target reads a translated prefix
    (evaluation, hand-off, the context store, serve); training reads the translation as is. 0.1 was chosen on the
    validation rows of the SmolLM2 + Gemma-3 pair (docs/results/real-pair.md, *Refresh*, validation table) as a
    trade of content against cost: at half the cost of 20 % it stays within 0.05 of it on every path and length
    but one (P = 512 smollm2→gemma3: 0.52 as translated, 0.85 at 10 %, 0.91 at 20 %), while 5 % leaves up to 0.06
    more behind 10 %."""
    token_prior: int = 0
    """Tokens per target (its most frequent in the calibration batches) whose decoded keys and values get a
    per-token, per-layer correction fitted in the ``closed_form`` calibration pass and kept only where it lowers
    that target's calibration suffix NLL (:mod:`kvlingua.prior`): the context-free part of a secondary sink, for
    the cost of a lookup. 0: none (as every pool before it). Needs ``init: closed_form``."""
    token_readout: bool = False
    """Each target's OUT also reads the target's own token at each position and the one before it, through its own
    input embeddings (:mod:`kvlingua.readout`), fitted jointly with OUT's short path in the ``closed_form``
    calibration pass and trained with it. False: Σ alone (as every pool before it). Needs ``init: closed_form`` and
    ``out_weights: uniform`` (the joint fit is unweighted)."""

    def __post_init__(self) -> None:
        if self.q_dim != "auto" and (isinstance(self.q_dim, bool) or not isinstance(self.q_dim, int)
                                     or self.q_dim < 1):
            raise ValueError(f"q_dim must be an integer >= 1 or 'auto', got {self.q_dim!r}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {list(ADAPTERS)}, got {self.adapter!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {list(OUTPUTS)}, got {self.output!r}")
        if not self.max_share > 0:
            raise ValueError(f"max_share must be > 0, got {self.max_share}")
        if self.embed_dim_factor is not None and not self.embed_dim_factor > 0:
            raise ValueError(f"embed_dim_factor must be > 0 or None, got {self.embed_dim_factor}")
        if not self.translation_dim_factor > 0:
            raise ValueError(f"translation_dim_factor must be > 0, got {self.translation_dim_factor}")
        if self.n_heads < 1:
            raise ValueError(f"n_heads must be >= 1, got {self.n_heads}")
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"head_dim must be >= 1 or None, got {self.head_dim}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1 or None, got {self.num_layers}")
        if self.group_mode not in GROUP_MODES:
            raise ValueError(f"group_mode must be one of {list(GROUP_MODES)}, got {self.group_mode!r}")
        if not (self.short_path or self.stack):
            raise ValueError("at least one of short_path and stack must be true")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")
        if isinstance(self.init_batches, bool) or not isinstance(self.init_batches, int) or self.init_batches < 1:
            raise ValueError(f"init_batches must be an integer >= 1, got {self.init_batches!r}")
        if self.init_prefix_len is not None and (isinstance(self.init_prefix_len, bool)
                                                 or not isinstance(self.init_prefix_len, int)
                                                 or self.init_prefix_len <= self.sink_tokens):
            raise ValueError(f"init_prefix_len must be None or an integer > sink_tokens ({self.sink_tokens}), "
                             f"got {self.init_prefix_len!r}")
        if not self.ridge > 0:
            raise ValueError(f"ridge must be > 0, got {self.ridge}")
        if isinstance(self.sink_tokens, bool) or not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an integer >= 0, got {self.sink_tokens!r}")
        if isinstance(self.token_prior, bool) or not isinstance(self.token_prior, int) or self.token_prior < 0:
            raise ValueError(f"token_prior must be an integer >= 0, got {self.token_prior!r}")
        if self.token_prior and self.init != "closed_form":
            raise ValueError(f"token_prior is fitted in the closed-form calibration pass: it needs init: closed_form, "
                             f"got init: {self.init} (set token_prior: 0)")
        if not isinstance(self.token_readout, bool):
            raise ValueError(f"token_readout must be true or false, got {self.token_readout!r}")
        if self.token_readout and (self.init != "closed_form" or self.out_weights != "uniform"):
            raise ValueError(f"token_readout is fitted jointly with OUT in the closed-form calibration pass: it needs "
                             f"init: closed_form and out_weights: uniform, got init: {self.init}, out_weights: "
                             f"{self.out_weights} (set token_readout: false)")
        if isinstance(self.refresh, bool) or not isinstance(self.refresh, (int, float)) or not 0 <= self.refresh <= 1:
            raise ValueError(f"refresh must be a share in [0, 1], got {self.refresh!r}")
        if self.out_weights not in OUT_WEIGHTS:
            raise ValueError(f"out_weights must be one of {list(OUT_WEIGHTS)}, got {self.out_weights!r}")
        if self.out_weights != "uniform" and self.init != "closed_form":
            raise ValueError(f"out_weights: {self.out_weights} weighs the closed-form start; init is {self.init!r}")
        if self.keys not in KEYS:
            raise ValueError(f"keys must be one of {list(KEYS)}, got {self.keys!r}")

    @property
    def output_layout(self) -> str:
        """``dense`` or ``per_layer``: what the translators build (an unresolved ``auto`` builds ``dense``)."""
        return "dense" if self.output == "auto" else self.output

    @property
    def short_layout(self) -> str:
        """``dense`` or ``per_layer``: the short path's layout. ``closed_form`` needs a dense one (Σ's principal
        directions mix every layer); otherwise it follows :attr:`output_layout`."""
        return "dense" if self.init == "closed_form" else self.output_layout

    @property
    def q(self) -> int:
        """Q as an integer; raises if ``q_dim: auto`` was not resolved against the pool (:func:`resolve_q_dim`)."""
        if self.q_dim == "auto":
            raise ValueError("q_dim: auto must be resolved against the pool's layer counts first (resolve_q_dim)")
        return self.q_dim

    @property
    def embed_factor(self) -> float:
        """The D'/D_i in effect: ``embed_dim_factor``, or the default of :attr:`output_layout`."""
        return self.embed_dim_factor if self.embed_dim_factor is not None else EMBED_DEFAULTS[self.output_layout]

    def check_init(self) -> None:
        """Raise ``ValueError`` unless the adapters can start as :attr:`init` says (checked before a run starts)."""
        if self.init == "closed_form" and self.adapter == "translator" and not self.short_path:
            raise ValueError("init: closed_form sets the short path, and this translator has none (short_path: false);"
                             " use init: random or match")

    def embed_dim(self, model_width: int) -> int:
        """D' for a model of cache width ``model_width`` (D_i)."""
        return max(1, round(self.embed_factor * model_width))


def resolve_q_dim(cfg: SpaceConfig, layers: "Iterable[int]") -> SpaceConfig:
    """``cfg`` with ``q_dim: auto`` made concrete: ``32·L_max`` rounded up to a multiple of every layer count."""
    if cfg.q_dim != "auto":
        return cfg
    layers = list(layers)
    lcm = math.lcm(*layers)
    q = Q_DIM_AUTO_PER_LAYER * max(layers)
    return replace(cfg, q_dim=-(-q // lcm) * lcm)


def stack_heads(cfg: SpaceConfig, embed_dim: int) -> tuple[int, int]:
    """``(n_heads, head_dim)`` of a stack of width D': ``cfg.head_dim`` if set, else the most heads up to
    ``cfg.n_heads`` that divide D' (a model whose D' = 5 gets 1 head of 5 instead of an error)."""
    if cfg.head_dim is not None:
        return cfg.n_heads, cfg.head_dim
    heads = max(h for h in range(1, cfg.n_heads + 1) if embed_dim % h == 0)
    return heads, embed_dim // heads
