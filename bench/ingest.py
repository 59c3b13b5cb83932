"""Ingestion throughput against its ceiling and against img2dataset as users run it, in one run.

    .venv/bin/python bench/ingest.py --num-images 8000          # the recorded run (installs img2dataset once)
    .venv/bin/python bench/ingest.py --num-images 500 --skip-img2dataset

1. Makes N web-like JPEGs (500x375 .. 1024x768, ~100 kB at q90: smooth noise + gradients, so they
   compress like photos) under .bench/ingest/, cached between runs, and serves them over HTTP/1.1
   keep-alive (`--no-keep-alive`: HTTP/1.0, a connection per request) on 127.0.0.1 from a
   separate process; both downloaders get the same server and all the cores.
2. Ceiling: the same bytes decoded with PIL draft mode, resized to shorter side 256 and encoded
   at q90, on one core, no I/O (x cores: what the machine could do with free downloads).
3. Cold, as a user runs each, alternated `--repeats` times: `megaclass ingest urls.parquet OUT`
   (defaults: local worker processes, one per core) and `img2dataset --processes_count CORES
   --thread_count 16` (its README's advice: one process per core), same URLs, shorter side 256,
   q90. Wall clock from the command's start to its exit; the median of the per-pair ratios
   img2dataset_s / megaclass_s is the headline (target >= 1.5). Once more with
   `--set runtime.executor=ray` (a local Ray started and stopped by the command).
4. Steady state, reported separately: megaclass on an already started Ray with warm workers;
   img2dataset from its own per-shard stats (successes / (last end - first start)).
   The server's CPU per stored image is printed for both (keep-alive vs a connection per image),
   and each downloader's own CPU per stored image (what a remote web would leave on these cores).
5. Memory: an endless response fetched with the default cap; peak RSS must stay far below it.
img2dataset lives in its own venv (.bench/img2dataset-venv; the `bench` extra names it), so its
dependencies never touch this one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
WORK = ROOT / ".bench" / "ingest"
I2D_VENV = ROOT / ".bench" / "img2dataset-venv"
from data_pipeline import ALLOCATOR_ENV  # noqa: E402

for name, value in {**ALLOCATOR_ENV, "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(name, value)

from http_server import LoopbackServer  # noqa: E402


def make_image(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    width = int(rng.integers(500, 1025))
    height = int(np.clip(width * rng.uniform(0.7, 0.8), 375, 768))
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    mid = Image.fromarray(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)).resize(
        (width, height), Image.BICUBIC)
    pixels = 0.6 * np.asarray(coarse, np.float32) + 0.3 * np.asarray(mid, np.float32)
    pixels += np.linspace(0, 40, width, dtype=np.float32)[None, :, None]
    pixels += rng.normal(0, 6, (height, width, 3)).astype(np.float32)  # sensor-like grain sets the size
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def images(num: int) -> list[bytes]:
    folder = WORK / "images"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(num):
        path = folder / f"{i:06d}.jpg"
        if not path.exists():
            path.write_bytes(make_image(i))
        out.append(path.read_bytes())
    return out


def ceiling(data: list[bytes], size: int, quality: int) -> float:
    """Images/s on one core: draft decode, resize, encode; no I/O, no Python around it but the loop."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    start = time.perf_counter()
    for blob in data:
        im = Image.open(io.BytesIO(blob))
        w, h = im.size
        scale = size / min(w, h)
        target = (max(1, round(w * scale)), max(1, round(h * scale)))
        im.draft("RGB", target)
        im = im.convert("RGB").resize(target, Image.BICUBIC)
        im.save(io.BytesIO(), "JPEG", quality=quality)
    elapsed = time.perf_counter() - start
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    return len(data) / elapsed


def _warm_worker() -> int:
    import data_pipeline.ingest  # noqa: F401
    import webdataset  # noqa: F401  (imports torch: seconds, once per worker, not per shard)
    time.sleep(1.0)  # hold the CPU slot so every warm-up lands on its own worker
    return os.getpid()


def run_megaclass(urls: list[str], cores: int) -> tuple[float, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from cluster.ingest_runner import run_plan
    from cluster.runtime import WORKER_ENV
    from data_pipeline.config import replace
    from data_pipeline.ingest import IngestConfig, finalize, plan_shards

    source = WORK / "urls.parquet"
    pq.write_table(pa.table({"url": urls, "label": [f"c{i % 10}" for i in range(len(urls))]}), str(source))
    out = WORK / "megaclass-out"
    shutil.rmtree(out, ignore_errors=True)
    shard_size = max(1, len(urls) // (4 * cores))
    cfg = replace(IngestConfig(), ["fetch.allow_networks=[127.0.0.0/8]", f"output.shard_size={shard_size}",
                                   "runtime.progress=false", "output.max_failed_fraction=1.0"])
    global _warm_worker
    _warm_worker = ray.remote(num_cpus=1)(_warm_worker)
    cold_start = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
    ray.get([_warm_worker.remote() for _ in range(cores)])  # workers started and imports done before timing
    try:
        start = time.perf_counter()
        plan = plan_shards(str(source), str(out), cfg)
        results, class_counts = run_plan(plan, cfg)
        manifest = finalize(plan, results, cfg, class_counts)
        elapsed = time.perf_counter() - start
    finally:
        ray.shutdown()
    # img2dataset's wall time includes its own start-up; this one is megaclass's (Ray start, worker imports).
    print(f"megaclass cold: {time.perf_counter() - cold_start:.1f} s including Ray start-up and shutdown")
    return elapsed, manifest["totals"]["train"]["ok"]


def run_megaclass_cold(urls: list[str], cores: int, extra: list[str] = ()) -> tuple[float, int]:
    """`megaclass ingest` as a user runs it (one command, defaults but for `extra`), wall clock to exit."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = WORK / "urls-cold.parquet"
    pq.write_table(pa.table({"url": urls, "label": [f"c{i % 10}" for i in range(len(urls))]}), str(source))
    out = WORK / "megaclass-cold"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "cluster", "ingest", str(source), str(out), "--allow-network", "127.0.0.0/8",
               "--shard-size", str(max(1, len(urls) // (4 * cores))), "--no-progress", "--max-failed-fraction", "1",
               *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        print("megaclass ingest failed:", done.stderr[-2000:])
        return elapsed, 0
    return elapsed, json.loads((out / "manifest.json").read_text())["totals"]["train"]["ok"]


def install_img2dataset() -> Path | None:
    python = I2D_VENV / "bin" / "python"
    if not (I2D_VENV / "bin" / "img2dataset").exists():
        print("installing img2dataset into", I2D_VENV, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", "img2dataset"], capture_output=True, text=True)
        if done.returncode != 0:
            print("img2dataset could not be installed (offline?):", done.stderr.strip().splitlines()[-1:])
            return None
    return I2D_VENV / "bin" / "img2dataset"


def run_img2dataset(binary: Path, urls: list[str], cores: int) -> tuple[float, int, float]:
    url_list = WORK / "urls.txt"
    url_list.write_text("\n".join(urls) + "\n")
    out = WORK / "img2dataset-out"
    shutil.rmtree(out, ignore_errors=True)
    command = [str(binary), "--url_list", str(url_list), "--input_format", "txt", "--output_format", "webdataset",
               "--output_folder", str(out), "--resize_mode", "keep_ratio", "--image_size", "256",
               "--encode_quality", "90", "--processes_count", str(cores), "--thread_count", "16",
               "--number_sample_per_shard", str(max(1, len(urls) // (4 * cores))), "--timeout", "10",
               "--retries", "0", "--enable_wandb", "False", "--distributor", "multiprocessing"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=""))
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        print("img2dataset failed:", done.stderr[-2000:])
        return elapsed, 0, 0.0
    ok = sum(1 for p in out.rglob("*.jpg")) + sum(_tar_jpgs(p) for p in out.glob("*.tar"))
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return elapsed, ok, sum(s["successes"] for s in stats) / span


def _tar_jpgs(path: Path) -> int:
    import tarfile

    with tarfile.open(path) as tar:
        return sum(1 for m in tar.getmembers() if m.name.endswith(".jpg"))


def endless_peak_rss_mb(server: LoopbackServer) -> tuple[str, float, float]:
    from data_pipeline.fetch import FetchOptions, fetch
    from data_pipeline.netpolicy import NetworkPolicy

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = fetch(server.add("/endless", endless=True), FetchOptions(timeout_s=60.0, policy=NetworkPolicy.from_cidrs(["127.0.0.0/8"])))
    return result.reason, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_cpu_seconds() -> float:
    """CPU seconds of every finished (waited-for) child process and its own waited-for children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (the server's share of the cores)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_images(core: int | None, keep_alive: bool = True) -> tuple[subprocess.Popen, str]:
    """The image files over HTTP/1.1 keep-alive, as web servers answer (or HTTP/1.0, a connection
    per request), from a separate process (pinned to `core` if given); both downloaders get the
    same server."""
    code = ("import sys, time\nfrom cluster.webserver import StaticServer, _QuietHandler\n"
            "_QuietHandler.protocol_version = sys.argv[2]\n"
            "server = StaticServer(sys.argv[1]).__enter__()\nprint(server.base_url, flush=True)\ntime.sleep(1e9)\n")
    protocol = "HTTP/1.1" if keep_alive else "HTTP/1.0"
    proc = subprocess.Popen([sys.executable, "-c", code, str(WORK / "images"), protocol], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, preexec_fn=None if core is None else lambda: os.sched_setaffinity(0, {core}))
    return proc, proc.stdout.readline().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1, help="cold runs of each downloader, alternated (medians)")
    parser.add_argument("--skip-img2dataset", action="store_true")
    parser.add_argument("--no-keep-alive", action="store_true", help="the server closes every connection (HTTP/1.0)")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))

    data = images(args.num_images)
    sizes = [Image.open(io.BytesIO(b)).size for b in data]
    print(f"{len(data)} JPEGs, mean {np.mean([len(b) for b in data]) / 1024:.0f} kB, mean size "
          f"{np.mean([w for w, _ in sizes]):.0f}x{np.mean([h for _, h in sizes]):.0f}; {cores} core(s) for each downloader")
    ceiling_rate = ceiling(data, 256, 90)
    print(f"ceiling (PIL draft -> 256 -> q90, one core, no I/O): {ceiling_rate:.1f} images/s")

    with LoopbackServer() as server:
        reason, rss_before, rss_after = endless_peak_rss_mb(server)
    print(f"endless response: {reason}; peak RSS {rss_before:.0f} -> {rss_after:.0f} MB")
    binary = None if args.skip_img2dataset else install_img2dataset()
    server_proc, base_url = serve_images(None, keep_alive=not args.no_keep_alive)
    cold, i2d, ratios = [], [], []
    server_ms, client_ms = {"megaclass": [], "img2dataset": []}, {"megaclass": [], "img2dataset": []}
    try:
        urls = [f"{base_url}/{i:06d}.jpg" for i in range(len(data))]
        for repeat in range(args.repeats):
            server_cpu, client_cpu = cpu_seconds(server_proc.pid), children_cpu_seconds()
            cold.append(run_megaclass_cold(urls, cores))
            server_ms["megaclass"].append((cpu_seconds(server_proc.pid) - server_cpu) / max(cold[-1][1], 1) * 1000)
            client_ms["megaclass"].append((children_cpu_seconds() - client_cpu) / max(cold[-1][1], 1) * 1000)
            print(f"[{repeat + 1}] megaclass cold: {cold[-1][1]} ok in {cold[-1][0]:.1f} s wall", flush=True)
            if binary is not None:
                server_cpu, client_cpu = cpu_seconds(server_proc.pid), children_cpu_seconds()
                i2d.append(run_img2dataset(binary, urls, cores))
                server_ms["img2dataset"].append((cpu_seconds(server_proc.pid) - server_cpu) / max(i2d[-1][1], 1) * 1000)
                client_ms["img2dataset"].append((children_cpu_seconds() - client_cpu) / max(i2d[-1][1], 1) * 1000)
                ratios.append(i2d[-1][0] / cold[-1][0])
                print(f"[{repeat + 1}] img2dataset cold: {i2d[-1][1]} ok in {i2d[-1][0]:.1f} s wall; steady "
                      f"{i2d[-1][2]:.1f} images/s; megaclass = {ratios[-1]:.2f}x", flush=True)
        ray_s, ray_ok = run_megaclass_cold(urls, cores, ["--set", "runtime.executor=ray"])
        print(f"megaclass cold on a local Ray: {ray_ok} ok in {ray_s:.1f} s wall", flush=True)
        warm_s, warm_ok = run_megaclass(urls, cores)
        print(f"megaclass steady (warm Ray): {warm_ok} ok in {warm_s:.1f} s = {warm_ok / warm_s:.1f} images/s", flush=True)
    finally:
        server_proc.kill()
    med = statistics.median
    cold_s, cold_ok = med(c[0] for c in cold), med(c[1] for c in cold)
    print(f"\n| {len(data)} loopback URLs, {cores} cores, median of {args.repeats} | wall s | images/s | ratio |")
    print("|---|---|---|---|")
    print(f"| ceiling: PIL draft, no I/O, x {cores} cores | - | {ceiling_rate * cores:.0f} | 1.00 |")
    print(f"| megaclass ingest, cold (local processes) | {cold_s:.1f} | {cold_ok / cold_s:.0f} | "
          f"{cold_ok / cold_s / (ceiling_rate * cores):.2f} of ceiling |")
    print(f"| megaclass ingest --set runtime.executor=ray, cold | {ray_s:.1f} | {ray_ok / ray_s:.0f} | "
          f"{ray_ok / ray_s / (ceiling_rate * cores):.2f} of ceiling |")
    print(f"| megaclass, steady (warm Ray) | {warm_s:.1f} | {warm_ok / warm_s:.0f} | "
          f"{warm_ok / warm_s / (ceiling_rate * cores):.2f} of ceiling |")
    if i2d and all(r[1] for r in i2d):
        i2d_s, i2d_ok, i2d_steady = med(r[0] for r in i2d), med(r[1] for r in i2d), med(r[2] for r in i2d)
        print(f"| img2dataset {cores} processes x 16 threads, cold | {i2d_s:.1f} | {i2d_ok / i2d_s:.0f} | "
              f"megaclass = {med(ratios):.2f}x faster (wall; per run {', '.join(f'{r:.2f}' for r in ratios)}) |")
        print(f"| img2dataset, steady (its shard stats) | - | {i2d_steady:.0f} | "
              f"megaclass steady = {warm_ok / warm_s / i2d_steady:.2f}x |")
    else:
        print("| img2dataset | not measured | - | - |")
    print("server CPU per stored image, cold runs (median): "
          + ", ".join(f"{k} {med(v):.2f} ms" for k, v in server_ms.items() if v))
    # what a remote web would leave on these cores: each downloader's own CPU (all its processes)
    print("downloader CPU per stored image, cold runs (median): "
          + ", ".join(f"{k} {med(v):.2f} ms" for k, v in client_ms.items() if v))


if __name__ == "__main__":
    main()
