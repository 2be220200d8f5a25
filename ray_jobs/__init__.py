"""Ray entry points, one module per step: `python -m ray_jobs.<step> --config run.yaml --key value`.

Each runs locally on an embedded Ray, or on a cluster under `ray job submit` (it joins RAY_ADDRESS).
"""
