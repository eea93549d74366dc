"""The fast decoder: the plain sampler's results (grpo/sampler.py) for less time (`sampling.decoder: fast`)."""
from grpo.fast.sampler import sample  # noqa: F401
