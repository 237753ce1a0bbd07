"""English texts of realistic, varied length without a download, for the text speed row.

The prose is the Python documentation that ships with CPython (`pydoc_data.topics`, the text
`help()` shows): unindented lines only, so code examples and grammar rules are left out, and
plain words only (quoted names, numbers and symbols dropped), so the token count per word is
that of ordinary English (about 1.3 with BERT's WordPiece vocabulary). Each
text is a run of consecutive words, 8 to 60 of them (uniform), from a seeded position: real
English sentences and sentence fragments, so per-batch padding meets the spread of lengths a sentence classifier meets.
"""
from __future__ import annotations

import functools
import re

import numpy as np

SHORTEST, LONGEST = 8, 60       # words per text
WORD = re.compile(r"[A-Za-z][a-z]*(-[a-z]+)?[.,;:]?")   # English words: no quoted code names


@functools.lru_cache(maxsize=1)
def prose_words() -> tuple[str, ...]:
    """The words of the documentation's prose lines, in order, punctuation attached."""
    from pydoc_data.topics import topics

    lines = []
    for key in sorted(topics):
        for line in topics[key].splitlines():
            if line and not line[0].isspace() and not re.fullmatch(r"[*=\-+^~]+", line):
                lines.append(line)
    return tuple(w for w in " ".join(lines).split() if WORD.fullmatch(w))


def texts(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """n texts of SHORTEST..LONGEST words and a 0/1 label each (seeded; the labels only give
    the loss something to fit)."""
    words = prose_words()
    rng = np.random.default_rng(seed)
    lengths = rng.integers(SHORTEST, LONGEST + 1, size=n)
    starts = rng.integers(0, len(words) - LONGEST, size=n)
    out = [" ".join(words[s:s + k]) for s, k in zip(starts, lengths)]
    return out, (rng.random(n) > 0.5).astype(np.float64)
