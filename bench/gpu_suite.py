"""One-shot GPU suite: the CUDA tests, training, tours, Serve and bulk throughput on one GPU, all into one folder.

Each section runs in a subprocess with its own time budget; the budgets add up to under 8 minutes, and time a section
leaves unused passes to the next. A failing or overrunning section is recorded (exit code, the tail of its log) with
whatever it measured before, and the others still run. Sections write their results after every case.
  cuda_tests     pytest -m cuda: passed/failed counts from --junitxml
  training       stage-1 panoramas/s and stage-2 views/s, eager and compiled (optim.compile), in-process on CUDA,
                 then stage 1 eager at larger batches (panoramas/s and peak GiB: how large a recipe's batch can go)
  tours_bundled  4- and 8-view tour seconds and peak memory of the bundled model, eager and compiled
  tours_sd       the same for a Stable-Diffusion-1.5-shaped model at 512x1024 with random weights, in bf16
  serve          Serve views/s with one GPU replica at concurrency 1, 8 and 32, batching and batch of 1
  bulk           offline bulk tours/hour with one GPU replica
Output: OUT/summary.json, OUT/summary.md, OUT/logs/SECTION.log, OUT/results/SECTION.json (and cuda_tests.xml).
--dry-run runs every section on the CPU at tiny sizes (a tiny random model, 32x64, concurrency 1 and 2) in a few
minutes; the CUDA tests are then only collected, and reported skipped for want of a CUDA device. Its cases are eager
only, as compiling takes minutes per graph on a small CPU; --compile-mode default adds the compiled ones.
Run: python bench/gpu_suite.py [--out outputs/gpu-suite] [--compile-mode default|reduce-overhead|max-autotune|off]
     [--only SECTION...] [--budget SECTION=SECONDS...] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from common import dtype_name, environment, format_table, median, peak_memory, time_ms  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "diffpano" / "assets" / "model"
PROMPT = "a cozy living room with a grey sofa, a wooden floor and large windows"
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")  # off: eager cases only
TAIL_LINES = 40


@dataclass(frozen=True)
class Plan:
    """Sizes, step counts and time budgets (s) of one suite mode: the GPU run or the CPU dry run."""

    device: str
    compile_mode: str  # of the compiled cases unless --compile-mode says otherwise (off: eager cases only)
    budgets: dict[str, int]
    train_config: str
    train_overrides: tuple[str, ...]
    train_steps: tuple[int, int]  # stage 1, stage 2; the first train_skip steps are left out of the rates
    train_skip: int
    stage1_batches: tuple[int, ...]  # larger stage-1 batches trained eager after the recipe's: rate and peak memory
    dataset: tuple[int, int, int, int, int]  # scenes, clips per scene, keyframes, height, width
    render_processes: int
    tour_views: tuple[int, ...]
    compiled_views: tuple[int, ...]  # view counts of the compiled tours (each count compiles its own graphs)
    tour_steps: dict[str, int]  # per model: bundled, sd
    tour_repeats: dict[str, int]
    tour_sizes: dict[str, tuple[int, int] | None]  # None: the model's default size
    serve: tuple[str, ...]  # bench/serve_throughput.py options
    bulk: tuple[str, ...]  # bench/bulk_throughput.py options


GPU = Plan(
    device="cuda", compile_mode="default",
    budgets={"cuda_tests": 50, "training": 195, "tours_bundled": 45, "tours_sd": 90, "serve": 60, "bulk": 30},
    train_config="trainer/configs/bundled-gpu.yaml",
    train_overrides=("vae.steps=0", "stage1.time_limit_s=null", "stage2.time_limit_s=null", "run.log_every=1",
                     "run.checkpoint_every=100000", "run.sample_steps=1", "run.max_failures=0"),
    train_steps=(60, 30), train_skip=20, stage1_batches=(192, 384),
    dataset=(24, 2, 8, 128, 256), render_processes=8,
    tour_views=(4, 8), compiled_views=(8, 4), tour_steps={"bundled": 20, "sd": 10},
    tour_repeats={"bundled": 2, "sd": 1}, tour_sizes={"bundled": None, "sd": (512, 1024)},
    serve=("--levels", "1", "8", "32", "--views", "2", "--steps", "10", "--rounds", "2", "--gpus", "1"),
    bulk=("--single", "--gpus", "1", "--cpus", "4", "--tours", "16", "--views", "4", "--steps", "10"),
)
DRY = Plan(
    device="cpu", compile_mode="off",  # compiling takes minutes per graph on a 2-core CPU
    budgets={"cuda_tests": 120, "training": 300, "tours_bundled": 240, "tours_sd": 240, "serve": 300, "bulk": 240},
    train_config="trainer/configs/tiny.yaml",
    train_overrides=("data.size=[32, 64]", "run.log_every=1", "run.checkpoint_every=100000", "run.sample_steps=1",
                     "run.max_failures=0"),
    train_steps=(5, 5), train_skip=2, stage1_batches=(8,),
    dataset=(2, 2, 4, 32, 64), render_processes=1,
    tour_views=(4, 8), compiled_views=(4,), tour_steps={"bundled": 2, "sd": 2},
    tour_repeats={"bundled": 1, "sd": 1}, tour_sizes={"bundled": (32, 64), "sd": (32, 64)},
    serve=("--levels", "1", "2", "--views", "2", "--steps", "2", "--rounds", "1"),
    bulk=("--single", "--cpus", "2", "--tours", "2", "--views", "2", "--steps", "2", "--batch-size", "2"),
)


@dataclass
class Context:
    """What every section needs: the plan, the output folders, the model under test, the compile mode."""

    plan: Plan
    out: Path
    scratch: Path
    model: Path
    compile_mode: str
    dry_run: bool

    def results(self, name: str) -> Path:
        """Where section `name` writes its results."""
        return self.out / "results" / f"{name}.json"

    def child(self, section: str) -> list[str]:
        """The command line running one of this script's own sections in a subprocess."""
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", section, "--out", str(self.out),
               "--scratch", str(self.scratch), "--model", str(self.model), "--compile-mode", self.compile_mode]
        return cmd + (["--dry-run"] if self.dry_run else [])


@dataclass
class Section:
    """One part of the suite: its command and how its results are read once it has ended."""

    name: str
    title: str
    command: Callable[[Context], list[str]]
    collect: Callable[[Context, int | None], dict]


@dataclass
class Outcome:
    """What the suite records of one section."""

    status: str  # ok, failed, timeout, skipped
    seconds: float
    budget_s: float
    rc: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    reason: str | None = None
    log_tail: str | None = None


# --- results of a section, written as it goes ------------------------------------------------------------------


class Results:
    """A section's results (metrics, cases, notes), rewritten after every case so that a timeout keeps them."""

    def __init__(self, path: Path, env: dict | None = None) -> None:
        self.path = path
        self.data: dict = {"metrics": {}, "cases": [], "notes": [], "env": env or {}}
        self.save()

    def add(self, case: dict, metrics: dict[str, float]) -> None:
        """Record one case and its headline numbers, save, and print a progress line."""
        self.data["cases"].append(case)
        self.data["metrics"].update(metrics)
        self.save()
        print("  " + ", ".join(f"{k} = {v:.4g}" for k, v in metrics.items()), flush=True)

    def note(self, text: str) -> None:
        """Record a remark (a compile that fell back to eager, a skipped case)."""
        self.data["notes"].append(text)
        self.save()
        print(f"  NOTE {text}", flush=True)

    def save(self) -> None:
        """Write the JSON file (atomically)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)


class FallbackCounter(logging.Handler):
    """Counts diffpano.pipelines.compiling's warnings that a compile failed and the call ran eagerly."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the message of every warning."""
        self.messages.append(record.getMessage())


@contextmanager
def compile_fallbacks() -> Iterator[FallbackCounter]:
    """Collect the compile-fallback warnings logged inside the block."""
    counter = FallbackCounter()
    logger = logging.getLogger("diffpano.pipelines.compiling")
    logger.addHandler(counter)
    try:
        yield counter
    finally:
        logger.removeHandler(counter)


def modes(ctx: Context) -> tuple[str, ...]:
    """Eager, then the compile mode unless it is off."""
    return ("off",) if ctx.compile_mode == "off" else ("off", ctx.compile_mode)


def label(mode: str) -> str:
    """'eager' for compile mode off, else 'compiled (MODE)'."""
    return "eager" if mode == "off" else f"compiled ({mode})"


# --- in-process sections (run as `--section NAME` subprocesses) -------------------------------------------------


def training_data(ctx: Context) -> str:
    """A procedural dataset of the plan's size under the scratch folder."""
    from batch.dataset import build_dataset
    from diffpano.data.manifest import commit_clips
    from diffpano.data.procedural.build import ProceduralSpec, render_clips

    scenes, clips, frames, h, w = ctx.plan.dataset
    root = str(ctx.scratch / "train-dataset")
    spec = ProceduralSpec(scenes=scenes, clips_per_scene=clips, frames=frames, height=h, width=w, seed=3, depth=False)
    started = time.perf_counter()
    if ctx.plan.render_processes > 1:
        build_dataset(spec, root, progress=False, processes=ctx.plan.render_processes)
    else:
        for s in range(scenes):
            commit_clips(root, render_clips(spec, s, list(range(clips))))
    print(f"dataset: {scenes * clips * frames} panoramas at {h}x{w} in {time.perf_counter() - started:.1f} s",
          flush=True)
    return root


@dataclass
class StageRun:
    """What one training stage measured: samples/s after the skipped steps, wall s, fallbacks, CUDA peak GiB."""

    rate: float
    wall_s: float
    fallbacks: list[str]
    peak_gib: float | None  # None off CUDA


def train_stage(ctx: Context, dataset: str, mode: str, stage: int, batch: int | None = None) -> StageRun:
    """Train one stage in this process on the plan's device (batch: the stage's batch size instead of the recipe's)."""
    import torch
    from train_throughput import throughput

    from trainer.config import load_config
    from trainer.run import train

    steps = ctx.plan.train_steps[stage - 1]
    overrides = [f"data.dataset={dataset}", "scaling.num_workers=0", f"stage1.steps={ctx.plan.train_steps[0]}",
                 f"stage2.steps={ctx.plan.train_steps[1]}", *ctx.plan.train_overrides]
    overrides += [f"optim.compile={mode}"] if mode != "off" else []
    overrides += [f"stage{stage}.batch_size={batch}"] if batch else []
    cfg = load_config(ROOT / ctx.plan.train_config, overrides)
    loop = cfg.stage1 if stage == 1 else cfg.stage2
    per_step = loop.batch_size * loop.grad_accum * (loop.views if stage == 2 else 1)
    cuda = ctx.plan.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    name = f"run-{mode}" + (f"-b{batch}" if batch else "")
    started = time.perf_counter()
    with compile_fallbacks() as fallbacks:
        train(cfg, [stage], name, str(ctx.scratch / "runs"), local_device=ctx.plan.device)
    wall = time.perf_counter() - started
    metrics_csv = ctx.scratch / "runs" / name / "logs" / f"stage{stage}" / "metrics.csv"
    return StageRun(throughput(metrics_csv, per_step, min(ctx.plan.train_skip, steps - 1)), wall,
                    fallbacks.messages, torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


def section_training(ctx: Context) -> None:
    """Stage-1 panoramas/s and stage-2 views/s, eager then compiled, and the compiled speed-ups."""
    results = Results(ctx.results("training"), {"config": ctx.plan.train_config, "steps": ctx.plan.train_steps,
                                                "skip": ctx.plan.train_skip, "device": ctx.plan.device})
    if ctx.compile_mode == "off":
        results.note("eager only (--compile-mode off)")
    dataset = training_data(ctx)
    rates: dict[tuple[str, int], float] = {}
    for mode in modes(ctx):
        for stage in (1, 2):
            run = train_stage(ctx, dataset, mode, stage)
            rates[mode, stage] = run.rate
            unit = "panoramas/s" if stage == 1 else "views/s"
            metrics = {f"stage-{stage} {unit}, {label(mode)}": run.rate,
                       f"stage-{stage} wall s, {label(mode)}": run.wall_s}
            if mode != "off":
                metrics[f"stage-{stage} compiled/eager"] = run.rate / rates["off", stage]
            if run.peak_gib is not None:
                metrics[f"stage-{stage} peak GiB, {label(mode)}"] = run.peak_gib
            results.add({"mode": mode, "stage": stage, "samples_per_s": run.rate, "unit": unit, "wall_s": run.wall_s,
                         "peak_gib": run.peak_gib, "compile_fallbacks": run.fallbacks}, metrics)
            if run.fallbacks:
                results.note(f"stage {stage}, {label(mode)}: compiling fell back to eager: {run.fallbacks[0]}")
    batch_sweep(ctx, dataset, results)


def batch_sweep(ctx: Context, dataset: str, results: Results) -> None:
    """Stage 1 eager at the plan's larger batches: panoramas/s and peak memory, to size a recipe's batch."""
    for batch in ctx.plan.stage1_batches:
        run = train_stage(ctx, dataset, "off", 1, batch)
        metrics = {f"stage-1 panoramas/s, eager, batch {batch}": run.rate}
        if run.peak_gib is not None:
            metrics[f"stage-1 peak GiB, eager, batch {batch}"] = run.peak_gib
        results.add({"mode": "off", "stage": 1, "batch_size": batch, "samples_per_s": run.rate,
                     "unit": "panoramas/s", "wall_s": run.wall_s, "peak_gib": run.peak_gib}, metrics)


def tour_model(ctx: Context, kind: str) -> tuple[Any, Any]:
    """(pipeline on the plan's device, its dtype) of `kind`: the model under test, or an SD-shaped random one."""
    import torch

    from diffpano.pipelines.factory import (
        build_pipeline,
        sd_unet_config,
        sd_vae_config,
        tiny_unet_config,
        tiny_vae_config,
    )
    from diffpano.pipelines.loading import load_model, place

    if kind == "bundled":
        pipe = load_model(ctx.model, ctx.plan.device)
    elif ctx.dry_run:  # the SD model's stand-in: a tiny latent model
        pipe = place(build_pipeline(tiny_unet_config(4), vae_config=tiny_vae_config()), ctx.plan.device)
    else:
        h = ctx.plan.tour_sizes["sd"][0]
        unet = sd_unet_config("1.5") | {"sample_size": h // 8}
        dtype = torch.bfloat16 if ctx.plan.device == "cuda" else torch.float32  # bf16 is slow on most CPUs
        pipe = place(build_pipeline(unet, vae_config=sd_vae_config()), ctx.plan.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.unet.dtype


def tour_case(ctx: Context, pipe: Any, kind: str, views: int) -> dict:
    """Warm-up, median seconds and peak memory of one tour of `views` views (memory: one more call)."""
    import torch

    from diffpano.geometry.trajectories import walk

    size = ctx.plan.tour_sizes[kind] or tuple(pipe.default_size)
    poses = walk(views, spacing=1.0)

    def tour() -> object:
        """One tour as a user asks for it."""
        return pipe(PROMPT, poses, height=size[0], width=size[1], num_inference_steps=ctx.plan.tour_steps[kind],
                    seed=0)

    device = torch.device(ctx.plan.device)
    warmup = time_ms(tour, device) / 1e3
    seconds = median([time_ms(tour, device) / 1e3 for _ in range(ctx.plan.tour_repeats[kind])])
    memory = peak_memory(tour, device)
    peak = memory.get("max_memory_allocated_mb", memory["peak_mb"])  # CUDA: everything allocated, weights included
    return {"views": views, "size": list(size), "steps": ctx.plan.tour_steps[kind], "seconds": seconds,
            "first_call_s": warmup, "peak_mb": peak, "memory": memory}


def section_tours(ctx: Context, kind: str) -> None:
    """Tour seconds and peak memory at each view count, eager and then with the UNet compiled."""
    import torch

    from diffpano.pipelines.compiling import compile_pipeline, is_compiled

    if ctx.plan.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.perf_counter()
    pipe, dtype = tour_model(ctx, kind)
    name = pipe.model_name if kind == "bundled" else "SD-1.5-shaped, random weights"
    env = environment(torch.device(ctx.plan.device), dtype) | {"model": name, "build_s": time.perf_counter() - started}
    results = Results(ctx.results(f"tours_{kind}"), env)
    if ctx.compile_mode == "off":
        results.note("eager only (--compile-mode off)")
    for mode in modes(ctx):
        if mode != "off":
            compile_pipeline(pipe, mode)
        for views in ctx.plan.tour_views if mode == "off" else ctx.plan.compiled_views:
            with compile_fallbacks() as fallbacks:
                case = tour_case(ctx, pipe, kind, views)
            compiled = is_compiled(pipe.unet)
            results.add(case | {"mode": mode, "dtype": dtype_name(dtype), "compiled": compiled},
                        {f"{views}-view tour s, {label(mode)}": case["seconds"],
                         f"{views}-view peak MB, {label(mode)}": case["peak_mb"]})
            if mode != "off" and not compiled:
                results.note(f"{views} views, {label(mode)}: the UNet ran eagerly (compiling failed): "
                             f"{fallbacks.messages[0] if fallbacks.messages else 'no warning logged'}")


SECTION_MAIN = {"training": section_training, "tours_bundled": lambda ctx: section_tours(ctx, "bundled"),
                "tours_sd": lambda ctx: section_tours(ctx, "sd")}


# --- collecting what a section left ----------------------------------------------------------------------------


def read_results(ctx: Context, name: str) -> dict:
    """A section's results file, or an empty one when it wrote none."""
    path = ctx.results(name)
    return json.loads(path.read_text()) if path.exists() else {}


def collect_own(name: str) -> Callable[[Context, int | None], dict]:
    """The collector of one of this script's own sections: its results file as written."""

    def collect(ctx: Context, rc: int | None) -> dict:
        """Metrics and notes of the results file."""
        data = read_results(ctx, name)
        return {"metrics": data.get("metrics", {}), "notes": data.get("notes", [])}

    return collect


def cuda_tests_command(ctx: Context) -> list[str]:
    """pytest -m cuda with a JUnit report; without a CUDA device (dry run), only the collection."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests", "-p", "no:cacheprovider", "-q"]
    if ctx.dry_run:
        return cmd + ["--collect-only"]
    return cmd + ["-rfE", f"--junitxml={ctx.out / 'results' / 'cuda_tests.xml'}"]


def collect_cuda_tests(ctx: Context, rc: int | None) -> dict:
    """Collected tests (dry run: skipped, no CUDA device) or the pass/fail counts of the JUnit report."""
    if rc == 5:  # pytest: nothing collected
        return {"status": "failed", "reason": "no tests marked cuda were collected"}
    if ctx.dry_run:
        text = (ctx.out / "logs" / "cuda_tests.log").read_text()
        collected = len(re.findall(r"^\S+::\S+", text, re.MULTILINE))
        if rc != 0 or not collected:
            return {}
        return {"metrics": {"collected": collected}, "status": "skipped",
                "reason": f"no CUDA device: {collected} cuda tests collected, not run"}
    report = ctx.out / "results" / "cuda_tests.xml"
    if not report.exists():
        return {}
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    found = {"metrics": {"collected": counts["tests"], "passed": passed, "failed": counts["failures"],
                         "errors": counts["errors"], "skipped": counts["skipped"]}}
    if rc is not None and (counts["failures"] or counts["errors"]):
        found |= {"status": "failed", "reason": f"{counts['failures']} failed, {counts['errors']} errors "
                                                f"of {counts['tests']} tests"}
    return found


def serve_command(ctx: Context) -> list[str]:
    """bench/serve_throughput.py with one replica (on a GPU unless dry) at the plan's concurrency levels."""
    return [sys.executable, str(ROOT / "bench" / "serve_throughput.py"), "--model", str(ctx.model), *ctx.plan.serve,
            "--json", str(ctx.results("serve"))]


def collect_serve(ctx: Context, rc: int | None) -> dict:
    """Views/s per path and concurrency, and the batching gain at the highest level."""
    data = read_results(ctx, "serve")
    if not data:
        return {}
    paths = {"http_batched": "HTTP batching", "http_single": "HTTP batch of 1", "in_process": "in-process"}
    metrics = {f"views/s c={c}, {title}": r["views_per_s"]
               for key, title in paths.items() for c, r in data[key].items()}
    top = str(max(int(c) for c in data["http_batched"]))
    metrics[f"batching gain c={top}"] = (data["http_batched"][top]["views_per_s"] /
                                         data["http_single"][top]["views_per_s"])
    return {"metrics": metrics}


def bulk_command(ctx: Context) -> list[str]:
    """bench/bulk_throughput.py --single: one offline replica (on a GPU unless dry)."""
    return [sys.executable, str(ROOT / "bench" / "bulk_throughput.py"), "--model", str(ctx.model), *ctx.plan.bulk,
            "--json", str(ctx.results("bulk"))]


def collect_bulk(ctx: Context, rc: int | None) -> dict:
    """Tours/hour and wall seconds of the one case; a tour that failed is a note."""
    data = read_results(ctx, "bulk")
    if not data:
        return {}
    (name, r), = data["results"].items()
    notes = [f"{r['failures']} tours failed"] if r.get("failures") else []
    return {"metrics": {"tours/hour": r["tours_per_hour"], "wall s": r["wall_s"], "tours done": r["tours_done"]},
            "notes": notes, "case": name}


SECTIONS = [
    Section("cuda_tests", "CUDA tests (pytest -m cuda)", cuda_tests_command, collect_cuda_tests),
    Section("training", "training samples/s per stage, eager and compiled", lambda c: c.child("training"),
            collect_own("training")),
    Section("tours_bundled", "bundled model: 4/8-view tour s and peak memory", lambda c: c.child("tours_bundled"),
            collect_own("tours_bundled")),
    Section("tours_sd", "SD-shaped model: 4/8-view tour s and peak memory", lambda c: c.child("tours_sd"),
            collect_own("tours_sd")),
    Section("serve", "Serve views/s, one replica", serve_command, collect_serve),
    Section("bulk", "bulk tours/hour, one replica", bulk_command, collect_bulk),
]


# --- running the sections ----------------------------------------------------------------------------------------


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the section's process group (it and what it started, Ray included), then SIGKILL what is left."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """(exit code, or None after a timeout; seconds) of cmd run in its own process group, output into log."""
    env = os.environ | {"PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    started = time.perf_counter()
    with log.open("w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            stop_group(proc)
            rc = None
        except BaseException:
            stop_group(proc)
            raise
    return rc, time.perf_counter() - started


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last lines of a log."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def run_section(ctx: Context, section: Section, budget: float) -> Outcome:
    """Run one section within its budget and read what it left; never raises for the section's own failure."""
    log = ctx.out / "logs" / f"{section.name}.log"
    rc, seconds = run_command(section.command(ctx), log, budget)
    try:
        found = section.collect(ctx, rc)
    except (OSError, ValueError, KeyError, TypeError, ET.ParseError) as err:
        found = {"notes": [f"results unreadable: {type(err).__name__}: {err}"]}
    metrics = {k: float(v) for k, v in found.get("metrics", {}).items()}
    outcome = Outcome("ok", seconds, budget, rc, metrics, list(found.get("notes", [])))
    outcome.notes += [f"not a finite number: {k} = {v}" for k, v in metrics.items() if not math.isfinite(v)]
    if rc is None:
        outcome.status, outcome.reason = "timeout", f"stopped after its {budget:.0f} s budget"
    elif "status" in found:
        outcome.status, outcome.reason = found["status"], found.get("reason")
    elif rc != 0:
        outcome.status, outcome.reason = "failed", f"exit code {rc}"
    elif not metrics:
        outcome.status, outcome.reason = "failed", "no results written"
    if outcome.status in ("failed", "timeout"):
        outcome.log_tail = tail(log)
    return outcome


def headline(outcome: Outcome, count: int = 2) -> str:
    """The first few metrics of a section (all are in summary.md), or why it has none."""
    if not outcome.metrics:
        return outcome.reason or "-"
    parts = [f"{k} {v:.4g}" for k, v in list(outcome.metrics.items())[:count]]
    more = len(outcome.metrics) - count
    return "; ".join(parts) + (f"; +{more}" if more > 0 else "")


# --- the summary ------------------------------------------------------------------------------------------------


def summary(ctx: Context, outcomes: dict[str, Outcome], started: float, env: dict) -> dict:
    """The summary.json payload."""
    sections = {}
    for s in SECTIONS:
        if s.name not in outcomes:
            continue
        o = outcomes[s.name]
        sections[s.name] = {"title": s.title, "status": o.status, "reason": o.reason, "rc": o.rc,
                            "seconds": round(o.seconds, 2), "budget_s": round(o.budget_s, 1), "metrics": o.metrics,
                            "notes": o.notes, "log": f"logs/{s.name}.log",
                            "results": f"results/{s.name}.json" if ctx.results(s.name).exists() else None,
                            "log_tail": o.log_tail}
    return {"suite": "gpu_suite", "mode": "dry-run" if ctx.dry_run else "gpu", "compile_mode": ctx.compile_mode,
            "model": str(ctx.model), "env": env, "started": time.strftime("%Y-%m-%dT%H:%M:%S",
                                                                         time.localtime(started)),
            "total_s": round(time.time() - started, 1), "sections": sections}


def status_table(payload: dict) -> str:
    """The one-line-per-section table (status, seconds, budget, headline numbers)."""
    rows = []
    for name, s in payload["sections"].items():
        o = Outcome(s["status"], s["seconds"], s["budget_s"], s["rc"], s["metrics"], s["notes"], s["reason"])
        rows.append([name, s["status"], s["seconds"], s["budget_s"], headline(o)])
    return format_table(["section", "status", "s", "limit s", "first results"], rows)


def markdown(payload: dict) -> str:
    """summary.md: the status table, every section's numbers, and the log tails of those that failed."""
    env = payload["env"]
    gpu = next((s.get("gpu") for s in env.get("sections", {}).values() if s.get("gpu")), None)
    lines = [f"# GPU suite ({payload['mode']})", "",
             f"Started {payload['started']}, {payload['total_s']:.0f} s in all; device "
             f"{gpu or env.get('device')}; torch {env.get('torch')}; compile mode `{payload['compile_mode']}`; "
             f"model `{payload['model']}`.", "", "```", status_table(payload), "```", ""]
    for name, s in payload["sections"].items():
        lines += [f"## {name}: {s['title']}", "", f"Status **{s['status']}**"
                  + (f" ({s['reason']})" if s["reason"] else "") + f", {s['seconds']:.0f} s of {s['budget_s']:.0f}; "
                  f"log `{s['log']}`" + (f", results `{s['results']}`" if s["results"] else "") + ".", ""]
        if s["metrics"]:
            lines += ["| measure | value |", "| --- | ---: |"]
            lines += [f"| {k} | {v:.4g} |" for k, v in s["metrics"].items()] + [""]
        lines += [f"- {n}" for n in s["notes"]] + ([""] if s["notes"] else [])
        if s["log_tail"]:
            lines += ["Last lines of the log:", "", "```", s["log_tail"], "```", ""]
    return "\n".join(lines)


def write_summary(ctx: Context, payload: dict) -> None:
    """Write summary.json and summary.md into the output folder."""
    (ctx.out / "summary.json").write_text(json.dumps(payload, indent=2) + "\n")
    (ctx.out / "summary.md").write_text(markdown(payload))


def section_env(ctx: Context) -> dict:
    """The environment the in-process sections recorded, by section."""
    return {s.name: read_results(ctx, s.name).get("env", {}) for s in SECTIONS if ctx.results(s.name).exists()}


def tiny_model(path: Path) -> Path:
    """A tiny random pixel-space model saved as a model directory (the dry run's model under test)."""
    from diffpano.pipelines.factory import build_tiny_pipeline
    from diffpano.pipelines.loading import save_model

    pipe = build_tiny_pipeline(latent=False)
    pipe.model_name = "tiny-random"
    save_model(pipe, str(path))
    return path


def parse_budgets(items: list[str], plan: Plan) -> dict[str, int]:
    """The plan's budgets with NAME=SECONDS overrides."""
    budgets = dict(plan.budgets)
    for item in items:
        name, _, value = item.partition("=")
        if name not in budgets or not value.isdigit():
            raise SystemExit(f"--budget: expected SECTION=SECONDS with SECTION one of {', '.join(budgets)}, "
                             f"got {item!r}")
        budgets[name] = int(value)
    return budgets


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/gpu-suite"), help="results folder (outputs/gpu-suite)")
    p.add_argument("--dry-run", action="store_true", help="every section on the CPU at tiny sizes")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="torch.compile mode of the compiled cases, off for none (default; off in a dry run: "
                        "compiling takes minutes per graph on a small CPU)")
    p.add_argument("--only", nargs="+", choices=[s.name for s in SECTIONS], default=None, help="run these sections")
    p.add_argument("--budget", nargs="+", default=[], metavar="SECTION=S", help="override a section's budget (s)")
    p.add_argument("--keep-scratch", action="store_true", help="keep OUT/scratch (datasets, runs, models)")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # one in-process section (a subprocess)
    p.add_argument("--scratch", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def run_suite(args: argparse.Namespace) -> int:
    """Run every section in turn, print progress and the final table, write the summary; 1 if any failed."""
    import torch

    plan = DRY if args.dry_run else GPU
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device is available (torch.cuda.is_available() is False); run it on a GPU "
              "machine, or use --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    out = args.out.resolve()
    if out.exists():
        for sub in ("logs", "results", "scratch"):
            shutil.rmtree(out / sub, ignore_errors=True)
    for sub in ("logs", "results", "scratch"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    started, clock = time.time(), time.perf_counter()
    model = tiny_model(out / "scratch" / "tiny-model") if args.dry_run else BUNDLED
    ctx = Context(plan, out, out / "scratch", model, args.compile_mode or plan.compile_mode, args.dry_run)
    budgets = parse_budgets(args.budget, plan)
    sections = [s for s in SECTIONS if args.only is None or s.name in args.only]
    env = {"device": plan.device, "torch": torch.__version__, "python": sys.version.split()[0],
           "cpu_count": os.cpu_count(), "budget_total_s": sum(budgets[s.name] for s in sections)}
    print(f"gpu_suite ({'dry run, CPU' if args.dry_run else 'GPU'}): {len(sections)} sections, "
          f"{env['budget_total_s']} s of budgets, results in {out}", flush=True)
    outcomes: dict[str, Outcome] = {}
    spare = 0.0
    try:
        for i, section in enumerate(sections, 1):
            budget = budgets[section.name] + spare
            outcome = outcomes[section.name] = run_section(ctx, section, budget)
            spare = max(0.0, budget - outcome.seconds)
            print(f"[{i}/{len(sections)}] {section.name}: {outcome.status} in {outcome.seconds:.0f} s "
                  f"(limit {budget:.0f} s) | {headline(outcome)}", flush=True)
            write_summary(ctx, summary(ctx, outcomes, started, env | {"sections": section_env(ctx)}))
    finally:
        payload = summary(ctx, outcomes, started, env | {"sections": section_env(ctx)})
        write_summary(ctx, payload)
        if not args.keep_scratch:
            shutil.rmtree(ctx.scratch, ignore_errors=True)
    print(status_table(payload))
    print(f"total {time.perf_counter() - clock:.0f} s; summary in {out / 'summary.md'} and {out / 'summary.json'}")
    return 0 if all(o.status in ("ok", "skipped") for o in outcomes.values()) else 1


def main() -> None:
    """The suite, or (with --section) one in-process section."""
    args = parse_args()
    if args.section:
        plan = DRY if args.dry_run else GPU
        ctx = Context(plan, args.out, args.scratch, args.model, args.compile_mode, args.dry_run)
        SECTION_MAIN[args.section](ctx)
        return
    sys.exit(run_suite(args))


if __name__ == "__main__":
    main()
