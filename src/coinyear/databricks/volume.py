"""The Databricks loop's contracts, shared by their writers (the gateway's databricks backend, the UI talking to
Databricks itself) and their reader (`coinyear ingest-payloads`). No heavy imports: the UI uses it.

In the Unity Catalog volume COINYEAR_LOOP_VOLUME (`/Volumes/<catalog>/<schema>/<volume>`):
    photos/<client_request_id>/<row>/front|back   decoded photo bytes of a request too big for the payload table,
                                                  stored before the request is sent to Model Serving; only for
                                                  an id that is a plain name (`safe_request_id`)
    feedback/<UTC time>-<uuid>.json               one `feedback` row as JSON (request_id, year_from, year_to,
                                                  timestamp ISO 8601 with zone, source, note, actor: who
                                                  gave it, as its writer says; coinyear.databricks.payloads)
"""

from __future__ import annotations

import json
import uuid

from coinyear.serve.request_id import SAFE_REQUEST_ID_RULE, safe_request_id

# Model Serving leaves `request` null in the payload table above 1 MiB; a little below it, to stay on the safe side.
PAYLOAD_LOG_LIMIT = 1_000_000
PHOTOS, FEEDBACK_FILES = "photos", "feedback"
# The client_request_id of `coinyear deploy`'s smoke queries (a plain name after it): Model Serving logs them in the
# payload table like any request, and `coinyear ingest-payloads` leaves them out of inference_log.
SMOKE_REQUEST_PREFIX = "coinyear-smoke-"


def photo_path(volume: str, request_id: str, row: int, side: str) -> str:
    """Where the photo `side` ("front" / "back") of row `row` of a request too big to be logged is kept.

    Raises ValueError for a request id that is not a plain name: it comes from whoever called the endpoint.
    """
    if not safe_request_id(request_id):
        raise ValueError(f"client_request_id {request_id[:200]!r} is not a plain name ({SAFE_REQUEST_ID_RULE}): "
                         f"it cannot name a folder of the volume")
    return f"{volume.rstrip('/')}/{PHOTOS}/{request_id}/{int(row)}/{side}"


def feedback_file(volume: str, record: dict) -> tuple[str, bytes]:
    """(path, content) of the file holding one feedback row; `record["timestamp"]` is an aware datetime."""
    stamp = record["timestamp"]
    path = f"{volume.rstrip('/')}/{FEEDBACK_FILES}/{stamp:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex}.json"
    return path, json.dumps({**record, "timestamp": stamp.isoformat()}).encode()


def files_api_path(path: str) -> str:
    """The Files API URL path of a volume file: `PUT` it to store bytes there."""
    from urllib.parse import quote

    return f"/api/2.0/fs/files{quote(path, safe='/')}"


def served_model(endpoint: dict) -> tuple[str, str] | None:
    """(model name, version) of the served entity taking the most traffic, from `GET /api/2.0/serving-endpoints/
    {name}`; during a canary the old version until the new one has the most traffic."""
    config = endpoint.get("config") or {}
    entities = config.get("served_entities") or config.get("served_models") or []
    if not entities:
        return None
    share = {route.get("served_entity_name") or route.get("served_model_name"): route.get("traffic_percentage", 0)
             for route in (config.get("traffic_config") or {}).get("routes") or []}
    main = max(entities, key=lambda entity: share.get(entity.get("name"), 0))
    name = main.get("entity_name") or main.get("model_name")
    version = main.get("entity_version") or main.get("model_version")
    return (str(name), str(version)) if name and version else None
