"""A trained model records what it knows (its span): the years and portraits of the coins it trained on, read
back from the registered model, its MLmodel metadata and `coinyear predict`."""

import mlflow
import numpy as np

from coinyear.data import read_manifest, split_test
from coinyear.years import out_of_span_warning
from tests.conftest import OCRE, small_train_config


def test_the_registered_model_records_the_years_and_portraits_it_trained_on(trained):
    settings, outcome = trained
    config = small_train_config()
    rows = read_manifest(OCRE, settings.min_year, settings.max_year, limit=config.limit, seed=config.seed).rows
    usable = rows.iloc[split_test(rows)[0]]
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}/{outcome.version}")
    span = model.unwrap_python_model().span
    # the hold-out model trained on part of the non-test coins: its years lie within theirs, never a test coin's
    assert usable["year_from"].min() <= span["year_from"] < span["year_to"] <= usable["year_to"].max()
    assert 0 < span["coins"] < len(usable)
    classes = dict(model.unwrap_python_model().portraits)
    assert span["portraits"] and "other" not in span["portraits"] and set(span["portraits"]) <= set(classes)
    years = [classes[name] for name in span["portraits"]]
    assert years == sorted(years), "portraits are listed in order of their median training year"
    info = mlflow.models.get_model_info(f"models:/{settings.model_name}/{outcome.version}")
    assert info.metadata["span"] == span
    assert np.isfinite([span["year_from"], span["year_to"]]).all()
    assert out_of_span_warning(span).startswith("this coin does not look like the coins the model knows: ")
