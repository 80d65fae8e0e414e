"""The parallel plan: data the code generator reads to specialise the trainer and launcher."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Plan:
    """How the package runs: launcher, ranks and batch layout."""

    trainer_type: str  # basic | ddp | fsdp2 | pipeline | diloco
    nproc: int  # processes per node the launcher starts
    launcher: str  # "python" or "torchrun"
    global_batch_size: int  # sequences per optimizer step, over all ranks
    batch_per_rank: int  # with nproc ranks
    micro_batch_size: int  # sequences per forward on a rank
    grad_accum_steps: int  # forwards per optimizer step on a rank
    seq_len: int
    precision: str
    fsdp_units: str = "none"  # none | each decoder layer, then the root
    activation_checkpointing: str = "none"  # none | which decoder layers, full or selective
    compile: str = "none"  # none | per decoder layer
    # what is applied to the model, in this order (tensor parallel, activation checkpointing,
    # compile, FSDP2: the ones this plan uses)
    apply_order: tuple[str, ...] = ()
    # the device mesh: (dimension name, size) pairs, outermost first; () for one process
    mesh: tuple[tuple[str, int], ...] = ()
    # tensor parallelism: None, or {"degree", "colwise": [projections split by output features],
    # "rowwise": [split by input features], "replicated": what every rank holds whole}
    tensor_parallel: dict | None = None
    # pipeline parallelism: None, or {"schedule", "layout", "microbatches", "stages": [{"stage",
    # "rank", "layers": [start, end), "params"}]} with ranks counted inside one pipeline
    pipeline: dict | None = None
    # kernel -> {"impl", "reason"}: what the select-kernels pass chose
    kernels: dict = field(default_factory=dict)
    # DiLoCo: None, or {"workers", "ranks_per_worker", "data_ranks_per_worker" (its ranks over
    # tensor_degree), "tensor_degree", "replicate_degree" (HSDP inside a worker), "inner" (none |
    # ddp | fsdp2), "inner_steps",
    # "outer_optimizer", "outer_lr", "outer_momentum", "loss_normalisation"}
    diloco: dict | None = None
    # a pretrained model's vocabulary grown to the data's: None, or {"from": its rows, "to": the
    # model's, "source": the data's meta.json (or the config line), "new_rows": how they start}
    vocab_growth: dict | None = None

    def mesh_text(self, *, without_ones: bool = False) -> str:
        """The mesh as ``dp_shard=2 x pp=2`` (WITHOUT_ONES: leaving out dimensions of size 1);
        "" for one process."""
        return " x ".join(f"{name}={size}" for name, size in self.mesh if size > 1 or not without_ones)

    def to_data(self) -> dict:
        data = asdict(self)
        data["apply_order"] = list(self.apply_order)
        data["mesh"] = dict(self.mesh)
        if self.diloco is None:  # only a DiLoCo plan has the key
            del data["diloco"]
        if self.vocab_growth is None:  # only a plan whose vocabulary grows has the key
            del data["vocab_growth"]
        return data
