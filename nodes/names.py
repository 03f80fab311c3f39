"""Names the pack shows ComfyUI: the menu category and the pack's own socket types."""

CATEGORY = "RollingForcing"
CACHE_TYPE = "ROLLING_FORCING_CACHE"  # a RollingConfig (cache settings; the sampler sets the steps)
PROMPTS_TYPE = "ROLLING_FORCING_PROMPTS"  # a PromptList (timed prompts)
