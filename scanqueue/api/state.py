"""The state one app holds for its life: settings, the store, the event sink and hub.

Everything is opened on first use, so building the app touches no service.
Routes reach it through :func:`state_of`.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from scanqueue.api.hub import EventHub
from scanqueue.config import Settings
from scanqueue.db.store import Store, store_for
from scanqueue.observe.event_sinks import event_sink_for
from scanqueue.observe.events import EventSink


def state_of(request: Request) -> AppState:
    state: AppState = request.app.state.scanqueue
    return state


class AppState:
    """One app's settings, store, event sink and hub, and its count of open streams."""

    def __init__(self, settings: Settings, heartbeat_s: float, hub_window: int) -> None:
        self.settings = settings
        self.heartbeat_s = heartbeat_s
        self.hub_window = hub_window
        self.subscribers = 0  # open event streams
        self._store: Store | None = None
        self._sink: EventSink | None = None
        self._hub: EventHub | None = None
        self._redis: Any = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = store_for(self.settings.database_url)
        return self._store

    @property
    def sink(self) -> EventSink:
        if self._sink is None:
            self._sink = event_sink_for(self.settings)
        return self._sink

    def hub(self) -> EventHub:
        if self._hub is None:
            self._hub = EventHub(self.sink, window=self.hub_window)
            self._hub.start()
        return self._hub

    def release_subscriber(self) -> None:
        self.subscribers -= 1

    def close(self) -> None:
        if self._hub is not None:
            self._hub.close()

    def close_threadsafe(self) -> None:
        if self._hub is not None:
            self._hub.close_threadsafe()

    def redis(self) -> Any:
        if self._redis is None and self.settings.redis_url:
            from scanqueue.db.redisconn import redis_client

            self._redis = redis_client(self.settings.redis_url)
        return self._redis
