"""What the optimizers need only for a model sharded with FSDP2 (``fully_shard``): QE's
forward passes at other parameters (:mod:`.evaluation`) and the optimizer state saved and
loaded per rank with ``torch.distributed.checkpoint`` (:mod:`.checkpoint`)."""
