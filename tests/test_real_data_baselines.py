"""On the real Amazon music sample: the prepared data and the baselines behave as the issue expects."""
import json

from experiments.baselines import main as baselines_main
from recdata.prepare import main as prepare_main


def test_music_sample_baselines(tmp_path, data_dir, capsys):
    out = tmp_path / "music"
    assert prepare_main(["--dataset", "amazon-music", "--raw-dir", str(data_dir / "amazon-music-2014-sample"),
                         "--out", str(out), "--quiet"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["splits"]["train"]["count"] > 1000 and stats["splits"]["test"]["count"] > 100
    assert baselines_main(["--data", str(out)]) == 0
    table = capsys.readouterr().out
    results = json.loads((out / "baselines.json").read_text())
    assert set(results) == {"global_mean", "global_median", "user_mean", "item_mean", "user_item_bias", "mf"}
    assert all(name in table for name in results)
    # matrix factorisation beats the RMSE-optimal constant on both metrics
    assert results["mf"]["rmse"] < results["global_mean"]["rmse"]
    assert results["mf"]["mae"] < results["global_mean"]["mae"]
    # ratings are skewed to 5: the MAE-optimal constant ("always 5") wins on MAE, as the issue predicts
    assert results["global_median"]["mae"] < results["mf"]["mae"]
