"""Merge speed and memory: whole-model merges from adapter files, against PEFT's `svd` and dense tensorly CP.

    python benchmarks/merge_speed.py            # 10 rank-16 adapters with Mistral-7B shapes (~7 min on 2 cores)
    python benchmarks/merge_speed.py --quick    # 2 layers, fewer peers and scaling points (~2 min)

1. Writes 10 real PEFT adapter folders (random factors) with Mistral-7B shapes: 32 layers x q,k,v,o,gate,up,down.
2. Times `merge_adapters` for `cp`, `tsv`, `knots`, `svd` (each in a fresh subprocess, with its peak RSS).
3. Times PEFT's own `add_weighted_adapter(combination_type="svd")` (dense delta + full SVD) on one module of each
   shape up to 4096 wide, and dense tensorly `parafac` on the full T x out x in tensor of the 1024 x 4096 module,
   and extrapolates both to the whole model (dense CP from a few ALS iterations to the 100 that `cp` runs at most).
4. Measures how `cp`'s per-module time grows with the number of adapters, the LoRA rank and the hidden size.
Writes `benchmarks/results/merge_speed.{md,json,png}` and prints the table.

    python benchmarks/merge_speed.py --sweep library          # library scale (issue 24; ~1 h on 2 cores)
    python benchmarks/merge_speed.py --sweep library --quick  # 2 layers, T = 4 and 8, in-process (seconds)
    python benchmarks/merge_speed.py --busy                   # next to a competing 2-thread torch process

`--sweep library`: whole-model merges of T = 10, 64, 256 adapters (rank 4; rank 16 up to T = 64) with Phi-3-mini
and Mistral-7B shapes, methods cp, tucker (when registered), iso_c, tsv, each in a fresh interpreter with its peak
RSS; the floor is the Gram matrices' (T r)^2 (out + in) multiply-adds per module at this machine's matmul rate,
measured in the same run. Adapters are generated once under `$MERGE_SPEED_CACHE` (default /tmp/merge_speed_cache);
the T-adapter merges use the first T of 256 (64) folders. Writes `results/merge_speed_library.{md,json,png}`.
`--busy`: the quarter-Mistral cp merge (10 rank-16 adapters, 8 layers, 56 modules) and the dense peer (LAPACK SVD
of one 4096 x 4096 update), each alone and next to a competing process; writes `results/merge_speed_busy.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE / ".cache"
BASE_MODEL = "mistralai/Mistral-7B-v0.1"
MISTRAL = {  # module -> (out, in)
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (1024, 4096),
    "self_attn.v_proj": (1024, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (14336, 4096),
    "mlp.up_proj": (14336, 4096),
    "mlp.down_proj": (4096, 14336),
}
logger = logging.getLogger("merge_speed")


def write_adapters(n_adapters: int, rank: int, layers: int, dtype: torch.dtype, shapes: dict | None = None,
                   cache: Path = CACHE, model: str = "mistral", base_model: str = BASE_MODEL) -> list[Path]:
    """Real PEFT adapter folders with random factors (cached by their parameters; only missing ones are written)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    shapes = shapes or MISTRAL
    root = cache / f"{model}_T{n_adapters}_r{rank}_L{layers}_{str(dtype).removeprefix('torch.')}"
    dirs = [root / f"adapter_{t}" for t in range(n_adapters)]
    if all((d / "adapter_model.safetensors").exists() for d in dirs):
        return dirs
    for t, d in enumerate(dirs):
        if (d / "adapter_model.safetensors").exists():
            continue
        g = torch.Generator().manual_seed(t)
        tensors = {}
        for layer in range(layers):
            for name, (out, inn) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.{name}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, inn, generator=g) / inn**0.5).to(dtype)
                tensors[f"{key}.lora_B.weight"] = (torch.randn(out, rank, generator=g) * 0.01).to(dtype)
        d.mkdir(parents=True, exist_ok=True)
        LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=[n.split(".")[1] for n in shapes],
            base_model_name_or_path=base_model,
        ).save_pretrained(d)
        save_file(tensors, str(d / "adapter_model.safetensors.tmp"))
        os.replace(d / "adapter_model.safetensors.tmp", d / "adapter_model.safetensors")
        logger.info("wrote %s", d)
    return dirs


def child(method: str, sources: list[str], rank: int, warm: bool = False) -> None:
    """Run in a fresh interpreter: one `merge_adapters` call (or, for ``dense_svd``, the dense peer: LAPACK SVD of
    the weighted sum of the first q_proj update, 4096 x 4096); prints time and peak RSS as JSON. With ``warm`` the
    package's lazy imports (peft, for the merged config: 3-13 s on this machine) are done before the clock starts
    and reported as ``import_seconds``."""
    import peft_cp_merge

    import_seconds = None
    if warm:
        t = time.perf_counter()
        import peft_cp_merge.config  # noqa: F401  (imports peft)
        import peft_cp_merge.files.merge  # noqa: F401

        import_seconds = time.perf_counter() - t

    if method == "dense_svd":
        factors = load_module([Path(s) for s in sources], "base_model.model.model.layers.0.self_attn.q_proj")
        dense = sum(2.0 / len(factors) * B @ A for A, B in factors)
        t = time.perf_counter()
        torch.linalg.svd(dense, full_matrices=False)
        print(json.dumps({"method": method, "seconds": time.perf_counter() - t,
                          "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
        return

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    merged = peft_cp_merge.merge_adapters(sources, method=method, rank=rank, progress=False)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n_modules = merged.stats["modules"]
    print(json.dumps({"method": method, "seconds": seconds, "peak_rss": peak, "base_rss": base_rss,
                      "modules": n_modules, "import_seconds": import_seconds}))


def run_child(method: str, sources: list[Path], rank: int, timeout: float | None = None,
              max_rss: float | None = None, warm: bool = False) -> dict:
    """`child` in a fresh interpreter. With ``timeout`` (s) or ``max_rss`` (bytes) it is watched and stopped past
    either; the returned dict then says why (``stopped``) instead of raising."""
    cmd = [sys.executable, __file__, "--child", method, "--rank", str(rank), *map(str, sources)]
    if warm:
        cmd.insert(2, "--warm")
    if timeout is None and max_rss is None:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{method} merge failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])
    import psutil

    start, stopped = time.perf_counter(), None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = watched.memory_info().rss
            except psutil.NoSuchProcess:
                break
            if max_rss is not None and rss > max_rss:
                stopped = f"stopped: RSS over {max_rss / 2**30:.1f} GiB"
            elif timeout is not None and time.perf_counter() - start > timeout:
                stopped = f"stopped: over {timeout:.0f} s"
            if stopped:
                proc.kill()
                break
            time.sleep(0.2)
        out, err = proc.communicate()
    if stopped:
        return {"method": method, "stopped": stopped, "seconds": time.perf_counter() - start}
    if proc.returncode != 0:
        return {"method": method, "stopped": f"failed: {err.strip().splitlines()[-1][:300] if err.strip() else ''}"}
    return json.loads(out.strip().splitlines()[-1])


def load_module(sources: list[Path], key: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from safetensors import safe_open

    out = []
    for s in sources:
        with safe_open(str(s / "adapter_model.safetensors"), "pt") as f:
            out.append((f.get_tensor(f"{key}.lora_A.weight").float(), f.get_tensor(f"{key}.lora_B.weight").float()))
    return out


def peft_svd_seconds(factors, shape, rank: int, scaling: float) -> float:
    """PEFT's own `svd` combination on a one-Linear model holding the same adapters (dense delta + full SVD)."""
    from peft import LoraConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(shape[1], shape[0], bias=False, device="meta")

    cfg = LoraConfig(r=factors[0][0].shape[0], lora_alpha=scaling * factors[0][0].shape[0], target_modules=["proj"])
    model = get_peft_model(One(), cfg, adapter_name="a0")
    for t in range(1, len(factors)):
        model.add_adapter(f"a{t}", cfg)
    model.to_empty(device="cpu")
    layer = model.base_model.model.proj
    with torch.no_grad():
        for t, (A, B) in enumerate(factors):
            layer.lora_A[f"a{t}"].weight.copy_(A)
            layer.lora_B[f"a{t}"].weight.copy_(B)
    names = [f"a{t}" for t in range(len(factors))]
    start = time.perf_counter()
    model.add_weighted_adapter(names, [1 / len(names)] * len(names), "merged", combination_type="svd", svd_rank=rank)
    return time.perf_counter() - start


def dense_cp_seconds_per_iter(factors, scaling: float, rank: int, iters: int) -> float:
    """Dense tensorly `parafac` on the full T x out x in tensor (float32), seconds per ALS iteration. The start is
    random: an SVD start would add full SVDs of the out x (T in) unfoldings (minutes at 4096) on top of the ALS."""
    import tensorly as tl
    from tensorly.decomposition import parafac

    X = torch.stack([scaling * B @ A for A, B in factors])
    with tl.backend_context("pytorch"):
        start = time.perf_counter()
        parafac(X, rank, init="random", random_state=0, n_iter_max=iters, tol=0)
        seconds = time.perf_counter() - start
    return seconds / iters


def cp_scaling(points: list[tuple[int, int, int]], modules: int = 8) -> list[dict]:
    """Per-module time of the registry's batched `cp` (no I/O) for (n_adapters, rank, hidden) points."""
    from peft_cp_merge import LoraFactors, get_merge_method

    cp = get_merge_method("cp")
    rows = []
    for T, r, h in points:
        g = torch.Generator().manual_seed(0)
        groups = [
            [LoraFactors(torch.randn(r, h, generator=g) / h**0.5, torch.randn(h, r, generator=g) * 0.01, 2.0)
             for _ in range(T)]
            for _ in range(modules)
        ]
        start = time.perf_counter()
        cp.merge_batch(groups, [[1 / T] * T] * modules, rank=r)
        rows.append({"adapters": T, "rank": r, "hidden": h,
                     "seconds_per_module": (time.perf_counter() - start) / modules})
        logger.info("cp scaling %s", rows[-1])
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    from peft_cp_merge._io import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    whole = results["whole_model"]
    names = list(whole)
    axes[0].bar(names, [whole[n] for n in names], color=["C0" if "peer" not in n else "C3" for n in names])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("seconds, whole model")
    axes[0].set_title(f"{results['setup']['adapters']} adapters, rank {results['setup']['rank']}")
    axes[0].tick_params(axis="x", rotation=45)
    sweeps = [("adapters", "number of adapters"), ("rank", "LoRA rank"), ("hidden", "hidden size")]
    for ax, (key, label) in zip(axes[1:], sweeps):
        pts = [p for p in results["scaling"] if p["sweep"] == key]
        ax.plot([p[key] for p in pts], [p["seconds_per_module"] * 1000 for p in pts], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("cp ms per module")
    save_figure(fig, path)


PHI3 = {  # module -> (out, in): microsoft/Phi-3-mini-4k-instruct, fused qkv and gate_up
    "self_attn.qkv_proj": (9216, 3072),
    "self_attn.o_proj": (3072, 3072),
    "mlp.gate_up_proj": (16384, 3072),
    "mlp.down_proj": (3072, 8192),
}
LIBRARY_MODELS = {  # name -> (shapes, base model id, factor dtype on disk)
    # Phi-3-mini in float32 (the RSS target is against float32 adapters: 256 rank-4 ones are 6.4 GB); Mistral-7B in
    # bfloat16, which halves its 256 rank-4 (10.7 GB) and 64 rank-16 (10.7 GB) folders on this disk
    "phi3": (PHI3, "microsoft/Phi-3-mini-4k-instruct", torch.float32),
    "mistral": (MISTRAL, BASE_MODEL, torch.bfloat16),
}
LIBRARY_CACHE = Path(os.environ.get("MERGE_SPEED_CACHE", "/tmp/merge_speed_cache"))
# the competing process: a 2-thread torch matmul loop, in constant memory (no list of results)
COMPETITOR = "import torch; torch.set_num_threads(2); a = torch.randn(2000, 2000)\nwhile True: a @ a"


def matmul_rate(threads: int | None = None) -> float:
    """This machine's float32 rate (FLOP/s) on the Gram product `cp` does, M M^T with M (8, 1024, 12288): best of 3."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    M = torch.randn(8, 1024, 12288)
    best = float("inf")
    for _ in range(4):  # the first one warms up
        t = time.perf_counter()
        M @ M.mT
        best = min(best, time.perf_counter() - t)
    torch.set_num_threads(before)
    return 2 * 8 * 1024**2 * 12288 / best


def gram_floor_flops(shapes: dict, layers: int, T: int, r: int) -> float:
    """The FLOPs no factored joint merge avoids: the Gram matrices of the stacked factors, (T r)^2 (out + in)
    multiply-adds per module (2 FLOPs each, as a GEMM counts them)."""
    return 2.0 * (T * r) ** 2 * sum(out + inn for out, inn in shapes.values()) * layers


def library_grid(quick: bool) -> list[tuple[str, int, int, tuple[str, ...] | None]]:
    """(model, rank, T, methods or None for all) points. Rank 16 stops at T = 64: at T = 256 a rank-16 merge's
    (T r) = 4096 Gram matrices cost 16x the rank-4 ones (the floor column states it), and its folders 26-43 GB of
    disk. Mistral-7B (1.7x Phi-3-mini's out + in per layer, 224 modules) runs T = 256 with cp only and rank 16 at
    T = 10 only, so that the sweep fits in an hour on 2 cores."""
    if quick:
        return [("phi3", 4, 4, None), ("phi3", 4, 8, None)]
    return [("phi3", 4, 10, None), ("phi3", 4, 64, None), ("phi3", 4, 256, None), ("phi3", 16, 10, None),
            ("phi3", 16, 64, None), ("mistral", 4, 10, None), ("mistral", 4, 64, None), ("mistral", 4, 256, ("cp",)),
            ("mistral", 16, 10, None)]


def tucker_skip(T: int, r: int, batch: int = 32) -> str | None:
    """`tucker` holds the (T r) x (T r) x T float64 core of every module of a batch (32 of them): skipped where that
    alone passes 4 GiB, which would compete for this 23 GiB machine with the other jobs on it."""
    size = (T * r) ** 2 * T * 8 * batch
    if size > 4 * 2**30:
        return f"skipped: its (T r)^2 T float64 cores take {size / 2**30:.0f} GiB per batch of {batch} modules"
    return None


def library_sweep(args) -> dict:
    """Whole-model merges at library scale, each in a fresh interpreter (time, peak RSS), against the Gram floor."""
    from peft_cp_merge import list_merge_methods

    methods = [m for m in ("cp", "tucker", "iso_c", "tsv") if m in list_merge_methods()]
    layers = 2 if args.quick else 32
    rate = matmul_rate()
    logger.info("matmul rate %.1f GFLOP/s (float32 Gram product, %d threads)", rate / 1e9, torch.get_num_threads())
    rows = []
    grid = library_grid(args.quick)
    if args.points:  # e.g. phi3:4:256:cp,tsv -- a subset of the grid (or points beyond it), in the order given
        grid = [(m, int(r), int(T), tuple(ms.split(",")) if ms else None)
                for m, r, T, ms in (f"{p}:".split(":")[:4] for p in args.points)]
    largest = {}
    for model, r, T, _ in grid:
        largest[(model, r)] = max(largest.get((model, r), 0), 64 if r == 16 and not args.quick else T)
    if not args.quick:  # the pools of the full grid, so that --points reuses the same folders
        for model, r, T, _ in library_grid(False):
            largest[(model, r)] = max(largest.get((model, r), 0), T)
    for model, r, T, only in grid:
        shapes, base, dtype = LIBRARY_MODELS[model]
        pool = write_adapters(largest[(model, r)], r, layers, dtype, shapes, LIBRARY_CACHE, model, base)
        sources = pool[:T]  # the first T folders of the largest pool: one set of files for every T
        adapter_bytes = sum((d / "adapter_model.safetensors").stat().st_size for d in sources)
        floor = gram_floor_flops(shapes, layers, T, r)
        for method in [m for m in methods if only is None or m in only]:
            row = {"model": model, "adapters": T, "rank": r, "layers": layers, "dtype": str(dtype).removeprefix(
                "torch."), "method": method, "adapter_bytes": adapter_bytes, "floor_seconds": floor / rate,
                "load_before": os.getloadavg()}
            skip = tucker_skip(T, r) if method == "tucker" else None
            if skip:
                row["stopped"] = skip
            elif args.quick:  # in this interpreter (seconds, for CI): times only, no per-merge peak RSS
                import peft_cp_merge

                t = time.perf_counter()
                merged = peft_cp_merge.merge_adapters(sources, method=method, rank=r, progress=False)
                row.update(seconds=time.perf_counter() - t, modules=merged.stats["modules"])
            else:
                res = run_child(method, sources, r, timeout=args.timeout, max_rss=args.max_rss * 2**30, warm=True)
                row.update({k: v for k, v in res.items() if k != "method"})
            row["load_after"] = os.getloadavg()
            rows.append(row)
            logger.info("library %s", row)
    return {"setup": {"threads": torch.get_num_threads(), "cpu": platform.processor(), "cores": os.cpu_count(),
                      "torch": torch.__version__, "matmul_gflops": rate / 1e9, "quick": args.quick,
                      "load_start": rows[0]["load_before"] if rows else None,
                      "command": " ".join(["python", "benchmarks/merge_speed.py", *(args.argv or sys.argv[1:])])},
            "rows": rows}


def render_library(results: dict) -> str:
    s = results["setup"]
    lines = [
        f"Library sweep: whole-model merges from adapter files, {s['cores']} cores, {s['threads']} torch threads, "
        f"measured float32 matmul rate {s['matmul_gflops']:.1f} GFLOP/s (the Gram product, same run). Floor: the "
        "Gram matrices' 2 (T r)^2 (out + in) FLOPs per module at that rate. Peak RSS includes the interpreter with "
        "torch and peft imported (0.8 GiB); the next column counts only what the merge adds. Load average (1 min) "
        "logged before and after each merge (the machine is shared).",
        "",
        "| model | T | rank | dtype | method | seconds | x floor | floor (s) | peak RSS (GiB) | RSS / adapter bytes "
        "| added by the merge / adapter bytes | adapters (GiB) | load before/after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        if "stopped" in r:
            sec, xf, rss, ratio, own = r["stopped"], "", "", "", ""
        elif "peak_rss" not in r:  # --quick: in-process
            sec, xf, rss, ratio, own = f"{r['seconds']:.2f}", f"{r['seconds'] / r['floor_seconds']:.0f}", "", "", ""
        else:
            sec, xf = f"{r['seconds']:.1f}", f"{r['seconds'] / r['floor_seconds']:.1f}"
            rss, ratio = f"{r['peak_rss'] / 2**30:.2f}", f"{r['peak_rss'] / r['adapter_bytes']:.2f}"
            own = f"{(r['peak_rss'] - r['base_rss']) / r['adapter_bytes']:.2f}"
        lines.append(f"| {r['model']} | {r['adapters']} | {r['rank']} | {r['dtype']} | {r['method']} | {sec} | {xf} | "
                     f"{r['floor_seconds']:.1f} | {rss} | {ratio} | {own} | {r['adapter_bytes'] / 2**30:.2f} | "
                     f"{r['load_before'][0]:.1f}/{r['load_after'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def plot_library(results: dict, path: Path) -> None:
    import matplotlib

    from peft_cp_merge._io import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in results["rows"]})
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in results["rows"] if r["model"] == model]
        for i, method in enumerate(sorted({r["method"] for r in rows})):
            for rank, style in ((4, "o-"), (16, "s--")):
                pts = [r for r in rows if r["method"] == method and r["rank"] == rank and "stopped" not in r]
                if pts:
                    ax.plot([p["adapters"] for p in pts], [p["seconds"] for p in pts], style, color=f"C{i}",
                            label=f"{method}, r={rank}")
        for rank, style in ((4, ":"), (16, "-.")):
            pts = sorted({(r["adapters"], r["floor_seconds"]) for r in rows if r["rank"] == rank})
            if pts:
                ax.plot(*zip(*pts), style, color="k", label=f"Gram floor, r={rank}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("adapters T")
        ax.set_ylabel("seconds, whole model")
        ax.set_title(f"{model} shapes ({rows[0]['layers']} layers)")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def busy_row(args) -> dict:
    """The quarter-Mistral cp merge and the dense peer, alone and next to a competing 2-thread torch process."""
    sources = write_adapters(10, 16, 8, torch.float32)
    runs: dict[str, dict[str, list]] = {}

    def measure(state: str) -> None:  # interleaved, so both see the same load from the rest of the machine
        for _ in range(args.repeats):
            for name in ("cp", "dense_svd"):
                res = run_child(name, sources, 16, warm=True)
                runs.setdefault(name, {}).setdefault(state, []).append(res["seconds"])
                logger.info("%s %s: %.2f s (load %s)", state, name, res["seconds"], os.getloadavg())

    load = {"quiet_start": os.getloadavg()}
    measure("quiet")
    competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], stdout=subprocess.DEVNULL)
    try:
        time.sleep(3)  # let it start its loop
        load["busy_start"] = os.getloadavg()
        measure("busy")
        load["busy_end"] = os.getloadavg()
    finally:
        competitor.kill()
        competitor.wait()

    def median(xs):
        return sorted(xs)[len(xs) // 2]

    summary = {name: {"quiet": median(r["quiet"]), "busy": median(r["busy"]),
                      "slowdown": median(r["busy"]) / median(r["quiet"]), "runs": r} for name, r in runs.items()}
    return {"setup": {"adapters": 10, "rank": 16, "layers": 8, "modules": 56, "threads": torch.get_num_threads(),
                      "cores": os.cpu_count(), "competitor": COMPETITOR, "repeats": args.repeats, "load": load,
                      "torch": torch.__version__,
                      "command": " ".join(["python", "benchmarks/merge_speed.py", *(args.argv or sys.argv[1:])])},
            "results": summary}


def render_busy(results: dict) -> str:
    s, r = results["setup"], results["results"]
    names = {"cp": "cp merge_adapters, 10 rank-16 adapters, 56 modules (quarter Mistral-7B)",
             "dense_svd": "dense peer: LAPACK SVD of one 4096 x 4096 update (torch.linalg.svd)"}
    lines = [f"Busy machine: {s['cores']} cores, {s['threads']} torch threads; competing process `{s['competitor']}`. "
             f"Medians of {s['repeats']} fresh-process runs each.", "",
             "| merge | quiet (s) | next to the competitor (s) | slowdown | all runs quiet / busy (s) |",
             "|---|---|---|---|---|"]
    for name, e in r.items():
        runs = (", ".join(f"{x:.2f}" for x in e["runs"]["quiet"]) + " / "
                + ", ".join(f"{x:.2f}" for x in e["runs"]["busy"]))
        lines.append(f"| {names[name]} | {e['quiet']:.2f} | {e['busy']:.2f} | {e['slowdown']:.2f}x | {runs} |")
    ok = r["cp"]["slowdown"] <= r["dense_svd"]["slowdown"]
    lines += ["", f"cp degrades {'no worse than' if ok else 'WORSE than'} the dense peer "
              f"({r['cp']['slowdown']:.2f}x vs {r['dense_svd']['slowdown']:.2f}x). Load average (1, 5, 15 min): "
              + "; ".join(f"{k} {', '.join(f'{x:.1f}' for x in v)}" for k, v in s["load"].items()) + "."]
    return "\n".join(lines) + "\n"


def write_results(out: Path, stem: str, results: dict, md: str, plot_fn=None) -> None:
    from peft_cp_merge._io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{stem}.json", json.dumps(results, indent=2))
    if plot_fn is not None:
        plot_fn(results, out / f"{stem}.png")
    atomic_write_text(out / f"{stem}.md", md)
    print(md)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=10)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--methods", nargs="+", default=["cp", "tsv", "knots", "svd"])
    p.add_argument("--dense-cp-iters", type=int, default=2, help="ALS iterations timed for dense tensorly CP")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per method; the median is reported")
    p.add_argument("--quick", action="store_true", help="2 layers, peers on the small shapes only, few points")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--sweep", choices=["library"], help="the library-scale sweep (T up to 256) instead")
    p.add_argument("--busy", action="store_true", help="the busy-machine row: next to a competing torch process")
    p.add_argument("--points", nargs="+", help="library sweep: only these MODEL:RANK:T[:METHOD,...] points")
    p.add_argument("--timeout", type=float, default=480, help="library sweep: seconds before a merge is stopped")
    p.add_argument("--max-rss", type=float, default=12, help="library sweep: GiB of RSS before a merge is stopped")
    p.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("sources", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    if args.child:
        return child(args.child, args.sources, args.rank, args.warm)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.busy:
        results = busy_row(args)
        write_results(args.out, "merge_speed_busy", results, render_busy(results))
        return results
    if args.sweep == "library":
        results = library_sweep(args)
        stem = "merge_speed_library_quick" if args.quick else "merge_speed_library"
        stem += "_points" if args.points else ""
        write_results(args.out, stem, results, render_library(results), plot_library)
        return results
    if args.quick:
        args.layers = 2
    sources = write_adapters(args.adapters, args.rank, args.layers, torch.float32)
    adapter_bytes = sum((s / "adapter_model.safetensors").stat().st_size for s in sources)
    scaling = 2.0  # lora_alpha / r

    ours = {}
    for method in args.methods:
        runs = [run_child(method, sources, args.rank) for _ in range(args.repeats)]
        # the median run (wall time on a shared VM varies by 20-30% between runs); every run's time is kept
        ours[method] = dict(sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2],
                            all_seconds=[r["seconds"] for r in runs], peak_rss=max(r["peak_rss"] for r in runs))
        logger.info("merge_adapters %s: %s", method, ours[method])

    shapes = {}
    for name, shape in MISTRAL.items():
        shapes.setdefault(shape, []).append(name)
    # Peers are timed on the shapes up to 4096 wide; the 14336-wide MLP modules are extrapolated (below), because
    # PEFT's dense full-matrices SVD and the dense 10 x 14336 x 4096 tensor take many minutes each on 2 cores.
    peer_shapes = [s for s in shapes if max(s) <= 4096]
    peers = {}
    for shape in peer_shapes:
        factors = load_module(sources, f"base_model.model.model.layers.0.{shapes[shape][0]}")
        entry = {"peft_svd": peft_svd_seconds(factors, shape, args.rank, scaling)}
        if min(shape) <= 1024:  # the smallest dense tensor; ALS cost is linear in the number of elements
            entry["dense_cp_per_iter"] = dense_cp_seconds_per_iter(factors, scaling, args.rank, args.dense_cp_iters)
        peers[f"{shape[0]}x{shape[1]}"] = entry
        logger.info("peers on %s: %s", shape, entry)

    def per_model(key: str, cost) -> float | None:
        """Whole-model seconds: measured shapes as measured, the others scaled from the largest measured shape by
        ``cost(out, in)``."""
        measured = [(s, peers[f"{s[0]}x{s[1]}"][key]) for s in shapes if key in peers.get(f"{s[0]}x{s[1]}", {})]
        if not measured:
            return None
        ref_shape, ref_sec = max(measured, key=lambda m: m[0][0] * m[0][1])
        total = 0.0
        for shape, names in shapes.items():
            e = peers.get(f"{shape[0]}x{shape[1]}", {})
            sec = e[key] if key in e else ref_sec * cost(*shape) / cost(*ref_shape)
            total += sec * len(names) * args.layers
        return total

    whole = {f"{m} (merge_adapters)": r["seconds"] for m, r in ours.items()}
    # PEFT svd: dense delta + SVD, scaled by out * in * min(out, in) (a lower bound for PEFT's default
    # full_matrices=True, whose cost grows with max(out, in)^2 * min(out, in)); dense CP: by element count
    peft = per_model("peft_svd", lambda o, i: o * i * min(o, i))
    if peft is not None:
        whole["PEFT svd (peer, extrapolated)"] = peft
    dense = per_model("dense_cp_per_iter", lambda o, i: o * i)
    if dense is not None:
        whole["dense tensorly CP, 100 iters (peer, extrapolated)"] = 100 * dense

    sweeps = []
    T_pts = [2, 4, 8, 16, 32] if not args.quick else [2, 8]
    r_pts = [4, 8, 16, 32, 64] if not args.quick else [4, 16]
    h_pts = [1024, 2048, 4096, 8192] if not args.quick else [1024, 4096]
    for key, pts in [("adapters", [(T, 16, 4096) for T in T_pts]), ("rank", [(10, r, 4096) for r in r_pts]),
                     ("hidden", [(10, 16, h) for h in h_pts])]:
        for row in cp_scaling(pts):
            sweeps.append({**row, "sweep": key})

    results = {
        "setup": {"adapters": args.adapters, "rank": args.rank, "layers": args.layers, "shapes": "Mistral-7B",
                  "adapter_bytes": adapter_bytes, "threads": torch.get_num_threads(), "cpu": platform.processor(),
                  "torch": torch.__version__,
                  "command": " ".join(["python", "benchmarks/merge_speed.py", *(argv or sys.argv[1:])])},
        "merge_adapters": ours, "peers_per_module": peers, "whole_model": whole, "scaling": sweeps,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "merge_speed_quick" if args.quick else "merge_speed"
    from peft_cp_merge._io import atomic_write_text

    atomic_write_text(args.out / f"{stem}.json", json.dumps(results, indent=2))
    plot(results, args.out / f"{stem}.png")
    md = render(results)
    atomic_write_text(args.out / f"{stem}.md", md)
    print(md)
    return results


def render(results: dict) -> str:
    s = results["setup"]
    whole = results["whole_model"]
    cp = whole.get("cp (merge_adapters)")
    lines = [
        f"Whole model: {s['adapters']} adapters, rank {s['rank']}, {s['layers']} layers x 7 modules (Mistral-7B "
        f"shapes), adapters {s['adapter_bytes'] / 2**30:.2f} GiB on disk, {s['threads']} torch threads.",
        "",
        "| merge | seconds (median) | all runs (s) | cp is faster by | peak RSS (GiB) | peak RSS / adapter bytes |",
        "|---|---|---|---|---|---|",
    ]
    for name, sec in whole.items():
        method = name.split(" ")[0]
        r = results["merge_adapters"].get(method) if "merge_adapters" in name else None
        rss = f"{r['peak_rss'] / 2**30:.2f}" if r else ""
        ratio = f"{r['peak_rss'] / s['adapter_bytes']:.2f}" if r else ""
        faster = ""
        if cp and name != "cp (merge_adapters)":
            faster = f"{sec / cp:.0f}x" if sec >= 10 * cp else f"{sec / cp:.2f}x"
        runs = ", ".join(f"{x:.1f}" for x in r.get("all_seconds", [])) if r else ""
        lines.append(f"| {name} | {sec:.1f} | {runs} | {faster} | {rss} | {ratio} |")
    lines += ["", "Peers per module (seconds):", "", "| shape | PEFT svd | dense tensorly CP per ALS iteration |",
              "|---|---|---|"]
    for shape, e in results["peers_per_module"].items():
        dense = f"{e['dense_cp_per_iter']:.2f}" if "dense_cp_per_iter" in e else "not run"
        lines.append(f"| {shape} | {e['peft_svd']:.2f} | {dense} |")
    lines += ["", "`cp` per module (registry, batches of 8 modules, no I/O):", "",
              "| sweep | adapters | rank | hidden | ms per module |", "|---|---|---|---|---|"]
    for p in results["scaling"]:
        lines.append(f"| {p['sweep']} | {p['adapters']} | {p['rank']} | {p['hidden']} | "
                     f"{p['seconds_per_module'] * 1000:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
