"""A local stand-in for a Convex deployment, speaking its HTTP API over loopback.

POST /api/mutation and /api/query take {path, args, format} and answer {status: "success", value}
or {status: "error", errorMessage}, like Convex. Arguments are checked against FUNCTIONS, which is
written in the same JSON form Convex's own validators export (`fn.exportArgs()`);
tests/test_convex_mirror.py compares it with what convex/video.ts actually exports, so the fake
cannot drift from the real functions. The handlers re-implement video.ts's row logic (find or
create by twitchId, stale-update guard) on an in-memory `videos` table.

It can be taken down (connection refused), made to answer 503, or made slow.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import time
from typing import Any

from aiohttp import web

STR = {"type": "string"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}
DISPLAY_STATUSES = (
    "Queued",
    "Downloading",
    "Fetching chat",
    "Processing audio",
    "Transcribing",
    "Analyzing",
    "Finding highlights",
    "Completed",
    "Failed",
    "Cancelled",
)
URL_NAMES = (
    "video_url",
    "audio_url",
    "waveform_url",
    "transcript_url",
    "transcriptWords_url",
    "chat_url",
    "analysis_url",
    "transcriptUrl",
    "chatUrl",
    "audiowaveUrl",
    "transcriptAnalysisUrl",
    "transcriptWordUrl",
)


def _obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    value = {k: {"fieldType": t, "optional": False} for k, t in required.items()}
    value.update({k: {"fieldType": t, "optional": True} for k, t in (optional or {}).items()})
    return {"type": "object", "value": value}


URLS = _obj({}, dict.fromkeys(URL_NAMES, STR))
DISPLAY = {"type": "union", "value": [{"type": "literal", "value": s} for s in DISPLAY_STATUSES]}
_IDENTITY = {"secret": STR, "twitchId": STR, "jobId": STR, "createdAt": NUM, "updatedAt": NUM, "retryCount": NUM}
_IDENTITY_OPT = {"processingStartedAt": NUM, "title": STR, "urls": URLS}

FUNCTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "video:upsertJobProgress": (
        "mutation",
        _obj(
            {**_IDENTITY, "status": DISPLAY, "currentStage": STR, "progressPercentage": NUM},
            {**_IDENTITY_OPT, "estimatedCompletionSeconds": NUM},
        ),
    ),
    "video:markCompleted": ("mutation", _obj({**_IDENTITY, "processingCompletedAt": NUM}, _IDENTITY_OPT)),
    "video:markFailed": (
        "mutation",
        _obj(
            {
                **_IDENTITY,
                "processingCompletedAt": NUM,
                "progressPercentage": NUM,
                "errorType": STR,
                "errorMessage": STR,
                "isRetryable": BOOL,
            },
            _IDENTITY_OPT,
        ),
    ),
    "video:markCancelled": (
        "mutation",
        _obj({**_IDENTITY, "processingCompletedAt": NUM, "progressPercentage": NUM}, _IDENTITY_OPT),
    ),
    "video:updateStatusByTwitchId": ("mutation", _obj({"secret": STR, "twitchId": STR, "status": STR})),
    "video:updateStatus": (
        "mutation",
        _obj({"secret": STR, "id": {"type": "id", "tableName": "videos"}, "status": STR}),
    ),
    "video:updateUrls": ("mutation", _obj({"secret": STR, "twitchId": STR, "urls": URLS})),
    "video:getByTwitchIdPublic": ("query", _obj({"twitchId": STR})),
}


class ArgumentError(Exception):
    pass


def check(value: Any, spec: dict[str, Any], where: str = "args") -> None:
    """Validate a JSON value the way Convex validates function arguments."""
    kind = spec["type"]
    if kind in ("string", "id"):
        ok = isinstance(value, str)
    elif kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind == "boolean":
        ok = isinstance(value, bool)
    elif kind == "null":
        ok = value is None
    elif kind == "literal":
        ok = value == spec["value"] and type(value) is type(spec["value"])
    elif kind == "union":
        for option in spec["value"]:
            try:
                check(value, option, where)
                return
            except ArgumentError:
                pass
        ok = False
    elif kind == "object":
        if not isinstance(value, dict):
            raise ArgumentError(f"{where} must be an object, got {value!r}")
        fields = spec["value"]
        extra = set(value) - set(fields)
        if extra:
            raise ArgumentError(f"{where} has unknown fields {sorted(extra)}")
        for name, f in fields.items():
            if name not in value:
                if not f["optional"]:
                    raise ArgumentError(f"{where}.{name} is missing")
                continue
            check(value[name], f["fieldType"], f"{where}.{name}")
        return
    else:
        raise AssertionError(f"validator type {kind} not supported by the fake")
    if not ok:
        raise ArgumentError(f"{where}={value!r} does not match {spec}")


class FakeConvex:
    def __init__(self, secret: str = "s3cret") -> None:
        self.secret = secret
        self.videos: list[dict[str, Any]] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []  # successful calls, in order
        self.errors: list[str] = []
        self.delay = 0.0
        self.fail_503 = False
        self.in_flight = 0
        self.port = 0
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/mutation", self._mutation)
        app.router.add_post("/api/query", self._query)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Go down: the port refuses connections until start() is called again."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def row(self, twitch_id: str) -> dict[str, Any] | None:
        rows = [r for r in self.videos if r["twitchId"] == twitch_id]
        assert len(rows) <= 1, f"duplicate rows for {twitch_id}"
        return rows[0] if rows else None

    async def _mutation(self, request: web.Request) -> web.Response:
        return await self._handle(request, "mutation")

    async def _query(self, request: web.Request) -> web.Response:
        return await self._handle(request, "query")

    async def _handle(self, request: web.Request, kind: str) -> web.Response:
        self.in_flight += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail_503:
                return web.Response(status=503, text="upstream unavailable")
            body = await request.json()
            try:
                if set(body) != {"path", "args", "format"} or body["format"] != "json":
                    raise ArgumentError(f"request body must be {{path, args, format: 'json'}}, got {sorted(body)}")
                path, args = body["path"], body["args"]
                if path not in FUNCTIONS or FUNCTIONS[path][0] != kind:
                    raise ArgumentError(f"Could not find public function for '{path}'")
                check(args, FUNCTIONS[path][1])
                if "secret" in args and not hmac.compare_digest(args["secret"], self.secret):
                    raise ArgumentError("Uncaught ConvexError: Unauthorized: wrong KLIPSTREAM_CONVEX_SECRET")
                value = getattr(self, "_" + path.split(":")[1])(args)
            except ArgumentError as exc:
                self.errors.append(str(exc))
                return web.json_response({"status": "error", "errorMessage": str(exc), "logLines": []})
            self.calls.append((path, args))
            return web.json_response({"status": "success", "value": value, "logLines": []})
        finally:
            self.in_flight -= 1

    # --- the functions of convex/video.ts ---

    def _find_or_create(self, twitch_id: str) -> dict[str, Any]:
        row = self.row(twitch_id)
        if row is None:
            row = {"_id": f"v{next(self._ids)}", "_creationTime": time.time() * 1000, "twitchId": twitch_id}
            row["status"] = "Queued"
            self.videos.append(row)
        return row

    @staticmethod
    def _stale(row: dict[str, Any], a: dict[str, Any]) -> bool:
        if row.get("jobId") == a["jobId"]:
            return "updatedAt" in row and a["updatedAt"] < row["updatedAt"]
        return "createdAt" in row and a["createdAt"] < row["createdAt"]

    def _job_update(self, a: dict[str, Any], fields: dict[str, Any], clear: tuple[str, ...]) -> dict[str, Any]:
        row = self._find_or_create(a["twitchId"])
        if self._stale(row, a):
            return {"applied": False}
        row.update(a.get("urls", {}))
        if "title" in a:
            row["title"] = a["title"]
        for key in ("jobId", "retryCount", "createdAt", "updatedAt"):
            row[key] = a[key]
        for key in ("processingStartedAt", *clear):
            row.pop(key, None)
        if "processingStartedAt" in a:
            row["processingStartedAt"] = a["processingStartedAt"]
        row.update(fields)
        return {"applied": True}

    _NO_ERROR = ("errorType", "errorMessage", "isRetryable")

    def _upsertJobProgress(self, a: dict[str, Any]) -> dict[str, Any]:
        fields = {k: a[k] for k in ("status", "currentStage", "progressPercentage")}
        clear: tuple[str, ...] = (*self._NO_ERROR, "processingCompletedAt", "estimatedCompletionSeconds")
        if "estimatedCompletionSeconds" in a:
            fields["estimatedCompletionSeconds"] = a["estimatedCompletionSeconds"]
        return self._job_update(a, fields, clear)

    def _markCompleted(self, a: dict[str, Any]) -> dict[str, Any]:
        fields = {
            "status": "Completed",
            "currentStage": "Completed",
            "progressPercentage": 100,
            "estimatedCompletionSeconds": 0,
            "processingCompletedAt": a["processingCompletedAt"],
        }
        return self._job_update(a, fields, self._NO_ERROR)

    def _markFailed(self, a: dict[str, Any]) -> dict[str, Any]:
        fields = {k: a[k] for k in ("progressPercentage", "errorType", "errorMessage", "isRetryable")}
        fields.update(status="Failed", currentStage="Failed", processingCompletedAt=a["processingCompletedAt"])
        return self._job_update(a, fields, ("estimatedCompletionSeconds",))

    def _markCancelled(self, a: dict[str, Any]) -> dict[str, Any]:
        fields = {"status": "Cancelled", "currentStage": "Cancelled", "progressPercentage": a["progressPercentage"]}
        fields["processingCompletedAt"] = a["processingCompletedAt"]
        return self._job_update(a, fields, (*self._NO_ERROR, "estimatedCompletionSeconds"))

    def _updateStatusByTwitchId(self, a: dict[str, Any]) -> str:
        row = self._find_or_create(a["twitchId"])
        row.update(status=a["status"], updatedAt=time.time() * 1000)
        return row["_id"]

    def _updateStatus(self, a: dict[str, Any]) -> None:
        for row in self.videos:
            if row["_id"] == a["id"]:
                row.update(status=a["status"], updatedAt=time.time() * 1000)
                return None
        raise ArgumentError(f"Update on nonexistent document ID {a['id']}")

    def _updateUrls(self, a: dict[str, Any]) -> str:
        row = self._find_or_create(a["twitchId"])
        row.update(a["urls"], updatedAt=time.time() * 1000)
        return row["_id"]

    def _getByTwitchIdPublic(self, a: dict[str, Any]) -> dict[str, Any] | None:
        return self.row(a["twitchId"])
