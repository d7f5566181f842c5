"""Defaults every layer shares (CLI, HTTP API, bulk specs, evaluation), each defined once."""

DEFAULT_STEPS = 20  # sampler steps of a tour (DPM-Solver++ 2M, the bundled model's scheduler; MODEL.md)
DEFAULT_GUIDANCE = 7.5  # Stable Diffusion's; also the bundled model's best measured (MODEL.md)
DEFAULT_VIEWS = 4  # views of a tour when a request names none
MAX_SEED = 2**63 - 1  # seeds are integers in [0, MAX_SEED]
MAX_BATCH_VIEWS = 8  # views of several tours one serve call batches together
WINDOW_VIEWS = 16  # views of one tour denoised jointly; longer tours go in windows (EA cost is linear in views)
TOURS_PER_BATCH = 4  # tours per bulk batch: one replica call and one manifest part
REPLICAS = 1  # model replicas of a bulk job or an evaluation
