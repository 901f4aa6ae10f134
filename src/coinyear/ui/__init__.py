"""The Streamlit front end: predict from two photos and correct the date, watch the system, manage models.

`coinyear ui` runs `app.py`; the pages talk to the serving API through `client.py` (never to the model
directly), and read the monitoring data and the registry for the Monitor and Models pages.
"""
