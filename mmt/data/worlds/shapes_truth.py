"""Truth of captions about shapes scenes: parse a caption (a model's, maybe malformed) into
facts and check each against the scene graph, with the definitions of mmt.data.worlds.shapes.

Reading. The caption is lower-cased and split into words ([a-z0-9]+; everything else separates
words). A noun phrase is [a | an | the] [number] {size | colour | superlative}* noun, where a
number is one..six or 1..6 and a noun is a shape, singular or plural, or object(s) / shape(s) /
thing(s) for any shape. Any other word ends a phrase in progress: "red red the is" and
"a red and" state nothing; words the grammar does not know are otherwise ignored, and nothing
a caption says makes the parser raise.

Facts, each true or false of a scene:
- object: a phrase without a number ("a small red circle", "the circle") is true iff some object
  fits it. A phrase naming two sizes, colours or shapes ("a red blue circle") fits nothing.
- count: a phrase with a number ("two circles", "three objects", "one large square") is true iff
  exactly that many objects fit it.
- relation: phrase [is | are] (left of | right of | above | below | next to) phrase. True iff
  some object fitting the first phrase stands in that relation to another object fitting the
  second: "a circle is left of a square" holds when any circle is left of any square. (Its two
  phrases are also stated as object or count facts of their own.)
- superlative: "the largest|smallest|leftmost|rightmost [attributes] object is" phrase, or
  phrase "is the largest ... object". Among the objects that fit the superlative phrase's own
  attributes (at least two), the one larger than / smaller than / left of / right of all the
  others must exist and fit the phrase.

Mentions, for recall: an object counts as mentioned by a true object fact that fits it alone,
or by a true count fact that fits it, when that fact's phrase names a colour or a shape ("three
objects" and "two large objects" mention nobody).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

from mmt.data.worlds.shapes import COLOURS, NUMBERS, SHAPES, SIZES, SUPERLATIVES, Obj, Scene, relation_holds

DETERMINERS = {"a", "an", "the"}
NUMBER_WORDS = {w: n for n, w in enumerate(NUMBERS) if n > 0} | {str(n): n for n in range(1, 7)}
NOUNS = {s: s for s in SHAPES} | {s + ("es" if s.endswith("s") else "s"): s for s in SHAPES}
NOUNS |= {w: None for w in ("object", "objects", "shape", "shapes", "thing", "things")}
TWO_WORD_RELATIONS = {("left", "of"): "left of", ("right", "of"): "right of", ("next", "to"): "next to"}
ONE_WORD_RELATIONS = {"above", "below"}


@dataclasses.dataclass(frozen=True)
class Mention:
    """What a noun phrase says about the objects it means."""

    sizes: frozenset[str] = frozenset()
    colours: frozenset[str] = frozenset()
    shape: str | None = None  # None: any shape
    count: int | None = None  # a stated number: exactly this many fit
    superlative: str | None = None  # one of SUPERLATIVES

    def fits(self, o: Obj) -> bool:
        return (
            all(s == o.size for s in self.sizes)
            and all(c == o.colour for c in self.colours)
            and (self.shape is None or self.shape == o.shape)
        )

    def identifies(self) -> bool:
        return bool(self.colours) or self.shape is not None


@dataclasses.dataclass(frozen=True)
class Fact:
    kind: str  # "object", "count", "relation" or "superlative"
    text: str  # the words of the caption it was read from
    mentions: tuple[Mention, ...] = ()  # relation: (subject, other); superlative: (superlative phrase, phrase)
    relation: str | None = None  # the relation of a relation fact


@dataclasses.dataclass
class CaptionCheck:
    stated: int  # facts read from the caption
    true: int  # of which true of the scene
    false_facts: list[str]  # the text of each false fact
    mentioned: set[int]  # indices of the objects it mentions (see module docstring)
    num_objects: int


@dataclasses.dataclass
class _Phrase:
    """A noun phrase being read."""

    start: int  # index of its first word
    count: int | None = None
    attrs: list[str] = dataclasses.field(default_factory=list)  # sizes, colours, superlatives

    def mention(self, shape: str | None) -> Mention:
        superlatives = [a for a in self.attrs if a in SUPERLATIVES]
        return Mention(
            frozenset(a for a in self.attrs if a in SIZES),
            frozenset(a for a in self.attrs if a in COLOURS),
            shape,
            self.count,
            superlatives[0] if len(superlatives) == 1 else None,
        )


def _items(words: list[str]) -> list[tuple]:
    """Noun phrases ("np", Mention, start, end), relations ("rel", name, start, end) and
    ("is", None, start, end), in caption order; every other word is dropped."""
    items: list[tuple] = []
    phrase: _Phrase | None = None
    k = 0
    while k < len(words):
        word, pair = words[k], tuple(words[k : k + 2])
        if word in DETERMINERS:
            phrase = _Phrase(k)
        elif word in NUMBER_WORDS:
            if phrase is None or phrase.count is not None or phrase.attrs:  # else "the two circles"
                phrase = _Phrase(k)
            phrase.count = NUMBER_WORDS[word]
        elif word in SIZES or word in COLOURS or word in SUPERLATIVES:
            phrase = phrase or _Phrase(k)
            phrase.attrs.append(word)
        elif word in NOUNS:
            phrase = phrase or _Phrase(k)
            items.append(("np", phrase.mention(NOUNS[word]), phrase.start, k + 1))
            phrase = None
        elif pair in TWO_WORD_RELATIONS:
            items.append(("rel", TWO_WORD_RELATIONS[pair], k, k + 2))
            phrase, k = None, k + 1
        elif word in ONE_WORD_RELATIONS:
            items.append(("rel", word, k, k + 1))
            phrase = None
        elif word in ("is", "are"):
            items.append(("is", None, k, k + 1))
            phrase = None
        else:  # any other word ends the phrase: "a red and blue circle" names a blue circle
            phrase = None
        k += 1
    return items


def _is_np(item: tuple | None, superlative: bool = False) -> bool:
    return item is not None and item[0] == "np" and (item[1].superlative is not None) == superlative


def caption_facts(caption: str) -> list[Fact]:
    """The facts a caption states, in the order they are read."""
    words = re.findall(r"[a-z0-9]+", str(caption).lower())
    items = _items(words)

    def at(k: int) -> tuple | None:  # out of range reads as nothing
        return items[k] if 0 <= k < len(items) else None

    def text(start: int, end: int) -> str:
        return " ".join(words[start:end])

    facts = []
    for k, (kind, value, start, end) in enumerate(items):
        if kind == "np" and value.superlative is None:
            facts.append(Fact("object" if value.count is None else "count", text(start, end), (value,)))
        elif kind == "rel" and _is_np(at(k + 1)):
            subject = at(k - 2) if at(k - 1) is not None and at(k - 1)[0] == "is" else at(k - 1)
            if _is_np(subject):
                facts.append(Fact("relation", text(subject[2], at(k + 1)[3]), (subject[1], at(k + 1)[1]), value))
        elif kind == "is":  # "the largest object is a red circle" or "a red circle is the largest object"
            before, after = at(k - 1), at(k + 1)
            if _is_np(before, superlative=True) and _is_np(after):
                facts.append(Fact("superlative", text(before[2], after[3]), (before[1], after[1])))
            elif _is_np(before) and _is_np(after, superlative=True):
                facts.append(Fact("superlative", text(before[2], after[3]), (after[1], before[1])))
    return facts


def _check(fact: Fact, scene: Scene) -> tuple[bool, set[int]]:
    """Whether the fact is true of the scene, and the objects it mentions."""
    objects = scene.objects
    fitting = [[i for i, o in enumerate(objects) if m.fits(o)] for m in fact.mentions]
    if fact.kind in ("object", "count"):
        mention, fit = fact.mentions[0], fitting[0]
        true = len(fit) >= 1 if mention.count is None else len(fit) == mention.count
        mentioned = mention.identifies() and true and (mention.count is not None or len(fit) == 1)
        return true, set(fit) if mentioned else set()
    if fact.kind == "relation":
        pairs = [(i, j) for i in fitting[0] for j in fitting[1] if i != j]
        return any(relation_holds(objects[i], objects[j], fact.relation, scene.image_size) for i, j in pairs), set()
    best = scene.superlative(fact.mentions[0].superlative, fitting[0])
    return best is not None and fact.mentions[1].fits(objects[best]), set()


def check_caption(caption: str, scene: Scene) -> CaptionCheck:
    """Read `caption`'s facts and check each against `scene`."""
    true, false_facts, mentioned = 0, [], set()
    facts = caption_facts(caption)
    for fact in facts:
        ok, objects = _check(fact, scene)
        true += ok
        mentioned |= objects
        if not ok:
            false_facts.append(fact.text)
    return CaptionCheck(len(facts), true, false_facts, mentioned, len(scene.objects))


def fact_scores(captions: list[str], scenes: list[Scene]) -> dict:
    """Fact precision (true facts / stated facts, over all captions; 0.0 when none are stated),
    fact recall (mentioned objects / objects, micro-averaged) and how many captions state nothing."""
    if len(captions) != len(scenes):
        raise ValueError(f"fact_scores needs one scene per caption; got {len(captions)} captions, {len(scenes)} scenes")
    checks = [check_caption(c, s) for c, s in zip(captions, scenes)]
    stated = sum(c.stated for c in checks)
    objects = sum(c.num_objects for c in checks)
    return {
        "fact_precision": sum(c.true for c in checks) / stated if stated else 0.0,
        "fact_recall": sum(len(c.mentioned) for c in checks) / objects if objects else 0.0,
        "captions_without_facts": sum(c.stated == 0 for c in checks),
    }


def caption_objects(caption: str) -> Counter:
    """The multiset of (size, colour, shape) the caption's object and count phrases name, None
    for what a phrase leaves open; phrases naming neither colour nor shape are left out."""
    named: Counter = Counter()
    for fact in caption_facts(caption):
        if fact.kind in ("object", "count") and fact.mentions[0].identifies():
            m = fact.mentions[0]
            key = (min(m.sizes, default=None), min(m.colours, default=None), m.shape)
            named[key] += m.count or 1
    return named


def scenes_described(caption: str, scenes: list[Scene], complete: bool = False) -> list[int]:
    """Indices of the scenes of which every fact the caption states is true (all of them
    when it states none): how ambiguous the caption is within a gallery. With `complete`, only
    the scenes whose every object the caption also mentions (for captions that name them all)."""
    facts = caption_facts(caption)
    described = []
    for k, scene in enumerate(scenes):
        mentioned: set[int] = set()
        for fact in facts:  # most scenes fail an early fact: stop there
            ok, objects = _check(fact, scene)
            if not ok:
                break
            mentioned |= objects
        else:
            if not complete or len(mentioned) == len(scene.objects):
                described.append(k)
    return described
