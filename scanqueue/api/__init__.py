"""``scanqueue serve``: the HTTP API, the SSE event stream, OpenAPI and the page.

Owns routes, request validation, authentication and the event hub.  Uses
``db``, ``observe`` and ``config``; never the worker or the bridge.
"""
