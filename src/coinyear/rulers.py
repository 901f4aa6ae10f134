"""The ruler behind the portrait: a label read from the catalogue's obverse description.

A numismatist dates a Roman coin by first recognising whose portrait it shows (portrait style and legend), then
the issue. The OCRE manifest names the portrait in `obverse_desc` ("IMP CAES VESPASIAN AVG COS III: Head of
Vespasian, laureate, right"), so the label costs nothing to derive and can train an auxiliary head.

The rule (documented in docs/pipeline.md, counted by `label_report`):
1. Take the description after the legend (the text after the first colon, or all of it when there is none).
2. The portrait is the capitalised name after the first "Head of" / "Bust of" / "Heads of" / "Busts of"
   ("Bust of Hadrian, laureate, draped" -> "Hadrian"; "Head of Nero Claudius Drusus" -> "Nero Claudius Drusus").
3. A description without such a phrase (a legend in a wreath, a standing figure, an object) has no label; the
   coin is counted as unparsed and its auxiliary loss is ignored, it still trains the year.
Portraits of gods and family members keep their own name: they are as visual as an emperor's head and date
just as well (Julia Titi, Domitia, Divus Augustus). Rare names are pooled into one "other" class by the
trainer's `aux_top` rule, like mint and denomination.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

import pandas as pd

PORTRAIT = re.compile(r"\b(?:Head|Bust)s?\s+of\s+([A-Z][a-z]+(?:\s+[A-Z][a-z]+)*)")
COLUMN = "portrait"


def portrait(obverse_desc: object) -> str | None:
    """Whose head or bust the obverse shows, or None when the description names none."""
    if not isinstance(obverse_desc, str) or not obverse_desc.strip():
        return None
    description = obverse_desc.split(":", 1)[-1]
    match = PORTRAIT.search(description)
    return match.group(1) if match else None


def portrait_labels(obverse_descs: Iterable[object]) -> pd.Series:
    """The portrait label of each description ("" when there is none: the trainer's "no label")."""
    return pd.Series([portrait(desc) or "" for desc in obverse_descs], dtype=object)


def label_report(obverse_descs: Iterable[object]) -> dict:
    """How many descriptions the rule labels, how many it cannot parse, and the coins per portrait."""
    labels = [portrait(desc) for desc in obverse_descs]
    counts = Counter(label for label in labels if label)
    return {"coins": len(labels), "labelled": sum(counts.values()), "unparsed": sum(1 for lab in labels if not lab),
            "portraits": dict(counts.most_common())}
