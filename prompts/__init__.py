"""prompts: the recommendation task's text side -- prompt templates, the completion parser, rule-based rewards.

Pure functions of text and an example dict (no torch): `render_prompt` turns an example into a chat prompt,
`parse_completion` checks a completion's format and reads its rating, `REWARDS[name](completion, example)`
scores it. See docs/paper.md ("Output structure", "Reward") for the rules implemented here.
"""
from prompts.parse import ParseResult, parse_completion, parse_rating, well_formed_sections
from prompts.rewards import REWARDS, reward_range
from prompts.templates import (TEMPLATES, PromptTemplate, RenderedPrompt, build_messages, get_template,
                               rating_scale, render_prompt, render_prompt_info, shown_example)

__all__ = [
    "parse_completion", "ParseResult", "render_prompt", "build_messages", "REWARDS", "TEMPLATES",
    "parse_rating", "well_formed_sections", "reward_range", "PromptTemplate", "RenderedPrompt", "get_template",
    "rating_scale", "render_prompt_info", "shown_example",
]
