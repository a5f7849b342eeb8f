"""Minitron-style structured pruning (distill.lm.prune) on tiny random Llama / Qwen2 models built from configs."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from distill.lm.prune import (  # noqa: E402
    Keep,
    apply_keep,
    collect_importance,
    count_params,
    current_sizes,
    prune,
    select_heads,
)

VOCAB = 128


def tiny_llama(seed=0, tie=True):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def calibration():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (4, 24), generator=g) for _ in range(3)]


@pytest.fixture(scope="module")
def probe():
    return torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))


def logits(m, ids):
    with torch.no_grad():
        return m.eval()(input_ids=ids).logits


def reload(m, tmp_path):
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    return AutoModelForCausalLM.from_pretrained(tmp_path).eval()


def test_nothing_to_prune_keeps_logits(model, calibration, probe):
    new, report = prune(model, calibration, **current_sizes(model.config))
    assert new is not model
    torch.testing.assert_close(logits(new, probe), logits(model, probe), rtol=0, atol=1e-6)
    assert report["params_after"] == report["params_before"] == count_params(model)
    assert report["kept"]["layers"] == [0, 1, 2, 3]


CASES = {
    "mlp": dict(mlp=96),
    "q_heads_in_groups": dict(heads=2),
    "kv_groups": dict(kv_heads=1),
    "hidden": dict(hidden=48),
    "layers": dict(layers=3),
    "combined": dict(mlp=64, heads=2, kv_heads=1, hidden=40, layers=2),
}


@pytest.mark.parametrize("targets", CASES.values(), ids=CASES.keys())
def test_pruned_model_reloads_identically(model, calibration, probe, targets, tmp_path):
    new, report = prune(model, calibration, **targets)
    back = reload(new, tmp_path)
    torch.testing.assert_close(logits(back, probe), logits(new, probe), rtol=0, atol=1e-6)
    sizes = report["sizes_after"]
    for key, value in targets.items():
        assert sizes[key] == value
    if "heads" not in targets:  # kv_heads alone keeps the query/KV ratio
        assert sizes["heads"] == 2 * sizes["kv_heads"]
    cfg = back.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        sizes["mlp"], sizes["heads"], sizes["kv_heads"])
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim) == (sizes["hidden"], sizes["layers"], 16)
    assert count_params(back) == count_params(new) == report["params_after"] < report["params_before"]
    assert back.lm_head.weight is back.model.embed_tokens.weight  # still tied
    assert back.model.embed_tokens.weight.shape == (VOCAB, sizes["hidden"])
    kept = report["kept"]
    assert len(kept["layers"]) == len(kept["mlp"]) == sizes["layers"]
    assert all(len(q) == sizes["heads"] for q in kept["q_heads"])
    assert all(len(kv) == sizes["kv_heads"] for kv in kept["kv_heads"])


def test_untied_embeddings_reload(calibration, probe, tmp_path):
    m = tiny_llama(seed=3, tie=False)
    new, report = prune(m, calibration, mlp=64, hidden=32, layers=3)
    back = reload(new, tmp_path)
    assert back.lm_head.weight is not back.model.embed_tokens.weight
    torch.testing.assert_close(logits(back, probe), logits(new, probe), rtol=0, atol=1e-6)
    assert count_params(back) == report["params_after"]


def test_qwen2_family_with_biases(calibration, probe, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(4)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                      tie_word_embeddings=True)
    m = Qwen2ForCausalLM(cfg).eval()
    new, report = prune(m, calibration, mlp=64, heads=2, kv_heads=1, hidden=48, layers=3)
    assert new.model.layers[0].self_attn.q_proj.bias.shape == (2 * 16,)
    assert len(new.config.layer_types) == 3
    back = reload(new, tmp_path)
    torch.testing.assert_close(logits(back, probe), logits(new, probe), rtol=0, atol=1e-6)
    assert count_params(back) == report["params_after"]


def test_input_model_untouched(calibration, probe):
    m = tiny_llama(seed=5)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg_before, out_before = m.config.to_dict(), logits(copy.deepcopy(m), probe)
    prune(m, calibration, mlp=64, heads=2, kv_heads=1, hidden=40, layers=2)
    assert m.training
    assert m.config.to_dict() == cfg_before
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
    torch.testing.assert_close(logits(m, probe), out_before, rtol=0, atol=0)


def test_target_params_shrinks_mlp_then_depth(model, calibration, probe):
    imp = collect_importance(model, calibration)
    total = count_params(model)
    small, report = prune(model, None, target_params=int(total * 0.85), importance=imp)
    assert report["params_after"] <= int(total * 0.85)
    sizes = report["sizes_after"]
    assert sizes["layers"] == 4 and 64 <= sizes["mlp"] < 128 and sizes["mlp"] % 8 == 0
    tiny, report = prune(model, None, target_params=int(total * 0.5), importance=imp)
    sizes = report["sizes_after"]
    assert report["params_after"] <= int(total * 0.5)
    assert sizes["mlp"] == 64 and sizes["layers"] < 4  # MLP at its floor (hidden size), then depth
    fixed, report = prune(model, None, mlp=112, target_params=int(total * 0.85), importance=imp)
    assert report["sizes_after"]["mlp"] == 112 and report["sizes_after"]["layers"] < 4
    with pytest.raises(ValueError):
        prune(model, None, target_params=1000, importance=imp)
    assert logits(tiny, probe).shape == (2, 20, VOCAB)


def test_invalid_targets_are_refused(model, calibration):
    for bad in (dict(heads=3), dict(mlp=0), dict(mlp=129), dict(layers=5), dict(kv_heads=1, heads=4)):
        with pytest.raises(ValueError):
            prune(model, calibration, **bad)


def test_dead_neurons_are_pruned_not_random_ones(calibration, probe):
    m = tiny_llama(seed=6)
    g = torch.Generator().manual_seed(7)
    dead = []
    with torch.no_grad():
        for layer in m.model.layers:
            idx = torch.randperm(128, generator=g)[:32]
            layer.mlp.gate_proj.weight[idx] *= 1e-2
            layer.mlp.up_proj.weight[idx] *= 1e-2
            dead.append(set(idx.tolist()))
    new, report = prune(m, calibration, mlp=96)
    for kept, gone in zip(report["kept"]["mlp"], dead):
        assert set(kept) == set(range(128)) - gone
    ref = logits(m, probe)
    err_importance = (logits(new, probe) - ref).abs().max()
    rand = Keep(layers=[0, 1, 2, 3], hidden=list(range(64)),
                mlp=[sorted(torch.randperm(128, generator=g)[:96].tolist()) for _ in range(4)],
                q_heads=[[0, 1, 2, 3]] * 4, kv_heads=[[0, 1]] * 4)
    err_random = (logits(apply_keep(m, rand), probe) - ref).abs().max()
    assert err_importance < 1e-3 and err_random > 50 * err_importance


def test_identity_layer_is_the_one_dropped(calibration, probe):
    m = tiny_llama(seed=8)
    with torch.no_grad():
        m.model.layers[2].self_attn.o_proj.weight.zero_()
        m.model.layers[2].mlp.down_proj.weight.zero_()
    new, report = prune(m, calibration, layers=3)
    assert report["kept"]["layers"] == [0, 1, 3]
    assert report["importance"]["blocks"][2] == pytest.approx(0, abs=1e-6)
    assert min(b for i, b in enumerate(report["importance"]["blocks"]) if i != 2) > 1e-3
    torch.testing.assert_close(logits(new, probe), logits(m, probe), rtol=0, atol=1e-5)


def test_dead_kv_group_is_pruned_whole(calibration, probe):
    m = tiny_llama(seed=9)
    with torch.no_grad():
        for layer in m.model.layers:  # KV head 0's values are zero: query heads 0 and 1 output nothing
            layer.self_attn.v_proj.weight[:16].zero_()
    new, report = prune(m, calibration, kv_heads=1)
    assert report["kept"]["kv_heads"] == [[1]] * 4 and report["kept"]["q_heads"] == [[2, 3]] * 4
    torch.testing.assert_close(logits(new, probe), logits(m, probe), rtol=0, atol=1e-5)


def test_select_heads_keeps_groups_consistent():
    scores = torch.tensor([1.0, 5.0, 2.0, 3.0])  # query heads 0,1 -> KV 0; 2,3 -> KV 1
    assert select_heads(scores, 2, heads=2, kv_heads=1) == ([0, 1], [0])
    assert select_heads(scores, 2, heads=2, kv_heads=2) == ([1, 3], [0, 1])
    # a KV group is scored by the query heads it would keep: one head each -> group 0 (5) beats group 1 (3)
    assert select_heads(torch.tensor([0.0, 5.0, 2.9, 3.0]), 2, heads=1, kv_heads=1) == ([1], [0])


def test_dead_hidden_channels_are_pruned(calibration):
    m = tiny_llama(seed=10)
    dead = [3, 17, 40, 63]
    with torch.no_grad():  # channels that stay exactly zero in the residual stream
        m.model.embed_tokens.weight[:, dead] = 0
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
    _, report = prune(m, calibration, hidden=60)
    assert set(report["kept"]["hidden"]) == set(range(64)) - set(dead)


def test_padding_does_not_change_importance(model):
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, VOCAB, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0  # right padding
    mask[1, :5] = 0  # left padding
    a, b = ids.clone(), ids.clone()
    a[mask == 0], b[mask == 0] = 0, 2  # only the padding differs
    ia = collect_importance(model, [{"input_ids": a, "attention_mask": mask}])
    ib = collect_importance(model, [(b, mask)])
    assert ia.tokens == ib.tokens == int(mask.sum())
    for name in ("mlp", "heads", "hidden", "blocks"):
        torch.testing.assert_close(getattr(ia, name), getattr(ib, name), rtol=1e-5, atol=1e-6)
    unmasked = collect_importance(model, [a])  # sanity: counting padding would change the scores
    assert not torch.allclose(unmasked.mlp, ia.mlp, rtol=1e-4, atol=1e-6)


def test_calibration_formats_agree(model):
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(12))
    base = collect_importance(model, [ids])
    for batch in (ids[0], {"input_ids": ids}, (ids, torch.ones_like(ids)), (ids,)):
        other = collect_importance(model, [batch])
        torch.testing.assert_close(other.mlp, base.mlp)
        torch.testing.assert_close(other.blocks, base.blocks)
    with pytest.raises(ValueError):
        collect_importance(model, [])
