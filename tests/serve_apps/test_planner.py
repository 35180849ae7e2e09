"""The ingress's pure half without Ray: requests checked against the tiny pool's facts and planned.

Pool ``a``, ``b`` (2 layers) and ``c`` (4 layers) share one tokenizer (``tiny_pool.py``); no deployment runs.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kvlingua.context_store import ContextKey, ContextStore, StoredContext, token_digest
from kvlingua.pool import load_pool
from serve_apps.limits import TrainedLimits
from serve_apps.openai_plan import plan_choices, resolve_model
from serve_apps.openai_schemas import CompletionRequest
from serve_apps.options import ServeOptions
from serve_apps.planner import Planner
from serve_apps.requests import HandoffAsk, PhaseClock, Prepared, RequestError, sampling_params
from serve_apps.schemas import GenerateRequest

PROMPT = "the cat sat on the mat"


@pytest.fixture(scope="module")
def planner(pool_dir) -> Planner:
    pool = load_pool(pool_dir, load_models=False, verify=False)
    return Planner(pool, ServeOptions(max_prompt_tokens=16, max_new_tokens=8), ContextStore(2**20))


def refused(fn, *args, **kw) -> RequestError:
    with pytest.raises(RequestError) as e:
        fn(*args, **kw)
    return e.value


def test_the_planner_imports_no_ray():
    code = "import sys, serve_apps.planner, serve_apps.openai_plan; print(any(m.split('.')[0] == 'ray' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_plain_and_latent_plans(planner):
    ids = planner.ids(PROMPT)
    plain = planner.plan(HandoffAsk(target="b"), ids, {}, "/r")
    assert (plain.source, plain.handoff_used, plain.positions, plain.ids) == (None, "none", 0, ids)
    latent = planner.plan(HandoffAsk(target="b", source="a"), ids, {}, "/r")
    assert (latent.handoff_used, latent.positions, latent.reason) == ("latent", len(ids) - 1, None)
    part = planner.plan(HandoffAsk(target="b", source="a", handoff_tokens=2), ids, {}, "/r")
    assert part.positions == 2
    assert refused(planner.plan, HandoffAsk(target="b", source="a", handoff_tokens=len(ids)), ids, {}, "/r").status == 400


def test_refusals_name_the_field(planner):
    ids = planner.ids(PROMPT)
    e = refused(planner.plan, HandoffAsk(target="zz"), ids, {}, "/r")
    assert (e.status, e.param, e.code) == (404, "target", "model_not_found")
    e = refused(planner.plan, HandoffAsk(target="zz"), ids, {}, "/r", field_prefix="kvlingua.")
    assert e.param == "model"
    e = refused(planner.plan, HandoffAsk(target="c", source="a", handoff="identity"), ids, {}, "/r")
    assert e.status == 400 and "identity" in e.message  # a: 2 layers, c: 4
    assert planner.plan(HandoffAsk(target="b", source="a", handoff="identity"), ids, {}, "/r").handoff_used == "identity"
    e = refused(planner.plan, HandoffAsk(target="b", context_id="ab12"), ids, {}, "/r")
    assert (e.status, e.code) == (404, "context_not_found")
    e = refused(planner.plan, HandoffAsk(target="b", module="cat/moon"), ids, {}, "/r")
    assert e.status == 404 and "serves no modules" in e.message
    assert refused(planner.ids, [0, 10**6]).code == "invalid_token"
    assert refused(planner.ids, "").status == 400
    assert refused(planner.check_length, list(range(17))).code == "prompt_too_long"
    assert refused(planner.new_tokens, 9, "max_new_tokens").param == "max_new_tokens"


def test_outside_the_trained_limits_falls_back_to_text_or_is_refused(pool_dir):
    pool = load_pool(pool_dir, load_models=False, verify=False)
    planner = Planner(pool, ServeOptions(), ContextStore(2**20))
    planner.limits = TrainedLimits(frozenset({("a", "b")}), max_positions=3)
    ids = planner.ids(PROMPT)
    assert planner.plan(HandoffAsk(target="b", source="a", handoff_tokens=3), ids, {}, "/r").handoff_used == "latent"
    long = planner.plan(HandoffAsk(target="b", source="a"), ids, {}, "/r")
    assert long.handoff_used == "text" and "trained on at most 3" in long.reason
    path = planner.plan(HandoffAsk(target="c", source="a", handoff_tokens=2), ids, {}, "/r")
    assert path.handoff_used == "text" and "never trained the path a -> c" in path.reason
    e = refused(planner.plan, HandoffAsk(target="c", source="a", strict=True), ids, {}, "/r")
    assert (e.status, e.code, e.param) == (400, "outside_trained_limits", "handoff")


def test_a_stored_context_is_named_or_matched(planner):
    ctx_ids = planner.ids("the cat sat")
    q = planner.q_dim
    ctx = StoredContext(ContextKey(token_digest(ctx_ids), planner.members["a"].fingerprint, planner.adapters),
                        ctx_ids, "a", torch.zeros(1, len(ctx_ids), q), torch.zeros(1, len(ctx_ids), q))
    planner.store.put(ctx)
    rest = planner.ids(" on the mat", allow_empty=True)
    named = planner.plan(HandoffAsk(target="b", context_id=ctx.key.id), rest, {}, "/r")
    assert (named.source, named.context, named.ids) == ("a", ctx, ctx_ids + rest)
    assert named.positions == len(ctx_ids)
    whole = ctx_ids + rest
    matched = planner.plan(HandoffAsk(target="b", source="a"), whole, {}, "/r")
    assert matched.context is ctx and matched.positions == len(ctx_ids)
    e = refused(planner.plan, HandoffAsk(target="b", source="b", context_id=ctx.key.id), rest, {}, "/r")
    assert e.param == "source"
    planner.store.delete(ctx.key.id)


def test_generate_request_and_sampling_params(planner):
    p = planner.prepare(GenerateRequest(source="a", target="b", prompt=PROMPT, max_new_tokens=4, seed=7))
    assert p.params == sampling_params(4, 0.0, 1.0, 7, False) == {"max_new_tokens": 4, "temperature": 0.0,
                                                                  "top_p": 1.0, "seed": 7, "stop_at_eos": True}
    assert p.route == "/v1/generate" and p.handoff_used == "latent"
    assert refused(planner.prepare, GenerateRequest(target="b", prompt=PROMPT, max_new_tokens=9)).status == 400
    with pytest.raises(TypeError):
        Prepared("b", None, "none", "none", None, [1], 0, {})  # by keyword only


def test_openai_choices(planner):
    req = CompletionRequest(model="b@a:text", prompt=PROMPT, n=2, seed=5, max_tokens=3)
    assert resolve_model(planner, req) == ("b", "a", "text")
    plans = plan_choices(planner, req, [planner.ids(PROMPT)], "/v1/completions", chat=False, texts=[PROMPT])
    assert [p.params["seed"] for p in plans] == [5, 6] and {p.handoff_used for p in plans} == {"text"}
    e = refused(resolve_model, planner, CompletionRequest(model="b@zz", prompt=PROMPT))
    assert (e.status, e.param) == (404, "model")


def test_phase_clock_sums_each_phase_over_a_schedule_s_replies():
    """A schedule's timings: each phase summed over its segments' replies (an encode reply adds only its
    translate time), and the total is their sum."""
    replies = [{"prefill_s": 0.5, "translate_s": 0.0, "decode_s": 1.25}, {"prefill_s": 0.125, "translate_s": 0.25,
                                                                          "decode_s": 2.0}]
    clock = PhaseClock()
    for reply in replies:
        clock.add(reply)
    clock.add({"translate_s": 0.5, "keys": None}, ("translate_s",))
    t = clock.timings()
    assert (t.prefill_s, t.translate_s, t.decode_s) == (0.625, 0.75, 3.25) and t.total_s == 4.625
