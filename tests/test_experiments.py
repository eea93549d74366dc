"""The ablation, convergence and report commands end to end on a tiny random model and the real music sample.

A random model never writes the answer format, so every answer is a format failure, scored in the headline
MAE / RMSE as the rating farthest from the label and in mae_fallback / rmse_fallback as the fallback (the user's
average rating): the tests check the commands' numbers against both, computed here from the data, and against the
run folders' own files, not only that files exist."""
import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import yaml

import experiments.ablate_reward as ablate
import experiments.coldstart as coldstart
import experiments.convergence as convergence
from experiments.config import ExperimentConfig
from experiments.report import main as report_main
from experiments.runs import config_diff, load_run, read_csv, read_json
from experiments.task import RecTask
from grpo.config import build_config, read_config_values

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"
TINY = {
    "model": {"tokenizer": "default", "random_init": {
        "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
        "tie_word_embeddings": True}},
    "sampling": {"temperature": 1.0, "max_new_tokens": 8, "stop_strings": ["</rate>"]},
    "grpo": {"steps": 1, "batch_prompts": 2, "group_size": 2, "micro_batch_size": 4, "lr": 1.0e-3},
    "run": {"name": "tiny", "eval_examples": 2, "eval_batch_size": 2, "samples_per_step": 2, "plot": False},
    "task": {"template": "tbr", "reward": "paper", "one_shot": "none", "prefill": "<analyze user>\n",
             "max_prompt_tokens": 320},
}
PREFILLS = {"tbr": "<analyze user>\n", "answer_only": "<rate>\n", "single_think": "<think>\n"}


def has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def music(tmp_path_factory, data_dir):
    from recdata.prepare import main as prepare

    out = tmp_path_factory.mktemp("music")
    assert prepare(["--dataset", "amazon-music", "--raw-dir", str(data_dir / "amazon-music-2014-sample"),
                    "--out", str(out), "--max-train", "16", "--max-val", "4", "--max-test", "4", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def write_config(path: Path, music: Path, **sections) -> Path:
    values = json.loads(json.dumps(TINY))
    values["task"]["data_dir"] = str(music)
    for section, extra in sections.items():
        values.setdefault(section, {}).update(extra)
    path.write_text(yaml.safe_dump(values))
    return path


def fallback_mae_rmse(music: Path, n: int) -> tuple[float, float]:
    """MAE / RMSE of predicting each of the first n validation rows' user average rating (what a model that
    never writes the format scores)."""
    rows = [json.loads(line) for line in (music / "val.jsonl").read_text().splitlines()[:n]]
    err = np.array([r["rating"] - r["user_avg_rating"] for r in rows], dtype=float)
    return float(np.abs(err).mean()), float(np.sqrt((err ** 2).mean()))


def worst_mae_rmse(music: Path, n: int, split: str = "val") -> tuple[float, float]:
    """MAE / RMSE of predicting, for each of the first n rows, the rating farthest from its label on 1-5 (how
    a model that never writes the format is scored in the headline figures)."""
    rows = [json.loads(line) for line in (music / f"{split}.jsonl").read_text().splitlines()[:n]]
    err = np.array([max(r["rating"] - 1.0, 5.0 - r["rating"]) for r in rows], dtype=float)
    return float(err.mean()), float(np.sqrt((err ** 2).mean()))


# ----------------------------------------------------------------------------------------------------------
# ablate_reward: configs (no training)
# ----------------------------------------------------------------------------------------------------------
EXPECTED_WELL_FORMED = {"paper": 1.5, "format_only": 0.5, "answer_only": 1.0, "authors_code": 2.0,
                        "exact_match": 2.0, "no_think": 1.5, "single_think": 1.5, "partial_format": 1.5}
EXPECTED_MALFORMED = {"paper": -0.5, "format_only": -0.5, "answer_only": 0.0, "authors_code": -1.0,
                      "exact_match": -1.5, "no_think": -0.5, "single_think": -0.5, "partial_format": -0.5}


def test_small_budget_variants_fit_their_templates():
    """Each variant of the CPU config differs from the base only in reward, template, prefill and run folder;
    its prefill plus a well-formed rest of the answer earns the reward's maximum through RecTask (the path
    training takes), and a malformed answer its minimum."""
    base = read_config_values(CONFIGS / "ablate_small.yaml")
    base_cfg = build_config(ExperimentConfig, base)
    assert base_cfg.grpo.steps == 6 and base_cfg.run.eval_examples == 12 and base_cfg.run.eval_every == 0
    for name, variant in ablate.VARIANTS.items():
        values = ablate.variant_values(name, base, Path("out") / name)
        cfg = build_config(ExperimentConfig, values)
        assert (cfg.task.reward, cfg.task.template) == (variant.reward, variant.template)
        assert cfg.task.prefill == PREFILLS[variant.template], name
        assert cfg.sampling.stop_strings == ["</rate>"] and cfg.run.output_dir == str(Path("out") / name)
        changed = {d.split(":")[0] for d in config_diff(base, values)}
        assert changed <= {"task.reward", "task.template", "task.prefill", "run.name", "run.output_dir"}, changed

        task = RecTask(cfg.task, tokenizer=None)
        example = {"rating": 4.0, "user_avg_rating": 4.2, "item_avg_rating": 4.0}
        demo = ablate.TEMPLATES[variant.template].one_shot_answer  # a well-formed answer with rating 4
        first_tag = "<" + ablate.TEMPLATES[variant.template].sections[0] + ">"
        assert demo.startswith(first_tag)
        completion = demo[len(first_tag):].lstrip("\n ")  # what the model writes after the prefill
        total, parts = task.reward({"example": example}, completion)
        assert parts["format_ok"] == 1.0 and total == pytest.approx(EXPECTED_WELL_FORMED[name]), name
        total, parts = task.reward({"example": example}, "I think the user likes it.")
        assert parts["format_ok"] == 0.0 and total == pytest.approx(EXPECTED_MALFORMED[name]), name


def test_paper_budget_variants_keep_the_paper_prompt():
    base = read_config_values(CONFIGS / "ablate_qwen7b.yaml")
    for name in ablate.DEFAULT_VARIANTS:
        cfg = build_config(ExperimentConfig, ablate.variant_values(name, base, Path("o")))
        assert cfg.task.prefill == "" and cfg.task.one_shot == "none" and cfg.grpo.group_size == 8
        assert cfg.model.name_or_path == "Qwen/Qwen2.5-7B-Instruct" and cfg.grpo.lr == 2e-6
    with pytest.raises(ValueError, match="cannot be carried over"):
        ablate.template_prefill("single_think", "Let me think.", "tbr")
    assert ablate.template_prefill("answer_only", "  <analyze user>\n", "tbr") == "  <rate>\n"


# ----------------------------------------------------------------------------------------------------------
# ablate_reward: end to end
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ablation(music, runs_root):
    """All seven variants, one of them crashing mid-run (micro_batch_size=0 fails in the training loop after
    the step-0 evaluation). Returns what the first call wrote, before later tests rerun it."""
    config = write_config(runs_root.parent / "ablate_tiny.yaml", music)
    out = runs_root / "ablate"
    rc = ablate.main(["--config", str(config), "--out", str(out), "format_only:grpo.micro_batch_size=0"])
    return {"rc": rc, "out": out, "config": config, "csv": read_csv(out / "ablation.csv"),
            "md": (out / "ablation.md").read_text()}


def test_ablation_writes_a_row_per_variant_and_survives_a_crash(ablation, music):
    out, rows = ablation["out"], ablation["csv"]
    assert ablation["rc"] == 1  # a variant failed
    assert [r["variant"] for r in rows] == list(ablate.DEFAULT_VARIANTS)
    status = {r["variant"]: r["status"] for r in rows}
    assert status.pop("format_only") == "failed" and set(status.values()) == {"done"}
    failed = next(r for r in rows if r["variant"] == "format_only")
    marker = read_json(out / "format_only" / "variant.json")
    assert marker["status"] == "failed" and failed["mae"] == ""
    assert failed["note"] == marker["error"] and "Error" in marker["error"]  # e.g. "ValueError: range() arg 3 ..."
    assert "micro_batch" in marker["traceback"]  # it failed where the bad override bites, inside the training loop
    assert not (out / "format_only" / "eval.json").exists()

    mae, rmse = worst_mae_rmse(music, 2)
    fallback_mae, fallback_rmse = fallback_mae_rmse(music, 2)
    for row in rows:
        if row["status"] != "done":
            continue
        name = row["variant"]
        final = json.loads((out / name / "eval.json").read_text())
        assert float(row["mae"]) == pytest.approx(final["eval/mae"]) == pytest.approx(mae)
        assert float(row["rmse"]) == pytest.approx(rmse)
        # The fallback-scored figures stay in the run's evaluation, beside the headline, and are never better.
        assert final["eval/mae_fallback"] == pytest.approx(fallback_mae) and fallback_mae <= mae
        assert final["eval/rmse_fallback"] == pytest.approx(fallback_rmse)
        assert float(row["format_fail"]) == 1.0 and row["integer_share"] == ""  # nothing parsed
        assert float(row["len_mean"]) == pytest.approx(final["eval/len_mean"]) and 0 < float(row["len_mean"]) <= 8
        assert int(row["n"]) == 2 and int(row["steps"]) == 1
        marker = read_json(out / name / "variant.json")
        assert float(row["wall_s"]) == pytest.approx(marker["wall_s"]) and marker["wall_s"] > 0
        saved = yaml.safe_load((out / name / "config.yaml").read_text())
        variant = ablate.VARIANTS[name]
        assert saved["task"]["reward"] == variant.reward and saved["task"]["template"] == variant.template
        assert saved["task"]["prefill"] == PREFILLS[variant.template]
        # The training reward of gibberish is each reward's malformed value.
        assert float(row["train_reward"]) == pytest.approx(EXPECTED_MALFORMED[name])
        assert f"| {name} | {variant.reward} | {variant.template} | done | 1 | 2 | " in ablation["md"]
    assert "| format_only | format_only | tbr | failed |" in ablation["md"]

    curves = ablate.curves(out, list(ablate.DEFAULT_VARIANTS))
    assert "format_only" not in curves and len(curves) == 6
    assert [r["reward/normalised"] for r in curves["exact_match"] if "reward/normalised" in r] == [0.0]
    assert [r["reward/normalised"] for r in curves["answer_only"] if "reward/normalised" in r] == [0.0]
    assert [r["step"] for r in curves["paper"] if "eval/mae" in r] == [0, 1]
    if has_matplotlib():
        png = out / "ablation_curves.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000


def test_ablation_rerun_skips_finished_variants_and_retries_the_failed_one(ablation, monkeypatch, capsys):
    out = ablation["out"]
    before = {n: (out / n / "eval.json").stat().st_mtime_ns for n in ablate.DEFAULT_VARIANTS if n != "format_only"}
    trained = []
    real = ablate.run_experiment

    def counting(cfg):
        trained.append(Path(cfg.run.output_dir).name)
        return real(cfg)

    monkeypatch.setattr(ablate, "run_experiment", counting)
    assert ablate.main(["--config", str(ablation["config"]), "--out", str(out)]) == 0
    assert trained == ["format_only"]
    assert {n: (out / n / "eval.json").stat().st_mtime_ns for n in before} == before
    # The failed attempt's files were cleared: one step-0 evaluation, not two.
    metrics = load_run(out / "format_only").metrics
    assert [r["step"] for r in metrics if "eval/mae" in r] == [0, 1]
    rows = read_csv(out / "ablation.csv")
    assert [r["status"] for r in rows] == ["done"] * 7

    # Asking for other settings does not retrain finished variants silently: they are skipped with a note.
    trained.clear()
    assert ablate.main(["--config", str(ablation["config"]), "--out", str(out), "--variants", "paper",
                        "grpo.lr=0.5"]) == 0
    assert trained == []
    paper = next(r for r in read_csv(out / "ablation.csv") if r["variant"] == "paper")
    assert "grpo.lr: 0.001 -> 0.5" in paper["note"]
    assert len(read_csv(out / "ablation.csv")) == 7  # variants done earlier stay in the table


def test_ablation_rejects_bad_arguments(tmp_path, music, capsys):
    config = write_config(tmp_path / "c.yaml", music)
    assert ablate.main(["--config", str(config), "--out", str(tmp_path / "a"), "--variants", "paper,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert ablate.main(["--config", str(config), "--out", str(tmp_path / "b"), "grpo.stepz=3"]) == 2
    assert "grpo.stepz" in capsys.readouterr().err
    assert ablate.main(["--config", str(config), "--out", str(tmp_path / "c"), "nosuch:grpo.steps=3"]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing was trained


# ----------------------------------------------------------------------------------------------------------
# convergence
# ----------------------------------------------------------------------------------------------------------
def fake_self_traces(cfg, examples, out):
    """A stand-in teacher (a random model never writes the format): well-formed answers for every example."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for ex in examples:
            answer = ("<analyze user>\nlikes rock\n</analyze user>\n<analyze item>\n[pos] rock\n</analyze item>\n"
                      f"<match>\nfits\n</match>\n<rate> {ex['rating']:g} </rate>")
            f.write(json.dumps({"example_id": f"{ex['user_id']}|{ex['item_id']}|{ex['timestamp']}", "prompt": None,
                                "completion": answer, "label": ex["rating"], "kept": True, "stage": "first",
                                "reason": "ok", "source": "test"}) + "\n")
    return {"kept": len(examples)}


@pytest.fixture(scope="module")
def converged(music, runs_root):
    """Both recipes trained by the command: RecOne 2 steps, RecZero's config says 1 step (it must get 2)."""
    # 64 new tokens: the stand-in traces must fit the sampling budget, or RecOne leaves them out of SFT
    sampling = {"temperature": 1.0, "max_new_tokens": 64, "stop_strings": ["</rate>"]}
    reczero = write_config(runs_root.parent / "reczero_tiny.yaml", music, grpo={"steps": 1}, sampling=sampling)
    recone = write_config(runs_root.parent / "recone_tiny.yaml", music, grpo={"steps": 2}, sampling=sampling,
                          coldstart={"n_examples": 6, "samples_per_example": 2, "batch_examples": 3},
                          sft={"epochs": 1, "batch_size": 2, "micro_batch_size": 2, "lr": 1e-3})
    out = runs_root / "convergence"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(coldstart, "self_traces", fake_self_traces)
        rc = convergence.main(["--reczero-config", str(reczero), "--recone-config", str(recone), "--out", str(out)])
    return {"rc": rc, "out": out, "reczero_config": reczero, "recone_config": recone}


def test_convergence_trains_both_recipes_with_one_budget(converged):
    out = converged["out"]
    assert converged["rc"] == 0
    zero, one = load_run(out / "reczero"), load_run(out / "recone" / "grpo")
    assert zero.config["grpo"]["steps"] == one.config["grpo"]["steps"] == 2
    assert (out / "recone" / "sft" / "eval.json").exists() and (out / "recone" / "stages.json").exists()
    rows = read_csv(out / "convergence.csv")
    for recipe, run in (("RecZero", zero), ("RecOne", one)):
        mine = [r for r in rows if r["recipe"] == recipe]
        assert [int(r["step"]) for r in mine] == [0, 1, 2]
        evals = {r["step"]: r for r in run.eval_rows()}
        assert sorted(evals) == [0, 2]
        for r in mine:
            step = int(r["step"])
            if step in evals:
                assert float(r["eval_mae"]) == pytest.approx(evals[step]["eval/mae"])
                assert float(r["eval_format_rate"]) == pytest.approx(1 - evals[step]["eval/format_fail"])
            else:
                assert r["eval_mae"] == ""
            if step > 0:
                train = next(t for t in run.train_rows() if t["step"] == step)
                assert float(r["train_reward"]) == pytest.approx(train["reward/mean"])
    md = (out / "convergence.md").read_text()
    assert "RecZero: grpo.steps 1 -> 2 (as RecOne)" in md
    assert "| grpo.steps | 2 | 2 |" in md
    assert "| RecZero | 2 | 2 | " in md and "| RecOne | 2 | 2 | " in md
    if has_matplotlib():
        assert (out / "convergence.png").read_bytes()[:4] == b"\x89PNG"


def test_convergence_reuses_finished_runs_and_refuses_unequal_budgets(converged, music, tmp_path, monkeypatch,
                                                                      capsys):
    out = converged["out"]

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(convergence, "run_experiment", must_not_train)
    monkeypatch.setattr(convergence, "run_recone", must_not_train)
    again = tmp_path / "again"
    assert convergence.main(["--reczero", str(out / "reczero"), "--recone", str(out / "recone"),
                             "--out", str(again)]) == 0
    assert read_csv(again / "convergence.csv") == read_csv(out / "convergence.csv")
    # Rerunning into the same --out finds both finished runs there.
    assert convergence.main(["--reczero-config", str(converged["reczero_config"]), "--recone-config",
                             str(converged["recone_config"]), "--out", str(out)]) == 0

    # A RecZero run of another length is refused, unless asked for.
    from experiments.train import main as train_main

    short = write_config(tmp_path / "short.yaml", music)
    assert train_main(["--config", str(short), f"run.output_dir={tmp_path / 'short'}", "run.eval_examples=1"]) == 0
    monkeypatch.undo()
    capsys.readouterr()
    assert convergence.main(["--reczero", str(tmp_path / "short"), "--recone", str(out / "recone"),
                             "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "grpo.steps: 1 -> 2" in err and not (tmp_path / "x").exists()
    assert convergence.main(["--reczero", str(tmp_path / "short"), "--recone", str(out / "recone"),
                             "--out", str(tmp_path / "x"), "--allow-mismatch"]) == 0
    md = (tmp_path / "x" / "convergence.md").read_text()
    assert "warning: the GRPO budgets differ: grpo.steps: 1 -> 2" in md
    assert "run.eval_examples: 1 -> 2" in md


def test_convergence_plan_gives_a_missing_recipe_the_others_budget(converged):
    out = converged["out"]
    args = Namespace(reczero=str(out / "reczero"), recone=None, reczero_config=None,
                     recone_config=str(converged["recone_config"]), overrides=["recone:sft.epochs=3"])
    existing, to_train, notes = convergence.plan(args, out.parent / "elsewhere")
    assert set(existing) == {"reczero"} and set(to_train) == {"recone"}
    assert to_train["recone"]["grpo"]["steps"] == 2 and to_train["recone"]["sft"]["epochs"] == 3
    assert to_train["recone"]["run"]["output_dir"] == str(out.parent / "elsewhere" / "recone")
    args.overrides = ["recone:grpo.group_size=4"]  # a scoped override may break the budget: refused
    _, to_train, _ = convergence.plan(args, out.parent / "elsewhere")
    with pytest.raises(convergence.Refused, match="grpo.group_size: 2 -> 4"):
        convergence.check_budgets({"reczero": existing["reczero"].config, "recone": to_train["recone"]}, False)


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------
def test_report_collects_runs_baselines_and_evaluations(ablation, converged, music, runs_root, tmp_path):
    from experiments.baselines import run_baselines
    from experiments.evaluate import main as evaluate_main

    baselines = run_baselines(music)
    zero = runs_root / "convergence" / "reczero"
    assert evaluate_main(["--model", str(zero / "checkpoints" / "step_2"), "--data", str(music), "--limit", "2",
                          "--out", str(runs_root / "eval_reczero.json")]) == 0
    record = read_json(runs_root / "eval_reczero.json")
    (model_key, m), = record["models"].items()
    worst_mae, worst_rmse = worst_mae_rmse(music, 2, "test")
    assert m["format_fail"] == 1.0 and m["mae"] == pytest.approx(worst_mae) and m["rmse"] == pytest.approx(worst_rmse)
    assert m["mae_lo"] <= m["mae"] <= m["mae_hi"] and m["rmse_lo"] <= m["rmse"] <= m["rmse_hi"]
    assert m["mae_fallback"] <= m["mae"] and 0.0 <= m["copy_rate"] <= 1.0 and m["ci_level"] == 0.95
    assert set(m["vs_baselines"]) == set(baselines) == set(record["baselines_same_rows"])
    for name, d in m["vs_baselines"].items():
        assert d["mae_diff"] == pytest.approx(m["mae"] - record["baselines_same_rows"][name]["mae"])
        assert d["mae_diff_lo"] <= d["mae_diff"] <= d["mae_diff_hi"] and d["rmse_diff_lo"] <= d["rmse_diff_hi"]
        assert d["mae_verdict"] in ("better", "worse", "not distinguishable") and "rmse_verdict" in d
        assert d["mae_verdict"] != "better"  # failing every row never beats a baseline
    for r in record["predictions"][model_key]:
        assert {"scored_as", "copy_share", "copied_from"} <= set(r) and abs(r["scored_as"] - r["label"]) >= 2
    out = tmp_path / "report"
    assert report_main(["--runs", str(runs_root), "--data", str(music), "--out", str(out)]) == 0
    rows = read_csv(out / "results.csv")
    by_name = {(r["kind"], r["name"]): r for r in rows}
    assert {r["dataset"] for r in rows} == {music.name}

    base = [r for r in rows if r["kind"] == "baseline"]
    assert {r["name"]: float(r["mae"]) for r in base} == pytest.approx({k: v["mae"] for k, v in baselines.items()})
    assert all(r["split"] == "test" and int(r["n"]) == 4 for r in base)

    reczero = by_name[("RecZero", "convergence/reczero")]
    run = load_run(zero)
    assert float(reczero["mae"]) == pytest.approx(run.final["eval/mae"])
    assert float(reczero["train_s"]) == pytest.approx(run.record["wall_s"])
    assert reczero["train_time_source"] == "run.json"
    assert reczero["command"] == run.record["command"] and reczero["split"] == "val" and int(reczero["n"]) == 2
    assert float(reczero["paper_mae"]) == 0.5419
    recone = by_name[("RecOne", "convergence/recone/grpo")]
    assert float(recone["paper_mae"]) == pytest.approx(0.3815) and recone["paper_note"].startswith("derived")
    assert "SFT + GRPO" in recone["train_time_source"]
    assert float(by_name[("RecOne SFT only", "convergence/recone/sft")]["paper_mae"]) == 0.6472

    ablations = {r["name"] for r in rows if r["kind"] == "ablation"}
    done = {f"ablate/{n}" for n in ablate.DEFAULT_VARIANTS
            if read_json(runs_root / "ablate" / n / "variant.json").get("status") == "done"}
    assert ablations == done and len(done) >= 6

    mae, _ = worst_mae_rmse(music, 2)
    untrained = [r for r in rows if r["kind"] == "untrained"]
    assert untrained and all(float(r["mae"]) == pytest.approx(mae) for r in untrained)
    templates = {r["name"].split("template ")[1].split(" ")[0] for r in untrained}
    assert templates == {"tbr", "answer_only", "single_think"}  # one per prompt setting, not one per run

    evaluated = [r for r in rows if "(experiments.evaluate)" in r["name"]]
    assert len(evaluated) == 1 and evaluated[0]["kind"] == "RecZero" and evaluated[0]["split"] == "test"
    assert evaluated[0]["vs_baselines_mae"].count(":") == len(baselines)
    assert float(evaluated[0]["mae_lo"]) == pytest.approx(m["mae_lo"]) and evaluated[0]["vs_baselines_rmse"]
    assert evaluated[0]["command"].startswith("python -m experiments.evaluate --model")
    assert len([r for r in rows if r["kind"] == "baseline (same rows)"]) == len(baselines)
    published = by_name[("published", "Reason4Rec (paper's strongest baseline)")]
    assert float(published["paper_mae"]) == 0.5442

    md = (out / "results.md").read_text()
    assert f"## {music.name}" in md and "| RecZero | convergence/reczero | val | 2 | " in md
    assert md.index("| baseline |") < md.index("| RecZero |") < md.index("| ablation |")
    assert f"| [{m['mae_lo']:.4f}, {m['mae_hi']:.4f}] |" in md and "MAE vs baselines (paired)" in md
