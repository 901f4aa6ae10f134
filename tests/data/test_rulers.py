"""Data expectations on the portrait label (coinyear.rulers): the rule labels almost every OCRE coin, each
emperor's coins sit in his reign, and the label alone nearly dates a coin — why it is worth learning."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from coinyear.rulers import label_report, portrait, portrait_labels

# Years (AD) each emperor's portrait was struck: from his adoption as heir (Tiberius AD 4, Nero 50, Domitian 69 as
# Caesar) to the end of his reign, from the standard chronology.
REIGNS = {"Tiberius": (4, 37), "Caligula": (37, 41), "Nero": (50, 68), "Galba": (68, 69), "Otho": (69, 69),
          "Vitellius": (69, 69), "Vespasian": (69, 79), "Domitian": (69, 96), "Nerva": (96, 98),
          "Trajan": (98, 117), "Hadrian": (117, 138)}


@pytest.mark.parametrize("description, expected", [
    ("IMP CAES VESPASIAN AVG COS III: Head of Vespasian, laureate, right", "Vespasian"),
    ("IMP CAESAR TRAIAN HADRIANVS AVG: Bust of Hadrian, laureate, draped, cuirassed, right", "Hadrian"),
    ("NERO CLAVDIVS DRVSVS GERMANICVS IMP: Head of Nero Claudius Drusus, laureate, left", "Nero Claudius Drusus"),
    ("Jugate busts of Fortuna Victrix and Fortuna Felix", None),  # "busts of" in lower case is not a portrait
    ("OB CIVIS SERVATOS: oak-wreath between two laurel branches", None),
    ("Heads of Augustus and Agrippa, back to back", "Augustus"),
    (float("nan"), None),
    ("", None),
])
def test_portrait_rule(description, expected):
    assert portrait(description) == expected


@pytest.fixture(scope="module")
def manifest(ocre_dir):
    return pd.read_csv(ocre_dir / "manifest.csv")


def test_rule_labels_almost_every_coin_and_counts_the_rest(manifest):
    report = label_report(manifest["obverse_desc"])
    assert report["coins"] == len(manifest)
    assert report["labelled"] + report["unparsed"] == len(manifest)
    assert report["unparsed"] / len(manifest) < 0.06, report["unparsed"]
    assert list(report["portraits"])[:4] == ["Domitian", "Vespasian", "Hadrian", "Trajan"]


def test_each_emperors_coins_date_to_his_reign(manifest):
    """Most of an emperor's coins are dated inside his reign (restitution issues are the known exception)."""
    labels = portrait_labels(manifest["obverse_desc"])
    middle = (manifest["year_from"] + manifest["year_to"]) / 2
    for name, (start, end) in REIGNS.items():
        inside = middle[labels == name].between(start - 2, end + 2)
        assert inside.mean() >= 0.85, (name, inside.mean(), int(inside.size))


def test_knowing_the_portrait_nearly_dates_the_coin(manifest):
    """The 'portrait oracle' (each coin dated at the median of its portrait's coins) is within ±10 years of the
    catalogue range for over 90% of labelled coins: the structure the auxiliary head is meant to teach."""
    labels = portrait_labels(manifest["obverse_desc"])
    middle = (manifest["year_from"] + manifest["year_to"]) / 2
    known = labels != ""
    guess = middle[known].groupby(labels[known]).transform("median")
    distance = np.maximum(0, np.maximum(manifest["year_from"][known] - guess, guess - manifest["year_to"][known]))
    assert (distance <= 10).mean() > 0.9


def test_the_trainer_reads_the_portrait_label_from_the_description(manifest):
    """The auxiliary portrait head's labels come from obverse_desc (no portrait column needed): the commonest
    portraits get a class each, the rest share "other", an unparsed description is -100 (ignored by the loss)."""
    from coinyear.experiment import aux_labels

    rows = manifest
    labels, classes = aux_labels(rows, 5, ("portrait",))
    assert set(labels) == {"portrait"} and set(classes) == {"portrait"}
    assert len(classes["portrait"]) == 6 and classes["portrait"][0] == "Domitian" and classes["portrait"][-1] == "other"
    unparsed = portrait_labels(rows["obverse_desc"]).to_numpy() == ""
    assert (labels["portrait"][unparsed] == -100).all() and (labels["portrait"][~unparsed] >= 0).all()
    domitian = portrait_labels(rows["obverse_desc"]).to_numpy() == "Domitian"  # the commonest portrait
    assert (labels["portrait"][domitian] == 0).all()


def test_an_unknown_auxiliary_column_is_refused():
    from coinyear.recipe import TrainConfig

    with pytest.raises(ValueError, match="unknown auxiliary column"):
        TrainConfig(aux_heads=("emperor",))
