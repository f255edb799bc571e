"""`cluster.yaml` validates against the schema that ships with Ray, keeps MLflow off the network and its records
in durable stores, and agrees with the README's walkthrough."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).parents[1] / "cluster.yaml"


def test_cluster_yaml_validates_against_rays_schema():
    config = yaml.safe_load(CLUSTER.read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))


def test_cluster_yaml_pins_ray_and_keeps_mlflow_on_loopback():
    config = yaml.safe_load(CLUSTER.read_text())
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    head = " ".join(config["head_start_ray_commands"])
    assert "mlflow server --host 127.0.0.1" in head and "0.0.0.0" not in CLUSTER.read_text()
    assert "RAY_AUTH_MODE=token" in head
    text = CLUSTER.read_text().lower()
    assert "aws_secret_access_key" not in text and "aws_access_key_id" not in text


def test_no_credentials_anywhere_in_the_repository():
    import re
    import subprocess

    root = Path(__file__).parents[1]
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout (an sdist): scan the source folders instead
        tracked = [
            str(p.relative_to(root))
            for d in ("platform", "trainables", "tests", "benchmarks")
            for p in (root / d).rglob("*.py")
        ]
    patterns = [
        re.compile(p)
        for p in (
            r"AKIA[0-9A-Z]{16}",
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
            r"(?i)aws_secret_access_key\s*[:=]\s*\S{20,}",
            r"ghp_[0-9A-Za-z]{36}",
        )
    ]
    for name in tracked:
        path = root / name
        if path.suffix in {".py", ".yaml", ".yml", ".md", ".toml", ".txt", ""} and path.is_file():
            text = path.read_text(errors="ignore")
            assert not any(p.search(text) for p in patterns), f"{name} looks like it holds a credential"


def _readme_walkthrough() -> str:
    readme = (CLUSTER.parent / "README.md").read_text()
    section = readme[readme.index("### On a cloud GPU cluster") :]
    return section[section.index("```bash") + len("```bash") : section.index("```", section.index("```bash") + 3)]


def test_the_readme_cluster_walkthrough_matches_cluster_yaml():
    import re

    from catrs.sweep.space import find_search_space, load_search_space, shipped_spaces

    config = yaml.safe_load(CLUSTER.read_text())
    steps = [line.split("#")[0].strip() for line in _readme_walkthrough().splitlines()]
    steps = [step for step in steps if step]
    order = [
        next(i for i, s in enumerate(steps) if s.startswith(prefix))
        for prefix in (
            "aws ssm put-parameter",
            "ray up cluster.yaml",
            "ray attach cluster.yaml",
            "catrs tune",
            "ray down",
        )
    ]
    assert order == sorted(order), "the walkthrough's steps are out of order"
    assert any(s.startswith("ray up cluster.yaml") for s in steps[order[-1] :]), "no second cluster after ray down"

    head = " ".join(config["head_start_ray_commands"])
    port = re.search(r"mlflow server .*--port (\d+)", head).group(1)
    assert {re.search(r"-p (\d+)", s).group(1) for s in steps if s.startswith("ray attach")} == {port}

    tune = next(s for s in steps if s.startswith("catrs tune"))
    bucket = re.search(r"--storage-path s3://([^/\s]+)/", tune).group(1)
    assert f"--artifacts-destination s3://{bucket}/" in head  # MLflow's artifacts in the run storage's bucket
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert f"CATRS_CACHE=s3://{bucket}/" in " ".join(commands)  # every node's cache in the object store

    # The durable store: PostgreSQL from SSM (never the file), in the cluster's region; no SQLite on the head.
    parameter = re.search(r"--name (\S+)", next(s for s in steps if s.startswith("aws ssm"))).group(1)
    assert f'Name="{parameter}"' in head and f'region_name="{config["provider"]["region"]}"' in head
    assert "sqlite" not in CLUSTER.read_text().lower() and "--backend-store-uri" not in head
    assert all("USER:PASSWORD@HOST" in uri for uri in re.findall(r"postgresql://\S+", CLUSTER.read_text()))

    space = tune.split()[2]  # a shipped space: the head runs catrs installed from the mounted repository
    assert space in shipped_spaces() and load_search_space(find_search_space(space)).dataset == "cifar10"
    assert f"catrs tune {space} " in CLUSTER.read_text()  # cluster.yaml's header shows the same command
    assert "[cluster]" in " ".join(config["setup_commands"])  # psycopg and boto3 for PostgreSQL and S3
    ray_pin = re.search(r"ray\[default\]==([\d.]+)\.\*", _readme_walkthrough()).group(1)
    assert ray.__version__.startswith(ray_pin)


def test_cluster_yaml_syncs_only_the_source_installs_torch_once_and_offers_gpus_catrs_can_plan_with():
    from catrs.distributed.runtime import autoscaling_gpus

    config = yaml.safe_load(CLUSTER.read_text())
    assert {".venv", "data", "runs"} <= set(config["rsync_exclude"])
    torch_install = next(c for c in config["setup_commands"] if "torch==" in c)
    assert torch_install.startswith('python -c "import torch')  # skipped where torch is installed already
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0
    # What the driver on the head plans with before any GPU node is up: 2 four-GPU nodes, then 6 one-GPU ones.
    assert autoscaling_gpus(prepare_config(config)) == 2 * 4 + 6 * 1
