"""The Streamlit entry point (`coinyear ui`): page navigation and the serving status in the sidebar."""

import streamlit as st

from coinyear.ui import access
from coinyear.ui.client import ApiError
from coinyear.ui.shared import api_client, settings

st.set_page_config(page_title="coinyear", page_icon=":material/toll:", layout="wide")
access.signed_in(settings())  # on every page run: a sign-in whose token was rotated out ends here

navigation = st.navigation([
    st.Page("predict.py", title="Predict", icon=":material/photo_camera:", default=True),
    st.Page("monitor.py", title="Monitor", icon=":material/monitoring:"),
    st.Page("review.py", title="Review", icon=":material/rate_review:"),
    st.Page("models.py", title="Models", icon=":material/deployed_code_history:"),
])

with st.sidebar:
    st.markdown("### coinyear")
    st.caption(f"API: `{settings().api_url}`")
    try:
        served = api_client().version()
        if served.get("model_version"):
            st.success(f"Serving **{served.get('model_name', '?')}** version **{served['model_version']}**",
                       icon=":material/check_circle:")
        else:
            st.warning(f"The API is up but has no production model loaded yet. {served.get('last_error') or ''}",
                       icon=":material/hourglass_empty:")
    except ApiError as error:
        st.warning(error.message, icon=":material/cloud_off:")

navigation.run()
