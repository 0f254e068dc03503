"""The RL loop (loop.py) and its roles: rollout and reward workers (workers.py), the learner (learner.py), and
how they are reached (roles.py: in this process; posttrain/distributed: as Ray actors). Experience and
advantages: experience.py. Importing this package imports none of them."""
