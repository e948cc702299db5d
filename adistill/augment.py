"""Text perturbations of labelled queries, used only as stage 2's transfer inputs when a tenant brought no unlabelled
queries (`transfer.augment`, opt in): the student is taught the teachers' outputs on them, never a label.

- `dropout`: each word is dropped with probability `rate` (at least one word stays);
- `mask`: one span of about `rate` of the words (at least one) becomes the tokenizer's mask token;
- `swap`: about `rate` of the words (at least one pair) swap places with their right neighbour;
- `mixed`: one of the three, chosen per copy.

Words are whitespace-separated; the perturbations are seeded and pure (no global random state).
"""

from __future__ import annotations

import random

KINDS = ("dropout", "mask", "swap")


def perturb(text: str, kind: str, rate: float, rng: random.Random, mask_token: str = "[MASK]") -> str:
    """One perturbed copy of `text` (`kind` one of `KINDS`)."""
    words = text.split()
    if len(words) < 2:
        return text
    if kind == "dropout":
        kept = [w for w in words if rng.random() >= rate]
        return " ".join(kept or [rng.choice(words)])
    if kind == "mask":
        width = max(1, round(rate * len(words)))
        start = rng.randrange(len(words) - width + 1)
        return " ".join([*words[:start], mask_token, *words[start + width :]])
    if kind == "swap":
        for _ in range(max(1, round(rate * len(words)))):
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        return " ".join(words)
    raise ValueError(f"unknown perturbation {kind!r}; expected one of {KINDS}")


def augment(texts: list[str], kind: str, copies: int, rate: float, seed: int, mask_token: str = "[MASK]") -> list[str]:
    """`copies` perturbed copies of every text (`kind`: one of `KINDS` or `mixed`), without repeats and without the
    originals; in a seeded order."""
    rng = random.Random(f"augment:{seed}")
    seen, out = set(texts), []
    for text in texts:
        for _ in range(copies):
            how = rng.choice(KINDS) if kind == "mixed" else kind
            new = perturb(text, how, rate, rng, mask_token)
            if new not in seen:
                seen.add(new)
                out.append(new)
    return out
