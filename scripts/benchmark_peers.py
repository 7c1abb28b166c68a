"""Our trainer and model against the peers' code on the same OLMo 2 shape, interleaved step by step (CPU).

    python scripts/benchmark.py peers                      # 5 rounds; OLMo-core rows when olmo_core >= 2 imports
    python scripts/benchmark.py peers --compile            # also our trainer with torch.compile
    python scripts/benchmark.py peers --profile            # top ops by self time: our model vs transformers'

Contenders, each one optimizer step per batch on the same in-memory batches (seq 512 x batch 8 by default, fp32,
AdamW with the trainer's defaults, clipping at 1.0):
- ours: the real trainer's build() (olmo2 debugmodel: d 256, 4 layers, 8 heads, 4 K/V heads, FFN 768,
  vocab 2048; 4.2M parameters) and its train_step;
- ours_model: our model in the minimal loop below (forward, cross-entropy, backward, clip, AdamW);
- hf_model: transformers' Olmo2ForCausalLM (its default SDPA attention) in that same loop, our initial weights;
- hf_model_kept: the same, with the trainer's host-memory setting (training.cpu_keep_freed_memory) applied, so
  what that setting gives is not counted as the model's;
- olmo_core_model / olmo_core: OLMo-core's Transformer (olmo2_30M with 4 K/V heads: the same shape) in the
  loop, and its TransformerTrainModule's train_batch + optim_step (the trainer's per-step work).
Each contender runs in a process of its own (its own heap and malloc settings, as when launched alone), one process
computing at a time. Each round takes one step of each contender in turn, its order rotated per round, so drift of the
machine hits all alike; a ratio is the median over rounds of the two contenders' medians in that round (paired). The
roofline fraction is the model FLOP/s our trainer reaches (the model's flops_per_token, attention included) over the
best float32 GEMM rate measured in the same invocation.
"""
from __future__ import annotations

import importlib.metadata
import os
import statistics
import tempfile
import time

VOCAB = 2048  # the olmo2 debugmodel's
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_configs", "olmo2_debug.toml")


def _gemm_peak(threads: int) -> float:
    """Best float32 matmul FLOP/s over a few square sizes (the machine's practical ceiling for this model); run
    once per round, the best of all rounds is the ceiling."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            a @ b
        reps = max(3, int(1e10 / (2 * n ** 3)))
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


def _minimal_loop(model, forward, lr: float):
    """The plainest loop a user would write: the trainer's optimizer settings (fused AdamW on CPU)."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8, fused=True)

    def step(batch):
        logits = forward(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _ours(args, dump: str, compile_: bool):
    from torchtitan.train import build
    from torchtitan.trainer.plan import check_job
    from torchtitan.trainer.step import train_step

    argv = ["--job.config_file", CONFIG, "--job.dump_folder", dump,
            "--training.seq_len", str(args.seq_len), "--training.local_batch_size", str(args.batch),
            "--training.z_loss_multiplier", "0", "--metrics.log_freq", "1000000", "--training.steps", "100000",
            "--lr_scheduler.warmup_steps", "0", "--compile.enable", "true" if compile_ else "false"]
    checked = check_job(argv, 1)
    if isinstance(checked, int):
        raise SystemExit(f"config rejected (exit {checked})")
    cfg, plan = checked
    job = build(cfg, plan)
    n = [0]

    def step(batch):
        n[0] += 1
        train_step(job.runner, [(batch[:, :-1], batch[:, 1:])], step=n[0], dims=plan.dims, optimizers=job.optimizers,
                   lr_schedulers=job.lr_schedulers, max_norm=1.0, hooks=job.hooks)
    return job, step


def _our_model(lr: float):
    import torch

    from torchtitan.models.common.decoder import Decoder
    from torchtitan.models.olmo2 import olmo2_flavors

    torch.manual_seed(0)
    model = Decoder(olmo2_flavors["debugmodel"])
    model.init_weights()
    model.train()
    return model, _minimal_loop(model, model, lr)


def _hf_model(ours, lr: float):
    import transformers

    from torchtitan.models.olmo2 import Olmo2StateDictAdapter, olmo2_flavors

    adapter = Olmo2StateDictAdapter(olmo2_flavors["debugmodel"])
    cfg = transformers.AutoConfig.for_model(**adapter.hf_config())
    cfg._attn_implementation = "sdpa"
    model = transformers.Olmo2ForCausalLM(cfg)
    model.load_state_dict(adapter.to_hf(ours.state_dict()), strict=False)
    model.train()
    return _minimal_loop(model, lambda x: model(input_ids=x, use_cache=False).logits, lr)


def _olmo_core(args, lr: float):
    """OLMo-core's model in the minimal loop and its train module; None when olmo_core >= 2 does not import."""
    try:
        from olmo_core.nn.transformer import TransformerConfig
        from olmo_core.optim import AdamWConfig
        from olmo_core.train.train_module import TransformerTrainModuleConfig
    except ImportError:
        return None
    import torch

    def model():
        torch.manual_seed(0)
        m = TransformerConfig.olmo2_30M(vocab_size=2048, n_kv_heads=4).build(init_device="cpu")
        m.init_weights(device=torch.device("cpu"))
        m.train()
        return m

    loop_model = model()
    loop = _minimal_loop(loop_model, loop_model, lr)
    tokens = args.batch * args.seq_len
    module = TransformerTrainModuleConfig(
        rank_microbatch_size=tokens, max_sequence_length=args.seq_len, max_grad_norm=1.0,
        optim=AdamWConfig(lr=lr, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8, fused=True),
    ).build(model(), device=torch.device("cpu"))

    class _Trainer:  # what the train module asks of OLMo-core's Trainer per step
        dp_process_group = None
        global_batch_size = tokens

        def record_metric(self, *a, **k):
            pass

        record_ce_loss = record_metric

    module._attach_trainer(_Trainer())

    def trainer_step(batch):
        module.zero_grads()
        module.train_batch({"input_ids": batch[:, :-1].contiguous()})
        module.optim_step()
    return importlib.metadata.version("ai2-olmo-core"), loop, trainer_step


def _profile(step, batch, steps: int = 3) -> list[tuple[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    step(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(batch)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1000 / steps) for e in rows[:15]]


def _build(name: str, args, dump: str):
    """One contender's step function and what the report needs from it; None when it cannot be built here."""
    import torch

    from torchtitan.tools.host_memory import keep_freed_memory

    lr = 3e-3
    if name in ("ours", "ours_compiled"):
        job, step = _ours(args, dump, compile_=name == "ours_compiled")
        return step, {"flops_per_token": job.runner.parts[0].flops_per_token(args.seq_len)}
    model, step = _our_model(lr)
    info = {"params": sum(p.numel() for p in model.parameters())}
    if name == "ours_model":
        return step, info
    if name.startswith("hf_model"):
        if name == "hf_model_kept":  # the trainer's host-memory setting (training.cpu_keep_freed_memory)
            keep_freed_memory(torch.device("cpu"))
        return _hf_model(model, lr), info
    oc = _olmo_core(args, lr)
    if oc is None:
        return None
    version, loop, trainer_step = oc
    return (loop if name == "olmo_core_model" else trainer_step), {"version": version}


def _worker(name: str, args, conn) -> None:
    """A contender in a process of its own (its own heap and malloc settings); steps when the parent says so."""
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as dump:
        built = _build(name, args, dump)
        if built is None:
            conn.send(None)
            return
        step, info = built
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, VOCAB, (args.batch, args.seq_len + 1), generator=g) for _ in range(4)]
        for i in range(args.warmup):
            step(batches[i % len(batches)])
        conn.send(info)
        while (msg := conn.recv()) is not None:
            if msg == "profile":
                conn.send(_profile(step, batches[0]))
                continue
            t0 = time.perf_counter()
            step(batches[msg % len(batches)])
            conn.send(time.perf_counter() - t0)


def _interleaved(workers: dict, args) -> tuple[dict[str, list[list[float]]], float]:
    """Seconds per step, per contender and round: each round takes one step of each in turn, its order rotated
    by one per round, so drift of the machine and whoever-runs-first hit all alike. Only one process computes
    at a time; the GEMM ceiling is measured once per round, between the steps."""
    names = list(workers)
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    peak = 0.0
    for r in range(args.rounds):
        peak = max(peak, _gemm_peak(args.threads))
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append([])
        for i in range(args.steps):
            for name in order:
                workers[name].send(i)
                times[name][-1].append(workers[name].recv())
    return times, peak


CONTENDERS = ("ours", "ours_compiled", "ours_model", "hf_model", "hf_model_kept", "olmo_core_model", "olmo_core")


def run(args) -> None:
    import multiprocessing as mp

    import torch

    torch.set_num_threads(args.threads)
    ctx = mp.get_context("spawn")
    workers, infos, procs = {}, {}, []
    for name in CONTENDERS:
        if name == "ours_compiled" and not args.compile:
            continue
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(name, args, child), daemon=True)
        proc.start()
        procs.append(proc)
        info = parent.recv()  # built and warmed up one at a time, so setups do not compete either
        if info is not None:
            workers[name], infos[name] = parent, info
    try:
        if args.profile:
            for name in ("ours_model", "hf_model"):
                workers[name].send("profile")
                print(f"top ops by self CPU time, {name} (ms per step):")
                for key, ms in workers[name].recv():
                    print(f"  {ms:9.2f}  {key}")
        times, peak = _interleaved(workers, args)
    finally:
        for conn in workers.values():
            conn.send(None)
        for proc in procs:
            proc.join(timeout=60)
    _report(times, peak, infos, args)


def _report(times: dict, peak: float, infos: dict, args) -> None:
    med = {name: statistics.median(t for r in rounds for t in r) for name, rounds in times.items()}

    def paired(a: str, b: str) -> float:  # b's time over a's, median over the rounds of each round's medians
        return statistics.median(statistics.median(rb) / statistics.median(ra) for ra, rb in zip(times[a], times[b]))

    tokens = args.batch * args.seq_len
    print(f"olmo2 debugmodel ({infos['ours_model']['params']:,} params), batch {args.batch} x seq {args.seq_len}, "
          f"float32, {args.threads} threads, one process per contender, median of {args.rounds * args.steps} steps "
          f"each ({args.rounds} rounds of {args.steps} steps, interleaved step by step, after {args.warmup} warm-up)")
    print(f"olmo_core {infos['olmo_core']['version']}" if "olmo_core" in infos
          else "olmo_core >= 2 not importable: its rows are left out")
    print(f"{'contender':16s} {'ms/step':>9s} {'tokens/s':>10s} {'ours is':>9s}")
    for name, t in med.items():
        print(f"{name:16s} {t * 1000:9.1f} {tokens / t:10,.0f} {paired('ours', name):8.3f}x")
    print(f"ours_model vs hf_model (same loop, glibc's default malloc): {paired('ours_model', 'hf_model'):.3f}x")
    achieved = infos["ours"]["flops_per_token"] * tokens / med["ours"]
    print(f"roofline: ours {achieved / 1e9:.1f} GFLOP/s of model FLOPs / best fp32 GEMM {peak / 1e9:.1f} GFLOP/s "
          f"= {achieved / peak:.2f}")


def add_parser(sub) -> None:
    p = sub.add_parser("peers", help="ours vs transformers' and OLMo-core's code, same OLMo 2 shape (CPU)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also our trainer with torch.compile")
    p.add_argument("--profile", action="store_true", help="print the top ops of our model and transformers'")
