"""A small client for the homepage engine's layout API.

>>> from homepage_client import HomepageClient, Event
>>> client = HomepageClient("http://127.0.0.1:8000", timeout=0.3, retries=2)  # doctest: +SKIP
>>> page = client.layout("u42", device="mobile", hour=20)                      # doctest: +SKIP
>>> client.feedback(page.request_id, [Event(slot=0, item_id=page.modules[0].items[0].item_id,
...                                         type="play")])                     # doctest: +SKIP

>>> admin = HomepageClient("http://127.0.0.1:8000", operator_token="...")         # doctest: +SKIP
>>> job = admin.apply_config(open("homepage.toml").read(), wait_s=60)        # doctest: +SKIP
>>> job.result["version"]                                                     # doctest: +SKIP

It depends only on ``requests``; it never imports the engine.
"""

from ._client import (
    ConfigJob,
    ConfigJobError,
    Event,
    FeedbackResult,
    HomepageClient,
    HomepageClientError,
    Item,
    Layout,
    Module,
)

__all__ = ["ConfigJob", "ConfigJobError", "Event", "FeedbackResult", "HomepageClient", "HomepageClientError", "Item", "Layout", "Module"]
