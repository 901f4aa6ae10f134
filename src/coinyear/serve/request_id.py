"""The rule a client's `client_request_id` must follow: a plain name, never a path. Both gateway backends check it
(on Databricks the id names a folder of the loop volume, coinyear.databricks.volume) and payload ingestion
keeps no photos for an id that breaks it. No heavy imports: the UI's volume paths use it.
"""

from __future__ import annotations

import re

# A request id that names a folder: ASCII letters, digits, '.', '_', '-', not starting with '.' (no '..', no
# hidden name), at most 128 characters (the longest client_request_id the gateway takes).
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
SAFE_REQUEST_ID_RULE = "1 to 128 ASCII letters, digits, '.', '_' or '-', not starting with '.'"


def safe_request_id(request_id: str) -> bool:
    """Whether `request_id` can name a folder of the volume: a plain name, never a path (see SAFE_REQUEST_ID)."""
    return isinstance(request_id, str) and SAFE_REQUEST_ID.fullmatch(request_id) is not None
