"""posttrain: post-train language models with reinforcement learning.

    import posttrain
    result = posttrain.fit("grpo", model="models/smollm2-135m-instruct", dataset="data.jsonl",
                             reward_funcs=[my_reward], rl={"steps": 20})

See posttrain/api.py (and the README's "Python API") for every argument; the command line runs the same code.
The API is imported on first use, so that `import posttrain.<module>` (the sandbox's runner, a worker) stays light.
"""

__all__ = ["Result", "evaluate", "fit", "run"]


def __getattr__(name: str):
    if name in __all__:
        from posttrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'posttrain' has no attribute {name!r}")
