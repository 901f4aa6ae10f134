"""What the pages share: the settings, the API client, and reading years as people write them."""

from __future__ import annotations

import re

import streamlit as st

from coinyear.config import Settings, get_settings
from coinyear.ui.client import ApiClient, WorkspaceClient
from coinyear.years import year_label

YEAR_PATTERN = re.compile(r"^\s*(?:(AD|BC|BCE|CE)\s*)?(-?\d{1,4})\s*(AD|BC|BCE|CE)?\s*$", re.IGNORECASE)


def settings() -> Settings:
    return get_settings()


@st.cache_resource
def _client(url: str, token: str | None, timeout: float) -> ApiClient:
    return ApiClient(url, token, timeout)


@st.cache_resource
def _workspace_client(endpoint_name: str, volume: str | None, timeout: float) -> ApiClient:
    return WorkspaceClient(endpoint_name, volume, timeout)


def api_client() -> ApiClient:
    """The gateway at COINYEAR_API_URL, or with COINYEAR_SERVING_BACKEND=databricks the workspace itself (the
    Model Serving endpoint and the loop volume: no gateway needed, as in a Databricks App)."""
    current = settings()
    if current.serving_backend == "databricks":
        return _workspace_client(current.serving_endpoint_name, current.loop_volume, current.api_timeout)
    token = current.api_token.get_secret_value() if current.api_token else None
    return _client(current.api_url, token, current.api_timeout)


def parse_year(text: str) -> int:
    """'27 BC' -> -27, 'AD 73' / '73' / '73 AD' -> 73, '-27' -> -27; ValueError with a readable message."""
    match = YEAR_PATTERN.match(text or "")
    if not match or (match.group(1) and match.group(3)):
        raise ValueError(f"{text!r} is not a year; write e.g. '27 BC', 'AD 73' or '-27'")
    era = (match.group(1) or match.group(3) or "").upper()
    value = int(match.group(2))
    if era and value <= 0:
        raise ValueError(f"{text!r}: with AD or BC write a positive year")
    if value == 0:
        raise ValueError("there is no year 0: 1 BC is followed by AD 1")
    return -value if era in ("BC", "BCE") else value


def correction_label(year_from: int, year_to: int) -> str:
    """An expert's correction as the pages show it: 'AD 71', or a range with an en dash between the years."""
    if year_from == year_to:
        return year_label(year_from)
    return f"{year_label(year_from)} – {year_label(year_to)}"
