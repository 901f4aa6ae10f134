"""Retraining, clean step: which candidate rows may become training data, and why the others may not.

Label rule: of several labels for the same photos (SHA-256 of both sides), the latest expert correction wins,
in one batch and across runs (by feedback timestamp): a later correction replaces what is already in
`training_data` (see `ingest.current_rows`); an older one is `superseded`. Rows without a timestamp (the base
dataset) that disagree with each other, or with rows already in the data, are `contradictory_label`.
"""

from __future__ import annotations

import hashlib
import logging

import pandas as pd
from tqdm.auto import tqdm

from coinyear.config import Settings
from coinyear.data import ImageError, decode_side
from coinyear.jobs.ingest import CANDIDATE_COLUMNS

log = logging.getLogger(__name__)

KEPT_COLUMNS = [*CANDIDATE_COLUMNS, "content_hash"]


def clean(candidates: pd.DataFrame, existing: pd.DataFrame, settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows to add, with `content_hash`; dropped rows: coin_id, reason, detail).

    `existing`: the current rows of `training_data` (content_hash, year_from, year_to, feedback_timestamp).
    Reasons: a base-manifest reason, unknown_request, superseded, no_actor and anonymous (feedback nobody
    answers for: coinyear.jobs.ingest), missing_image, undecodable_image, impossible_label, year_out_of_span,
    contradictory_label, duplicate_image (same photos and years already present); see the module docstring for
    the label rule.
    """
    dropped, kept = [], []
    for row in tqdm(candidates.to_dict("records"), desc="clean", unit="row", leave=False,
                    disable=len(candidates) < 200):
        reason, detail = problem_of(row, settings)
        if reason:
            dropped.append({"coin_id": row["coin_id"], "reason": reason, "detail": detail})
            continue
        row["content_hash"] = content_hash(row["front"], row["back"])
        kept.append(row)
    kept = pd.DataFrame(kept, columns=KEPT_COLUMNS)
    verdicts = label_verdicts(kept, existing)
    for index, (reason, detail) in verdicts.items():
        dropped.append({"coin_id": kept.at[index, "coin_id"], "reason": reason, "detail": detail})
    dropped = pd.DataFrame(dropped, columns=["coin_id", "reason", "detail"])
    for reason, count in count_reasons(dropped).items():
        log.warning("clean: dropped %d rows: %s", count, reason)
    return kept.drop(index=list(verdicts)).reset_index(drop=True), dropped


def _when(frame: pd.DataFrame) -> pd.Series:
    """When each row's label was given (NaT: a base-dataset row, labelled before any feedback)."""
    if "feedback_timestamp" not in frame:
        return pd.Series(pd.NaT, index=frame.index, dtype="datetime64[us, UTC]")
    return pd.to_datetime(frame["feedback_timestamp"], utc=True, errors="coerce", format="ISO8601")


def label_verdicts(kept: pd.DataFrame, existing: pd.DataFrame) -> dict[int, tuple[str, str]]:
    """{index of a `kept` row to drop: (reason, detail)} under the label rule (module docstring)."""
    verdicts: dict[int, tuple[str, str]] = {}
    if len(kept) == 0:
        return verdicts
    when = _when(kept)
    before = {}
    if len(existing):
        current = existing.assign(labelled_at=_when(existing))
        before = {r.content_hash: (int(r.year_from), int(r.year_to), r.labelled_at) for r in current.itertuples()}
    for digest, rows in kept.groupby("content_hash", sort=False):
        years = {i: (int(kept.at[i, "year_from"]), int(kept.at[i, "year_to"])) for i in rows.index}
        stamps = when[rows.index]
        latest = stamps.max()
        winners = [i for i in rows.index if (pd.isna(latest) or stamps[i] == latest)]
        if len({years[i] for i in winners}) > 1:
            for i in winners:
                verdicts[i] = ("contradictory_label", "the same photos carry other years at the same time")
            winner = None
        else:
            winner = winners[0]
            for i in winners[1:]:
                verdicts[i] = ("duplicate_image", "the same photos and years are already in this batch")
        for i in rows.index:
            if i in winners:
                continue
            same = winner is not None and years[i] == years[winner]
            verdicts[i] = ("duplicate_image", "the same photos and years are already in this batch") if same \
                else ("superseded", "a later correction of the same photos")
        if winner is None or digest not in before:
            continue
        old_from, old_to, old_when = before[digest]
        if years[winner] == (old_from, old_to):
            verdicts[winner] = ("duplicate_image", "the same photos and years are already in the data")
        elif pd.isna(stamps[winner]):
            verdicts[winner] = ("contradictory_label", f"the same photos are in the data as {old_from}..{old_to}")
        elif not pd.isna(old_when) and stamps[winner] <= old_when:
            verdicts[winner] = ("superseded", "a later correction of the same photos is already in the data")
        else:
            log.info("clean: %s corrects %d..%d to %d..%d", kept.at[winner, "coin_id"], old_from, old_to,
                     *years[winner])
    return verdicts


def problem_of(row: dict, settings: Settings) -> tuple[str | None, str]:
    """(reason, detail) why a candidate row cannot be used, or (None, "")."""
    if isinstance(row.get("problem"), str):
        reason, _, detail = row["problem"].partition(": ")
        return reason, detail
    for side in ("front", "back"):
        if not isinstance(row[side], (bytes, bytearray)) or not row[side]:
            return "missing_image", f"no {side} photo was logged"
    try:
        year_from, year_to = int(row["year_from"]), int(row["year_to"])
    except (TypeError, ValueError):
        return "impossible_label", f"{row['year_from']!r}..{row['year_to']!r}"
    if year_from > year_to:
        return "impossible_label", f"{year_from} > {year_to}"
    if year_from < settings.min_year or year_to > settings.max_year or 0 in (year_from, year_to):
        return "year_out_of_span", f"{year_from}..{year_to} (supported {settings.min_year}..{settings.max_year})"
    for side in ("front", "back"):
        try:
            decode_side(row[side], side)
        except ImageError as error:
            return "undecodable_image", f"{side}: {error}"
    return None, ""


def content_hash(front: bytes, back: bytes) -> str:
    """The photo pair's identity: SHA-256 over the SHA-256 of each side."""
    return hashlib.sha256(hashlib.sha256(front).digest() + hashlib.sha256(back).digest()).hexdigest()


def count_reasons(dropped: pd.DataFrame) -> dict[str, int]:
    """{reason: rows dropped for it}."""
    return {str(k): int(v) for k, v in dropped["reason"].value_counts().sort_index().items()} if len(dropped) else {}
