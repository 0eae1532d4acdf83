"""Typed settings, read from the environment and ``.env`` by :func:`load_settings`.

Every variable is listed in ``deploy/.env.example`` and the README. Nothing reads
settings at import time: entry points call :func:`load_settings` once and pass
the result down.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_CLASSES = ("autoimmune", "normal")


class Settings(BaseSettings):
    """All of thyrocad's configuration; defaults give the embedded, one-machine setup."""

    model_config = SettingsConfigDict(
        env_prefix="THYROCAD_", env_file=".env", extra="ignore", populate_by_name=True
    )

    data_dir: Path = Field(default=Path("./thyrocad-data"))
    # Storage and broker: empty means the embedded default under data_dir.
    database_url: str = Field(default="", validation_alias="DATABASE_URL")
    celery_broker_url: str = Field(default="", validation_alias="CELERY_BROKER_URL")

    # DICOM listener
    ae_title: str = "THYROCAD"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    allowed_aets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_associations: int = 16  # per listener process
    listener_processes: int = Field(default=1, ge=1)
    max_pdu_size: int = 131072
    acse_timeout_seconds: float = Field(default=5.0, gt=0)  # connect -> A-ASSOCIATE-RQ (ARTIM)
    network_timeout_seconds: float = Field(default=60.0, gt=0)  # idle association; one PDU
    require_called_aet: bool = True  # refuse associations addressed to another AE title
    spool_min_free_mb: int = 512
    reconcile_interval_seconds: float = 60.0

    # Inference and aggregation
    classes: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(DEFAULT_CLASSES))
    positive_class: str = "autoimmune"
    threshold: float = 0.5
    frame_policy: str = "middle"
    batch_max: int = 32
    batch_wait_seconds: float = 0.2
    # A live worker renews its claims every third of this; a vanished one loses them after it.
    claim_lease_seconds: float = Field(default=30.0, gt=0)
    decode_threads: int = 2
    study_idle_seconds: float = 30.0
    finalise_interval_seconds: float = 1.0
    aggregation_rule: str = "mean"
    requeue_interval_seconds: float = 10.0
    requeue_stale_seconds: float = 120.0
    # Grad-CAM evidence with every prediction, for the web page (one extra backward pass).
    evidence_maps: bool = True
    # Where an inference worker runs its model: "cpu", or "gpu:N" to pin GPU N (memory
    # growth, mixed precision where the backend has it, THYROCAD_GPU_BATCH_MAX).
    worker_device: str = "cpu"
    gpu_batch_max: int = Field(default=128, ge=1)
    mixed_precision: bool = True  # on a GPU only; a CPU worker always computes in float32

    # Continuous learning: labels → scheduled refit → champion/challenger promotion
    retrain_interval_seconds: float = Field(default=3600.0, ge=0)  # 0: no scheduled refit
    retrain_min_new_patients: int = Field(default=10, ge=1)
    retrain_epochs: int = Field(default=0, ge=0)  # 0: as many as the active model had
    retrain_stale_seconds: float = Field(default=21600.0, gt=0)
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)
    promote_auc_tolerance: float = Field(default=0.02, ge=0, le=1)
    promote_min_sensitivity: float = Field(default=0.8, ge=0, le=1)

    # The archive: backfill (query/retrieve) and Structured Reports back to the PACS
    sr_destination: str = ""  # "AET@HOST:PORT"; empty sends no Structured Report
    backfill_rate: float = 1.0  # retrieve requests per second; 0 = no limit
    backfill_concurrency: int = Field(default=2, ge=1, le=16)
    retrieve_timeout_seconds: float = 300.0  # an archive silent this long fails that request
    backfill_wait_seconds: float = 3600.0  # how long a backfill waits for arrival/classification

    # DICOM over TLS: our certificate and key (PEM); with a CA, client certificates are
    # required and verified, and it is the trust anchor for the peers we connect to.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_also_plain_port: int = Field(default=0, ge=0, le=65535)  # 0: TLS only
    sr_tls: bool = False  # send Structured Reports to THYROCAD_SR_DESTINATION over TLS

    # The radiologists' web page (thyrocad web)
    web_host: str = "127.0.0.1"  # loopback unless opened on purpose
    web_port: int = Field(default=8080, ge=1, le=65535)
    web_session_minutes: float = Field(default=60.0, gt=0)  # a sign-in lasts this long idle
    # Signs session cookies; empty: a random key kept in THYROCAD_DATA_DIR/web-secret.
    web_secret_file: Path | None = None
    # PostgreSQL: the read-only role the page reads through; empty: DATABASE_URL.
    web_read_database_url: str = ""

    # Metrics
    metrics_port: int = Field(default=0, ge=0, le=65535)  # 0 disables the metrics endpoint
    # Loopback unless opened on purpose: /metrics and /readyz describe the deployment.
    metrics_host: str = "127.0.0.1"
    # Where a prefork worker keeps its per-process metric files (default: the temp folder).
    metrics_multiproc_dir: Path | None = None

    log_json: bool = False
    log_level: str = "INFO"
    # Every audit event also as an RFC 5424 syslog message: udp://host[:port],
    # unix:///path or a socket path. Empty: the audit trail is in the database only.
    audit_syslog: str = ""

    @field_validator("allowed_aets", "classes", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("ae_title")
    @classmethod
    def _check_aet(cls, value: str) -> str:
        value = value.strip()
        if not value or len(value) > 16:
            raise ValueError("an AE title has 1 to 16 characters")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        value = value.strip().upper()
        if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("a log level is DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value

    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        # Paths under it are recorded in the database and read by other processes, which
        # may run from another folder or on another host: never a relative path.
        return value.expanduser().absolute()

    @field_validator("worker_device")
    @classmethod
    def _check_worker_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not re.fullmatch(r"cpu|gpu:\d{1,2}", value):
            raise ValueError("THYROCAD_WORKER_DEVICE is cpu or gpu:N (N the GPU's index, 0 first)")
        return value

    @field_validator("audit_syslog")
    @classmethod
    def _check_audit_syslog(cls, value: str) -> str:
        value = value.strip()
        # The forms thyrocad.audit_log.parse_target reads (TCP would need RFC 6587 framing).
        if value and not re.fullmatch(
            r"udp://(\[[0-9a-fA-F:]+\]|[^\s/:\[\]]+)(:\d{1,5})?|(unix://)?/\S+", value
        ):
            raise ValueError(
                "THYROCAD_AUDIT_SYSLOG must be udp://host[:port], unix:///path or a socket path"
            )
        return value

    @field_validator("sr_destination")
    @classmethod
    def _check_sr_destination(cls, value: str) -> str:
        value = value.strip()
        if value and not re.fullmatch(r"[^@\s]{1,16}@[^:@\s]*:\d{1,5}", value):
            raise ValueError("THYROCAD_SR_DESTINATION must look like AET@HOST:PORT")
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("THYROCAD_TLS_CERT and THYROCAD_TLS_KEY are set together")
        if self.tls_also_plain_port and self.tls_cert is None:
            raise ValueError("THYROCAD_TLS_ALSO_PLAIN_PORT needs THYROCAD_TLS_CERT and _KEY")
        return self

    @model_validator(mode="after")
    def _check_classes(self) -> Settings:
        if len(set(self.classes)) < 2:
            raise ValueError("THYROCAD_CLASSES needs at least two distinct class names")
        if self.positive_class not in self.classes:
            raise ValueError(
                f"THYROCAD_POSITIVE_CLASS {self.positive_class!r} is not one of {self.classes}"
            )
        return self

    @cached_property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @cached_property
    def registry_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def tls_files(self) -> tuple[Path | None, Path | None, Path | None]:
        """(certificate, key, CA): the arguments of ``pacs.tls.TlsConfig``."""
        return self.tls_cert, self.tls_key, self.tls_ca

    @property
    def embedded(self) -> bool:
        """True when neither a database nor a broker server is configured."""
        return not self.database_url and not self.celery_broker_url

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'thyrocad.sqlite').resolve()}"

    @property
    def broker_url(self) -> str:
        # The filesystem transport needs no server: the embedded default.
        return self.celery_broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"


def load_settings(**overrides: object) -> Settings:
    """Read the settings from the environment (and ``.env``), with explicit overrides."""
    return Settings(**overrides)  # type: ignore[arg-type]
