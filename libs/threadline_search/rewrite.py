"""`rewrite_query` of vector store search: a question as the words that carry its meaning, as hosted rewrites a
natural-language question into a search query ("I'd like to know the height of the main office building." ->
"height main office building"), without a model call."""

import re

_LEAD_IN = re.compile(
    r"^\s*(?:(?:please|hey|hi|hello|so|ok|okay|well)\b[\s,!.]*)*"
    r"(?:(?:can|could|would|will)\s+you\s+(?:please\s+)?(?:tell|show|give|find|explain|describe|list)"
    r"(?:\s+(?:me|us))?"
    r"|i(?:'d|\s+would)\s+like\s+to\s+(?:know|find\s+out|learn|see|understand)"
    r"|i\s+(?:want|need|wish)\s+to\s+(?:know|find\s+out|learn|see|understand)"
    r"|do\s+you\s+know|(?:please\s+)?(?:tell|show|give)\s+(?:me|us))\b",
    re.IGNORECASE)
"""Conversational openings that say nothing about what is sought."""
_WORD = re.compile(r"[^\W_](?:[\w'.-]*[^\W_])?")
"""A word: letters and digits, with inner apostrophes, dots and hyphens (o'clock, 10.5, e-mail)."""
STOP_WORDS = frozenset("""
a about above after again all also am an and any are as at be been being before below between both but by
could did do does doing down during each few for from further had has have having he her here hers herself him
himself his i i'd i'm i've if in into is it it's its itself just let let's me more most my myself of off on
once only or other our ours ourselves out over own please same she should so some such than that that's the
their theirs them themselves then there there's these they this those through to too under until up us very
was we were what what's when where which while who whom whose why will with would you you're your yours
yourself yourselves can may might must shall how
""".split())
"""Function words and pronouns; negations (no, not, nor, without) stay, they change what matches. Keyword search
(`keywords.terms`) leaves out the same words."""


def rewrite_query(query: str) -> str:
    """The query's content words in their order, lowercased, each once; the query itself if none are left."""
    words = [w.lower() for w in _WORD.findall(_LEAD_IN.sub(" ", query, count=1))]
    kept = [w for w in dict.fromkeys(words) if w not in STOP_WORDS]
    return " ".join(kept) or query.strip() or query
