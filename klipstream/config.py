"""Settings read once from the environment and validated at start.

A bad value stops the process with one line naming the variable, instead of a failure deep inside
a job hours later.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A variable has a value the service cannot use."""


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be greater than 0")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0:
        raise ValueError("must be 0 or more")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port (0-65535)")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def _database_url(raw: str) -> str:
    value = raw.strip()
    if value and not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("must be empty (SQLite) or a postgresql:// URL")
    return value


_X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


def _env(name: str, parse: Callable[[str], Any] = str, *, secret: bool = False, **kwargs: Any) -> Any:
    """A dataclass field read from `name`; parse() turns the raw string into the value. A `secret`
    is removed from the process environment once read, so no child process inherits it."""
    return field(metadata={"env": name, "parse": parse, "secret": secret}, **kwargs)


@dataclass(frozen=True)
class Settings:
    # --- server ---
    port: int = _env("PORT", _port, default=8080)
    host: str = _env("KLIPSTREAM_HOST", default="0.0.0.0")
    public_url: str = _env("KLIPSTREAM_PUBLIC_URL", default="")  # base for absolute URLs in responses
    data_dir: Path = _env("KLIPSTREAM_DATA_DIR", Path, default=Path("./data"))
    log_level: str = _env("KLIPSTREAM_LOG_LEVEL", _choice("debug", "info", "warning", "error"), default="info")
    log_format: str = _env("KLIPSTREAM_LOG_FORMAT", _choice("json", "text"), default="json")
    # --- job store: SQLite in the data directory unless a PostgreSQL URL is given ---
    database_url: str = _env("KLIPSTREAM_DATABASE_URL", _database_url, secret=True, default="")
    database_pool_size: int = _env("KLIPSTREAM_DATABASE_POOL_SIZE", _positive_int, default=10)
    database_timeout_seconds: float = _env("KLIPSTREAM_DATABASE_TIMEOUT_SECONDS", _positive_float, default=5.0)
    # --- several instances on one PostgreSQL database (leases; ignored with SQLite) ---
    instance_id: str = _env("KLIPSTREAM_INSTANCE_ID", default="")  # empty: host-pid-random
    lease_seconds: float = _env("KLIPSTREAM_LEASE_SECONDS", _positive_float, default=30.0)
    heartbeat_seconds: float = _env("KLIPSTREAM_HEARTBEAT_SECONDS", _positive_float, default=1.0)
    claim_poll_seconds: float = _env("KLIPSTREAM_CLAIM_POLL_SECONDS", _positive_float, default=1.0)
    # LISTEN/NOTIFY wake-ups between instances (checked at start; off: polling alone, e.g. behind PgBouncer)
    database_notify: bool = _env("KLIPSTREAM_DATABASE_NOTIFY", _bool, default=True)
    # --- access ---
    admin_token: str = _env("KLIPSTREAM_ADMIN_TOKEN", secret=True, default="")
    admin_loopback: bool = _env("KLIPSTREAM_ADMIN_LOOPBACK", _bool, default=False)  # no token: loopback may use admin
    api_keys: tuple[str, ...] = _env("KLIPSTREAM_API_KEYS", _list, secret=True, default=())
    stream_token_seconds: int = _env("KLIPSTREAM_STREAM_TOKEN_SECONDS", _positive_int, default=3600)
    # an event topic nobody has watched for this long is dropped (a finished job's answers 204 till then)
    stream_idle_seconds: float = _env("KLIPSTREAM_STREAM_IDLE_SECONDS", _positive_float, default=600.0)
    # events kept per job for Last-Event-ID replay (job_events table, and each stream's ring in memory)
    stream_events_kept: int = _env("KLIPSTREAM_STREAM_EVENTS_KEPT", _positive_int, default=256)
    # at most one progress event per job this often (each is a stored event and a job-row write)
    stream_progress_seconds: float = _env("KLIPSTREAM_STREAM_PROGRESS_SECONDS", _positive_float, default=1.0)
    cors_origins: tuple[str, ...] = _env("KLIPSTREAM_CORS_ORIGINS", _list, default=("*",))
    allow_private_urls: bool = _env("KLIPSTREAM_ALLOW_PRIVATE_URLS", _bool, default=False)
    allow_local_files: bool = _env("KLIPSTREAM_ALLOW_LOCAL_FILES", _bool, default=False)
    max_body_bytes: int = _env("KLIPSTREAM_MAX_BODY_BYTES", _positive_int, default=64 * 1024)
    legacy_routes: bool = _env("KLIPSTREAM_LEGACY_ROUTES", _bool, default=True)  # POST /, /run_pipeline, /list_files
    legacy_wait_seconds: float = _env("KLIPSTREAM_LEGACY_WAIT_SECONDS", _positive_float, default=3300.0)
    legacy_max_waiting: int = _env("KLIPSTREAM_LEGACY_MAX_WAITING", _positive_int, default=64)
    # --- queue and workers ---
    # per instance; 0 (with KLIPSTREAM_DATABASE_URL): an API-only instance that runs no jobs
    max_running_jobs: int = _env("KLIPSTREAM_MAX_RUNNING_JOBS", _non_negative_int, default=2)
    # with PostgreSQL the bound holds across all instances (the database counts, atomically)
    max_queued_jobs: int = _env("KLIPSTREAM_MAX_QUEUED_JOBS", _positive_int, default=1000)
    # PostgreSQL: at most this many jobs running across all instances (checked in each claim); unset: no limit
    cluster_max_running_jobs: int | None = _env("KLIPSTREAM_CLUSTER_MAX_RUNNING_JOBS", _positive_int, default=None)
    aging_seconds: float = _env("KLIPSTREAM_AGING_SECONDS", _positive_float, default=300.0)
    network_concurrency: int = _env("KLIPSTREAM_NETWORK_CONCURRENCY", _positive_int, default=4)
    cpu_concurrency: int = _env("KLIPSTREAM_CPU_CONCURRENCY", _positive_int, default=max(1, os.cpu_count() or 1))
    stage_retries: int = _env("KLIPSTREAM_STAGE_RETRIES", _non_negative_int, default=2)
    retry_base_seconds: float = _env("KLIPSTREAM_RETRY_BASE_SECONDS", _positive_float, default=2.0)
    stage_timeout_seconds: float = _env("KLIPSTREAM_STAGE_TIMEOUT_SECONDS", _positive_float, default=4 * 3600.0)
    shutdown_seconds: float = _env("KLIPSTREAM_SHUTDOWN_SECONDS", _positive_float, default=7.0)
    keep_workdirs: bool = _env("KLIPSTREAM_KEEP_WORKDIRS", _bool, default=False)
    # --- retention (the janitor); 0 keeps that kind of data forever ---
    janitor_interval_seconds: float = _env("KLIPSTREAM_JANITOR_INTERVAL_SECONDS", _positive_float, default=600.0)
    retain_workdirs_seconds: float = _env("KLIPSTREAM_RETAIN_WORKDIRS_SECONDS", _non_negative_float, default=86400.0)
    retain_jobs_seconds: float = _env("KLIPSTREAM_RETAIN_JOBS_SECONDS", _non_negative_float, default=30 * 86400.0)
    retain_idempotency_seconds: float = _env(
        "KLIPSTREAM_RETAIN_IDEMPOTENCY_SECONDS", _non_negative_float, default=86400.0
    )
    retain_stage_runs_seconds: float = _env(
        "KLIPSTREAM_RETAIN_STAGE_RUNS_SECONDS", _non_negative_float, default=30 * 86400.0
    )
    retain_webhooks_seconds: float = _env(
        "KLIPSTREAM_RETAIN_WEBHOOKS_SECONDS", _non_negative_float, default=7 * 86400.0
    )
    retain_artifacts_seconds: float = _env(
        "KLIPSTREAM_RETAIN_ARTIFACTS_SECONDS", _non_negative_float, default=30 * 86400.0
    )
    # --- media ---
    max_video_seconds: float = _env("KLIPSTREAM_MAX_VIDEO_SECONDS", _positive_float, default=12 * 3600.0)
    video_height: int = _env("KLIPSTREAM_VIDEO_HEIGHT", _positive_int, default=480)
    download_fragments: int = _env("KLIPSTREAM_DOWNLOAD_FRAGMENTS", _positive_int, default=8)
    # --- clips (options.clips) ---
    clip_height: int = _env("KLIPSTREAM_CLIP_HEIGHT", _positive_int, default=720)  # or the source's if lower
    vertical_height: int = _env("KLIPSTREAM_VERTICAL_HEIGHT", _positive_int, default=1920)  # width: 9/16 of it
    clip_encoder: str = _env("KLIPSTREAM_CLIP_ENCODER", _choice("auto", "libx264", "h264_nvenc"), default="auto")
    clip_preset: str = _env("KLIPSTREAM_CLIP_PRESET", _choice(*_X264_PRESETS), default="veryfast")
    vertical_preset: str = _env("KLIPSTREAM_VERTICAL_PRESET", _choice(*_X264_PRESETS), default="superfast")
    clip_crf: int = _env("KLIPSTREAM_CLIP_CRF", _non_negative_int, default=21)
    ffmpeg_path: str = _env("KLIPSTREAM_FFMPEG", default="ffmpeg")  # the ffmpeg program of the vertical versions
    # --- chat ---
    twitch_gql_url: str = _env("KLIPSTREAM_TWITCH_GQL_URL", default="https://gql.twitch.tv/gql")
    twitch_client_id: str = _env("KLIPSTREAM_TWITCH_CLIENT_ID", default="kd1unb4b3q4t58fwlpcbzcbnm76a8fp")
    twitch_comments_hash: str = _env(
        "KLIPSTREAM_TWITCH_COMMENTS_HASH", default="b70a3591ff0f4e0313d126c6a1502d79a1c02baebb288227c582044aa76adf6a"
    )
    chat_ranges: int = _env("KLIPSTREAM_CHAT_RANGES", _positive_int, default=4)
    max_chat_bytes: int = _env("KLIPSTREAM_MAX_CHAT_BYTES", _positive_int, default=200 * 1024 * 1024)
    bot_accounts: tuple[str, ...] = _env(
        "KLIPSTREAM_BOT_ACCOUNTS", _list, default=("nightbot", "streamelements", "moobot", "fossabot", "streamlabs")
    )
    # --- transcription ---
    whisper_model: str = _env("KLIPSTREAM_WHISPER_MODEL", default="")  # empty: the bundled tiny.en
    transcribe_workers: int = _env("KLIPSTREAM_TRANSCRIBE_WORKERS", _positive_int, default=1)
    whisper_device: str = _env("KLIPSTREAM_WHISPER_DEVICE", _choice("auto", "cpu", "cuda"), default="auto")
    whisper_compute_type: str = _env("KLIPSTREAM_WHISPER_COMPUTE_TYPE", default="auto")
    whisper_batch_size: int = _env("KLIPSTREAM_WHISPER_BATCH_SIZE", _positive_int, default=16)
    # BatchedInferencePipeline: "auto" uses it on GPU only; "on" forces it (CI runs the GPU code path on CPU)
    whisper_batched: str = _env("KLIPSTREAM_WHISPER_BATCHED", _choice("auto", "on", "off"), default="auto")
    chunk_seconds: float = _env("KLIPSTREAM_CHUNK_SECONDS", _positive_float, default=120.0)
    # --- analysis ---
    top_highlights: int = _env("KLIPSTREAM_TOP_HIGHLIGHTS", _positive_int, default=10)
    llm_base_url: str = _env("KLIPSTREAM_LLM_BASE_URL", default="")
    llm_api_key: str = _env("KLIPSTREAM_LLM_API_KEY", secret=True, default="")
    llm_model: str = _env("KLIPSTREAM_LLM_MODEL", default="")
    llm_concurrency: int = _env("KLIPSTREAM_LLM_CONCURRENCY", _positive_int, default=4)
    # --- artifact storage ---
    storage: str = _env("KLIPSTREAM_STORAGE", _choice("local", "gcs"), default="local")
    gcs_bucket: str = _env("KLIPSTREAM_GCS_BUCKET", default="")  # one bucket for all kinds: {video_id}/{file}
    gcs_bucket_raw: str = _env("KLIPSTREAM_GCS_BUCKET_RAW", default="klipstream-vods-raw")
    gcs_bucket_transcripts: str = _env("KLIPSTREAM_GCS_BUCKET_TRANSCRIPTS", default="klipstream-transcripts")
    gcs_bucket_chatlogs: str = _env("KLIPSTREAM_GCS_BUCKET_CHATLOGS", default="klipstream-chatlogs")
    gcs_bucket_analysis: str = _env("KLIPSTREAM_GCS_BUCKET_ANALYSIS", default="klipstream-analysis")
    # where job checkpoints go with KLIPSTREAM_STORAGE=gcs; empty: KLIPSTREAM_GCS_BUCKET, else the raw bucket
    gcs_bucket_checkpoints: str = _env("KLIPSTREAM_GCS_BUCKET_CHECKPOINTS", default="")
    gcs_signing_account: str = _env("KLIPSTREAM_GCS_SIGNING_ACCOUNT", default="")  # sign URLs via IAM signBlob
    signed_url_seconds: int = _env("KLIPSTREAM_SIGNED_URL_SECONDS", _positive_int, default=7 * 24 * 3600)
    upload_concurrency: int = _env("KLIPSTREAM_UPLOAD_CONCURRENCY", _positive_int, default=4)
    # --- Convex status mirror (off unless CONVEX_URL is set) ---
    convex_url: str = _env("CONVEX_URL", default="")
    convex_secret: str = _env("KLIPSTREAM_CONVEX_SECRET", secret=True, default="")
    # --- webhooks for callback_url ---
    webhook_secrets: tuple[str, ...] = _env("KLIPSTREAM_WEBHOOK_SECRET", _list, secret=True, default=())
    webhook_timeout_seconds: float = _env("KLIPSTREAM_WEBHOOK_TIMEOUT_SECONDS", _positive_float, default=10.0)
    webhook_max_age_seconds: float = _env("KLIPSTREAM_WEBHOOK_MAX_AGE_SECONDS", _positive_float, default=24 * 3600.0)
    webhook_retry_base_seconds: float = _env("KLIPSTREAM_WEBHOOK_RETRY_BASE_SECONDS", _positive_float, default=5.0)
    webhook_progress_seconds: float = _env("KLIPSTREAM_WEBHOOK_PROGRESS_SECONDS", _positive_float, default=5.0)
    webhook_concurrency: int = _env("KLIPSTREAM_WEBHOOK_CONCURRENCY", _positive_int, default=8)
    # --- the outbox (webhook deliveries and Convex updates in the job store) ---
    # How long a sender's claim on a delivery lasts: a killed sender's deliveries are sent again
    # (same webhook-id) after this. Longer than one attempt (KLIPSTREAM_WEBHOOK_TIMEOUT_SECONDS).
    outbox_claim_seconds: float = _env("KLIPSTREAM_OUTBOX_CLAIM_SECONDS", _positive_float, default=60.0)
    # Longest idle wait of the senders: how soon another instance's rows (or an expired claim) are seen.
    outbox_poll_seconds: float = _env("KLIPSTREAM_OUTBOX_POLL_SECONDS", _positive_float, default=1.0)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata["env"]
            if name in env:
                try:
                    values[f.name] = f.metadata["parse"](env[name])
                except ValueError as exc:
                    raise ConfigError(f"{name}={env[name]!r}: {exc}") from None
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.max_running_jobs == 0 and not self.database_url:
            raise ConfigError(
                "KLIPSTREAM_MAX_RUNNING_JOBS=0 (an API-only instance) needs KLIPSTREAM_DATABASE_URL: "
                "with SQLite no other instance would run its jobs"
            )
        if self.heartbeat_seconds * 3 > self.lease_seconds:
            raise ConfigError(
                f"KLIPSTREAM_HEARTBEAT_SECONDS={self.heartbeat_seconds:g} must be at most a third of "
                f"KLIPSTREAM_LEASE_SECONDS={self.lease_seconds:g}, so a lease survives a missed heartbeat"
            )
        if self.outbox_claim_seconds <= self.webhook_timeout_seconds:
            raise ConfigError(
                f"KLIPSTREAM_OUTBOX_CLAIM_SECONDS={self.outbox_claim_seconds:g} must be longer than "
                f"KLIPSTREAM_WEBHOOK_TIMEOUT_SECONDS={self.webhook_timeout_seconds:g}, or a slow delivery "
                "could be claimed by a second sender while the first still sends it"
            )
        if self.clip_crf > 51:
            raise ConfigError(f"KLIPSTREAM_CLIP_CRF={self.clip_crf}: must be 0-51")
        if not 144 <= self.clip_height <= 2160:
            raise ConfigError(f"KLIPSTREAM_CLIP_HEIGHT={self.clip_height}: must be 144-2160")
        if not 320 <= self.vertical_height <= 3840:
            raise ConfigError(f"KLIPSTREAM_VERTICAL_HEIGHT={self.vertical_height}: must be 320-3840")
        if self.llm_base_url and not self.llm_model:
            raise ConfigError("KLIPSTREAM_LLM_BASE_URL is set but KLIPSTREAM_LLM_MODEL is empty")

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "klipstream.sqlite3"


def secret_variables() -> tuple[str, ...]:
    return tuple(f.metadata["env"] for f in fields(Settings) if f.metadata["secret"])


def remove_secrets_from_environment(environ: MutableMapping[str, str] | None = None) -> None:
    """Drop the secret variables from the process environment once the settings hold them.

    Child processes inherit the environment: the download children get an explicit minimal one
    (klipstream.proc.child_env), but multiprocessing's spawned transcription workers can only
    inherit this process's, so the secrets must not be in it when they start.
    """
    environ = os.environ if environ is None else environ
    for name in secret_variables():
        environ.pop(name, None)


def env_table() -> list[tuple[str, str, str]]:
    """(variable, default, field) rows, so the README and `--help` list every variable."""
    rows = []
    for f in fields(Settings):
        default = f.default if f.default is not f.default_factory else ""  # type: ignore[comparison-overlap]
        rows.append((f.metadata["env"], str(default), f.name))
    return rows
