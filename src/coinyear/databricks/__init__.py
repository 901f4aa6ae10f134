"""What only runs against a Databricks workspace: the second deployment target (the first is this machine).

gateway    the gateway's remote backend: scoring forwarded to a Model Serving endpoint, feedback kept in a volume
volume     the loop volume's paths and file formats (photos of big requests, feedback files); light: the UI uses it
payloads   `coinyear ingest-payloads`: the endpoint's payload table and the volume's files -> the lake
deploy     `coinyear deploy` to a Model Serving endpoint: create, canary, smoke, restore, CAN_QUERY grants

Chosen at start-up by coinyear.targets; nothing here is imported by the local target.
"""
