"""Which phrases of a caption to ground: the caption's nouns, or the caption itself.

The authors' route (Grounded-SAM's automatic labelling) tags the caption with a part-of-speech tagger
and grounds its nouns. A tagger needs model data that cannot ship with this package, so nouns come
from a small rule set tuned to BLIP-2's short, literal captions: drop function words, verbs' -ing and
-ed forms, numbers, colours and common adjectives, and keep what is left, in caption order, each once.
Wrong guesses are cheap: a phrase the detector cannot find yields no box, and the object filters drop
names the caption does not contain. Pass any `Callable[[str], list[str]]` to replace the rules.
"""

from __future__ import annotations

import re

_STOPWORDS = frozenset(
    """
    a an the this that these those some any each every no another other such both either neither
    and or but nor so yet of in on at to for from by with without into onto over under above below
    behind beside besides between among through across along around near next inside outside up down
    off out about against upon within beneath toward towards than then there here where when while
    as like is are was were be been being am has have had having do does did it its it's they them
    their he him his she her hers we us our you your i me my one two three four five six seven eight
    nine ten several many few lots lot very too also just only top front back side left right middle
    image picture photo photograph view close closeup shot background foreground scene there's who
    which what what's very sitting standing lying laying holding wearing looking walking
    """.split()
)
_ADJECTIVES = frozenset(
    """
    red orange yellow green blue purple pink brown black white gray grey silver gold golden dark light
    bright colorful colourful big small large little tiny huge old new young tall short long wooden
    metal plastic glass empty full open closed single pair group couple different same beautiful
    """.split()
)
# nouns that look like verb forms
_NOUNS_LIKE_VERBS = frozenset(
    """
    building buildings ceiling painting paintings clothing string railing awning pudding wedding
    king ring wing swing spring sling thing things bed shed sled seed weed reed sheet
    """.split()
)
_WORD = re.compile(r"[a-z][a-z'-]*")


def caption_nouns(caption: str) -> list[str]:
    """Candidate object nouns of `caption`, lower-case, in order, without repeats.

    "a cat sitting on a couch next to a red jacket" -> ["cat", "couch", "jacket"]
    """
    nouns: list[str] = []
    for word in _WORD.findall(caption.lower()):
        word = word.strip("'-")
        if len(word) < 2 or word in _STOPWORDS or word in _ADJECTIVES:
            continue
        if (word.endswith("ing") or word.endswith("ed")) and word not in _NOUNS_LIKE_VERBS:
            continue  # verb forms in BLIP's captions ("sitting", "parked")
        if word not in nouns:
            nouns.append(word)
    return nouns


def grounding_text(phrases: list[str]) -> str:
    """Grounding DINO's expected prompt: lower-case phrases, each ended by a period ("cat. couch.")."""
    cleaned = [p.strip().lower().rstrip(".") for p in phrases if p.strip()]
    return " ".join(f"{p}." for p in cleaned)
