"""serve_app/config.yaml as `serve run serve_app/config.yaml` reads it, without starting Serve: Serve's own schema
accepts it (in a subprocess: importing ray.serve here would fix its settings for the serve tests), and its
runtime_env holds only what an application can set."""

import subprocess
import sys
from pathlib import Path

import yaml

from serve_app.local import SERVE_ENV

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "serve_app" / "config.yaml"


def _app() -> dict:
    return yaml.safe_load(CONFIG.read_text())["applications"][0]


def test_serve_accepts_the_config_as_written():
    code = (
        "import sys, yaml; from ray.serve.schema import ServeDeploySchema; "
        "ServeDeploySchema.model_validate(yaml.safe_load(open(sys.argv[1])))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(CONFIG)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_runtime_env_holds_only_what_an_application_can_set():
    env = _app()["runtime_env"]
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    # read when the cluster and the Serve controller start: in an application's env they would reach its replicas only
    assert not set(env["env_vars"]) & set(SERVE_ENV)
    for key in ("working_dir", "py_modules"):  # Serve takes remote URIs only; the code comes from the install
        assert key not in env
