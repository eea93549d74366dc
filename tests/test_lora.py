"""LoRA (grpo/lora.py): step 0 is the base model, only adapters train, the reference is the base, merging
and saving give back the adapted model."""
import json

import pytest
import torch

from grpo.config import LoRAConfig
from grpo.lora import (LoRALinear, adapter_state_dict, adapters_disabled, add_lora, has_lora, load_adapters,
                       merge_weight, merged_state_dict, save_adapters)
from grpo.logprobs import completion_logprobs
from tests.conftest import tiny_model

TARGETS = LoRAConfig().targets


def ids(seed=0, shape=(3, 10)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def adapted(rank=4, alpha=8.0, dropout=0.0, targets=TARGETS, steps=0):
    """A tiny model with adapters, after `steps` AdamW steps on a next-token loss over random tokens."""
    model = tiny_model()
    add_lora(model, rank, alpha, dropout, targets)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # all of them: frozen ones must not move
    x = ids(1, (4, 12))
    model.train()
    for _ in range(steps):
        out = model(input_ids=x).logits[:, :-1]  # (4, 11, V)
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_step_zero_is_the_base_model():
    base, model = tiny_model(), tiny_model()
    names = add_lora(model, 4, 8.0, 0.0, TARGETS)
    assert len(names) == 2 * 7 and names == sorted(names) and "model.layers.1.mlp.down_proj" in names
    assert has_lora(model) and not has_lora(base)
    assert torch.equal(logits(model, ids()), logits(base, ids()))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert set(base.state_dict()) <= set(model.state_dict())  # Hugging Face names of the base kept


def test_from_linear_keeps_the_same_parameters():
    linear = torch.nn.Linear(8, 6)
    layer = LoRALinear.from_linear(linear, rank=2, alpha=4.0, dropout=0.0)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert layer.lora_A.shape == (2, 8) and layer.lora_B.shape == (6, 2) and layer.scaling == 2.0
    assert layer.lora_A.dtype == torch.float32 and layer.lora_A.abs().sum() > 0 and layer.lora_B.abs().sum() == 0


def test_training_moves_only_the_adapters():
    before = {n: p.detach().clone() for n, p in tiny_model().named_parameters()}
    model = adapted(steps=3)
    params = dict(model.named_parameters())
    for name, value in before.items():
        assert torch.equal(params[name], value), name
    moved = [n for n, p in params.items() if n.endswith(".lora_B") and p.abs().max() > 0]
    assert len(moved) == 14


def test_adapters_disabled_is_the_base_model():
    base, model = tiny_model(), adapted(steps=3)
    prompt, completion = ids(2, (3, 6)), ids(3, (3, 5))
    masks = torch.ones_like(prompt), torch.ones_like(completion)
    args = (prompt, masks[0], completion, masks[1])
    with torch.no_grad():
        expected = completion_logprobs(base, *args)
        with adapters_disabled(model):
            reference = completion_logprobs(model, *args)
        adapted_logp = completion_logprobs(model, *args)
    assert torch.equal(reference, expected)
    assert (adapted_logp - expected).abs().max() > 1e-3
    assert all(m.adapters_enabled for m in model.modules() if isinstance(m, LoRALinear))  # restored


def test_adapters_disabled_restores_on_error():
    model = adapted()
    with pytest.raises(RuntimeError), adapters_disabled(model):
        raise RuntimeError("boom")
    assert all(m.adapters_enabled for m in model.modules() if isinstance(m, LoRALinear))


def test_merged_state_dict_is_a_plain_model_with_the_adapters():
    model = adapted(steps=3)
    plain = tiny_model(seed=5)  # other weights: everything must come from the merged state dict
    state = merged_state_dict(model)
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state)
    torch.testing.assert_close(logits(plain, ids()), logits(model, ids()), atol=1e-5, rtol=0)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[q], tiny_model().state_dict()[q])  # the update is really in there


def test_merge_weight_matches_the_layer_in_bf16():
    layer = LoRALinear(torch.nn.Linear(8, 6, bias=False), rank=2, alpha=4.0)
    torch.nn.init.normal_(layer.lora_B)
    merged = merge_weight(layer.weight.to(torch.bfloat16), layer.lora_A, layer.lora_B, layer.scaling)
    assert merged.dtype == torch.bfloat16 and merged.shape == (6, 8)
    eye = torch.eye(8)
    with torch.no_grad():
        torch.testing.assert_close(merged.float().T, layer(eye), atol=2e-2, rtol=1e-2)  # row i = W' e_i


def test_bf16_inputs_and_autocast():
    layer = LoRALinear(torch.nn.Linear(8, 6).to(torch.bfloat16), rank=2)  # a bf16 base, fp32 adapters
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 8)
    with torch.no_grad():
        out = layer(x.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16
        layer32 = LoRALinear(torch.nn.Linear(8, 6), rank=2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer32(x).dtype == torch.bfloat16


def test_dropout_only_in_train_mode():
    layer = LoRALinear(torch.nn.Linear(16, 16), rank=4, alpha=4.0, dropout=0.5)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 16)
    with torch.no_grad():
        layer.train()
        assert not torch.equal(layer(x), layer(x))
        with adapters_disabled(layer):  # dropout acts on the adapter path only
            assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        layer.eval()
        no_dropout = torch.nn.functional.linear(x, layer.weight, layer.bias) + (x @ layer.lora_A.T @ layer.lora_B.T)
        torch.testing.assert_close(layer(x), no_dropout)


def test_add_lora_errors():
    with pytest.raises(ValueError, match="rank"):
        add_lora(tiny_model(), 0, 16.0, 0.0, TARGETS)
    with pytest.raises(ValueError, match="nope") as error:
        add_lora(tiny_model(), 4, 16.0, 0.0, ["nope"])
    assert "model.layers.0.self_attn.q_proj" in str(error.value)  # lists what exists
    model = adapted()
    with pytest.raises(ValueError, match="already"):
        add_lora(model, 4, 16.0, 0.0, TARGETS)


def test_save_and_load_adapters(tmp_path):
    model = adapted(steps=3)
    cfg = LoRAConfig(rank=4, alpha=8.0, targets=TARGETS)
    save_adapters(model, tmp_path, cfg)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank"] == 4 and config["alpha"] == 8.0 and config["targets"] == TARGETS
    assert len(config["modules"]) == 14
    fresh = adapted()  # same base, fresh adapters (B = 0)
    assert not torch.allclose(logits(fresh, ids()), logits(model, ids()))
    load_adapters(fresh, tmp_path)
    assert torch.equal(logits(fresh, ids()), logits(model, ids()))
    assert set(adapter_state_dict(fresh)) == set(adapter_state_dict(model))
    with pytest.raises(ValueError, match="unexpected"):
        load_adapters(adapted(targets=["q_proj"]), tmp_path)
    with pytest.raises(ValueError, match="shape"):
        load_adapters(adapted(rank=2), tmp_path)
