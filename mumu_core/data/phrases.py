"""Model-free noun-phrase chunker for captions.

No spaCy / NLTK model can be downloaded here, so phrases come from a small rule-based chunker
(documented in docs/DATA.md, "Noun phrases"):

1. Split the caption into word tokens (keeping character spans) and punctuation.
2. Function words (determiners, numbers, pronouns, prepositions, conjunctions, auxiliaries,
   common verbs, adverbs) and punctuation are boundaries; a possessive ``'s`` ends a phrase.
3. A maximal run of the remaining words is a candidate phrase. Inside a run, a verb-like word
   (a listed verb, or a word of 5+ letters ending in ``-ing`` / ``-ed`` that is not a listed noun)
   starts a new run, except right after a determiner ("a running dog" keeps "running dog").
4. The phrase is kept when its last word (the head) is not a known adjective ("is red" gives
   nothing). Determiners are not part of the phrase, so the crop goes between "a" and "man":
   "a <image> man".

Callers that know better (a tagger run elsewhere, synthetic scenes) pass their own phrases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DETERMINERS = set(
    """a an the this that these those his her its their our my your some any each every another
    no both either neither several many few one two three four five six seven eight nine ten
    eleven twelve dozen couple pair group bunch lot lots of""".split()
)
_STOP = set(
    """i you he she it we they me him them us myself himself herself itself themselves who whom
    whose which what where when why how there here and or but nor so yet as at by for from in into
    on onto off out over under up down upon with within without about above below across after
    against along among around before behind beneath beside besides between beyond during except
    inside near next outside past since through throughout till to toward towards until via than
    is are was were be been being am do does did done has have had having can could may might
    must shall should will would not very too also just only while then near front top bottom side
    left right middle center centre back together alone image photo picture shot view closeup
    close-up""".split()
)
_VERBS = set(
    """sits sit sat stands stand stood lies lie lay holds hold held looks look watches watch
    walks walk runs run rides ride eats eat drinks drink plays play wears wear carries carry
    throws throw catches catch flies fly swims swim jumps jump leans lean rests rest waits wait
    smiles smile poses pose shows show covered filled made parked topped dressed seen shown
    using uses use makes make takes take gets get goes go comes come talks talk reads read
    hangs hang hung grazes graze""".split()
)
# -ing / -ed nouns that the verb heuristic would otherwise cut.
_ING_ED_NOUNS = set(
    """building buildings ceiling painting paintings clothing evening morning wedding pudding
    icing railing railings awning frosting sibling siblings dumpling dumplings ring rings king
    thing things string strings wing wings swing swings sling earring earrings stuffing topping
    toppings bedding stocking stockings sled bed shed seed speed steed breed reed weed
    sled""".split()
)
_ADJECTIVES = set(
    """red orange yellow green blue purple pink brown black white gray grey silver golden gold
    dark light bright big small large little tiny huge giant tall short long old young new
    happy sad cute beautiful pretty nice good bad hot cold wet dry clean dirty empty full open
    closed wooden metal plastic glass colorful colourful sunny cloudy snowy busy quiet
    several various other same different many""".split()
)

PERSON_WORDS = frozenset(
    """man men woman women person people boy boys girl girls child children kid kids baby babies
    guy guys lady ladies gentleman gentlemen teenager teenagers teen toddler toddlers infant
    bride groom player players skier skiers surfer surfers skateboarder snowboarder rider riders
    batter catcher pitcher umpire student students teacher athlete athletes dancer dancers
    singer musician guitarist drummer actor actress model father mother dad mom son daughter
    brother sister husband wife friend friends grandmother grandfather grandma grandpa
    boyfriend girlfriend policeman policewoman fireman firefighter businessman businesswoman
    cowboy nurse doctor chef cook waiter waitress runner cyclist biker climber swimmer hiker
    fisherman farmer officer soldier customer tourist pedestrian passenger driver pilot artist
    worker workers spectator spectators crowd""".split()
) - {"crowd"}  # a crowd has many heads: one head crop would be wrong

_TOKEN = re.compile(r"[A-Za-z][A-Za-z\-]*(?:'s|')?|\d+(?:[.,]\d+)?|[^\sA-Za-z\d]")


@dataclass(frozen=True)
class Phrase:
    """A caption phrase and its character span ``caption[span[0]:span[1]] == text``."""

    text: str
    span: tuple[int, int]


def _verb_like(word: str) -> bool:
    w = word.lower()
    if w in _ING_ED_NOUNS:
        return False
    if w in _VERBS:
        return True
    return len(w) >= 5 and (w.endswith("ing") or w.endswith("ed"))


def extract_phrases(caption: str) -> list[Phrase]:
    """Noun phrases of ``caption`` in caption order, each with its character span (see module doc)."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    runs: list[list[tuple[str, int, int]]] = []
    run: list[tuple[str, int, int]] = []
    after_det = False

    def close() -> None:
        nonlocal run
        if run:
            runs.append(run)
        run = []

    for m in _TOKEN.finditer(caption):
        tok, s, e = m.group(0), m.start(), m.end()
        low = tok.lower()
        if not tok[0].isalpha():
            close()
            after_det = tok[0].isdigit()  # "2 dogs": a number works like a determiner
            continue
        possessive = low.endswith("'s") or low.endswith("'")
        if possessive:
            tok = tok[:-2] if low.endswith("'s") else tok[:-1]
            e = s + len(tok)
            low = tok.lower()
        if low in _DETERMINERS:
            close()
            after_det = True
            continue
        if low in _STOP:
            close()
            after_det = False
            continue
        if _verb_like(low) and not (after_det and not run):
            close()
            after_det = False
            continue
        run.append((tok, s, e))
        after_det = False
        if possessive:
            # "the man's dog": "man" is one phrase, "dog" the next.
            close()
            after_det = True
    close()

    phrases = []
    for r in runs:
        # Trailing adjectives carry no object ("the sky is blue" -> "sky" only).
        while r and r[-1][0].lower() in _ADJECTIVES:
            r = r[:-1]
        if not r:
            continue
        s, e = r[0][1], r[-1][2]
        phrases.append(Phrase(caption[s:e], (s, e)))
    return phrases


def phrases_from_strings(caption: str, words: list[str]) -> list[Phrase]:
    """Caller-supplied phrases: find each string in ``caption`` (left to right, case-insensitive).

    Raises ValueError naming the phrase when it does not occur after the previous one, so a typo
    never turns into a silently missing object.
    """
    out, pos, low = [], 0, caption.lower()
    for w in words:
        i = low.find(w.lower(), pos)
        if i < 0:
            raise ValueError(f"phrase {w!r} not found in caption {caption!r} after position {pos}")
        out.append(Phrase(caption[i : i + len(w)], (i, i + len(w))))
        pos = i + len(w)
    return out


def is_person_phrase(phrase: str) -> bool:
    """True when the phrase's head noun (last word) names a single person ("young man", "skier")."""
    words = re.findall(r"[a-z]+", phrase.lower())
    return bool(words) and words[-1] in PERSON_WORDS
