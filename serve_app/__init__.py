"""Ray Serve application serving a trained textclf classifier.

app.py            the deployment (one vLLM engine per replica) and the builders named in config.yaml
api.py            the FastAPI app over textclf.serving.Classifiers: routes, middleware, error answers
engine.py         textclf.serving.Engine over vLLM's AsyncLLM
cpu_placement.py  each replica's engine on its own CPU cores
metrics.py        the app's metrics, through Ray's metrics system
replica_gate.py   the overload refusal at a replica's own port, before Serve's request path
serve_errors.py   Serve's own error answers in the API's JSON body; the middlewares Serve runs around its servers
"""
