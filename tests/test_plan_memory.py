"""The memory planner (experiments/plan_memory.py): hand-checkable counts, sharding, the 7B verdicts, the CLI,
and one measured check of the prediction on the tiny random model."""
import json

import pytest

from experiments import plan_memory as pm
from experiments.config import load_experiment

QWEN7B_CONFIG = "experiments/configs/reczero_qwen7b.yaml"
PAPER = ["task.max_prompt_tokens=1024"]  # 8 prompts x 8, 1024 prompt + 1024 new tokens
TINY = pm.Shape(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=32, tied=True,
                qkv_bias=False)


def seven_b(overrides=(), gpus=1, memory=80.0):
    cfg = load_experiment(QWEN7B_CONFIG, PAPER + list(overrides))
    shape = pm.resolve_shape(cfg.model)
    return pm.plan(shape, pm.setup_from_config(cfg, gpus=gpus, memory_gib=memory, device="cuda"))


def term(p, name):
    (t,) = [t for t in p.terms if t.name == name]
    return t


def test_parameter_counts_of_the_known_shapes():
    assert pm.param_count(pm.QWEN25_7B) == pytest.approx(7.62e9, rel=0.005)
    assert pm.param_count(pm.SMOLLM2_135M) == pytest.approx(134.5e6, rel=0.01)
    # by hand: embedding 32*8, per layer q 64 + k 32 + v 32 + o 64 + gate/up/down 3*128 + norms 16, final norm 8
    assert pm.param_count(TINY) == 32 * 8 + 2 * (64 + 32 + 32 + 64 + 3 * 128 + 16) + 8


def test_default_shape_matches_the_converted_model_and_its_folder():
    from grpo.models import default_model_dir

    assert pm.default_model_dir() == default_model_dir()
    shape = pm.shape_of("default")  # the converted config.json if present, else the table
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.intermediate, shape.vocab, shape.tied) == \
        (30, 576, 9, 3, 1536, 49152, True)


def test_unknown_hub_id_is_an_error_not_a_download():
    with pytest.raises(pm.PlanError, match="no shape"):
        pm.shape_of("someone/unknown-model")


def test_lora_adapter_count_by_hand():
    # per layer r x (in + out): q 8+8, k 8+4, v 8+4, o 8+8, gate 8+16, up 8+16, down 16+8 = 128 per unit rank
    assert pm.lora_params(TINY, 2) == 2 * 2 * 128
    assert pm.lora_params(TINY, 2, ["q_proj", "v_proj"]) == 2 * 2 * (16 + 12)
    assert pm.lora_params(TINY, 0) == 0
    with pytest.raises(pm.PlanError):
        pm.lora_params(TINY, 2, ["qkv"])
    # 7B, rank 16, all seven linears: 16 x 28 x (2x(3584+3584) + 2x(3584+512) + 3x(3584+18944))
    assert pm.lora_params(pm.QWEN25_7B, 16) == 16 * 28 * (2 * 7168 + 2 * 4096 + 3 * 22528)


def test_sharding_divides_weights_gradients_and_optimizer_state():
    one, four = seven_b(gpus=1), seven_b(gpus=4)
    P = pm.param_count(pm.QWEN25_7B)
    assert term(one, "weights").bytes == 4 * P and term(one, "optimizer state").bytes == 8 * P
    for name in ("weights", "optimizer state", "gradients"):
        assert term(four, name).bytes == term(one, name).bytes // 4
    assert term(four, "decode copy").bytes == term(one, "decode copy").bytes == 2 * P  # never sharded
    offload = seven_b(["model.cpu_offload=true"], gpus=4)
    assert {term(offload, n).where for n in ("weights", "optimizer state", "gradients")} == {"cpu"}
    assert offload.phases["resident"] < four.phases["resident"]


def test_start_up_decode_copy_and_evaluation_follow_the_trainer():
    P = pm.param_count(pm.QWEN25_7B)
    kl = seven_b(["grpo.beta=0.04"], gpus=8)
    # before sharding each GPU holds the fp32 model, the fp32 reference and the bf16 decode copy
    assert kl.phases["load"] == 4 * P + 4 * P + 2 * P
    assert term(kl, "reference model").bytes == 4 * P // 8
    # sharded or LoRA models always sample through the copy; one GPU full fine-tune may decode from the master
    assert term(seven_b(["sampling.decode_weights=master"], gpus=8), "decode copy").bytes == 2 * P
    assert term(seven_b(["sampling.decode_weights=master", "model.lora.rank=16"]), "decode copy").bytes == 2 * P
    assert term(seven_b(["sampling.decode_weights=master"]), "decode copy").bytes == 0
    # evaluation: each of 8 ranks decodes every 8th of 256 items, 32 at a time (eval_batch_size 64)
    assert "32 prompts" in term(seven_b(gpus=8), "KV cache (evaluation)").note
    assert "64 prompts" in term(seven_b(gpus=1), "KV cache (evaluation)").note


def test_kv_cache_token_counts_by_hand():
    assert pm.kv_bytes_per_token(pm.QWEN25_7B, 2) == 28 * 2 * 4 * 128 * 2
    assert pm.kv_tokens_shared(8, 8, 1024, 1024) == 8 * 1024 + 64 * 1024
    assert pm.kv_tokens_naive(8, 8, 1024, 1024) == 64 * 2048
    # CPU split cache: prompts once + each row's completion slots (P + T rounded up to 16, minus P)
    _, tokens, layout = pm.kv_cache(TINY, False, 2, 4, 100, 20)
    assert tokens == 2 * 100 + 8 * (128 - 100) and layout.startswith("split")
    # CUDA at the 7B shape with 8 prompts: the grid cache would leave an H200 idle, the slot cache runs
    assert not pm.grid_cache_used(pm.QWEN25_7B, 8, 8) and pm.grid_cache_used(pm.SMOLLM2_135M, 32, 8)


def test_layer_activations_by_hand_cpu_fp32():
    s = pm.SMOLLM2_135M
    cpu = pm.Precision(compute=4, stream=4, casts=False, trainable_norms=True)
    H, I, hq = 576, 1536, 576
    # two norms x (fp32 input + normalised + output) x 4 B, attention 4 B x (q, k, v repeated to all heads,
    # output, o_proj input) + logsumexp, MLP 4 x 4 B x I
    assert pm.layer_activation_bytes(s, cpu) == 2 * 3 * 4 * H + 4 * 5 * hq + 4 * 9 + 16 * I


def test_checkpointing_and_smaller_micro_batches_reduce_activations():
    full, ckpt = seven_b(["model.gradient_checkpointing=false"]), seven_b()
    assert term(ckpt, "activations, checkpointing").bytes < term(full, "activations, no checkpointing").bytes / 4
    assert term(full, "activations, no checkpointing").counted
    assert not term(full, "activations, checkpointing").counted
    half = seven_b(["grpo.micro_batch_size=2"])
    assert term(half, "activations, checkpointing").bytes < term(ckpt, "activations, checkpointing").bytes


def test_seven_b_verdicts():
    lora = seven_b(["model.lora.rank=16"], gpus=1, memory=80)
    assert lora.fits and lora.total < 70 * pm.GIB
    fsdp = seven_b(gpus=8, memory=80)
    assert fsdp.fits
    h200 = seven_b(gpus=1, memory=139)
    assert not h200.fits and h200.total > 150 * pm.GIB
    # fp32 weights + AdamW + gradients + foreach temporaries alone exceed the H200
    assert h200.phases["resident"] + h200.phases["step"] > 139 * pm.GIB


def test_suggestions_show_a_fitting_change_with_its_figures():
    cfg = load_experiment(QWEN7B_CONFIG, PAPER)
    setup = pm.setup_from_config(cfg, gpus=1, memory_gib=139, device="cuda")
    sug = pm.suggest(pm.resolve_shape(cfg.model), setup)
    fitting = {x["change"] for x in sug["single"] if x["fits"]}
    assert "model.lora.rank=16" in fitting and "--gpus 2" in fitting
    assert "sampling.decode_weights=master" not in fitting
    lora = next(x for x in sug["single"] if x["change"] == "model.lora.rank=16")
    assert lora["total_bytes"] == seven_b(["model.lora.rank=16"], memory=139).total


def test_cli_prints_a_table_and_json(capsys):
    assert pm.main(["--config", QWEN7B_CONFIG, "--gpus", "1", "--gpu-memory", "139", *PAPER]) == 0
    out = capsys.readouterr().out
    assert "optimizer state" in out and "KV cache (rollout)" in out and "DOES NOT FIT" in out
    assert "model.lora.rank=16" in out  # a suggestion
    assert pm.main(["--config", QWEN7B_CONFIG, "--gpus", "8", "--json", *PAPER]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True and data["setup"]["gpus"] == 8
    assert data["kv"]["tokens_naive"] == 8 * 2048 and data["kv"]["tokens_shared"] == 1024 + 8 * 1024
    assert data["total_bytes"] == data["peak_bytes"] + data["margin_bytes"]


def test_cpu_plan_has_no_decode_copy_and_fp32_activations(capsys):
    assert pm.main(["--config", "experiments/configs/smoke.yaml", "--device", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    terms = {t["name"]: t for t in data["terms"]}
    assert terms["decode copy"]["bytes"] == 0 and data["setup"]["device"] == "cpu"
    assert data["kv"]["bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # 2 layers x (k, v) x 2 kv heads x 16 x fp32


def test_bad_config_key_exits_2_with_a_message(capsys):
    assert pm.main(["--config", "experiments/configs/smoke.yaml", "grpo.micro_batch=4"]) == 2
    err = capsys.readouterr().err
    assert "grpo.micro_batch" in err and "micro_batch_size" in err


def test_measured_peak_of_the_tiny_model_matches_the_prediction():
    """A real rollout + update of the tiny random Qwen2 in a fresh process (~10 s on an idle 2-core CPU): the
    log-prob chunk (512 tokens x 49152 vocab, ~0.4 GiB) dominates, so a wrong chunk term or a missed phase shows."""
    if not (pm.default_model_dir() / "config.json").exists():
        pytest.skip("the smoke config's tokenizer is the default model's: run `make model`")
    overrides = ["task.max_prompt_tokens=384", "sampling.max_new_tokens=128", "grpo.batch_prompts=1",
                 "grpo.micro_batch_size=4"]
    cfg = load_experiment("experiments/configs/smoke.yaml", overrides)
    p = pm.plan(pm.resolve_shape(cfg.model), pm.setup_from_config(cfg, memory_gib=16, device="cpu"))
    measured = pm.measure("experiments/configs/smoke.yaml", overrides, timeout=300)
    assert measured["micro_batches"] == 1
    # resident + the largest of rollout, update, step (what was run), margin not included
    peak = next(r for r in pm.compare(p, measured) if r["what"].startswith("peak of these phases"))
    assert 0.75 < peak["ratio"] < 1.3, (peak, measured)
    assert p.phases["update"] > 3 * p.phases["rollout"]  # the measured peak is the update's
    assert measured["update_peak_bytes"] > measured["rollout_peak_bytes"]
