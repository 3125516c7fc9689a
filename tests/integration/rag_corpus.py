"""A small written corpus for the RAG integration tests and its mixed query set.

Two kinds of queries, each with one relevant document:
- semantic: paraphrases that share no content word with their document (keyword search misses them);
- lexical: a rare code or name in a family of near-identical documents (dense search confuses them).
Hybrid retrieval should get both kinds right.
"""

from __future__ import annotations

SEMANTIC = [
    ("sem-cat", "The feline dozed on the rug beside the fireplace for the whole afternoon.",
     "Where did the cat take a nap?"),
    ("sem-car", "Her automobile broke down on the motorway, so a tow truck hauled it to a garage.",
     "What happened when the vehicle failed on the highway?"),
    ("sem-doctor", "The physician prescribed antibiotics to treat the bacterial infection in his lungs.",
     "Which medicine did the medic give for the chest illness?"),
    ("sem-money", "Inflation eroded household savings as prices climbed faster than wages all year.",
     "How did rising costs affect what families had put aside?"),
    ("sem-ocean", "Whales migrate thousands of kilometres between cold feeding grounds and warm breeding waters.",
     "Do large marine mammals travel long distances each season?"),
    ("sem-cooking", "Simmer the onions slowly in butter until they turn golden and sweet.",
     "How should I caramelize shallots in a pan?"),
    ("sem-sleep", "Adults who rest fewer than six hours a night show poorer memory and attention.",
     "Does lack of slumber harm concentration?"),
    ("sem-rain", "A heavy downpour flooded the village streets and closed the school for two days.",
     "Why were children unable to attend classes after the storm?"),
]

_PART = "Part {code} is the replacement gasket for the series 9 water pump; order it from the spare parts desk."
LEXICAL = [
    ("lex-zx", _PART.format(code="ZX-4471-B"), "Which gasket is ZX-4471-B?"),
    ("lex-qk", _PART.format(code="QK-9902-A"), "Which gasket is QK-9902-A?"),
    ("lex-mt", _PART.format(code="MT-3318-C"), "Which gasket is MT-3318-C?"),
    ("lex-rv", _PART.format(code="RV-6620-D"), "Which gasket is RV-6620-D?"),
    ("lex-errA", "Error E7731 on the controller means the coolant sensor reports an open circuit.",
     "What does error E7731 mean?"),
    ("lex-errB", "Error E7732 on the controller means the coolant sensor reports a short circuit.",
     "What does error E7732 mean?"),
    ("lex-errC", "Error E7733 on the controller means the coolant sensor reports a stuck reading.",
     "What does error E7733 mean?"),
    ("lex-errD", "Error E7734 on the controller means the coolant sensor reports an unknown fault.",
     "What does error E7734 mean?"),
]

DISTRACTORS = [
    ("x-1", "Quarterly tax filings are due at the end of each fiscal quarter for registered firms."),
    ("x-2", "The museum's new wing displays sculptures from the early bronze age."),
    ("x-3", "Solar panels convert sunlight into electricity using photovoltaic cells."),
    ("x-4", "The orchestra rehearsed the symphony twice before the opening night."),
    ("x-5", "Glaciers carve deep valleys as they advance and retreat over millennia."),
    ("x-6", "A balanced diet includes vegetables, whole grains, and lean proteins."),
]

PLANTED = ("planted", "The capital of the fictional republic of Zubrowka is Lutz, a city famous for its "
                      "pink pastry boxes and a grand hotel on the mountainside.")

DOCUMENTS = [(d, t) for d, t, _ in SEMANTIC + LEXICAL] + DISTRACTORS + [PLANTED]
QUERIES = [(q, d, "semantic") for d, _, q in SEMANTIC] + [(q, d, "lexical") for d, _, q in LEXICAL]


def mrr(ranked_doc_ids: list[list[str]], relevant: list[str]) -> float:
    total = 0.0
    for ranked, rel in zip(ranked_doc_ids, relevant):
        if rel in ranked:
            total += 1.0 / (ranked.index(rel) + 1)
    return total / len(relevant)
