"""Typed job configuration: one dataclass per TOML section.

Field metadata carries what the parser needs beyond the type: ``choices`` for
enumerated strings and ``help`` for docs/config.md. Each component receives only
the section(s) it needs, never the whole JobConfig.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType


def opt(default, help: str, choices: tuple | None = None):
    """A config field with documentation and optional valid choices."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Job:
    config_file: str | None = opt(None, "TOML file to read (also the CONFIG / CONFIG_FILE environment variables).")
    dump_folder: str = opt("./outputs", "Folder for checkpoints, metrics, traces and the data order of this run.")
    description: str = opt("", "Free text describing the job.")
    print_config: bool = opt(False, "On the command line: print the resolved config as TOML, each value with where it "
                                    "came from (default, which file, the command line), and exit. Set in a file "
                                    "(as torchtitan's configs do), it logs the same text at start, as print_args.")
    print_args: bool = opt(False, "Log the resolved config (as --job.print_config prints it) when training starts.")


@dataclass
class Profiling:
    enable_profiling: bool = opt(False, "Record torch.profiler traces every profile_freq steps.")
    save_traces_folder: str = opt("profile_traces", "Trace folder, under dump_folder.")
    profile_freq: int = opt(10, "Steps between traces.")
    profiler_active: int = opt(1, "Steps traced at the end of each window of profile_freq steps.")
    profiler_warmup: int = opt(1, "Profiler warm-up steps before the traced ones (fewer if the window is short).")
    enable_memory_snapshot: bool = opt(False, "Record CUDA allocator memory snapshots (CUDA only).")
    save_memory_snapshot_folder: str = opt("memory_snapshot", "Snapshot folder, under dump_folder.")


@dataclass
class Metrics:
    log_freq: int = opt(10, "Steps between logged lines; host syncs happen only on these steps.")
    enable_tensorboard: bool = opt(False, "Also write the logged values to TensorBoard.")
    save_tb_folder: str = opt("tb", "TensorBoard folder, under dump_folder.")
    enable_jsonl: bool = opt(True, "Write {dump_folder}/metrics.jsonl, one JSON object per logged step.")
    enable_wandb: bool = opt(False, "Also log to Weights & Biases (the wandb package): the TensorBoard scalars and "
                                    "the resolved config, from rank 0 (under fault tolerance, each replica group's "
                                    "rank 0); the run folder is {dump_folder}/wandb.")
    wandb_project: str = opt("", "W&B project. Empty: WANDB_PROJECT, else \"torchtitan\".")
    wandb_entity: str = opt("", "W&B entity (user or team). Empty: WANDB_ENTITY, else wandb's default entity.")
    wandb_run_name: str = opt("", "W&B run name. Empty: WANDB_NAME, else the dump folder's name; under fault "
                                  "tolerance -replica<id> is appended.")
    wandb_group: str = opt("", "W&B run group. Empty: WANDB_RUN_GROUP, else none (under fault tolerance: the "
                               "dump folder's name, so the replica groups' runs sit together).")
    wandb_tags: list[str] = opt([], "W&B run tags. Empty: WANDB_TAGS (a comma-separated list).")
    wandb_mode: str = opt("auto", "online uploads as it runs; offline writes a run folder that `wandb sync` "
                                  "uploads later, with no network use. auto: WANDB_MODE when set, else online "
                                  "when W&B credentials exist (WANDB_API_KEY or a netrc entry), else offline.",
                          ("auto", "online", "offline"))


@dataclass
class Model:
    name: str = opt("llama3", "Model family, a key of the train-spec table (llama3, olmo, olmo2, olmo3, olmoe, "
                              "qwen3, qwen3_moe, gemma3, gpt_oss, deepseek_v3; docs/models.md).")
    flavor: str = opt("debugmodel", "Size preset of the model family.")
    tokenizer_path: str = opt("", "Tokenizer file or folder (tiktoken tokenizer.model, sentencepiece .model, HF "
                                  "tokenizer.json). Empty: the bundled debug tokenizer.")
    tokenizer_backend: str = opt("auto", "Engine for HF tokenizer.json files: auto runs byte-level BPE files on "
                                         "tiktoken when it gives the same ids (about 3x faster), tokenizers always "
                                         "uses the HF library.",
                                 ("auto", "tokenizers"))
    vocab_size: int = opt(-1, "Override the flavor's vocabulary size (-1: keep the flavor's).")
    converters: list[str] = opt([], "Model converters applied before parallelization (float8: torchao's float8 "
                                     "linears, CUDA only).", ("float8",))
    sdpa_backend: str = opt("auto", "scaled_dot_product_attention backend; auto picks cuDNN on Hopper+, flash on "
                                    "other CUDA, the default on CPU (where short float32 causal sequences run from "
                                    "explicit scores, faster than the CPU flash kernel; flash or math there to keep "
                                    "SDPA's kernel).",
                            ("auto", "default", "cudnn", "flash", "efficient", "math"))


@dataclass
class Optimizer:
    name: str = opt("AdamW", "Optimizer. Muon: orthogonalized momentum on the matrices, AdamW (lr, betas, eps, "
                             "weight_decay above) on embeddings, output layer, norms, biases, routers and sinks "
                             "(docs/optimizers.md).", ("AdamW", "Adam", "Muon"))
    lr: float = opt(8e-4, "Peak learning rate.")
    beta1: float = opt(0.9, "Adam beta1.")
    beta2: float = opt(0.95, "Adam beta2.")
    eps: float = opt(1e-8, "Adam epsilon.")
    weight_decay: float = opt(0.1, "Decoupled weight decay (AdamW).")
    decay_embeddings: bool = opt(True, "Apply weight_decay to embedding weights (nn.Embedding, and an output layer "
                                       "tied to it); false trains them without decay (OLMo 2). Roles by module "
                                       "type: components/param_groups.py.")
    decay_norm_and_bias: bool = opt(True, "Apply weight_decay to the weights and biases of norm layers and to every "
                                          "bias; false trains them without decay (OLMo 1's option of that name).")
    muon_momentum: float = opt(0.95, "Muon: momentum of the matrices' gradient average.")
    muon_nesterov: bool = opt(True, "Muon: Nesterov momentum (the update is the gradient lerped toward the "
                                    "momentum).")
    muon_ns_steps: int = opt(5, "Muon: Newton-Schulz iterations per orthogonalization.")
    muon_ns_coefficients: list[float] = opt([3.4445, -4.775, 2.0315], "Muon: the quintic Newton-Schulz "
                                                                       "coefficients (a, b, c).")
    muon_ns_dtype: str = opt("auto", "Muon: the dtype Newton-Schulz runs in (and shards travel in). auto: "
                                     "bfloat16 on CUDA (torch.optim.Muon's), float32 elsewhere (CPUs without "
                                     "bfloat16 matmul units run it ~60x slower); float32 costs twice the traffic "
                                     "and is insensitive to last-bit gradient noise.",
                             ("auto", "bfloat16", "float32"))
    muon_adjust_lr: str = opt("match_rms_adamw", "Muon: the update scale. match_rms_adamw: lr x 0.2 x "
                                                 "sqrt(max(rows, cols)), an update RMS like AdamW's, so AdamW "
                                                 "learning rates carry over (Moonlight); original: lr x "
                                                 "sqrt(max(1, rows / cols)) (Keller Jordan's).",
                              ("match_rms_adamw", "original"))
    qk_clip_threshold: float | None = opt(None, "QK-clip (MuonClip): after each step, a head whose largest "
                                                "attention logit in the step's forward exceeded this has its "
                                                "query (and, without grouped K/V, key) weights scaled down to "
                                                "bring it back to the threshold (Kimi K2: 100). Any optimizer. "
                                                "None: off.")
    implementation: str = opt("auto", "Kernel. auto: fused (CUDA and CPU), the fastest, and the one that skips a "
                                      "step with a non-finite gradient norm on the device; with foreach or "
                                      "for-loop that check costs a host sync per step.",
                              ("auto", "fused", "foreach", "for-loop"))


@dataclass
class LRScheduler:
    warmup_steps: int = opt(200, "Linear warm-up steps from ~0 to the peak lr.")
    total_steps: int | None = opt(None, "Steps the schedule spans (None: training.steps); a shorter run then stops "
                                        "partway through the same schedule.")
    decay_ratio: float | None = opt(None, "Fraction of steps spent decaying at the end; the rest after warm-up is a "
                                          "stable phase. None: decay all steps after warm-up.")
    decay_type: str = opt("linear", "Decay shape.", ("linear", "sqrt", "cosine"))
    min_lr_factor: float = opt(0.0, "Final lr as a fraction of the peak lr.")
    start_lr_from_checkpoint: bool = opt(False, "With checkpoint.initial_load_path (a new stage): the peak lr is "
                                                "the lr the loaded run would have used next, not optimizer.lr "
                                                "(OLMo 2's anneal starts where stage 1 stopped).")
    grad_clip_warmup_steps: int | None = opt(None, "OLMo's gradient-clipping warm-up: steps 2 to "
                                                   "grad_clip_warmup_steps + 1 clip at training.max_norm x "
                                                   "grad_clip_warmup_factor, the others at max_norm (OLMo clips with "
                                                   "the threshold its scheduler set on the step before; "
                                                   "docs/olmo.md). Set both or neither.")
    grad_clip_warmup_factor: float | None = opt(None, "Multiplier of training.max_norm during the gradient-clipping "
                                                      "warm-up (OLMo 7B: 10 over 1000 steps).")


@dataclass
class Source:
    """One named source of a memmap mixture ([[data.sources]] tables; docs/datasets.md)."""

    name: str = opt("", "Name: the data/<name>/* metrics and inspect_batch.py show it.")
    paths: list[str] = opt([], "Token files (headerless, data.memmap_dtype); globs allowed, expanded in name order.")
    label_mask_paths: list[str] = opt([], "Bool label-mask files, one per token file after expansion (globs "
                                          "allowed); False marks a label to ignore.")
    target_ratio: float = opt(0.0, "Fraction of the run's instances drawn from this source; the ratios sum to 1.")
    max_repetition: float = opt(1.0, "How many times this source's instances may be seen over the run (fractional "
                                     "allowed); a source too small for its share within it is an error.")


@dataclass
class Data:
    """What to train on (the classic training.* keys alias these)."""

    dataset: str = opt("pydoc", "Dataset: pydoc (bundled offline corpus, less the last 5% of each topic, which "
                                "pydoc_heldout holds), c4 (allenai/c4 en, streamed; c4_validation: its validation "
                                "split), memmap (pre-tokenized files), or a hub dataset name.")
    dataset_path: str | None = opt(None, "Local json/jsonl/parquet/text file or folder; overrides where the dataset "
                                         "is read from.")
    dataset_text_field: str = opt("text", "Column holding the document text.")
    shuffle_documents: bool = opt(True, "Read local and bundled documents in a seeded order that depends only on "
                                        "(seed, epoch); hub streams keep their order.")
    memmap_paths: list[str] = opt([], "memmap dataset: raw token files (headerless).")
    memmap_dtype: str = opt("uint16", "memmap dataset: token dtype.", ("uint16", "uint32"))
    memmap_label_mask_paths: list[str] = opt([], "memmap dataset: bool files, one per token file; False marks a label "
                                                 "to ignore.")
    data_order_ignore_fingerprint: bool = opt(False, "memmap dataset: resume even if the files differ from the saved "
                                                     "fingerprint.")
    sources: list[Source] = opt([], "memmap dataset: a mixture of named sources, [[data.sources]] tables with name, "
                                    "paths, label_mask_paths, target_ratio, max_repetition (instead of "
                                    "memmap_paths). The run's instances (training.steps x global batch) are drawn "
                                    "from them at the target ratios in one seeded order.")
    instance_filter: bool = opt(False, "memmap dataset: leave out instances holding a pattern of period "
                                       "instance_filter_min_period..instance_filter_max_period tokens repeated "
                                       "instance_filter_max_count times or more in a row (OLMo-core's instance "
                                       "filter), decided once when the order is built.")
    instance_filter_max_period: int = opt(13, "Longest repeated pattern (tokens) the instance filter looks for.")
    instance_filter_min_period: int = opt(1, "Shortest repeated pattern (tokens) the instance filter looks for.")
    instance_filter_max_count: int = opt(32, "Repetitions in a row that make an instance degenerate.")
    document_masking: bool = opt(False, "Attention stays inside EOS-delimited documents of a packed window (the "
                                        "tokenizer's EOS ends a document); training and validation.")
    document_rope_restart: bool = opt(False, "With document_masking: RoPE positions restart at 0 in every document.")


@dataclass
class Training:
    local_batch_size: int = opt(8, "Sequences per data-parallel rank per micro-batch.")
    global_batch_size: int = opt(-1, "Sequences per optimizer step over all ranks; a multiple of local_batch_size x "
                                     "dp adds gradient accumulation. -1: local_batch_size x dp.")
    seq_len: int = opt(2048, "Tokens per sequence.")
    max_norm: float = opt(1.0, "Global gradient-norm clip (<= 0 disables clipping).")
    steps: int = opt(10000, "Optimizer steps to train.")
    enable_cpu_offload: bool = opt(False, "FSDP: keep parameters, gradients and optimizer state on the CPU.")
    mixed_precision_param: str = opt("bfloat16", "FSDP parameter/compute dtype on GPUs (CPU runs in float32).",
                                     ("bfloat16", "float32"))
    mixed_precision_reduce: str = opt("float32", "FSDP gradient reduction dtype.", ("float32", "bfloat16"))
    gc_freq: int = opt(50, "Run Python's garbage collector every N steps (automatic GC is disabled).")
    cpu_keep_freed_memory: bool = opt(True, "CPU runs on glibc: keep freed host memory in the process for the next "
                                            "step instead of returning it to the kernel, so activations do not "
                                            "page-fault fresh memory every step; the process keeps its peak "
                                            "resident size. No effect on GPU runs.")
    seed: int | None = opt(None, "Seed for weight init and RNG. None: 0 for init, nothing forced.")
    deterministic: bool = opt(False, "Use deterministic algorithms (slower).")
    z_loss_multiplier: float = opt(0.0, "Auxiliary z-loss weight (OLMo 2 uses 1e-5).")
    loss_chunk_size: int = opt(0, "Cross-entropy in chunks of this many tokens, each upcast to float32 and recomputed "
                                  "in backward, so the full float32 logits never exist (0: in one piece). Not applied "
                                  "to vocab-sharded logits under TP loss parallel.")
    spike_guard_sigma: float = opt(0.0, "Skip the update of a step whose loss or gradient norm exceeds the mean of "
                                        "the last spike_guard_window applied steps by this many standard deviations "
                                        "(0: off; OLMo-core uses 6). Decided on the device; skipped steps are logged.")
    spike_guard_window: int = opt(128, "Steps of history the spike guard compares against (it judges once half "
                                       "of them are in).")
    fused_output_loss: bool = opt(False, "Also compute the output layer inside each loss chunk (needs loss_chunk_size "
                                         "> 0; not with tensor parallel): no logits tensor exists whole in any dtype, "
                                         "for one extra output-layer matmul per step.")


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = opt(1, "Replicas (DDP, or the outer dim of HSDP).")
    data_parallel_shard_degree: int = opt(-1, "FSDP shards; -1 infers it from the world size.")
    fsdp_reshard_after_forward: str = opt("default", "Free gathered parameters after forward: default (yes except the "
                                                     "last stage), always, never.",
                                          ("default", "always", "never"))
    tensor_parallel_degree: int = opt(1, "Tensor (and sequence) parallel degree.")
    disable_loss_parallel: bool = opt(False, "Gather logits before the loss instead of computing it sharded under TP.")
    enable_async_tensor_parallel: bool = opt(False, "Async TP (CUDA + compile only).")
    pipeline_parallel_degree: int = opt(1, "Pipeline stages over ranks.")
    pipeline_parallel_split_points: list[str] = opt([], "Module names where a new stage starts, e.g. "
                                                        "layers.2,layers.4.")
    pipeline_parallel_layers_per_stage: int | None = opt(None, "Split evenly with this many layers per stage.")
    pipeline_parallel_schedule: str = opt("1F1B", "Pipeline schedule.",
                                          ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble",
                                           "ZBVZeroBubble", "DualPipeV", "CSV"))
    pipeline_parallel_schedule_csv: str = opt("", "CSV schedule file (with schedule = CSV).")
    pipeline_parallel_microbatch_size: int = opt(1, "Sequences per pipeline micro-batch.")
    context_parallel_degree: int = opt(1, "Context parallel degree: the sequence is sharded over these ranks.")
    expert_parallel_degree: int = opt(1, "Expert parallel degree (MoE models): the experts are split over this many "
                                         "ranks borrowed from data_parallel_shard x context_parallel, and tokens "
                                         "travel to them by all-to-all. Must divide data_parallel_shard_degree x "
                                         "context_parallel_degree and be a multiple of context_parallel_degree.")
    context_parallel_rotate_method: str = opt("alltoall", "How K/V travel between CP ranks: alltoall passes them "
                                              "around a ring, one piece in flight (attention memory O(S/cp)); "
                                              "allgather gathers each layer's K/V at once.", ("allgather", "alltoall"))


@dataclass
class MoETraining:
    load_balance_loss_weight: float = opt(0.01, "Weight of the load-balancing loss (Switch Transformer's "
                                                "E x sum f_e P_e per MoE layer, summed over layers); 0 turns it off.")
    router_z_loss_weight: float = opt(0.001, "Weight of the router z-loss (mean squared log-sum-exp of the router "
                                             "logits per MoE layer, summed over layers); 0 turns it off.")
    load_balance_scope: str = opt("global_batch", "Tokens whose expert counts the load-balancing loss uses: "
                                                  "global_batch counts the whole step (every data, context, tensor "
                                                  "and expert rank and every micro-batch; with more than one "
                                                  "micro-batch per rank this costs one forward-only routing pass), "
                                                  "micro_batch counts each micro-batch over all ranks.",
                                  ("global_batch", "micro_batch"))
    expert_bias_update_rate: float = opt(0.001, "Step of the aux-loss-free expert bias (routers with expert_bias): "
                                                "after each step bias_e += rate x sign(mean load - load_e).")


@dataclass
class Validation:
    enable: bool = opt(False, "Evaluate the loss on held-out data every validation.freq steps and at the last step.")
    freq: int = opt(500, "Steps between validations.")
    steps: int = opt(-1, "Batches per validation; -1: the whole set (every whole global batch of it).")
    dataset: str = opt("pydoc_heldout", "A text dataset as in data.dataset (pydoc_heldout: the part of the "
                                        "bundled corpus that pydoc training leaves out), or memmap.")
    dataset_path: str | None = opt(None, "Local json/jsonl/parquet/text file or folder; with dataset = memmap a "
                                         "token file or a folder of them (dtype data.memmap_dtype).")
    seq_len: int = opt(-1, "Tokens per validation sequence, at most training.seq_len (the length the model is built "
                           "for); -1: training.seq_len. Under pipeline parallel it must equal training's.")
    local_batch_size: int = opt(-1, "Validation sequences per data-parallel rank per batch; -1: "
                                    "training.local_batch_size. Under pipeline parallel it must equal training's.")
    sets: list[str] = opt([], "Several named held-out sets instead of dataset/dataset_path, each evaluated and logged "
                              "under its name: NAME=DATASET (a text dataset name), NAME=PATH (a json/jsonl/parquet/"
                              "text file or folder) or NAME=memmap:PATH (token files, dtype data.memmap_dtype).")


@dataclass
class DownstreamEval:
    enable: bool = opt(False, "Run OLMo's downstream tasks (ai2-olmo-eval) every downstream_eval.freq steps and at "
                              "the last step (docs/evaluation.md).")
    tasks: list[str] = opt(["olmo1_core"], "ai2-olmo-eval task labels and named sets: olmo1_core (the nine tasks of "
                                           "the OLMo model cards), olmes_rc_5shot, olmes_mc_5shot_fast, mmlu.")
    freq: int = opt(1000, "Steps between evaluations.")
    limit: int = opt(0, "Documents per task, the first in the task's order; 0: all.")
    batch_tokens: int = opt(-1, "Padded tokens per forward on each data-parallel rank; -1: training.local_batch_size "
                                "x training.seq_len (a training forward's size).")
    local_batch_size: int = opt(0, "At most this many sequences per forward on each data-parallel rank; 0: as many as "
                                   "batch_tokens allows.")
    model_ctx_len: int = opt(-1, "Longest input, at most training.seq_len; longer prompts lose their start (as in "
                                 "ai2-olmo-eval). -1: training.seq_len.")
    fatal: bool = opt(False, "An evaluation that fails stops training; by default it is logged and training goes on.")


@dataclass
class Checkpoint:
    enable: bool = opt(False, "Save and resume checkpoints.")
    folder: str = opt("checkpoint", "Checkpoint folder, under dump_folder.")
    interval_type: str = opt("steps", "Unit of interval.", ("steps", "seconds"))
    interval: int = opt(500, "Save every this many steps (or seconds).")
    keep_latest_k: int = opt(10, "Keep only the newest k complete checkpoints (0 keeps all).")
    load_step: int = opt(-1, "Resume from this step instead of the newest complete checkpoint.")
    last_save_model_only: bool = opt(True, "The final save holds only model weights (in export_dtype).")
    last_save_in_hf: bool = opt(False, "Also write the final weights as a Hugging Face folder ({folder}/step-N-hf: "
                                       "config.json + safetensors, in export_dtype) that transformers' "
                                       "from_pretrained loads.")
    export_dtype: str = opt("float32", "dtype of weights in the final weights-only save (and the HF export).",
                            ("float32", "bfloat16", "float16"))
    async_mode: str = opt("disabled", "Overlap checkpoint writes with training.",
                          ("disabled", "async", "async_with_pinned_mem"))
    create_seed_checkpoint: bool = opt(False, "Write step-0 weights from a single-process init and exit.")
    initial_load_path: str | None = opt(None, "DCP folder or HF safetensors folder to start from when no checkpoint "
                                              "of this run exists.")
    initial_load_model_only: bool = opt(True, "Load only model weights from initial_load_path.")
    exclude_from_loading: list[str] = opt([], "State keys not to load on resume (model, optimizer, lr_scheduler, "
                                              "dataloader, train_state, spike_guard).")
    enable_first_step_checkpoint: bool = opt(False, "Also save right after step 1.")
    reset_trainer_state: bool = opt(False, "With initial_load_path: load the weights and the optimizer moments, "
                                           "and start the step counter, data position and lr schedule afresh (a "
                                           "new stage; OLMo's --reset_trainer_state). initial_load_model_only "
                                           "loads the weights alone.")


@dataclass
class ActivationCheckpoint:
    mode: str = opt("selective", "Activation checkpointing.", ("none", "full", "selective"))
    selective_ac_option: str = opt("2", "'op' (save matmul and attention outputs) or N (checkpoint every Nth block).")


@dataclass
class Compile:
    enable: bool = opt(False, "torch.compile each transformer block (fullgraph) and the loss.")
    components: list[str] = opt(["model", "loss"], "What to compile: model, loss.")


@dataclass
class Float8:
    recipe_name: str = opt("tensorwise", "torchao float8 recipe (with model.converters = [\"float8\"]).",
                           ("tensorwise", "rowwise"))
    enable_fsdp_float8_all_gather: bool = opt(False, "All-gather FSDP parameters in float8 (tensorwise only).")
    precompute_float8_dynamic_scale_for_fsdp: bool = opt(False, "One all-reduce for all float8 scales per step.")
    filter_fqns: list[str] = opt(["output"], "Linear layers (by name fragment) kept in bf16.")


@dataclass
class Comm:
    init_timeout_seconds: int = opt(300, "Timeout for process-group setup and the first step.")
    train_timeout_seconds: int = opt(100, "Collective timeout after the first step.")
    mode: str = opt("default", "default, or fake_backend: build and shard on the meta device over a fake process "
                               "group (dry run).",
                    ("default", "fake_backend"))


@dataclass
class MemoryEstimation:
    enabled: bool = opt(False, "Print per-rank parameter, gradient and optimizer memory before training.")


@dataclass
class FaultTolerance:
    enable: bool = opt(False, "Train as one of several replica groups under torchft (docs/fault_tolerance.md): a group "
                              "that dies is dropped from the next step's quorum and rejoins from a live peer, "
                              "without stopping the others. Needs the `ft` extra and a running torchft_lighthouse.")
    replica_id: int = opt(0, "This replica group's id, 0..group_size-1 (run_train.sh: REPLICA_ID).")
    group_size: int = opt(1, "Replica groups in the full job (run_train.sh: NUM_REPLICAS): the data-parallel replicate "
                             "dimension across groups. training.global_batch_size counts all of them; with fewer "
                             "present a step's global batch shrinks to the groups present.")
    min_replica_size: int = opt(1, "Replica groups that must be present for a step to commit; with fewer the step "
                                   "waits and retries.")
    lighthouse: str = opt("", "Lighthouse address, e.g. http://host:29510. Empty: the TORCHFT_LIGHTHOUSE environment "
                              "variable.")
    timeout_seconds: int = opt(60, "Timeout of cross-replica collectives, commits and live recovery.")
    quorum_timeout_seconds: int = opt(120, "How long a step waits for a quorum of replica groups.")
    log_weight_digest: bool = opt(False, "Add a sha256 of each rank's weight shards to every step's record in "
                                         "{dump_folder}/replica_{id}/steps_rank{rank}.jsonl (tests, debugging: it "
                                         "reads all weights each step).")
    semi_sync_method: str = opt("sync", "sync: gradients summed across replica groups at every step. "
                                    "diloco: each group takes fault_tolerance.sync_steps optimizer steps on its own "
                                    "data, then the groups average the change of their weights (pseudo-gradient) "
                                    "and apply it with an outer SGD (torchft's DiLoCo; docs/fault_tolerance.md).",
                                ("sync", "diloco"))
    sync_steps: int = opt(20, "DiLoCo: inner steps between syncs (H); training.steps and checkpoint.interval must be "
                              "multiples of it.")
    outer_lr: float = opt(0.7, "DiLoCo: learning rate of the outer SGD (0.7 in the DiLoCo paper). 1.0 with "
                               "outer_momentum 0 is local SGD: the groups' weights averaged.")
    outer_momentum: float = opt(0.9, "DiLoCo: Nesterov momentum of the outer SGD (0.9 in the DiLoCo paper); 0 turns "
                                     "momentum off.")


@dataclass
class Experimental:
    """Home of the classic parallel-degree keys; they alias the [parallelism] ones."""


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    profiling: Profiling = field(default_factory=Profiling)
    metrics: Metrics = field(default_factory=Metrics)
    model: Model = field(default_factory=Model)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    data: Data = field(default_factory=Data)
    validation: Validation = field(default_factory=Validation)
    downstream_eval: DownstreamEval = field(default_factory=DownstreamEval)
    parallelism: Parallelism = field(default_factory=Parallelism)
    moe: MoETraining = field(default_factory=MoETraining)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    float8: Float8 = field(default_factory=Float8)
    comm: Comm = field(default_factory=Comm)
    memory_estimation: MemoryEstimation = field(default_factory=MemoryEstimation)
    fault_tolerance: FaultTolerance = field(default_factory=FaultTolerance)
    experimental: Experimental = field(default_factory=Experimental)

    # Where each key the user set came from: "file" or "cli" (load_config fills it; not a config key). An option
    # the user set that has no effect in this configuration is an error, not silence (config/effects.py).
    set_by = MappingProxyType({})
    # What loading accepted with no effect (torchtitan keys, config/torchtitan_keys.py): logged at start.
    notes = ()
    # Keys set under a torchtitan name (config/torchtitan_keys.py), canonical: trainer/effects.py logs those whose
    # switch is off instead of refusing them.
    torchtitan_keys = frozenset()


# Classic key locations, kept so older configs and commands keep working.
ALIASES: dict[str, str] = {
    "training.data_parallel_replicate_degree": "parallelism.data_parallel_replicate_degree",
    "training.data_parallel_shard_degree": "parallelism.data_parallel_shard_degree",
    "training.tensor_parallel_degree": "parallelism.tensor_parallel_degree",
    "experimental.pipeline_parallel_degree": "parallelism.pipeline_parallel_degree",
    "experimental.context_parallel_degree": "parallelism.context_parallel_degree",
    "experimental.pipeline_parallel_split_points": "parallelism.pipeline_parallel_split_points",
    "experimental.pipeline_parallel_schedule": "parallelism.pipeline_parallel_schedule",
    "checkpoint.enable_checkpoint": "checkpoint.enable",
    "checkpoint.model_weights_only": "checkpoint.last_save_model_only",
    "training.batch_size": "training.local_batch_size",
    # OLMo's key names (its fine-tuning command: --data.paths=[...] --data.label_mask_paths=[...]).
    "data.paths": "data.memmap_paths",
    "data.label_mask_paths": "data.memmap_label_mask_paths",
    "load_path": "checkpoint.initial_load_path",
    "reset_trainer_state": "checkpoint.reset_trainer_state",
    # What to train on moved to [data]; the training.* keys stay valid.
    **{f"training.{name}": f"data.{name}" for name in (
        "dataset", "dataset_path", "dataset_text_field", "shuffle_documents", "memmap_paths", "memmap_dtype",
        "memmap_label_mask_paths", "data_order_ignore_fingerprint", "document_masking", "document_rope_restart")},
}
