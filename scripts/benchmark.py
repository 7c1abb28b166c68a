"""Throughput benchmarks: named trainer configurations, trainer overhead on CPU, data-path speed.

    python scripts/benchmark.py rows --rows 8b8l_compile_sacop,1b_compile_noac --steps 30 --skip 15
    python scripts/benchmark.py rows --rows ... --baseline benchmarks/torchtitan_baseline --wheels .whl
    python scripts/benchmark.py rows --rows ... --plan-only   # each row's plan (fake backend), any machine
    python scripts/benchmark.py profile --row 8b8l_compile_sacop   # top kernels of a traced step, trace gzipped
    python scripts/benchmark.py overhead            # trainer step vs a minimal hand-written loop (CPU)
    python scripts/benchmark.py data                # tokenizer + packing tokens/s on one core
    python scripts/benchmark.py prepare             # prepare_memmap_data.py tokens/s by --workers vs HF encode_batch
    python scripts/benchmark.py loss                # peak memory and time of plain / chunked / fused loss (CPU)
    python scripts/benchmark.py cp --seq-lens 16384   # context parallel vs one process: memory and tokens/s
    python scripts/benchmark.py moe                 # MoE vs dense of the same active size; EP2 all-to-all share
    python scripts/benchmark.py families            # each family's debug model vs a Llama of its active size (CPU)
    python scripts/benchmark.py downstream          # downstream evaluation documents/s vs ai2-olmo-eval's loop (CPU)
    python scripts/benchmark.py peers               # ours vs transformers' / OLMo-core's code, same OLMo 2 shape (CPU)
    python scripts/benchmark_muon.py step           # Muon vs AdamW: optimizer step time and communication

`rows` runs the real trainer (run_train.sh) per row, averages the logged steps after `--skip`, and prints
tokens/s, TFLOP/s, MFU and peak memory. With `--baseline FOLDER`, torchtitan 0.2.2's own trainer
(FOLDER/run.sh: benchmarks/torchtitan_baseline) runs the rows that have a torchtitan twin first, on the same
machine, and the table gains ratios. scripts/gpu_check.sh runs all of it on one GPU.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import benchmark_peers  # noqa: E402

BENCH_8B = os.path.join(ROOT, "train_configs", "bench_llama3_8b_8l.toml")
BENCH_1B = os.path.join(ROOT, "train_configs", "bench_llama3_1b.toml")

# name -> (config, overrides, torchtitan anchor row name). Same shapes, seq, batch, compile and AC as the anchor.
ROWS: dict[str, tuple[str, list[str], str]] = {
    "8b8l_compile_sacop": (BENCH_8B, [], "8b8l_compile_sacop"),
    "8b8l_eager_sacop": (BENCH_8B, ["--compile.no-enable"], "8b8l_eager_sacop"),
    "8b8l_compile_noac": (BENCH_8B, ["--activation_checkpoint.mode", "none"], "8b8l_compile_noac"),
    "1b_compile_noac": (BENCH_1B, [], "1b_compile_noac"),
    "8b8l_compile_noac_float8_tensorwise": (BENCH_8B, ["--activation_checkpoint.mode", "none", "--model.converters",
                                                       "float8", "--float8.recipe_name", "tensorwise"], ""),
    "8b8l_compile_noac_float8_rowwise": (BENCH_8B, ["--activation_checkpoint.mode", "none", "--model.converters",
                                                    "float8", "--float8.recipe_name", "rowwise"], ""),
    # The loss options on the no-AC row, where activation memory is highest (compare with 8b8l_compile_noac).
    "8b8l_compile_noac_chunked_loss": (BENCH_8B, ["--activation_checkpoint.mode", "none", "--training.loss_chunk_size",
                                                  "2048"], ""),
    "8b8l_compile_noac_fused_loss": (BENCH_8B, ["--activation_checkpoint.mode", "none", "--training.loss_chunk_size",
                                                "2048", "--training.fused_output_loss"], ""),
    # Mixture of experts (no torchtitan anchor row): grouped experts in bf16, the MoE layers eager under compile.
    "olmoe_1b_7b_compile_fullac": (os.path.join(ROOT, "train_configs", "bench_olmoe_1b_7b.toml"), [], ""),
    # Blockwise attention at long context (no torchtitan anchor row): packed documents with document masking
    # (cross-document pairs skipped), and Gemma 3's sliding-window layers (window 512, every sixth layer global).
    "1b_seq32k_docs_compile_sacop": (BENCH_1B, ["--training.seq_len", "32768", "--training.local_batch_size", "1",
                                                "--data.document_masking", "--activation_checkpoint.mode",
                                                "selective", "--activation_checkpoint.selective_ac_option", "op"], ""),
    "gemma3_1b_seq32k_window_compile_sacop": (os.path.join(ROOT, "train_configs", "bench_gemma3_1b.toml"),
                                              ["--training.seq_len", "32768"], ""),
    # CPU rows: the harness itself, runnable anywhere.
    "cpu_debug": (os.path.join(ROOT, "train_configs", "debug_model.toml"), ["--training.seq_len", "256",
                                                                          "--training.local_batch_size", "4"], ""),
}


def summarize(records: list[dict], skip: int) -> dict:
    rows = [r for r in records if r["step"] > skip] or records[-1:]
    pick = lambda k: statistics.mean(r[k] for r in rows) if rows and rows[0].get(k) is not None else None  # noqa: E731
    return {"tps": pick("tps"), "tflops": pick("tflops"), "mfu": pick("mfu"),
            "memory_gib": max(r["memory_gib"] for r in rows), "data_wait_pct": pick("data_wait_pct"),
            "steps": [r["step"] for r in rows]}


def run_row(name: str, steps: int, skip: int, log_freq: int, extra: list[str]) -> dict:
    config, overrides, _ = ROWS[name]
    with tempfile.TemporaryDirectory() as dump:
        cmd = ["./run_train.sh", "--job.dump_folder", dump, "--training.steps", str(steps), "--metrics.log_freq",
               str(log_freq), *overrides, *extra]
        env = dict(os.environ, NGPU=os.environ.get("NGPU", "1"), CONFIG=config)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": (proc.stdout + proc.stderr)[-1500:]}
        with open(os.path.join(dump, "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f]
    out = summarize(recs, skip)
    out["wall_s"] = time.time() - t0
    return out


def run_baseline(runner: str, wheels: str, rows: list[str]) -> dict[str, dict]:
    """torchtitan's own trainer (runner: a folder with run.sh, as benchmarks/torchtitan_baseline), same machine,
    right before ours, on the rows that have a torchtitan twin; parses its 'step:' lines."""
    twins = [ROWS[r][2] for r in rows if ROWS[r][2]]
    if not twins:
        return {}
    proc = subprocess.run(["bash", "run.sh", os.path.abspath(wheels), *twins], cwd=runner, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        print(f"torchtitan baseline failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-500:]}")
    return parse_baseline(proc.stdout)


def parse_baseline(stdout: str) -> dict[str, dict]:
    """run.sh's output ('== ROW (exit N)', then torchtitan's step lines) -> per row the mean of the last two."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", stdout)
    results, name = {}, None
    for line in text.splitlines():
        m = re.match(r"== (\S+) \(exit", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"tps: ([\d,]+).*tflops: ([\d.]+).*mfu: ([\d.]+)%", line)
        mem = re.search(r"memory: ([\d.]+)GiB", line)
        if m and name:
            results.setdefault(name, []).append({"tps": float(m.group(1).replace(",", "")), "tflops": float(m.group(2)),
                                                 "mfu": float(m.group(3)),
                                                 "memory_gib": float(mem.group(1)) if mem else None})
    return {k: {"tps": statistics.mean(r["tps"] for r in v[-2:]),
                "tflops": statistics.mean(r["tflops"] for r in v[-2:]),
                "mfu": statistics.mean(r["mfu"] for r in v[-2:]), "memory_gib": v[-1]["memory_gib"]}
            for k, v in results.items()}


def plan_row(name: str) -> str:
    """The row's plan without a step (comm.mode fake_backend: model, layout, memory estimate): its config and
    overrides are checked on any machine."""
    config, overrides, _ = ROWS[name]
    with tempfile.TemporaryDirectory() as dump:
        # COMM_MODE=fake_backend: run_train.sh starts the one process itself, no launcher or torchrun around it.
        cmd = ["./run_train.sh", "--job.dump_folder", dump, *overrides]
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, NGPU="1", CONFIG=config, COMM_MODE="fake_backend"),
                              capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return f"{name:40s} FAILED: {text[-800:]}"
    lines = [re.sub(r"^\[rank\d+\]:", "", line).strip() for line in text.splitlines()]
    plan = [line for line in lines if line.startswith("mesh:") or re.match(r"\d+\s+\d+\s+\d+\s", line)]  # + GiB
    return f"{name:40s} plan ok: " + " | ".join(" ".join(line.split()) for line in plan)


def cmd_rows(args) -> None:
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"benchmark.py rows: unknown row(s) {', '.join(unknown)}; valid: {', '.join(ROWS)}")
    if args.plan_only:  # each plan is its own launch: run them side by side, print them in order
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(names), os.cpu_count() or 1)) as pool:
            for line in pool.map(plan_row, names):
                print(line, flush=True)
        return
    baseline = run_baseline(args.baseline, args.wheels, names) if args.baseline else {}
    print(f"{'row':40s} {'tok/s':>10s} {'TFLOP/s':>8s} {'MFU':>7s} {'mem GiB':>8s} {'data%':>6s} {'vs tt':>7s} "
          f"{'tt tok/s':>9s}")
    for name in names:
        r = run_row(name, args.steps, args.skip, args.log_freq, args.extra or [])
        if "error" in r:
            print(f"{name:40s} FAILED: {r['error']}")
            continue
        tt = baseline.get(ROWS[name][2]) if ROWS[name][2] else None
        ratio = f"{r['tps'] / tt['tps']:.3f}x" if tt else "-"
        mfu = f"{r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{name:40s} {r['tps']:10,.0f} {r['tflops']:8.1f} {mfu:>7s} {r['memory_gib']:8.2f} "
              f"{r['data_wait_pct']:6.2f} "
              f"{ratio:>7s} {tt['tps'] if tt else 0:9,.0f}")
    print(f"(steps {args.steps}, averaged over logged steps > {args.skip}; same machine, one run after the other)")


def top_ops(trace_path: str, top: int) -> list[tuple[str, float, int]]:
    """(name, total ms, calls) of a chrome trace's GPU kernels, or of its CPU ops when it has no kernels."""
    with open(trace_path) as f:
        events = [e for e in json.load(f).get("traceEvents", []) if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    chosen = kernels or [e for e in events if e.get("cat") == "cpu_op"]
    totals: dict[str, list[float]] = {}
    for e in chosen:
        t = totals.setdefault(e["name"], [0.0, 0])
        t[0] += e.get("dur", 0) / 1000
        t[1] += 1
    return sorted(((k, v[0], v[1]) for k, v in totals.items()), key=lambda r: -r[1])[:top]


def cmd_profile(args) -> None:
    """One row with the last of its steps traced: the top kernels (or CPU ops) and the trace, gzipped."""
    import glob
    import gzip

    config, overrides, _ = ROWS[args.row]
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as dump:
        cmd = ["./run_train.sh", "--job.dump_folder", dump, "--training.steps", str(args.steps), *overrides,
               "--profiling.enable_profiling", "--profiling.profile_freq", str(args.steps),
               "--profiling.profiler_active", "1", "--metrics.log_freq", str(args.steps)]
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, NGPU="1", CONFIG=config), capture_output=True,
                              text=True)
        traces = sorted(glob.glob(os.path.join(dump, "**", "rank0_trace.json"), recursive=True))
        if proc.returncode != 0 or not traces:
            print(f"{args.row} FAILED: {(proc.stdout + proc.stderr)[-1500:]}")
            return
        rows = top_ops(traces[-1], args.top)
        with open(traces[-1], "rb") as f, gzip.open(os.path.join(args.out, f"trace_{args.row}.json.gz"), "wb") as g:
            shutil.copyfileobj(f, g)
    total = sum(r[1] for r in rows)
    print(f"{args.row}: step {args.steps} traced; top {len(rows)} by total time ({total:.1f} ms among them)")
    for name, ms, calls in rows:
        print(f"{ms:10.2f} ms {calls:6d}x  {name[:110]}")
    print(f"trace: {os.path.join(args.out, f'trace_{args.row}.json.gz')}")


def cmd_overhead(args) -> None:
    """Our train_step on one process vs the plainest PyTorch loop: same model, batch, optimizer, data in memory."""
    import torch

    from torchtitan.components.loss import cross_entropy_sum
    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.components.optimizer import build_optimizers
    from torchtitan.config import load_config
    from torchtitan.distributed.fault_tolerance import SingleGroup
    from torchtitan.distributed.parallel_dims import ParallelDims
    from torchtitan.models import get_train_spec
    from torchtitan.trainer.plan import build_model_args
    from torchtitan.trainer.step import ModelRunner, NonFiniteGuard, StepHooks, train_step

    torch.set_num_threads(args.threads)
    cfg = load_config(["--training.seq_len", str(args.seq_len), "--training.local_batch_size", str(args.batch),
                       "--metrics.log_freq", "1000000", "--training.steps", str(args.steps + 10)], env={})
    spec = get_train_spec("llama3")
    margs = build_model_args(spec, cfg, "cpu")
    batches = [torch.randint(0, margs.vocab_size, (args.batch, args.seq_len + 1)) for _ in range(8)]

    def fresh():
        torch.manual_seed(0)
        m = spec.build_model(margs)
        m.init_weights()
        return m

    def plain(n):
        model = fresh()
        # The kernel the trainer picks by default (optimizer.implementation = auto).
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=True)
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            b = batches[i % len(batches)]
            logits = model(b[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), b[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        return times

    def ours(n):
        model = fresh()
        dims = ParallelDims.from_config(cfg.parallelism, 1)
        opts = build_optimizers([model], cfg.optimizer, "cpu")
        scheds = build_lr_schedulers(opts, cfg.lr_scheduler, cfg.training.steps)
        runner = ModelRunner([model], lambda lg, lb: cross_entropy_sum(lg, lb), torch.device("cpu"))
        hooks = StepHooks(guard=NonFiniteGuard(), groups=SingleGroup(""))
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            b = batches[i % len(batches)]
            train_step(runner, [(b[:, :-1], b[:, 1:])], step=i + 1, dims=dims, optimizers=opts,
                       lr_schedulers=scheds, max_norm=cfg.training.max_norm, hooks=hooks)
            times.append(time.perf_counter() - t0)
        return times

    # Alternate the two, several rounds, so drift of the machine hits both alike.
    plain_t, ours_t = [], []
    for _ in range(args.rounds):
        plain_t += plain(args.steps)[args.warmup:]
        ours_t += ours(args.steps)[args.warmup:]
    p, o = statistics.median(plain_t), statistics.median(ours_t)
    print(f"debug model, batch {args.batch} x seq {args.seq_len}, {args.threads} threads, median of {len(plain_t)} "
          "steps")
    print(f"minimal loop: {p * 1000:.1f} ms/step   trainer: {o * 1000:.1f} ms/step   ratio {o / p:.3f}")


def cmd_data(args) -> None:
    """Tokenizer + packing on one core: tokens/s of the path the dataloader runs, per tokenizer engine."""
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from torchtitan.components.tokenizer import build_tokenizer
    from torchtitan.datasets.text import DocumentSource, PackedWindows
    from torchtitan.train import DEFAULT_TOKENIZER

    src = DocumentSource("pydoc", None, "text")
    for backend in args.backends.split(","):
        tok = build_tokenizer(args.tokenizer or DEFAULT_TOKENIZER, backend)
        best = 0.0
        for _ in range(3):
            ds = PackedWindows(src, lambda t, tok=tok: tok.encode_batch(t, bos=True, eos=True), 2048, 1, 0, 1,
                               infinite=True)
            it = iter(ds)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < args.seconds:
                item = next(it)
                n += item["input"].numel()
            best = max(best, n / (time.perf_counter() - t0))
        engine = getattr(tok, "backend", type(tok).__name__)
        print(f"tokenize + pack (seq 2048, one core), backend {backend} ({engine}): {best:,.0f} tokens/s")


def _hf_encode_batch_tps(tokenizer_json: str, docs: list[str], batch: int) -> tuple[int, float]:
    """(tokens, seconds) of the HF tokenizers library's own batch API on every core: the ceiling of tokenizing."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    tok.encode_special_tokens = True  # as the trainer's tokenizer: specials in the text stay text
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    n, t0 = 0, time.perf_counter()
    for i in range(0, len(docs), batch):
        n += sum(len(e.ids) + 1 for e in encode(docs[i:i + batch], add_special_tokens=False))  # + EOS
    return n, time.perf_counter() - t0


def _engine_tps(tokenizer: str, backend: str, docs: list[str], batch: int) -> tuple[int, float]:
    """(tokens, seconds) of the trainer's tokenizer object with this backend, in one process."""
    from torchtitan.components.tokenizer import build_tokenizer

    tok = build_tokenizer(tokenizer, backend)
    n, t0 = 0, time.perf_counter()
    for i in range(0, len(docs), batch):
        n += sum(map(len, tok.encode_batch(docs[i:i + batch], bos=False, eos=True)))
    return n, time.perf_counter() - t0


def cmd_prepare(args) -> None:
    """scripts/prepare_memmap_data.py on the pydoc corpus repeated --repeat times (a .jsonl file, streamed), run as
    a user runs it (wall time, process start included) with each --workers, beside HF encode_batch alone."""
    from torchtitan.datasets.text import pydoc_documents

    tokenizer = args.tokenizer or os.path.join(ROOT, "torchtitan", "assets", "tokenizer")
    tokenizer_json = os.path.join(tokenizer, "tokenizer.json") if os.path.isdir(tokenizer) else tokenizer
    docs = pydoc_documents("all") * args.repeat
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        with open(corpus, "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        n, dt = _hf_encode_batch_tps(tokenizer_json, docs, args.batch_size)
        print(f"pydoc corpus x {args.repeat}: {len(docs):,} documents, {os.cpu_count()} cores")
        print(f"{'what':44s} {'tokens':>12s} {'seconds':>8s} {'tokens/s':>12s}")
        print(f"{'HF tokenizers encode_batch alone (all cores)':44s} {n:12,d} {dt:8.2f} {n / dt:12,.0f}", flush=True)
        for backend in args.backends.split(","):
            if backend != "tokenizers":  # the engine this backend picks, alone in this process
                n, dt = _engine_tps(tokenizer, backend, docs, args.batch_size)
                name = f"tokenizer.encode_batch alone ({backend})"
                print(f"{name:44s} {n:12,d} {dt:8.2f} {n / dt:12,.0f}", flush=True)
            for workers in args.workers.split(","):
                out = os.path.join(tmp, f"out-{backend}-{workers}")
                cmd = [sys.executable, os.path.join(ROOT, "scripts", "prepare_memmap_data.py"), "--source", corpus,
                       "--out-dir", out, "--tokenizer", tokenizer, "--workers", workers, "--tokenizer-backend",
                       backend, "--batch-size", str(args.batch_size)]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                dt = time.perf_counter() - t0
                name = f"prepare_memmap_data --workers {workers} ({backend})"
                if proc.returncode != 0:
                    print(f"{name:44s} FAILED: {proc.stderr[-300:]}")
                    continue
                with open(os.path.join(out, "prepare_info.json")) as f:
                    n = json.load(f)["tokens"]
                print(f"{name:44s} {n:12,d} {dt:8.2f} {n / dt:12,.0f}", flush=True)
                shutil.rmtree(out)


def _loss_variant(variant: str, tokens: int, dim: int, vocab: int, chunk: int, dtype_name: str) -> None:
    """One loss forward + backward in this process; prints seconds and peak RSS (the parent compares them)."""
    import resource

    import torch
    import torch.nn.functional as F

    from torchtitan.components.loss import chunked_cross_entropy_sum, cross_entropy_sum, linear_cross_entropy_sum

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    h = torch.randn(1, tokens, dim, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, dim, dtype=dtype) * dim ** -0.5).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if variant == "plain":
        loss = cross_entropy_sum(F.linear(h, w), labels)
    elif variant == "chunked":
        loss = chunked_cross_entropy_sum(F.linear(h, w), labels, chunk)
    else:
        loss = linear_cross_entropy_sum(h, w, labels, chunk)
    loss.backward()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": dt, "peak_mib": (peak - base) / 1024, "loss": loss.item()}))


def cmd_loss(args) -> None:
    """Peak memory above the inputs, and time, of one loss forward + backward: each variant in its own process."""
    if args.variant:
        _loss_variant(args.variant, args.tokens, args.dim, args.vocab, args.chunk, args.dtype)
        return
    logits_mib = args.tokens * args.vocab * (2 if args.dtype == "bfloat16" else 4) / 2**20
    print(f"{args.tokens} tokens x vocab {args.vocab}, dim {args.dim}, {args.dtype} inputs, chunk {args.chunk} "
          f"(the logits alone: {logits_mib:,.0f} MiB); peak RSS growth over the inputs, CPU")
    print(f"{'loss':34s} {'peak MiB':>9s} {'seconds':>8s} {'loss value':>12s}")
    names = {"plain": "cross-entropy on full logits", "chunked": "training.loss_chunk_size",
             "fused": "+ training.fused_output_loss"}
    for variant in ("plain", "chunked", "fused"):
        proc = subprocess.run([sys.executable, __file__, "loss", "--variant", variant, "--tokens", str(args.tokens),
                               "--dim", str(args.dim), "--vocab", str(args.vocab), "--chunk", str(args.chunk),
                               "--dtype", args.dtype],
                              capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        if proc.returncode != 0:
            print(f"{names[variant]:34s} FAILED: {proc.stderr[-500:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{names[variant]:34s} {r['peak_mib']:9,.0f} {r['seconds']:8.2f} {r['loss']:12.1f}")


DEBUG_CONFIG = os.path.join(ROOT, "train_configs", "debug_model.toml")


def _cap_address_space(gib: float):
    """A preexec_fn giving the launcher, and so every rank it starts, at most `gib` GiB of private writable
    memory (RLIMIT_DATA: heap and anonymous mappings, not shared libraries): each rank behaves like a device of
    that size, and an allocation beyond it fails with an out-of-memory error."""
    def cap() -> None:
        limit = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    return cap


def _run_layout(ngpu: int, seq: int, steps: int, skip: int, extra: list[str], rank_gib: float = 0.0) -> dict:
    """The debug model at batch 1 and sequence `seq` on `ngpu` processes; mean tokens/s after `skip` steps."""
    with tempfile.TemporaryDirectory() as dump:
        cmd = ["./run_train.sh", "--job.dump_folder", dump, "--training.steps", str(steps), "--metrics.log_freq", "1",
               "--training.seq_len", str(seq), "--training.local_batch_size", "1", "--data.dataset", "pydoc",
               "--validation.no-enable", *extra]
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, NGPU=str(ngpu), CONFIG=DEBUG_CONFIG),
                              capture_output=True, text=True,
                              preexec_fn=_cap_address_space(rank_gib) if rank_gib > 0 else None)
        if proc.returncode != 0:
            text = proc.stdout + proc.stderr
            oom = any(m in text for m in ("can't allocate memory", "MemoryError", "out of memory", "std::bad_alloc"))
            return {"error": "out of memory" if oom else text[-800:]}
        with open(os.path.join(dump, "metrics.jsonl")) as f:
            return summarize([json.loads(line) for line in f], skip)


def cmd_cp(args) -> None:
    """Context parallel against one process on the same cores: per-rank peak memory and tokens/s, with ratios.

    job tok/s: tokens of the global batch per second (the trainer logs tokens/s per device; a CP=C job's
    throughput is C times that). Memory: rank 0's peak RSS (CPU) or peak allocated device memory (GPU).
    Ratios are against CP=1 in the same invocation."""
    degrees = [int(d) for d in args.degrees.split(",")]
    cap = f", each rank capped at {args.rank_memory_gib:g} GiB (RLIMIT_DATA)" if args.rank_memory_gib else ""
    print(f"debug model, batch 1, {args.steps} steps (mean after step {args.skip}), rotate {args.rotate}{cap}")
    print(f"{'seq':>7s} {'layout':>7s} {'peak GiB':>9s} {'job tok/s':>10s} {'per device':>11s} {'mem ratio':>10s} "
          f"{'tok/s ratio':>12s}")
    for seq in (int(x) for x in args.seq_lens.split(",")):
        base = None
        for cp in degrees:
            extra = [] if cp == 1 else ["--parallelism.context_parallel_degree", str(cp),
                                        "--parallelism.data_parallel_shard_degree", "1",
                                        "--parallelism.context_parallel_rotate_method", args.rotate]
            r = _run_layout(cp, seq, args.steps, args.skip, extra, args.rank_memory_gib)
            if "error" in r:
                print(f"{seq:7d} {'cp' + str(cp):>7s} FAILED: {r['error'][-300:]}", flush=True)
                continue
            r["job_tps"] = r["tps"] * cp
            base = r if cp == 1 else base
            ratios = (f"{r['memory_gib'] / base['memory_gib']:10.2f} {r['job_tps'] / base['job_tps']:12.2f}"
                      if base else f"{'-':>10s} {'-':>12s}")
            print(f"{seq:7d} {'cp' + str(cp):>7s} {r['memory_gib']:9.2f} {r['job_tps']:10.0f} {r['tps']:11.0f} "
                  f"{ratios}", flush=True)


MOE_CONFIG = os.path.join(ROOT, "train_configs", "olmoe_debug.toml")


def _all_to_all_share(trace_path: str) -> tuple[float, float]:
    """(all-to-all ms, step ms) of the profiled step of a chrome trace: gloo/NCCL all-to-all kernels, which
    include waiting for the slower rank (that wait is part of what expert parallel costs)."""
    with open(trace_path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    step = sum(e["dur"] for e in events if e["name"].startswith("ProfilerStep#"))
    a2a = sum(e["dur"] for e in events if re.match(r"(gloo|nccl):all_?to_?all", e["name"], re.I)
              or e["name"].startswith("ncclDevKernel_SendRecv"))
    return a2a / 1e3, step / 1e3


def cmd_moe(args) -> None:
    """OLMoE's debug model against the same decoder with one dense SwiGLU of the active width (same parameters per
    token), on one process; then expert parallel over 2 processes with the same global batch, and the share of
    its step the all-to-alls take (from a torch.profiler trace of one step on rank 0)."""
    layouts = [("dense (active width)", 1, ["--model.flavor", "debugmodel-dense"]),
               ("moe", 1, []),
               ("moe ep2", 2, ["--parallelism.expert_parallel_degree", "2"])]
    print(f"olmoe debug, global batch {args.batch} x {args.seq_len}, {args.steps} steps (mean after step {args.skip})")
    print(f"{'layout':>22s} {'ranks':>5s} {'step s':>7s} {'job tok/s':>10s} {'vs dense':>9s} {'all-to-all':>11s}")
    base = None
    for name, ngpu, extra in layouts:
        with tempfile.TemporaryDirectory() as dump:
            profile = ["--profiling.enable_profiling", "--profiling.profile_freq", str(args.steps)] if ngpu > 1 else []
            cmd = ["./run_train.sh", "--job.dump_folder", dump, "--training.steps", str(args.steps),
                   "--metrics.log_freq", "1", "--training.seq_len", str(args.seq_len),
                   "--training.local_batch_size", str(args.batch // ngpu), "--validation.no-enable", *profile, *extra]
            proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, NGPU=str(ngpu), CONFIG=MOE_CONFIG),
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name:>22s} FAILED: {(proc.stdout + proc.stderr)[-600:]}", flush=True)
                continue
            with open(os.path.join(dump, "metrics.jsonl")) as f:
                r = summarize([json.loads(line) for line in f], args.skip)
            share = ""
            if profile:
                a2a, step = _all_to_all_share(os.path.join(dump, "profile_traces", f"iteration_{args.steps}",
                                                           "rank0_trace.json"))
                share = f"{100 * a2a / step:10.1f}%"
        job_tps = r["tps"] * ngpu
        step_s = args.batch * args.seq_len / job_tps
        base = base or job_tps
        print(f"{name:>22s} {ngpu:5d} {step_s:7.3f} {job_tps:10.0f} {job_tps / base:9.2f} {share:>11s}", flush=True)


FAMILIES = ("qwen3", "qwen3_moe", "gemma3", "gpt_oss", "deepseek_v3")


def llama_of_active_size(args, active: int):
    """A Llama 3 decoder with the family model's width, depth, heads and vocabulary whose SwiGLU width gives it
    `active` parameters (the family model's parameters per token), the comparison's yardstick."""
    import dataclasses

    import torch

    from torchtitan.models.llama3.args import LlamaModelArgs

    llama = LlamaModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                           vocab_size=args.vocab_size, max_seq_len=args.max_seq_len, multiple_of=1)
    with torch.device("meta"):
        from torchtitan.models.common.decoder import Decoder
        base = Decoder(dataclasses.replace(llama, ffn_dim_multiplier=1.0 / int(8 * args.dim / 3))).num_params()
    # base has a 1-wide SwiGLU: each unit of width adds 3 x dim parameters per layer.
    width = max(1, round((active - base) / (3 * args.dim * args.n_layers)) + 1)
    return dataclasses.replace(llama, ffn_dim_multiplier=(width + 0.5) / int(8 * args.dim / 3))


def _time_training(args, batch: int, seq_len: int, steps: int, skip: int) -> float:
    """Mean seconds of a forward + backward + AdamW step after `skip` steps (one process, fp32)."""
    import torch

    from torchtitan.models.common.decoder import Decoder

    torch.manual_seed(0)
    model = Decoder(args)
    model.init_weights(buffer_device="cpu", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, args.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.mean(times[skip:])


def cmd_families(args) -> None:
    """Each family's debug flavor against a Llama 3 decoder of the same width, depth, heads and parameters per
    token (llama_of_active_size), one after the other in this process: model FLOPs per token (attention differs
    where head_dim differs) and step time, as ratios family / Llama."""
    import torch

    from torchtitan.models import get_train_spec

    torch.set_num_threads(args.threads)
    print(f"global batch {args.batch} x {args.seq_len}, {args.steps} steps (mean after step {args.skip}), "
          f"{args.threads} threads, float32, forward + backward + AdamW")
    print(f"{'family':>12s} {'active params':>14s} {'llama ffn':>9s} {'FLOPs ratio':>11s} {'llama s':>8s} "
          f"{'family s':>9s} {'time ratio':>10s}")
    for family in args.families.split(","):
        spec = get_train_spec(family)
        fam = spec.model_args("debugmodel")
        fam.max_seq_len = max(args.seq_len, 64)
        active = spec.build_meta_model(fam).num_params(active=True)
        llama = llama_of_active_size(fam, active)
        t_llama = _time_training(llama, args.batch, args.seq_len, args.steps, args.skip)
        t_fam = _time_training(fam, args.batch, args.seq_len, args.steps, args.skip)
        flops = spec.build_meta_model(fam).flops_per_token(args.seq_len) / (
            spec.build_meta_model(llama).flops_per_token(args.seq_len))
        print(f"{family:>12s} {active:14,d} {llama.ffn_hidden_dim:9d} {flops:11.2f} {t_llama:8.3f} {t_fam:9.3f} "
              f"{t_fam / t_llama:10.2f}", flush=True)


def _library_loop(model, tasks_by_label: dict, limit: int, rows: int) -> float:
    """Seconds of ai2-olmo-eval's own loop (collate_fn batches in the task's order, one row per continuation,
    ICLMetric.update per batch), as OLMo's trainers run it."""
    import torch
    from olmo_eval import ICLMetric

    t0 = time.perf_counter()
    for task in tasks_by_label.values():
        samples = [s for s in task.samples if limit <= 0 or s["doc_id"] < limit]
        metric = ICLMetric(metric_type=task.metric_type)
        for i in range(0, len(samples), rows):
            batch = task.collate_fn(samples[i:i + rows])
            with torch.no_grad():
                metric.update(batch, model(batch["input_ids"]))
        metric.compute()
    return time.perf_counter() - t0


def cmd_downstream(args) -> None:
    """Downstream evaluation speed on the CPU, one process, float32: documents per second of ours (distinct queries
    once, length-sorted batches, one host copy) beside ai2-olmo-eval's own loop on the same model and documents,
    and the share of training time evaluation takes at --freq steps for the debug model's training step."""
    import torch
    from olmo_eval import build_task

    from torchtitan.components.downstream import build_tasks, resolve_tasks, task_tokenizer
    from torchtitan.components.tokenizer import build_tokenizer
    from torchtitan.models import get_train_spec
    from torchtitan.trainer.downstream_eval import BatchShape, DownstreamEvaluator
    from torchtitan.trainer.step import ModelRunner

    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer(os.path.join(ROOT, "torchtitan", "assets", "tokenizer"))
    labels = resolve_tasks(args.tasks.split(","), "--tasks")
    print(f"tasks {','.join(labels)}, limit {args.limit} documents per task ({args.limit_1b} for 1B), "
          f"model_ctx_len {args.ctx}, {args.threads} threads, float32")
    print(f"{'model':>22s} {'documents':>9s} {'ours s':>7s} {'docs/s':>7s} {'library s':>9s} {'docs/s':>7s} "
          f"{'speedup':>7s}")
    step_s = None
    models = {"debug": ("llama3", "debugmodel"), "1b": ("olmo2", "1B")}
    for name, flavor in (models[m] for m in args.models.split(",")):
        spec = get_train_spec(name)
        margs = spec.model_args(flavor)
        torch.manual_seed(0)
        model = spec.build_meta_model(margs)
        model.to_empty(device="cpu")
        model.init_weights(buffer_device=torch.device("cpu"), seed=0)
        model.eval()
        limit = args.limit if flavor == "debugmodel" else args.limit_1b
        tasks = build_tasks(labels, tokenizer, args.ctx, limit)
        evaluator = DownstreamEvaluator(tasks, BatchShape(args.batch_tokens, 0, 64, args.ctx), tokenizer.eos_id)
        ours = evaluator.run(ModelRunner([model], None, torch.device("cpu"))).seconds
        wrapped = task_tokenizer(tokenizer)
        library = _library_loop(model, {lb: build_task(lb, wrapped, model_ctx_len=args.ctx) for lb in labels},
                                limit, args.rows)
        docs = evaluator.documents
        print(f"{name + ' ' + flavor:>22s} {docs:9d} {ours:7.2f} {docs / ours:7.1f} {library:9.2f} "
              f"{docs / library:7.1f} {library / ours:7.2f}", flush=True)
        if flavor == "debugmodel":
            step_s = _time_training(margs, 8, 256, 6, 2)
            share = ours / (ours + args.freq * step_s)
            print(f"{'':>22s} debug model training step (8 x 256, AdamW) {step_s:.3f}s: evaluating these "
                  f"{docs} documents every {args.freq} steps takes {100 * share:.2f}% of the time", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rows")
    r.add_argument("--rows", default="8b8l_compile_sacop,8b8l_eager_sacop,8b8l_compile_noac,1b_compile_noac")
    r.add_argument("--steps", type=int, default=30)
    r.add_argument("--skip", type=int, default=15)
    r.add_argument("--log-freq", type=int, default=5)
    r.add_argument("--baseline", help="torchtitan's runner folder (benchmarks/torchtitan_baseline: run.sh)")
    r.add_argument("--wheels", default=".whl", help="wheels for the runner (torchtitan 0.2.2 and its deps)")
    r.add_argument("--plan-only", action="store_true", help="plan each row (fake backend), run no step")
    pf = sub.add_parser("profile")
    pf.add_argument("--row", default="8b8l_compile_sacop")
    pf.add_argument("--steps", type=int, default=10, help="the last of them is traced")
    pf.add_argument("--out", default="benchmarks/results")
    pf.add_argument("--top", type=int, default=25)
    r.add_argument("extra", nargs="*", help="more trainer overrides, after --")
    o = sub.add_parser("overhead")
    o.add_argument("--steps", type=int, default=12)
    o.add_argument("--warmup", type=int, default=2)
    o.add_argument("--rounds", type=int, default=3)
    o.add_argument("--batch", type=int, default=4)
    o.add_argument("--seq-len", type=int, default=256)
    o.add_argument("--threads", type=int, default=2)
    d = sub.add_parser("data")
    d.add_argument("--seconds", type=float, default=3.0)
    d.add_argument("--tokenizer", default="")
    d.add_argument("--backends", default="tokenizers,auto", help="model.tokenizer_backend values to compare")
    pr = sub.add_parser("prepare")
    pr.add_argument("--repeat", type=int, default=200, help="copies of the pydoc corpus in the input file")
    pr.add_argument("--workers", default="1,2", help="--workers values to run")
    pr.add_argument("--backends", default="auto", help="--tokenizer-backend values to run (auto, tokenizers)")
    pr.add_argument("--batch-size", type=int, default=256, help="documents per tokenizer call")
    pr.add_argument("--tokenizer", default="", help="tokenizer file or folder (default: the bundled one)")
    lo = sub.add_parser("loss")
    lo.add_argument("--tokens", type=int, default=4096)
    lo.add_argument("--dim", type=int, default=512)
    lo.add_argument("--vocab", type=int, default=32768)
    lo.add_argument("--chunk", type=int, default=1024)
    lo.add_argument("--threads", type=int, default=2)
    lo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="bfloat16 is what GPUs run, but CPU bf16 matmuls are slow")
    lo.add_argument("--variant", choices=["plain", "chunked", "fused"], help=argparse.SUPPRESS)
    c = sub.add_parser("cp")
    c.add_argument("--seq-lens", default="16384")
    c.add_argument("--degrees", default="1,2", help="context-parallel degrees; 1 is the baseline of the ratios")
    c.add_argument("--rotate", default="alltoall", choices=["alltoall", "allgather"])
    c.add_argument("--steps", type=int, default=4)
    c.add_argument("--skip", type=int, default=1)
    c.add_argument("--rank-memory-gib", type=float, default=0.0,
                   help="cap every rank's private memory (RLIMIT_DATA), as if each rank were a device of this size")
    m = sub.add_parser("moe")
    m.add_argument("--seq-len", type=int, default=256)
    m.add_argument("--batch", type=int, default=8, help="global batch (sequences), split over the EP2 ranks")
    m.add_argument("--steps", type=int, default=12)
    m.add_argument("--skip", type=int, default=4)
    fa = sub.add_parser("families")
    fa.add_argument("--families", default=",".join(FAMILIES))
    fa.add_argument("--seq-len", type=int, default=256)
    fa.add_argument("--batch", type=int, default=8)
    fa.add_argument("--steps", type=int, default=10)
    fa.add_argument("--skip", type=int, default=3)
    fa.add_argument("--threads", type=int, default=2)
    ds = sub.add_parser("downstream")
    ds.add_argument("--tasks", default="olmo1_core")
    ds.add_argument("--limit", type=int, default=50, help="documents per task for the debug model")
    ds.add_argument("--limit-1b", type=int, default=4, help="documents per task for the 1B-shaped model")
    ds.add_argument("--ctx", type=int, default=2048, help="model_ctx_len")
    ds.add_argument("--batch-tokens", type=int, default=16384)
    ds.add_argument("--rows", type=int, default=16, help="requests per batch of the library's loop")
    ds.add_argument("--freq", type=int, default=1000, help="steps between evaluations, for the time share")
    ds.add_argument("--threads", type=int, default=2)
    ds.add_argument("--models", default="debug,1b", help="debug (Llama 3 debug model), 1b (OLMo 2 1B shape)")
    benchmark_peers.add_parser(sub)
    args = ap.parse_args()
    {"rows": cmd_rows, "overhead": cmd_overhead, "data": cmd_data, "prepare": cmd_prepare, "loss": cmd_loss,
     "peers": benchmark_peers.run, "profile": cmd_profile, "cp": cmd_cp, "moe": cmd_moe,
     "families": cmd_families, "downstream": cmd_downstream}[args.cmd](args)


if __name__ == "__main__":
    main()
