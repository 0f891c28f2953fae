"""Reading a workflow's results from the REST result store (long polling)."""

from __future__ import annotations

import base64

import requests

from idds_fat.errors import ServiceError


class RestResultSource:
    """Long-polls ``GET {service}/results/{workflow}?since=CURSOR`` for new envelopes.

    One ``requests.Session`` per source; every call has a timeout.
    """

    def __init__(self, service_url: str, workflow_id: str, token: str | None = None) -> None:
        self.url = f"{service_url.rstrip('/')}/results/{workflow_id}"
        self._session = requests.Session()
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    def fetch(
        self, cursor: int, wait: float = 0.0, limit: int = 1000, holder: str | None = None
    ) -> tuple[int, list[bytes]]:
        """Return ``(new_cursor, envelopes)`` newer than ``cursor``, waiting up to ``wait`` s;
        with ``holder``, without the copies the store keeps for that reader (the cursor
        still moves past them).

        Raises:
            ServiceError: the service could not be reached or answered an error.
        """
        params: dict[str, object] = {"since": cursor, "wait": wait, "limit": limit}
        if holder is not None:
            params["holder"] = holder
        try:
            response = self._session.get(
                self.url,
                params=params,
                timeout=(5.0, wait + 15.0),
            )
        except requests.RequestException as exc:
            raise ServiceError(f"result store at {self.url} unreachable: {exc}") from exc
        if response.status_code != 200:
            raise ServiceError(
                f"result store at {self.url} answered {response.status_code}: {response.text[:200]}"
            )
        document = response.json()
        envelopes = [base64.b64decode(item["envelope"]) for item in document["results"]]
        return int(document["cursor"]), envelopes

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()
