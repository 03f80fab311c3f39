"""The toy world's caption grammar: ``a {colour} {shape} {motion} on a {background} background``.

e.g. ``a red circle drifting left on a dark background``. :func:`parse_caption` reads a caption back
into attributes (case and extra spaces ignored); :data:`VOCABULARY` lists every word a caption can use.
"""
from __future__ import annotations

from .world import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, _check

TEMPLATE = "a {colour} {shape} {motion} on a {background} background"


def make_caption(shape: str, colour: str, motion: str, background: str) -> str:
    _check("shape", shape, SHAPES)
    _check("colour", colour, tuple(COLOURS))
    _check("motion", motion, MOTIONS)
    _check("background", background, tuple(BACKGROUNDS))
    return TEMPLATE.format(colour=colour, shape=shape, motion=motion, background=background)


def _vocabulary() -> tuple[str, ...]:
    words: list[str] = []
    for w in ("a " + " ".join(COLOURS) + " " + " ".join(SHAPES) + " " + " ".join(MOTIONS)
              + " on " + " ".join(BACKGROUNDS) + " background").split():
        if w not in words:
            words.append(w)
    return tuple(words)


VOCABULARY = _vocabulary()
"""Every word of the grammar, in a fixed order (17 words)."""


def parse_caption(text: str) -> dict:
    """Caption -> {"shape", "colour", "motion", "background"}; ValueError naming the allowed words."""
    if not isinstance(text, str):
        raise ValueError(f"a caption must be a string, got {type(text).__name__}")
    words = text.lower().split()
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        raise ValueError(f"caption {text!r} has unknown word(s) {unknown}; allowed words: {', '.join(VOCABULARY)}")
    bad = (f"caption {text!r} does not follow the grammar {TEMPLATE!r}; colours: {', '.join(COLOURS)}; "
           f"shapes: {', '.join(SHAPES)}; motions: {', '.join(MOTIONS)}; backgrounds: {', '.join(BACKGROUNDS)}")
    if len(words) < 8 or words[0] != "a":
        raise ValueError(bad)
    try:
        colour, shape = words[1], words[2]
        rest = words[3:]
        on = rest.index("on")
        motion = " ".join(rest[:on])
        tail = rest[on:]
    except (IndexError, ValueError):
        raise ValueError(bad) from None
    if (colour not in COLOURS or shape not in SHAPES or motion not in MOTIONS or len(tail) != 4
            or tail[0] != "on" or tail[1] != "a" or tail[2] not in BACKGROUNDS or tail[3] != "background"):
        raise ValueError(bad)
    return {"shape": shape, "colour": colour, "motion": motion, "background": tail[2]}


def all_captions() -> list[str]:
    """The 96 captions of the grammar, in the order of :func:`rolling.toy.world.all_attributes`."""
    from .world import all_attributes
    return [make_caption(**a) for a in all_attributes()]
