"""Defaults and bounds every layer shares (CLI, HTTP API, bulk specs, training, evaluation), each defined once."""

import secrets

DEFAULT_STEPS = 20  # sampler steps of a tour (DPM-Solver++ 2M, the bundled model's scheduler; MODEL.md)
DEFAULT_GUIDANCE = 7.5  # Stable Diffusion's; also the bundled model's best measured (MODEL.md)
DEFAULT_VIEWS = 4  # views of a tour when a request names none
MAX_SEED = 2**63 - 1  # seeds are integers in [0, MAX_SEED]
MAX_PROMPT_CHARS = 1000  # a prompt or a caption
MAX_BATCH_VIEWS = 8  # views of several tours one serve call batches together
GEOMETRY_STRENGTH = 0.8  # img2img strength of tours made on a geometry (--mesh, --layout); MODEL.md "On a geometry"
MAX_LORAS = 4  # LoRAs a model replica (or bulk actor) keeps loaded, the least recently used dropped beyond
BATCH_WAIT_S = 0.1  # how long a serve replica waits to fill a batch
STALL_S = 600.0  # seconds with no replica answering, work left, before an offline job stops (resumable)
STORAGE_WAIT_S = 600.0  # seconds an s3:// read or write retries through an outage before the work stops (resumable)
WINDOW_VIEWS = 16  # views of one tour denoised jointly; longer tours go in windows (EA cost is linear in views)
TOURS_PER_BATCH = 4  # tours per bulk batch: one replica call and one manifest part
COMPACT_EVERY = 256  # manifest parts a bulk job writes between merges of them (compaction; publication on S3)
PUBLISH_S = 60.0  # seconds after which a bulk job writing to S3 publishes the parts it staged, however few
REPLICAS = 1  # model replicas of a bulk job or an evaluation

# Bounds. A tour made on your own machine (CLI, training, evaluation) may be long and finely sampled; one asked of a
# shared server or a bulk spec is held to less, so a single request cannot occupy a replica for long.
MAX_VIEWS = 64  # views of a tour (generate, eval, training clips)
MAX_STEPS = 1000  # sampler steps (the pipelines' own check)
MAX_SPEC_VIEWS = 16  # views of a tour in an HTTP request or a bulk spec
MAX_SPEC_STEPS = 200  # sampler steps in an HTTP request or a bulk spec
MAX_REF_VIEWS = 16  # K: reference views each view attends to
MAX_SAMPLES = 64  # S: samples per epipolar arc


def random_seed() -> int:
    """A seed drawn from the system's randomness, in [0, MAX_SEED]."""
    return secrets.randbelow(MAX_SEED + 1)
