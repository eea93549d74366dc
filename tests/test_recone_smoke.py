"""The whole RecOne pipeline (self-teacher traces -> SFT -> GRPO) on a tiny random model, in seconds."""
import json

from conftest import ctrl_c_at_call
from experiments.coldstart import ReconeConfig, copy_overlap
from experiments.recone import run_recone
from grpo.config import load_config
from grpo.runlog import read_jsonl
from prompts import parse_completion


def test_copy_overlap():
    demo = "a b c d e f g h i j"
    assert copy_overlap(demo, demo) == 1.0
    assert copy_overlap("x y z", demo) == 0.0
    assert 0 < copy_overlap("a b c d e f zz", demo) < 1


def test_recone_pipeline_on_a_tiny_model(tmp_path, data_dir, default_tokenizer, monkeypatch):
    from recdata.prepare import main as prepare
    import experiments.coldstart as coldstart

    data = tmp_path / "music"
    assert prepare(["--dataset", "amazon-music", "--raw-dir", str(data_dir / "amazon-music-2014-sample"),
                    "--out", str(data), "--max-train", "16", "--max-val", "4", "--max-test", "4", "--quiet"]) == 0
    smoke = "experiments/configs/smoke.yaml"
    import yaml

    values = yaml.safe_load(open(smoke))
    values.update({"coldstart": {"n_examples": 6, "samples_per_example": 2, "batch_examples": 3,
                                 "tolerance": 4.0},
                   "sft": {"epochs": 1, "batch_size": 2, "micro_batch_size": 2, "lr": 1e-3}})
    path = tmp_path / "recone_smoke.yaml"
    path.write_text(yaml.safe_dump(values))
    cfg = load_config(ReconeConfig, path, [f"task.data_dir={data}", f"run.output_dir={tmp_path / 'run'}",
                                           "grpo.steps=2", "run.eval_examples=2", "sampling.max_new_tokens=64"])
    # A random model never writes the format; stand in a teacher that answers well for half the examples,
    # so that the filter, the SFT stage and the hand-over to GRPO all run on real files.
    calls = []

    def fake_best_answer_traces(cfg_, examples, out):
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            for i, ex in enumerate(examples):
                kept = i % 2 == 0
                answer = ("<analyze user>\nlikes rock\n</analyze user>\n<analyze item>\n[pos] rock\n</analyze item>\n"
                          f"<match>\nfits\n</match>\n<rate> {ex['rating']:g} </rate>")
                f.write(json.dumps({"example_id": f"{ex['user_id']}|{ex['item_id']}|{ex['timestamp']}",
                                    "prompt": None, "completion": answer, "label": ex["rating"], "kept": kept,
                                    "stage": "first" if kept else "rejected", "reason": "ok", "source": "test"}) + "\n")
        calls.append(len(examples))
        return {"kept": (len(examples) + 1) // 2}

    monkeypatch.setattr(coldstart, "self_traces", fake_best_answer_traces)
    root = run_recone(cfg)
    stages = json.loads((root / "stages.json").read_text())
    assert calls == [6]
    assert stages["sft"]["pairs"] == 3
    assert (root / "sft" / "checkpoints" / "best" / "config.json").exists()
    assert stages["grpo"]["starts_from"].endswith("best")
    assert (root / "grpo" / "metrics.jsonl").exists() and (root / "grpo" / "checkpoints" / "step_2").exists()

    # Resumed with more GRPO steps: the finished SFT stage is kept as it is, GRPO continues from step 2.
    sft_record = (root / "sft" / "run.json").read_text()
    cfg.run.resume, cfg.grpo.steps = "latest", 3
    run_recone(cfg)
    assert (root / "sft" / "run.json").read_text() == sft_record
    steps = [row["step"] for row in read_jsonl(root / "grpo" / "metrics.jsonl") if "reward/mean" in row]
    assert steps == [1, 2, 3] and (root / "grpo" / "checkpoints" / "step_3").exists()


def test_self_teacher_writes_one_line_per_example_and_resumes(tmp_path, data_dir, default_tokenizer):
    from experiments.coldstart import _hint_prompt, self_traces
    from experiments.task import RecTask
    from recdata.prepare import main as prepare

    data = tmp_path / "music"
    assert prepare(["--dataset", "amazon-music", "--raw-dir", str(data_dir / "amazon-music-2014-sample"),
                    "--out", str(data), "--max-train", "8", "--max-val", "2", "--max-test", "2", "--quiet"]) == 0
    cfg = load_config(ReconeConfig, "experiments/configs/smoke.yaml",
                      [f"task.data_dir={data}", "task.one_shot=turn", "coldstart.samples_per_example=2",
                       "coldstart.batch_examples=2", "coldstart.scaffold=false"])
    task = RecTask(cfg.task, default_tokenizer)
    examples = task.examples("train")[:3]
    out = tmp_path / "traces.jsonl"
    stats = self_traces(cfg, examples, out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3 and stats["requested"] == 3 and stats["skipped"] == 0
    assert not any(r["kept"] for r in lines)  # a random model never writes the format
    assert stats["rejected_format"] == 3
    again = self_traces(cfg, examples, out)
    assert again["skipped"] == 3 and len(out.read_text().splitlines()) == 3  # nothing asked twice

    # With the scaffold the decoder writes the tags, so even a random model's traces are well formed; a
    # wide tolerance keeps them all (their digits are random), and each parses under the strict rule.
    cfg.coldstart.scaffold, cfg.coldstart.tolerance, cfg.coldstart.min_words = True, 4.0, 1
    cfg.coldstart.section_tokens = [6, 6, 6, 1]
    cfg.task.prefill = "<analyze user>\n"
    task = RecTask(cfg.task, default_tokenizer)
    out2 = tmp_path / "scaffolded.jsonl"
    stats = self_traces(cfg, examples, out2)
    lines = [json.loads(line) for line in out2.read_text().splitlines()]
    assert stats["kept"] == 3 and stats["rejected_format"] == 0
    for record in lines:
        assert not record["completion"].startswith("<analyze user>")  # stored after the prefill
        parsed = parse_completion(cfg.task.prefill + record["completion"], template="tbr")
        assert parsed.format_ok and parsed.rating in {1.0, 2.0, 3.0, 4.0, 5.0}, record["completion"]

    hinted = _hint_prompt(task, examples[0])
    plain = task.prompt(examples[0])
    label = f"{examples[0]['rating']:g}"
    assert f"true rating is {label}" in hinted and "true rating" not in plain
    assert hinted.index("true rating") > plain.rfind("<|im_start|>user")  # in the last user turn


def test_cli_rejects_unknown_keys(capsys):
    from experiments.coldstart import main as coldstart_main
    from experiments.recone import main as recone_main

    assert coldstart_main(["coldstart.n_exampels=3"]) == 2
    assert "coldstart.n_exampels" in capsys.readouterr().err
    assert recone_main(["sft.epoch=1"]) == 2


def test_evaluate_reads_a_recone_stage_config(tmp_path):
    """A RecOne stage folder's config.yaml has coldstart/sft/teacher sections: evaluate takes its prompt settings."""
    from experiments.evaluate import resolve_config
    from grpo.config import save_config

    cfg = load_config(ReconeConfig, "experiments/configs/recone.yaml", ["task.one_shot=inline"])
    run = tmp_path / "sft"
    (run / "checkpoints" / "best").mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    got, source = resolve_config(str(run / "checkpoints" / "best"), None, ["task.max_prompt_tokens=512"])
    assert source == str(run / "config.yaml")
    assert got.task.one_shot == "inline" and got.task.max_prompt_tokens == 512
    assert got.model.name_or_path == str(run / "checkpoints" / "best")


def test_recone_stopped_during_sft_skips_grpo_and_resumes_the_sft_stage(tmp_path, data_dir, default_tokenizer,
                                                                         monkeypatch):
    # Ctrl-C during SFT's second step: SFT saves step_2 and returns unfinished, RecOne returns without GRPO;
    # run.resume=latest continues SFT from step 2 (no step logged twice), then runs GRPO.
    import yaml

    from grpo import sft as sft_module
    from grpo.runlog import run_finished
    from recdata.prepare import main as prepare

    data = tmp_path / "music"
    assert prepare(["--dataset", "amazon-music", "--raw-dir", str(data_dir / "amazon-music-2014-sample"),
                    "--out", str(data), "--max-train", "24", "--max-val", "4", "--max-test", "4", "--quiet"]) == 0
    values = yaml.safe_load(open("experiments/configs/smoke.yaml"))
    values.update({"coldstart": {"teacher": "rules", "n_examples": 20, "tolerance": 4.0, "style": "titles"},
                   "sft": {"epochs": 1, "batch_size": 4, "micro_batch_size": 4, "lr": 1e-3}})
    path = tmp_path / "recone_rules.yaml"
    path.write_text(yaml.safe_dump(values))
    cfg = load_config(ReconeConfig, path, [f"task.data_dir={data}", f"run.output_dir={tmp_path / 'run'}",
                                           "grpo.steps=1", "run.eval_examples=0", "sampling.max_new_tokens=200"])
    real = ctrl_c_at_call(monkeypatch, sft_module, "accumulate_sft_gradients", 2)
    root = run_recone(cfg)
    sft_dir = root / "sft"
    assert not run_finished(sft_dir) and (sft_dir / "checkpoints" / "step_2").is_dir()
    assert not (root / "grpo").exists()

    monkeypatch.setattr(sft_module, "accumulate_sft_gradients", real)
    cfg.run.resume = "latest"
    run_recone(cfg)
    steps = [row["step"] for row in read_jsonl(sft_dir / "metrics.jsonl") if "sft/loss" in row]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 2 and run_finished(sft_dir)
    assert len(json.loads((sft_dir / "run.json").read_text())["sessions"]) == 2  # continued, not started over
    assert (root / "grpo" / "checkpoints" / "step_1").exists()
