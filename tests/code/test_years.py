"""The years module: numismatic labels, the span a model records, and the out-of-span words."""

from coinyear.years import out_of_span_warning, span_text, training_span, year_label


def test_year_labels_follow_numismatic_usage():
    assert [year_label(y) for y in (-27, 0, 1, 73.4, 137.6)] == ["27 BC", "1 BC", "AD 1", "AD 73", "AD 138"]


def test_the_span_covers_every_training_range_and_orders_portraits_by_year():
    span = training_span([-31, 14, 117], [-27, 37, 138], [("Hadrian", 127.0), ("Augustus", -10.0), ("Nero", 62.0)])
    assert span == {"year_from": -31, "year_to": 138, "coins": 3, "portraits": ["Augustus", "Nero", "Hadrian"]}
    assert span_text(span) == "31 BC – AD 138, 3 portraits from Augustus to Hadrian"
    assert span_text({**span, "portraits": []}) == "31 BC – AD 138"


def test_the_warning_names_the_span_when_the_model_recorded_one():
    span = training_span([-31], [138], [("Augustus", 1.0), ("Hadrian", 127.0)])
    assert out_of_span_warning(span) == ("this coin does not look like the coins the model knows: 31 BC – AD 138, "
                                         "2 portraits from Augustus to Hadrian; the date may be wrong")
    assert out_of_span_warning({}) == "this coin does not look like the coins the model knows; the date may be wrong"
