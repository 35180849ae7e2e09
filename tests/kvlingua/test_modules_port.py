"""Porting modules through Σ, tasks, and meta-training (paper §6) on tiny models."""
import pytest
import torch

from kvlingua.backend import LocalBackend
from kvlingua.cache import cache_kwargs, fingerprint, KVBlock
from kvlingua.modules.meta import MetaConfig, ModuleBackend, meta_batches, meta_train, task_batch
from kvlingua.modules.port import ModuleLibrary, generate_after, port_module
from kvlingua.modules.prompt import Module, ModuleError, PromptConfig, learn_prompts, prompt_block, save_module
from kvlingua.modules.module_store import ModuleStore
from kvlingua.modules.tasks import Task, TaskConfig, chapter_task, example_windows, held_out_ids
from kvlingua.space import SharedSpace
from kvlingua.train_config import TrainConfig
from kvlingua.rotary import KeyRotation
from kvlingua.space_config import SpaceConfig
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def pool():
    models = {"a": tiny_model("gemma2", seed=0), "b": tiny_model("gemma2", seed=1, layers=4)}
    torch.manual_seed(0)
    space = SharedSpace({n: LocalBackend(models).summary(n) for n in models}, SpaceConfig(q_dim=16))
    return models, space


def _manual_cache_block(model, prompts):
    """The model's cache after an inputs_embeds forward, read layer by layer (independent of prompt_block)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    model(inputs_embeds=prompts, use_cache=True, **cache_kwargs(model, cache))
    ks = [l.keys.permute(0, 2, 1, 3).flatten(2) for l in cache.layers]  # [B, p, D] each
    vs = [l.values.permute(0, 2, 1, 3).flatten(2) for l in cache.layers]
    return KVBlock(torch.stack(ks, 2), torch.stack(vs, 2), model.config.num_key_value_heads)


def test_ported_suffix_loss_equals_the_hand_composed_path(pool):
    models, space = pool
    backend = LocalBackend(models)
    module = Module(torch.randn(5, 32), "a", fingerprint(models["a"]), "t")
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        rot_a, rot_b = KeyRotation.from_model(models["a"]), KeyRotation.from_model(models["b"])
        ported = port_module(space, module, models["a"], "b", target_rotation=rot_b)
        # by hand: keys un-rotated at the source's positions, translated, rotated at the target's (no sink)
        raw = _manual_cache_block(models["a"], module.prompt[None])  # [1, p, L_a, D_a]
        hand = rot_b.rotate(space.decode(space.encode(rot_a.unrotate(raw), "a"), "b"))
    assert ported.keys.shape == (1, 5, 4, 8)
    torch.testing.assert_close(backend.suffix_nll("b", ported, ids), backend.suffix_nll("b", hand, ids))
    # and the same number through the training seam (what meta-training reads)
    loss, _ = backend.suffix_loss_and_grad("b", hand, ids)
    torch.testing.assert_close(loss, backend.suffix_nll("b", ported, ids).mean())


def test_port_refuses_other_model_unknown_model_and_long_prompts(pool):
    models, space = pool
    module = Module(torch.randn(5, 32), "a", fingerprint(models["a"]), "t")
    with pytest.raises(ModuleError, match="fingerprint"):
        port_module(space, module, models["b"], "b")  # the weights are not the module's model's
    with pytest.raises(ModuleError, match="'zz' is not in the pool"):
        port_module(space, module, models["a"], "zz")
    with pytest.raises(ModuleError, match="at most 4"):
        port_module(space, module, models["a"], "b", max_prompt_len=4)
    stranger = Module(torch.randn(5, 32), "c", "f" * 32, "t")
    with pytest.raises(ModuleError, match="'c' is not in the pool"):
        port_module(space, stranger, models["a"], "b")


def test_library_lists_ports_once_per_target_and_refuses_strangers(pool, tmp_path):
    models, space = pool
    fps = {n: fingerprint(m) for n, m in models.items()}
    save_module(tmp_path / "lib" / "greet.safetensors", Module(torch.randn(3, 32), "a", fps["a"], "en/1.1"))
    lib = ModuleLibrary(space, models, fps, tmp_path / "lib")
    assert lib.list() == [{"name": "greet", "model": "a", "task": "en/1.1", "prompt_len": 3}]
    first = lib.block("greet", "b")
    assert lib.block("greet", "b") is first  # reused, not ported again
    assert first.keys.shape == (1, 3, 4, 8)
    with pytest.raises(KeyError, match="unknown module"):
        lib.block("nope", "b")
    with pytest.raises(KeyError, match="unknown target"):
        lib.block("greet", "zz")
    tokens = generate_after(models["b"], first, [5, 6], seed=0)
    assert tokens and all(0 <= t < 128 for t in tokens)
    save_module(tmp_path / "bad" / "x.safetensors", Module(torch.randn(3, 32), "a", "0" * 32, "t"))
    with pytest.raises(ModuleError, match="x.safetensors.*fingerprint"):
        ModuleLibrary(space, models, fps, tmp_path / "bad")
    save_module(tmp_path / "far" / "y.safetensors", Module(torch.randn(3, 32), "q", "0" * 32, "t"))
    with pytest.raises(ModuleError, match="model 'q', which is not in the pool"):
        ModuleLibrary(space, models, fps, tmp_path / "far")
    with pytest.raises(ModuleError, match="at most 2"):
        ModuleLibrary(space, models, fps, tmp_path / "lib", max_prompt_len=2)


# ---------------------------------------------------------------------------------------------- tasks
def test_chapter_task_holds_out_verses_and_skips_short_chapters():
    cfg = TaskConfig(held_out=2, train_len=4, eval_len=3)
    verses = [[10 * v + i for i in range(3)] for v in range(6)]  # 6 verses of 3 distinct tokens
    task = chapter_task("en/1.1", verses, cfg)
    train, held = set(task.train.tolist()), set(task.held_out.tolist())
    assert not train & held and len(task.train) == 12 and len(task.held_out) == 3
    assert chapter_task("en/1.1", verses, cfg).held_out.tolist() == task.held_out.tolist()  # seeded
    assert chapter_task("en/1.2", verses[:2], cfg) is None  # nothing left to learn from
    with pytest.raises(ValueError, match="disjoint"):
        TaskConfig(meta_train_splits=("train", "test"))


def _tasks(n: int, seed: int = 0, train_len: int = 40, eval_len: int = 12) -> list[Task]:
    """Tasks whose texts repeat a task-specific 3-token motif: a prompt can learn it, held-out text shares it."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n):
        motif = torch.randint(4, 128, (3,), generator=g)
        out.append(Task(f"x/{seed}.{t}", motif.repeat(train_len // 3 + 1)[:train_len],
                        motif.roll(t % 3).repeat(eval_len // 3 + 1)[:eval_len]))
    return out


def test_example_windows_do_not_depend_on_the_batch():
    tasks = _tasks(3)
    together = example_windows(tasks, 8, seed=1)(5)
    alone = example_windows(tasks[1:2], 8, seed=1)(5)
    assert torch.equal(together[1], alone[0]) and together.shape == (3, 8)


def test_store_learns_once_and_reuses(tmp_path, pool):
    models, _ = pool
    store, cfg = ModuleStore(tmp_path), PromptConfig(length=2, steps=2, tasks_per_batch=2)
    tasks = _tasks(3)
    first = store.learn("a", models["a"], tasks, cfg, train_len=8)
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 3 and [m.task for m in first] == [t.name for t in tasks]
    stamps = [f.stat().st_mtime_ns for f in files]
    again = store.learn("a", models["a"], tasks, cfg, train_len=8)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert all(torch.equal(x.prompt, y.prompt) for x, y in zip(first, again))


# ---------------------------------------------------------------------------------------------- meta-training
def test_module_backend_serves_the_named_tasks_blocks(pool):
    models, _ = pool
    tasks = _tasks(4)
    prompts = torch.randn(4, 3, 32)
    with torch.no_grad():
        blocks = {"a": prompt_block(models["a"], prompts)}
    backend = ModuleBackend(LocalBackend(models), blocks)
    batch = task_batch(torch.tensor([2, 0]), tasks, ["a", "b"], 3)
    got = backend.prefix_block("a", batch.prefix("a"))
    assert torch.equal(got.keys, blocks["a"].keys[[2, 0]])
    assert torch.equal(batch.suffix("b"), held_out_ids([tasks[2], tasks[0]]))
    with pytest.raises(ValueError, match="task index"):
        backend.prefix_block("a", torch.tensor([[0, 1, 0]]))
    seen = [b.prefix("a")[:, 0] for b, _ in zip(meta_batches(tasks, ["a"], 3, 2, seed=0, rank=1, world_size=2),
                                                range(2))]
    assert set(torch.cat(seen).tolist()) == {1, 3}  # rank 1 of 2 reads the odd tasks


def _ported_loss(space, models, blocks, tasks, source, target):
    with torch.no_grad():
        ported = space.translate(blocks[source], source, target)
        return float(LocalBackend(models).suffix_nll(target, ported, held_out_ids(tasks)).mean())


def test_meta_training_moves_only_the_adapters_and_lowers_the_ported_loss(pool):
    models, space0 = pool
    space = SharedSpace(dict(space0.members), space0.cfg)
    space.load_state_dict(space0.state_dict())
    tasks = _tasks(8)
    cfg = PromptConfig(length=3, steps=15, lr=0.1)
    prompts = {n: learn_prompts(m, [t.name for t in tasks], example_windows(tasks, 12, 0), cfg)[0]
               for n, m in models.items()}
    with torch.no_grad():
        blocks = {n: prompt_block(models[n], p) for n, p in prompts.items()}
    frozen = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in models.items()}
    saved_blocks = {n: b.keys.clone() for n, b in blocks.items()}
    before_adapters = {k: v.clone() for k, v in space.state_dict().items()}
    before = {(i, j): _ported_loss(space, models, blocks, tasks, i, j) for i, j in (("a", "b"), ("b", "a"))}
    meta = MetaConfig(train=TrainConfig(steps=30, lr=3e-3, log_every=5, eval_every=10, checkpoint_every=0), batch_size=4)
    curve = []
    state = meta_train(space, LocalBackend(models), blocks, tasks, meta,
                       eval_fn=lambda step: curve.append(step) or {})
    after = {(i, j): _ported_loss(space, models, blocks, tasks, i, j) for i, j in (("a", "b"), ("b", "a"))}
    assert state.step == 30
    assert all(after[p] < before[p] - 0.05 for p in before), (before, after)
    for n, m in models.items():  # the frozen models and the modules did not move
        assert all(torch.equal(v, frozen[n][k]) for k, v in m.state_dict().items())
        assert torch.equal(blocks[n].keys, saved_blocks[n])
    moved = [k for k, v in space.state_dict().items() if not torch.equal(v, before_adapters[k])]
    assert moved and all(k.startswith("_adapters.") for k in moved)
    train_paths = {k.split("/", 1)[1] for r in state.history if r["kind"] == "train" for k in r if k.startswith("suffix/")}
    assert train_paths == {"a->b", "b->a"}  # cross paths only by default
    assert curve == [0, 10, 20, 30]
