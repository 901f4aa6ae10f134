"""The span of years a coin date may take: one place, imported by settings, data checks and the served model
(which must not import the settings machinery)."""

# The OCRE reference data spans 32 BC .. AD 138; a coin dating system should still accept the whole span of
# coinage (c. 700 BC to today), and nothing else: years outside it are typos, not coins.
MIN_YEAR = -700
MAX_YEAR = 2100


def year_label(year: float) -> str:
    """Numismatic form: 73 -> 'AD 73', -27 -> '27 BC'."""
    value = int(round(year))
    if value <= 0:
        return f"{max(-value, 1)} BC"
    return f"AD {value}"


def training_span(year_from, year_to, portraits: list[tuple[str, float]] | None = None) -> dict:
    """What a model knows, recorded with it: the years its training coins' catalogue ranges cover, how many
    coins, and (with a portrait head) the portraits it names, in order of their median training year."""
    names = [name for name, _ in sorted(portraits or [], key=lambda item: item[1])]
    return {"year_from": int(min(year_from)), "year_to": int(max(year_to)), "coins": len(year_from),
            "portraits": names}


def span_text(span: dict) -> str:
    """'31 BC to AD 138' with an en dash, then ', 20 portraits from Augustus to Hadrian' when it has them."""
    text = f"{year_label(span['year_from'])} – {year_label(span['year_to'])}"
    portraits = span.get("portraits") or []
    if len(portraits) >= 2:
        text += f", {len(portraits)} portraits from {portraits[0]} to {portraits[-1]}"
    elif portraits:
        text += f", portrait of {portraits[0]}"
    return text


def out_of_span_warning(span: dict | None) -> str:
    """The words said before the number when the out-of-distribution flag is up."""
    known = f": {span_text(span)}" if span else ""
    return f"this coin does not look like the coins the model knows{known}; the date may be wrong"
