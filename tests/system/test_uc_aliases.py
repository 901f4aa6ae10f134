"""Moving an alias in Unity Catalog, against the fake workspace: MLflow's own `databricks-uc` registry client
talks to it over HTTP, as a job or an app does on Databricks.

Only the registered model's owner (or a metastore admin) may set an alias ("Set Registered Model Alias"); what
the bundle grants others (EXECUTE, and here APPLY_TAG too) is not enough. A promotion or rollback by anyone else
must fail with a RegistryError saying so (`coinyear models ...` prints it and exits 2) and move nothing: not
the alias, not the version tags a promotion writes before it. Before, the 403 left through as an MlflowException
(a traceback) and `promote` left its `production_since` / `previous_production` tags on a version that was
never promoted.
"""

from __future__ import annotations

import pytest

from coinyear import cli, registry
from coinyear.config import Settings, get_settings
from tests.fake_workspace import DEPLOYER, FakeWorkspace

MODEL = "main.dev_alice_coinyear.dev_alice_coinyear"
APP = "app-ui-token"  # a principal with what the bundle grants an app: EXECUTE (and here APPLY_TAG too)


@pytest.fixture
def uc(tmp_path, monkeypatch):
    """The fake workspace with the model (versions 1-3, owned by the deployer, production at 2 after 1), and a
    function giving Settings that act as the principal of a token."""
    with FakeWorkspace("sqlite:///unused.db") as fake:
        fake.add_principal(APP, service_principal_name="0000-app-ui", groups=("account users",))
        fake.add_uc_model(MODEL, DEPLOYER, 3, {"0000-app-ui": {"EXECUTE", "APPLY_TAG"}})
        model = fake.uc_models[MODEL]
        model["aliases"]["production"] = "2"
        model["versions"]["2"]["tags"]["previous_production"] = "1"
        for name in ("DATABRICKS_CONFIG_PROFILE", "DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("DATABRICKS_HOST", fake.url)

        def acting_as(token: str) -> Settings:
            monkeypatch.setenv("DATABRICKS_TOKEN", token)
            return Settings(home=tmp_path / "home", model_name=MODEL, tracking_uri="databricks",
                            registry_uri="databricks-uc")

        fake.acting_as = acting_as
        yield fake
        assert fake.unhandled == []


def state(fake) -> tuple[dict, dict]:
    model = fake.uc_models[MODEL]
    return dict(model["aliases"]), {v: dict(entry["tags"]) for v, entry in model["versions"].items()}


def test_a_promotion_by_a_non_owner_fails_clearly_and_moves_nothing(uc):
    before = state(uc)
    settings = uc.acting_as(APP)
    with pytest.raises(registry.RegistryError, match="only the model's owner may move an alias"):
        registry.promote(settings, "3", "production")
    with pytest.raises(registry.RegistryError, match="owner"):
        registry.promote(settings, "3", "production", expected_current="2")  # the retrain job's compare-and-set
    assert state(uc) == before  # the alias where it was, and version 3 without the promotion's tags
    assert ("POST", "/api/2.0/mlflow/unity-catalog/registered-models/alias") in uc.calls  # refused, not skipped


def test_a_rollback_by_a_non_owner_fails_clearly_and_moves_nothing(uc, monkeypatch, capsys):
    before = state(uc)
    with pytest.raises(registry.RegistryError, match=r"cannot point production .* at version 1"):
        registry.rollback(uc.acting_as(APP), expected_current="2")
    assert state(uc) == before
    # the command line (the rollback job's task) says why and exits 2, without a traceback
    settings = uc.acting_as(APP)
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    assert cli.main(["models", "rollback"]) == 2
    assert "coinyear: error: cannot point production" in capsys.readouterr().err
    assert state(uc) == before


def test_the_owner_promotes_and_rolls_back(uc):
    """The same calls as the model's owner (the deployer; the prod jobs' service principal in prod) succeed: the
    fake refuses the principal, not the calls."""
    settings = uc.acting_as(DEPLOYER)
    assert registry.promote(settings, "3", "production", expected_current="2") == "2"
    aliases, tags = state(uc)
    assert aliases["production"] == "3" and tags["3"]["previous_production"] == "2"
    assert registry.rollback(settings) == ("3", "2")
    assert state(uc)[0]["production"] == "2"
    get_settings.cache_clear()
