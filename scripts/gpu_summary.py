"""The figures of a GPU check, as one block (used by scripts/gpu_check*.sh; computed from the bench JSON files,
so a stage cut short still reports what it measured).

    python scripts/gpu_summary.py OUT_FOLDER [--previous docs/bench/check2]

--previous: an earlier check's folder, whose figures are printed beside this one's (both on the machines their
env.txt names: compare them only where that is the same kind)."""
import argparse
import json
from pathlib import Path


def load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def tokens_per_s(report: dict) -> dict:
    return {k: v.get("tokens_per_s", v.get("status")) for k, v in report.get("sampler", {}).items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--previous", default=None)
    args = parser.parse_args()
    for name in ("gpu-small", "gpu-7b"):
        r = load(Path(args.out), name)
        if r is None:
            print(f"{name}: no results")
            continue
        gpu = r.get("machine", {}).get("gpu", "?")
        s = r.get("sampler", {})
        print(f"{name} on {gpu}: tokens/s {tokens_per_s(r)}")
        before = load(Path(args.previous), name) if args.previous else None
        if before is not None:
            print(f"  previous check ({args.previous}, {before.get('machine', {}).get('gpu', '?')}): "
                  f"{tokens_per_s(before)}")
        ours = s.get("ours", {}).get("tokens_per_s")
        hf = {k: v["tokens_per_s"] for k, v in s.items() if k.startswith("hf_") and v.get("status") in ("ok", "recorded")}
        if ours and hf:
            best = max(hf, key=hf.get)
            note = "" if "recorded" not in best or "H200" in gpu else "  (CAUTION: recorded on an H200, this run is not)"
            print(f"  ratio: ours {ours:,.0f} / {best} {hf[best]:,.0f} = {ours / hf[best]:.2f}x "
                  f"(target >= {r['settings'].get('target_ratio', 3):g}x){note}")
        lc = r.get("logprob_check")
        if lc:
            print(f"  log-probs: ours vs training max {lc['max_abs_diff']:.3g}; HF cached vs training max "
                  f"{lc.get('hf_cached_max_abs_diff', float('nan')):.3g}; ours vs HF cached max "
                  f"{lc.get('ours_vs_hf_cached_max_abs_diff', float('nan')):.3g}; threshold {lc['threshold']:.3g} "
                  f"({lc['rule']}): {'ok' if lc['within_tolerance'] else 'EXCEEDED'}")
        p = r.get("decode_probe")
        if p:
            att = p.get("attention", {})
            times = {k: v.get("ms_per_step", v.get("error")) for k, v in att.items()
                     if isinstance(v, dict) and k != "shape"}
            fastest = min(s.get("ours", {}).get("seconds") or [float("nan")])
            print(f"  decode step alone: {p.get('step_ms')} ms ({'graph' if p.get('graphs') else 'eager'}, grid cache "
                  f"{p.get('grid_cache')}, stacked weights {p.get('stacked_weights')}); sampler step: "
                  f"{1000 * fastest / r['settings']['new_tokens']:.2f} ms (fastest run, prefill and capture "
                  f"included); read/step {p.get('gib_read_per_step')}; {p.get('error', '')}")
            print(f"  attention, all layers, ms/step: {times}; SDPA picks {att.get('sdpa_picks')}")
        sp = r.get("step_profile")
        if sp:
            print(f"  eager step by kernel kind, ms: {sp.get('ms_per_step')}, {sp.get('kernels_per_step')} kernels "
                  f"(grid {sp.get('grid_cache')}, stacked {sp.get('stacked_weights')}, fused {sp.get('fused_ops')}) "
                  f"{sp.get('error', '')}")
            for k in sp.get("top", [])[:8]:
                print(f"    {k['ms_per_step']:.3f} ms  x{k['calls_per_step']:g}  {k['name']}")
        t = r.get("train", {})
        for k in ("measures_on", "measures_off"):
            if k in t:
                print(f"  update {k}: {t[k].get('tokens_per_s', t[k].get('status'))} tokens/s, "
                      f"peak {t[k].get('peak_gib')} GiB")


if __name__ == "__main__":
    main()
