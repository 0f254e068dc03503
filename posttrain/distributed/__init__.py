"""`backend: ray`: the RL loop with its roles as Ray actors, calling the same pieces as the local loop.

    rollout workers  (N)  a policy copy each; generate an equal share of every rollout batch (engines.py)
    reward workers   (K)  score the shards: the task's reward, the mbpp sandbox, the reward model (workers.py)
    learner ranks    (M)  data-parallel actor/critic updates; a torch.distributed all-reduce of the gradients
                          gives the single-process gradient of the global batch (learner.py)
    driver                the `posttrain rl` process: prompts, advantages, metrics, evaluation, checkpoints (loop.py)

cluster.py starts (or joins) Ray and cleans up; pool.py calls the actors with timeouts and restarts dead
ones; experience.py makes one rollout batch from the shards; vllm_engine.py is the GPU rollout engine (the
vllm extra; untested here). docs/distributed.md shows where each role runs.
Nothing here is imported by the local backend, and importing this package does not import Ray.
"""
