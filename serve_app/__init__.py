"""Ray Serve application serving a trained textclf classifier (see app.py and config.yaml)."""
