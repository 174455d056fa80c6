"""Tensor and expert parallelism over torch.distributed (NCCL on GPU, gloo on CPU).

    LLM(model, tensor_parallel_size=N, expert_parallel=False)
    lightspeed generate --tensor-parallel-size N [--expert-parallel] ...

parallel.py   ParallelContext, size checks, process-group setup (every collective times out)
comm.py       all-reduce: one-shot over symmetric memory for small CUDA messages, else NCCL
shard.py      a model's modules -> this rank's shard (plan: models/llama.py TP_PLAN)
loading.py    each rank reads only its safetensors slices (get_slice)
executor.py   worker processes fed each SchedulerOutput by rank 0 (the Engine's process)

TP = 1 never imports this package: the Engine keeps its single-process path.
"""
