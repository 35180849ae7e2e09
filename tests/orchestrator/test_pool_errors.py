"""Every kind of damage a trained pool directory can suffer, through the real command line.

A tiny run is laid out as training lays it out (models under ``$KVLINGUA_HOME``, ``<run>/pool``
for the translator and ``<run>/pool-linear``, each with its job recorded), then damaged one way
per test. ``kvlingua eval`` and ``kvlingua serve`` must refuse it with one line on stderr naming
the damaged file, exit code 2 and no traceback (serve is refused before Ray starts).
"""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kvlingua.cache import arch_summary, fingerprint
from kvlingua.config import to_dict
from kvlingua.data.views import DataConfig
from kvlingua.evaluate import EvalConfig
from kvlingua.job import TrainJob
from kvlingua.pool import save_pool
from kvlingua.pool_members import PoolMember
from kvlingua.rundir import main_space, space_pool_dir
from kvlingua.space import SharedSpace
from kvlingua.space_config import SpaceConfig
from kvlingua.train_config import TrainConfig
from orchestrator.cli import main
from tests.helpers import tiny_model
from tests.serve_apps.tiny_pool import SENTENCES, train_tiny_tokenizer

PROGRESS = re.compile(r"^Loading weights: +\d+%\|")
SPACES = {"translator": SpaceConfig(q_dim=32), "linear": SpaceConfig(q_dim=32, adapter="linear")}


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A tiny trained run: models in $KVLINGUA_HOME/pools/tiny/{a,b}, pools in tmp_path/run."""
    home = tmp_path / "home"
    monkeypatch.setenv("KVLINGUA_HOME", str(home))
    text = tmp_path / "text"
    text.mkdir()
    for split in ("train", "validation", "test"):
        (text / f"{split}.txt").write_text("\n\n".join(SENTENCES * 2) + "\n")
    tok = tmp_path / "tok"
    train_tiny_tokenizer(tok)
    models, members = {}, []
    for seed, name in enumerate(("a", "b")):
        models[name] = tiny_model("gemma2", seed=seed, layers=2)
        path = home / "pools" / "tiny" / name
        models[name].save_pretrained(str(path))
        members.append(PoolMember(name, str(path), arch_summary(models[name]), fingerprint(models[name])))
    run_dir = tmp_path / "run"
    job = TrainJob(name="tiny", models={m.name: m.path for m in members}, tokenizer=str(tok), out_dir=str(run_dir),
                   train=TrainConfig(steps=1), data=DataConfig(source=str(text), view="text"), prefix_len=4,
                   suffix_len=4, batch_size=2, spaces=SPACES, eval=EvalConfig(batches=1, first_tokens=2,
                                                                              curve_batches=1))
    main_name = main_space(SPACES)
    torch.manual_seed(0)
    for name, cfg in SPACES.items():
        space = SharedSpace({m.name: m.summary for m in members}, cfg)
        save_pool(space_pool_dir(run_dir, name, main_name), space, members, tokenizer_dir=tok,
                  extra={"run": "tiny", "space_name": name, "job": to_dict(job)})
    return {"run": run_dir, "pool": run_dir / "pool", "home": home, "models": models, "tmp": tmp_path}


def _edit_json(path, edit):
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10  # the last tensor's data; the header (names, shapes) is untouched
    path.write_bytes(bytes(data))


def _as_format_1(meta):
    meta["format"] = 1
    for entry in meta["members"]:
        del entry["adapter_sha256"]


def _change_weights(r):
    model = r["models"]["b"]
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 0.5
    model.save_pretrained(str(r["home"] / "pools" / "tiny" / "b"))


def _truncate_format_1(r):
    f = r["pool"] / "adapters-a.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    _edit_json(r["pool"] / "pool.json", _as_format_1)


# damage, the file the message must name (relative to tmp_path), what it must say
DAMAGE = {
    "missing pool.json": (lambda r: (r["pool"] / "pool.json").unlink(), "run/pool",
                          r"not a pool (or run )?directory"),
    "invalid json": (lambda r: (r["pool"] / "pool.json").write_text('{"format": 2, "members": ['),
                     "run/pool/pool.json", r"not valid JSON \(Expecting"),
    "missing key": (lambda r: _edit_json(r["pool"] / "pool.json", lambda m: m.pop("members")),
                    "run/pool/pool.json", "missing key 'members'"),
    "member lacks a key": (lambda r: _edit_json(r["pool"] / "pool.json", lambda m: m["members"][1].pop("path")),
                           "run/pool/pool.json", r"members\[1\] \('b'\) lacks \['path'\]"),
    "missing adapter file": (lambda r: (r["pool"] / "adapters-b.safetensors").unlink(),
                             "run/pool/adapters-b.safetensors", "adapter file of model 'b' not found"),
    "changed adapter byte": (lambda r: _flip_last_byte(r["pool"] / "adapters-a.safetensors"),
                             "run/pool/adapters-a.safetensors", r"SHA-256 [0-9a-f]{12}\.\. != [0-9a-f]{12}\.\. "
                                                                r"recorded in pool.json"),
    "truncated adapter file": (lambda r: (r["pool"] / "adapters-a.safetensors").write_bytes(
        (r["pool"] / "adapters-a.safetensors").read_bytes()[:100]), "run/pool/adapters-a.safetensors", "SHA-256"),
    "truncated adapter file, format 1 pool": (_truncate_format_1, "run/pool/adapters-a.safetensors",
                                              "not a readable safetensors file"),
    "changed model checkpoint": (_change_weights, "home/pools/tiny/b",
                                 r"model 'b': fingerprint [0-9a-f]{8}\.\. != [0-9a-f]{8}\.\. \(weights changed"),
    "moved models": (lambda r: shutil.move(str(r["home"] / "pools"), str(r["tmp"] / "moved")), "home/pools/tiny/a",
                     r"model 'a': checkpoint directory not found \(pool.json records "
                     r"'\$KVLINGUA_HOME/pools/tiny/a'.*--models-root DIR"),
    "missing tokenizer": (lambda r: shutil.rmtree(r["pool"] / "tokenizer"), "run/pool/tokenizer",
                          "the pool's tokenizer is missing"),
}


def _refused(capsys, argv, command, file, message):
    capsys.readouterr()
    assert main(argv) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    # transformers' own weight-loading progress bar (kvlingua.models.load_frozen) is not an error line
    lines = [x for x in out.err.splitlines() if x.strip() and not PROGRESS.match(x)]
    assert len(lines) == 1, out.err
    line = lines[0]
    assert line.startswith(f"kvlingua {command}: error: {file}"), line
    assert re.search(message, line), line


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_eval_refuses_a_damaged_pool_in_one_line(run, damage, capsys):
    do, file, message = DAMAGE[damage]
    do(run)
    _refused(capsys, ["eval", str(run["pool"]), "--out", str(run["tmp"] / "out")], "eval", run["tmp"] / file,
             message)
    assert not (run["tmp"] / "out").exists()  # nothing evaluated, nothing written


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_serve_refuses_a_damaged_pool_before_starting(run, damage, capsys):
    pytest.importorskip("ray")
    do, file, message = DAMAGE[damage]
    do(run)
    _refused(capsys, ["serve", str(run["pool"]), "--port", "1"], "serve", run["tmp"] / file, message)


def test_eval_refuses_a_damaged_sibling_pool(run, capsys):
    _flip_last_byte(run["run"] / "pool-linear" / "adapters-b.safetensors")
    _refused(capsys, ["eval", str(run["run"])], "eval", run["run"] / "pool-linear" / "adapters-b.safetensors",
             "SHA-256")


def test_moved_models_are_found_with_models_root(run, capsys):
    shutil.move(str(run["home"] / "pools" / "tiny"), str(run["tmp"] / "moved"))
    out = run["tmp"] / "out"
    _refused(capsys, ["eval", str(run["run"] / "pool-linear"), "--out", str(out)], "eval",
             run["home"] / "pools" / "tiny" / "a", "checkpoint directory not found")
    assert main(["eval", str(run["run"] / "pool-linear"), "--models-root", str(run["tmp"] / "moved"),
                 "--out", str(out)]) == 0
    result = json.loads((out / "eval-test.json").read_text())
    assert set(result["paths"]) == {"a->a", "a->b", "b->a", "b->b"}
    for row in result["paths"].values():  # both pools of the run, found from either one
        assert {"base", "control", "translator", "linear"} <= set(row)
    _refused(capsys, ["eval", str(run["run"]), "--models-root", str(run["tmp"] / "nowhere")], "eval",
             run["tmp"] / "nowhere" / "a", r"looked in .*nowhere")


def test_models_root_with_other_weights_is_refused(run, capsys):
    """--models-root moves where models are looked for, not what they must be: fingerprints still hold."""
    other = run["tmp"] / "other"
    for seed, name in ((5, "a"), (6, "b")):
        tiny_model("gemma2", seed=seed, layers=2).save_pretrained(str(other / name))
    _refused(capsys, ["eval", str(run["pool"]), "--models-root", str(other)], "eval", other / "a",
             r"model 'a': fingerprint")
    assert load_file(str(run["pool"] / "adapters-a.safetensors"))  # the pool itself is untouched
