"""Prompt-schedule nodes: timed segments for the Rolling Forcing Sampler's ``positive`` input.

* ``RollingForcingPromptSegment``: one CONDITIONING from a start time, chained segment by segment.
* ``RollingForcingPromptStory``: CLIP + multi-line text (``0:00 a quiet street`` / ``0:20 rain``),
  one prompt per line, or the timed syntax ``a quiet street[20s] | rain starts[25s#]`` (durations,
  ``#`` = hard cut), each prompt encoded with the connected text encoder.
"""
from __future__ import annotations

from ..rolling.prompts import APPLIES, MAX_BLEND_SECONDS, RECACHE, TRANSITIONS, parse_story
from . import comfy_adapter as comfy
from .names import CATEGORY
from .run_inputs import conditioning_tensor
from .prompt_logic import PROMPTS_TYPE, PromptList, TimedPrompt, check_options, parse_time, story_segments

io = comfy.io
RollingForcingPrompts = io.Custom(PROMPTS_TYPE)

_TRANSITION_TIP = ("How the prompt takes over: cut = from its first block on; blend = the text moves from the "
                   "previous prompt to this one block by block over blend_seconds.")
_RECACHE_TIP = ("At the switch, re-encode the recent cached frames under the new prompt (LongLive's KV re-cache): "
                "none; keep_sink = same scene, new action (the sink keeps its keys); new_sink = the oldest "
                "re-encoded frames become the sink (LongLive global_sink off); reanchor = scene change: like "
                "keep_sink, then the new segment's first block becomes the sink.")
_APPLIES_TIP = ("Which blocks the new prompt conditions: entering = only blocks from the switch time on (each block "
                "keeps the prompt it started under); window = from the switch on, every block still being denoised "
                "(LongLive-style: the whole window turns at once, the switch shows up to 3 s earlier).")


def _check(parse, value, transition, blend_seconds, recache, applies) -> None:
    """Both nodes' ``validate_inputs``: ``parse(value)`` (start or story text) and the transition options,
    each where its values are known (not linked)."""
    if value is not None:
        parse(value)
    if transition is not None and recache is not None and blend_seconds is not None:
        check_options(transition, blend_seconds, recache, applies)


def _options():
    return [
        io.Combo.Input("transition", options=list(TRANSITIONS), default="cut", tooltip=_TRANSITION_TIP),
        io.Float.Input("blend_seconds", default=2.0, min=0.0, max=MAX_BLEND_SECONDS, step=0.25,
                       tooltip="Length of a blend in seconds (rounded to whole 0.75 s blocks); ignored for cut."),
        io.Combo.Input("recache", options=list(RECACHE), default="none", tooltip=_RECACHE_TIP),
        io.Combo.Input("applies", options=list(APPLIES), default="entering", optional=True, tooltip=_APPLIES_TIP),
    ]


class RollingForcingPromptSegment(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RollingForcingPromptSegment",
            display_name="Rolling Forcing Prompt Segment",
            category=f"{CATEGORY}/prompts",
            description=("One timed prompt of a story: this CONDITIONING applies from `start` until the next "
                         "segment. Chain segments through `previous` (the first must start at 0:00) and connect "
                         "the last one to the sampler's positive input. Starts snap to the nearest block "
                         "boundary (every 0.75 s); the sampler's info output shows where each one landed."),
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The prompt (CLIPTextEncode with a CLIPLoader of type wan)."),
                io.String.Input("start", default="0:00",
                                tooltip="When this prompt starts: seconds (20, 20.5), m:ss (0:20) or h:mm:ss "
                                        "(1:00:00)."),
                *_options(),
                io.String.Input("label", default="", optional=True,
                                tooltip="Name shown in progress and info (default: the segment number)."),
                RollingForcingPrompts.Input("previous", optional=True,
                                            tooltip="The segments before this one (from another Prompt Segment or "
                                                    "Prompt Story)."),
            ],
            outputs=[RollingForcingPrompts.Output(display_name="prompts",
                                                  tooltip="The schedule so far; connect to the sampler's positive "
                                                          "input or to the next segment.")],
        )

    @classmethod
    def validate_inputs(cls, start=None, transition=None, blend_seconds=None, recache=None, applies="entering", **_):
        return comfy.validation(_check, parse_time, start, transition, blend_seconds, recache, applies)

    @classmethod
    def execute(cls, conditioning, start, transition, blend_seconds, recache, label="", previous=None,
                applies="entering") -> io.NodeOutput:
        check_options(transition, blend_seconds, recache, applies)
        prev = previous or PromptList()
        n = len(prev.segments) + 1
        seg = TimedPrompt(parse_time(start), conditioning_tensor(conditioning), label or f"segment {n}",
                          transition, blend_seconds, recache, f"segment {n} ({label or start})", applies)
        return io.NodeOutput(prev.add(seg))


class RollingForcingPromptStory(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RollingForcingPromptStory",
            display_name="Rolling Forcing Prompt Story",
            category=f"{CATEGORY}/prompts",
            description=("A whole story as text, one prompt per line, each starting with its time: "
                         "'0:00 a quiet street at dusk' / '0:20 rain starts, neon reflections' (seconds, m:ss or "
                         "h:mm:ss; lines starting with # are comments). Or the timed syntax of other tools: "
                         "'a quiet street[20s] | rain starts[25s#]', each prompt ending in its duration, so "
                         "durations add up to the start times; # in the brackets is a hard cut into that prompt "
                         "(a cut even when transition is blend). Each prompt is encoded with the connected text "
                         "encoder (CLIPLoader type wan). Times beyond the video's end are dropped with a warning."),
            inputs=[
                io.Clip.Input("clip", tooltip="umT5-XXL text encoder from CLIPLoader with type wan."),
                io.String.Input("text", multiline=True,
                                default="0:00 a quiet street at dusk, warm lamps, light traffic\n"
                                        "0:20 rain starts, neon reflections on the wet asphalt\n"
                                        "0:45 the camera rises above the rooftops",
                                tooltip="One prompt per line: TIME PROMPT, times increasing, the first at 0:00; "
                                        "or 'prompt[5s] | prompt[10s#]' (durations; # = hard cut)."),
                *_options(),
            ],
            outputs=[RollingForcingPrompts.Output(display_name="prompts",
                                                  tooltip="The schedule; connect to the sampler's positive input.")],
        )

    @classmethod
    def validate_inputs(cls, text=None, transition=None, blend_seconds=None, recache=None, applies="entering", **_):
        return comfy.validation(_check, parse_story, text, transition, blend_seconds, recache, applies)

    @classmethod
    def execute(cls, clip, text, transition, blend_seconds, recache, applies="entering") -> io.NodeOutput:
        if clip is None:
            raise ValueError("no text encoder connected: use CLIPLoader with type wan (umT5-XXL)")

        def encode(prompt: str):
            return conditioning_tensor(clip.encode_from_tokens_scheduled(clip.tokenize(prompt)))
        return io.NodeOutput(story_segments(text, encode, transition=transition, blend_s=blend_seconds,
                                            recache=recache, applies=applies))
