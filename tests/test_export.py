"""experiments/export.py: a LoRA run's checkpoint -> a plain Hugging Face model with the adapters merged."""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from experiments.config import ExperimentConfig
from experiments.export import main
from grpo.config import LoRAConfig, ModelConfig, save_config
from grpo.lora import add_lora, save_adapters
from grpo.models import build_random_model, load_tokenizer
from tests.conftest import TINY_QWEN2, word_tokenizer

SEED = 3  # not 0: the exporter must rebuild the random base with the run's own seed


def base_model(tokenizer):
    """The base exactly as grpo/policy.py's load_policy builds a random_init model."""
    specials = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                "bos_token_id": tokenizer.bos_token_id}
    return build_random_model(TINY_QWEN2, vocab_size=len(tokenizer), seed=SEED, dtype="float32", device="cpu",
                              special_ids=specials)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def make_run(tmp_path):
    """A run folder as training leaves it: config.yaml, step_1 (fresh adapters), step_2 (trained ones)."""
    lora = LoRAConfig(rank=4, alpha=8.0)
    cfg = ExperimentConfig(model=ModelConfig(tokenizer=str(word_tokenizer(tmp_path / "tok")),
                                             random_init=dict(TINY_QWEN2), lora=lora))
    cfg.run.seed = SEED
    run = tmp_path / "run"
    (run / "checkpoints" / "step_x").mkdir(parents=True)  # not a step: ignored
    save_config(cfg, run / "config.yaml")
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    model = base_model(tokenizer)
    add_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets)
    save_adapters(model, run / "checkpoints" / "step_1", lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, len(tokenizer), (4, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        out = model(input_ids=x).logits[:, :-1]  # (4, 11, V)
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_adapters(model, run / "checkpoints" / "step_2", lora)
    tokenizer.save_pretrained(run / "checkpoints" / "step_2")
    return run, model.eval(), tokenizer


def test_export_merges_the_latest_adapters(tmp_path, capsys):
    run, model, tokenizer = make_run(tmp_path)
    out = tmp_path / "exported"
    assert main(["--run", str(run), "--out", str(out)]) == 0
    assert "step_2" in capsys.readouterr().out  # the latest, by default
    exported = AutoModelForCausalLM.from_pretrained(out)
    x = torch.randint(0, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(exported, x), logits(model, x), atol=1e-5, rtol=0)
    assert (logits(exported, x) - logits(base_model(tokenizer), x)).abs().max() > 1e-3  # adapters are in
    assert not any("lora" in k for k in exported.state_dict())
    assert len(AutoTokenizer.from_pretrained(out)) == len(tokenizer)
    assert not (tmp_path / "exported.partial").exists()

    # --step 1: the untrained adapters (B = 0), i.e. the base model; its tokenizer comes from the config.
    out1 = tmp_path / "exported1"
    assert main(["--run", str(run), "--step", "1", "--out", str(out1)]) == 0
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out1), x),
                               logits(base_model(tokenizer), x), atol=1e-5, rtol=0)


def test_export_errors(tmp_path, capsys):
    run, _, _ = make_run(tmp_path)
    assert main(["--run", str(run), "--step", "7", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "available steps: [1, 2]" in err and len(err.strip().splitlines()) == 1
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert main(["--run", str(run), "--out", str(existing)]) == 2
    assert "not empty" in capsys.readouterr().err and (existing / "keep.txt").read_text() == "mine"
    assert main(["--run", str(tmp_path / "tok"), "--out", str(tmp_path / "o")]) == 2  # no config.yaml
    assert "config.yaml" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.yaml").write_text((run / "config.yaml").read_text())
    assert main(["--run", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_export_copies_a_full_model(tmp_path, capsys):
    run, _, tokenizer = make_run(tmp_path)
    full = base_model(tokenizer)
    ckpt = run / "checkpoints" / "step_5"
    full.save_pretrained(ckpt, safe_serialization=True)
    (ckpt / "trainer_state.pt").write_bytes(b"optimizer state")
    out = tmp_path / "exported"
    assert main(["--run", str(run), "--out", str(out)]) == 0
    assert "already a full model" in capsys.readouterr().out
    assert not (out / "trainer_state.pt").exists()
    x = torch.randint(0, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out), x), logits(full, x))


def test_an_adapter_folder_given_as_a_model_says_how_to_export(tmp_path):
    import pytest

    from grpo.models import load_model

    (tmp_path / "adapters.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="experiments.export --run"):
        load_model(str(tmp_path), device="cpu")
