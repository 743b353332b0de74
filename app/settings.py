"""Every setting of the service, read once from `DID_*` environment variables (and `did serve` flags).

docs/deploy.md's settings table lists these fields; keep the two in step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.compiled import Compile

from . import faces

MiB = 1 << 20


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DID_", extra="ignore", frozen=True)

    # --- models -------------------------------------------------------------------------------------------------
    weights: Path = Field(Path("weights"), description="directory of checkpoints (NAME.json + NAME.safetensors); every card in it is loaded")
    examples: Path = Field(Path("examples"), description="directory of sample images that the demo page at / offers "
                           "(index.json + one folder per pair), served at /examples/; missing: no samples")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="compute dtype of the models: any on CUDA; on the CPU float32, or bfloat16 where the CPU has native bf16 (AVX512-BF16 or AMX)")
    default_model: str | None = Field(None, description="model used when a request names none (default: "
                                      "smile_glasses_mask when loaded, else the first checkpoint by name)")
    torch_threads: int = Field(0, ge=0, description="intra-op threads of torch per process (0: torch's default, one per "
                               "physical core, shared out among the uvicorn workers)")
    channels_last: bool = Field(False, description="the networks' weights and activations in channels_last memory "
                                "format: a faster model on the CPU, in float32 and in bfloat16 (docs/benchmarks.md)")
    compile: Compile = Field(
        "none", description="fixed batch shapes for the networks: buckets pads every model call to a power of two; "
        "compile also compiles each shape with torch.compile at startup (CUDA graphs on CUDA)")

    # --- server -------------------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    workers: int = Field(1, ge=1, description="uvicorn worker processes; each loads every model")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="uvicorn's and the service's log level")
    access_log: bool = Field(True, description="one log line per request")

    # --- inputs and outputs -------------------------------------------------------------------------------------
    max_upload_bytes: int = Field(10 * MiB, ge=1, description="largest accepted image file (413 above)")
    max_pixels: int = Field(40_000_000, ge=1, description="largest accepted image area in pixels (decompression bombs: 413)")
    max_output_size: int = Field(1024, ge=16, description="largest `size=` of an answered image (pixels per side)")
    image_threads: int = Field(0, ge=0, description="threads that decode uploads and encode answers (0: one per CPU core)")
    max_interpolate_steps: int = Field(32, ge=2, le=256, description="largest `steps` of /interpolate")
    png_level: int = Field(3, ge=0, le=9, description="zlib effort of PNG answers: 0 fastest and largest, 9 smallest and slowest")

    # --- faces --------------------------------------------------------------------------------------------------
    face_detect_size: int = Field(faces.DETECT_SIZE, ge=80, le=8192, description="the face detector sees each upload "
                                  "resized to this many pixels on its longer side: it finds faces of 80/this of that "
                                  "side and up, in time that grows with its square")
    face_min_score: float = Field(faces.MIN_SCORE, allow_inf_nan=False, description="faces the detector scores below "
                                  "this are left out (its SVM margin: 0 is its own cut-off, faces train to 1 and up)")

    domain_check: bool = Field(True, description="score every upload against its model's calibration (X-Domain-Score, "
                               "X-Out-Of-Domain, strict=): an edit then encodes all three codes of each upload and "
                               "decodes its reconstruction once more; false skips that work and the headers")

    # --- batching -----------------------------------------------------------------------------------------------
    max_batch: int = Field(32, ge=1, description="most images per model call")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits for more work once it has some")
    queue_size: int = Field(256, ge=1, description="model jobs waiting per model before requests get 503")
    request_timeout_s: float = Field(30.0, ge=0, description="a request not answered this long after it arrived gets "
                                     "504, and its model job is dropped unless already computing (0: no deadline)")

    # --- latent store -------------------------------------------------------------------------------------------
    latent_ttl_s: int = Field(3600, ge=1, description="lifetime of a latent id")
    latent_cache_size: int = Field(10_000, ge=1, description="most latents kept by the in-process store (LRU)")
    redis_url: str | None = Field(None, description="redis://host:port/db: share latent ids between replicas")

    # --- access -------------------------------------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated keys; empty: no auth")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated origins allowed by CORS; empty: CORS off")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("redis_url", "default_model", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @property
    def max_request_bytes(self) -> int:
        """The whole request body: up to four images (content, guide, guide_a, guide_b) plus form overhead."""
        return 4 * self.max_upload_bytes + MiB


def as_env(values: dict[str, object]) -> dict[str, str]:
    """`DID_*` environment variables that make `Settings()` see these values (for uvicorn's worker processes)."""
    env = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"DID_{key.upper()}"] = str(value)
    return env
