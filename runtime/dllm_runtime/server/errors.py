"""OpenAI-shaped errors: every failure the API reports is `{"error": {message, type, param, code}}`.

Routes raise `APIError` (or a subclass); one handler turns it into the JSON body and status, so no
client mistake can surface as kserve's generic 500.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error reported to the client in OpenAI's shape with an HTTP status."""

    status: int = HTTPStatus.BAD_REQUEST
    type: str = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=int(self.status), headers=self.headers)


class BadRequest(APIError):
    """400: the request is malformed or a value is out of range (names the field in `param`)."""


class Unauthorized(APIError):
    status = HTTPStatus.UNAUTHORIZED
    type = "authentication_error"


class NotFound(APIError):
    status = HTTPStatus.NOT_FOUND
    type = "not_found_error"


class PayloadTooLarge(APIError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class QueueFull(APIError):
    """429 with Retry-After: the engine's waiting queue is at its limit; retrying later may work."""

    status = HTTPStatus.TOO_MANY_REQUESTS
    type = "rate_limit_error"


class Unavailable(APIError):
    """503: weights still loading, or the server is draining for shutdown."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "service_unavailable"


class EngineFailure(APIError):
    """500: the engine failed on a valid request (the only 5xx this API sends besides 503)."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR
    type = "internal_server_error"


async def api_error_handler(_request, exc: APIError) -> JSONResponse:
    """FastAPI exception handler for `APIError`."""
    return exc.response()
