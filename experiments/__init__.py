"""experiments: runnable entry points (training runs, baselines) built on grpo, recdata and prompts."""
