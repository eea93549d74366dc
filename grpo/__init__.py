"""grpo: a from-scratch GRPO engine in pure PyTorch.

It knows nothing about recommendation: it takes prompts and a reward function (see `grpo.task.Task`).
"""
