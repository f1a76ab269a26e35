"""deploy/serve.yaml and deploy/rayservice.yaml: valid Serve configs of the same application, whose
args ServeConfig accepts, on a GPU worker group large enough for one replica."""

from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from msa.serve.config import ServeConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def test_serve_yaml_is_a_serve_config_of_build_app_with_valid_args():
    config = ServeDeploySchema.parse_obj(load("serve.yaml"))
    (app,) = config.applications
    assert app.import_path == "msa.serve.app:build_app" and app.route_prefix == "/"
    serve_config = ServeConfig.from_args(app.args)
    assert serve_config.device == "cuda" and serve_config.model_name == "MiniMax-M3"


def test_rayservice_runs_the_same_application_on_enough_gpus():
    manifest = load("rayservice.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    serve_config_v2 = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve_config_v2["applications"] == load("serve.yaml")["applications"]
    args = ServeConfig.from_args(serve_config_v2["applications"][0]["args"])
    groups = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    gpus = [int(c["resources"]["limits"]["nvidia.com/gpu"]) for c in containers]
    assert max(gpus) >= args.tp * args.sp
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
