"""Soft prompts: their KV block, batched prompt tuning, module files."""
import pytest
import torch
from transformers import DynamicCache

from kvlingua.cache import cache_kwargs, extract_prefix, fingerprint
from kvlingua.modules.prompt import (
    Module,
    ModuleError,
    PromptConfig,
    check_module,
    init_prompts,
    learn_prompts,
    load_module,
    prompt_block,
    prompt_nll,
    save_module,
)
from tests.helpers import tiny_model


@pytest.mark.parametrize("kind", ["gemma2", "llama"])
def test_block_of_real_token_embeddings_is_the_prefix_cache(kind):
    model = tiny_model(kind, layers=3, kv_heads=2)
    ids = torch.randint(0, 128, (3, 6))
    embeds = model.get_input_embeddings()(ids)  # [3, 6, H]: soft prompts that are real tokens
    block = prompt_block(model, embeds)
    ref = extract_prefix(model, ids)  # the same text read as ids
    assert block.keys.shape == (3, 6, 3, 16)
    torch.testing.assert_close(block.keys, ref.keys, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(block.values, ref.values, atol=1e-6, rtol=1e-5)


def test_block_equals_the_cache_of_an_inputs_embeds_forward():
    model = tiny_model("gemma2", layers=2, kv_heads=2)
    prompts = torch.randn(2, 5, 32)
    block = prompt_block(model, prompts)
    cache = DynamicCache()
    model(inputs_embeds=prompts, use_cache=True, **cache_kwargs(model, cache))
    for l, layer in enumerate(cache.layers):  # [B, H, p, hd] per layer
        k = layer.keys.permute(0, 2, 1, 3).reshape(2, 5, -1)
        v = layer.values.permute(0, 2, 1, 3).reshape(2, 5, -1)
        torch.testing.assert_close(block.keys[:, :, l], k)
        torch.testing.assert_close(block.values[:, :, l], v)


def test_block_is_differentiable_in_the_prompt():
    model = tiny_model("gemma2")
    prompts = torch.randn(1, 4, 32, requires_grad=True)
    prompt_block(model, prompts).keys.sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0


def _examples(T: int, S: int = 12):
    g = torch.Generator().manual_seed(0)
    # each task repeats its own short pattern: learnable by a prompt, different per task
    patterns = torch.randint(4, 128, (T, 3), generator=g)
    ids = patterns.repeat(1, S // 3 + 1)[:, :S]  # [T, S]
    return lambda step: ids


def test_learning_lowers_each_tasks_loss_and_moves_only_the_prompts():
    model = tiny_model("gemma2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tasks = ["a", "b", "c"]
    examples = _examples(3)
    cfg = PromptConfig(length=4, steps=30, lr=0.1)
    init = init_prompts(model, tasks, cfg.length, cfg.seed)
    with torch.no_grad():
        start = prompt_nll(model, init, examples(0)).mean(1)
    prompts, last = learn_prompts(model, tasks, examples, cfg)
    with torch.no_grad():
        end = prompt_nll(model, prompts, examples(0)).mean(1)
    assert (end < start - 0.03).all(), (start, end)  # a random tiny model moves little, but it moves
    torch.testing.assert_close(last, end, atol=0.2, rtol=0)  # last-step loss reported per task
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_batched_learning_equals_learning_each_task_alone():
    model = tiny_model("gemma2")
    tasks = ["a", "b", "c"]
    examples = _examples(3)
    cfg = PromptConfig(length=3, steps=5, lr=0.05)
    together, _ = learn_prompts(model, tasks, examples, cfg)
    for t, name in enumerate(tasks):
        alone, _ = learn_prompts(model, [name], lambda s, t=t: examples(s)[t:t + 1], cfg)
        torch.testing.assert_close(alone[0], together[t], atol=1e-4, rtol=1e-4)


def test_init_prompt_depends_on_task_not_batch():
    model = tiny_model("gemma2")
    a = init_prompts(model, ["x", "y"], 4, seed=0)
    b = init_prompts(model, ["y"], 4, seed=0)
    torch.testing.assert_close(a[1], b[0])
    assert not torch.equal(a[0], a[1])
    table = model.get_input_embeddings().weight
    assert all(any(torch.equal(row, e) for e in table) for row in a[0])  # rows are token embeddings


def test_module_file_roundtrip_and_refusal_on_another_model(tmp_path):
    a, b = tiny_model("gemma2", seed=0), tiny_model("gemma2", seed=1)
    m = Module(torch.randn(4, 32), "seed0", fingerprint(a), "en/1.1", {"loss": 2.5})
    path = save_module(tmp_path / "m.safetensors", m)
    back = load_module(path)
    assert torch.equal(back.prompt, m.prompt) and back.task == "en/1.1" and back.info == {"loss": 2.5}
    check_module(back, "seed0", fingerprint(a))
    with pytest.raises(ModuleError) as e:
        check_module(back, "seed1", fingerprint(b))
    assert "\n" not in str(e.value) and "seed1" in str(e.value) and "fingerprint" in str(e.value)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ModuleError, match="bad.safetensors"):
        load_module(tmp_path / "bad.safetensors")
    with pytest.raises(ModuleError, match="not found"):
        load_module(tmp_path / "none.safetensors")
