"""A synthetic knowledge world, generated from a seed.

Invented entities (people, cities, organisations, products) with attributes, written three ways:
reference documents (what the knowledge base holds), narrative sentences and question/answer
pairs (what training text holds). Entities are split: `train` entities appear in training text
and in the knowledge base; `heldout` entities appear **only** in the knowledge base. Accuracy on
held-out questions therefore measures exactly what the model knows through its memory.

`fresh_entity` makes entities outside both splits, from a caller's RNG: same templates and
attribute pools, names that no world entity, city or organisation has. Training questions about
them cannot be answered from weights (each is seen once), only from their reference, which is
what held-out questions need; the world itself is left unchanged, so the held-out split stays
untouched.

Names are built from syllables, so no real-world knowledge can answer a question. Attribute
values come from finite pools (cities, organisations, professions, years...), which puts the
no-memory baseline at roughly chance: 1 / pool size.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "tr",
          "v", "z", "sh", "th", "ch", "w", "y", "j", "kl", "pl", "sk"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y", "io"]
CODAS = ["", "", "n", "r", "l", "s", "m", "nd", "rk", "th", "x", "ck", "st", "ng"]
PROFESSIONS = ["engineer", "teacher", "painter", "surgeon", "farmer", "architect", "chemist", "poet", "baker",
               "sailor", "pilot", "lawyer", "composer", "astronomer", "carpenter", "geologist", "librarian",
               "journalist", "tailor", "mathematician", "botanist", "potter", "violinist", "photographer",
               "translator", "economist", "blacksmith", "dancer", "historian", "nurse", "sculptor", "miner",
               "weaver", "cartographer", "judge", "brewer", "glassblower", "jeweller", "linguist", "beekeeper"]
INDUSTRIES = ["shipping", "mining", "textiles", "publishing", "brewing", "software", "banking", "railways",
              "pharmaceuticals", "aviation", "shipbuilding", "insurance", "glassmaking", "fishing", "printing",
              "steel", "tea trading", "clockmaking", "perfume", "telegraphy"]
CATEGORIES = ["bicycle", "telescope", "typewriter", "lantern", "radio", "camera", "violin", "compass", "kettle",
              "sewing machine", "clock", "microscope", "tractor", "piano", "umbrella", "stove", "barometer",
              "harmonica", "printing press", "loom"]
ORG_SUFFIXES = ["Company", "Works", "Guild", "Society", "Trading House", "Foundry", "Press", "Institute"]
CITY_SUFFIXES = ["ford", "holm", "bury", "wick", "stad", "mouth", "vale", "port", "grad", "burg", ""]
KINDS = ["person", "person", "person", "city", "organisation", "product"]  # entity i has kind KINDS[i % 6]


@dataclass(frozen=True)
class Fact:
    attribute: str
    question: str
    answer: str
    statement: str  # the fact as one narrative sentence
    cue: str  # the word written right before the value, in the document and in the answer


@dataclass(frozen=True)
class Entity:
    id: str
    kind: str
    name: str
    split: str  # "train" or "heldout"
    attributes: dict[str, str] = field(hash=False)
    document: str = ""  # the reference text the knowledge base holds
    facts: tuple[Fact, ...] = ()


class World:
    """Deterministic given (seed, sizes); entity ids are stable strings like `person-00042`."""

    def __init__(self, seed: int = 0, *, n_train: int = 2000, n_heldout: int = 300, n_cities: int = 120,
                 n_organisations: int = 80) -> None:
        if n_train < 1 or n_heldout < 1:
            raise ValueError("the world needs at least one train and one held-out entity")
        self.seed = seed
        rng = random.Random(f"memory3-world-{seed}")
        self._used: set[str] = set()
        self.cities = [self._city_name(rng) for _ in range(n_cities)]
        self.countries = [self._word(rng, 2).capitalize() + rng.choice(["ia", "land", "stan", "ora", "ane"])
                          for _ in range(24)]
        self.organisations = [f"{self._word(rng, 2).capitalize()} {rng.choice(ORG_SUFFIXES)}"
                              for _ in range(n_organisations)]
        self.rivers = [self._word(rng, 2).capitalize() for _ in range(40)]
        self.entities: list[Entity] = []
        for i in range(n_train + n_heldout):
            split = "train" if i < n_train else "heldout"
            kind = KINDS[i % len(KINDS)]
            self.entities.append(self._entity(rng, f"{kind}-{i:05d}", kind, split))
        # Every name in the world (pool organisations were drawn without a uniqueness check).
        self._names = frozenset(self._used | set(self.organisations))

    # ---- views ----------------------------------------------------------------------------
    def split(self, name: str) -> list[Entity]:
        return [e for e in self.entities if e.split == name]

    def answer_pools(self) -> dict[str, list[str]]:
        """Every value an attribute can take (for chance-level reasoning in reports)."""
        return {
            "city": self.cities, "organisation": self.organisations, "profession": PROFESSIONS,
            "industry": INDUSTRIES, "category": CATEGORIES, "country": self.countries, "river": self.rivers,
        }

    def fresh_entity(self, rng: random.Random, eid: str) -> Entity:
        """An entity in neither split, drawn from `rng` (split "fresh"); the world is not modified.

        Its name differs from every name of the world (entities, cities, organisations), so it
        never collides with a held-out entity. Deterministic given the state of `rng`.
        """
        return self._entity(rng, eid, rng.choice(KINDS), "fresh", taken=self._names)

    # ---- generation -----------------------------------------------------------------------
    def _word(self, rng: random.Random, syllables: int) -> str:
        return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables)) + rng.choice(CODAS)

    def _unique(self, make, taken: frozenset[str] | None = None) -> str:
        """A new name. While building the world (taken=None) it is reserved; else it avoids `taken`."""
        for _ in range(1000):
            name = make()
            if taken is not None:
                if name not in taken:
                    return name
            elif name not in self._used:
                self._used.add(name)
                return name
        raise RuntimeError("could not generate a unique name")

    def _city_name(self, rng: random.Random, taken: frozenset[str] | None = None) -> str:
        return self._unique(lambda: (self._word(rng, 1) + rng.choice(CITY_SUFFIXES)).capitalize(), taken)

    def _entity(self, rng: random.Random, eid: str, kind: str, split: str,
                taken: frozenset[str] | None = None) -> Entity:
        year = str(rng.randint(1780, 1999))
        if kind == "person":
            name = self._unique(lambda: f"{self._word(rng, 2).capitalize()} {self._word(rng, 2).capitalize()}",
                                taken)
            attrs = {"profession": rng.choice(PROFESSIONS), "birthplace": rng.choice(self.cities),
                     "birth_year": year, "employer": rng.choice(self.organisations)}
            facts = (
                Fact("profession", f"What is the profession of {name}?", attrs["profession"],
                     f"{name} works as a {attrs['profession']}.", "profession"),
                Fact("birthplace", f"In which city was {name} born?", attrs["birthplace"],
                     f"{name} was born in {attrs['birthplace']}.", "birthplace"),
                Fact("birth_year", f"In which year was {name} born?", attrs["birth_year"],
                     f"{name} was born in the year {attrs['birth_year']}.", "born"),
                Fact("employer", f"Which organisation does {name} work for?", attrs["employer"],
                     f"{name} is employed by the {attrs['employer']}.", "employer"),
            )
        elif kind == "city":
            name = self._city_name(rng, taken)
            attrs = {"country": rng.choice(self.countries), "river": rng.choice(self.rivers), "founded": year}
            facts = (
                Fact("country", f"In which country is {name}?", attrs["country"],
                     f"{name} lies in {attrs['country']}.", "country"),
                Fact("river", f"On which river is {name}?", attrs["river"],
                     f"The river {attrs['river']} flows through {name}.", "river"),
                Fact("founded", f"In which year was {name} founded?", attrs["founded"],
                     f"{name} was founded in {attrs['founded']}.", "founded"),
            )
        elif kind == "organisation":
            name = self._unique(lambda: f"{self._word(rng, 2).capitalize()} {rng.choice(ORG_SUFFIXES)}", taken)
            attrs = {"industry": rng.choice(INDUSTRIES), "headquarters": rng.choice(self.cities), "founded": year}
            facts = (
                Fact("industry", f"In which industry is the {name}?", attrs["industry"],
                     f"The {name} works in {attrs['industry']}.", "industry"),
                Fact("headquarters", f"Where is the {name} based?", attrs["headquarters"],
                     f"The {name} is based in {attrs['headquarters']}.", "headquarters"),
                Fact("founded", f"In which year was the {name} established?", attrs["founded"],
                     f"The {name} was established in {attrs['founded']}.", "established"),
            )
        else:  # product
            name = self._unique(lambda: f"the {self._word(rng, 2).capitalize()} {rng.choice(CATEGORIES)}", taken)
            attrs = {"maker": rng.choice(self.organisations), "launched": year}
            facts = (
                Fact("maker", f"Who makes {name}?", attrs["maker"], f"{name} is made by the {attrs['maker']}.",
                     "maker"),
                Fact("launched", f"In which year was {name} launched?", attrs["launched"],
                     f"{name} was launched in {attrs['launched']}.", "launched"),
            )
        doc = reference_document(name, kind, facts)
        return Entity(eid, kind, name, split, attrs, doc, facts)


def reference_document(name: str, kind: str, facts: Sequence[Fact]) -> str:
    """The knowledge base's record of an entity: each value right after its cue word.

    e.g. "Grolock Goupork (person): profession jeweller; birthplace Yelbury; born 1813; employer
    Skopliol Society."
    """
    title = name[0].upper() + name[1:]
    return f"{title} ({kind}): " + "; ".join(f"{f.cue} {f.answer}" for f in facts) + "."


def qa_text(fact: Fact) -> str:
    """The one question/answer format used in training text and evaluation prompts."""
    return f"{qa_prompt(fact)} {fact.answer}\n"


def qa_prompt(fact: Fact) -> str:
    """The question, then an answer that starts with the fact's cue: only the value is left to say."""
    return f"Question: {fact.question}\nAnswer: {fact.cue}"
