"""Every file under cluster/ parses, and every command in it, in the top-level README or in
the experiment log (bench/RESULTS.md) that runs a job names an existing jobs/*.py script
with flags (and values) that job's own parser accepts.

Commands are found as `python .../jobs/NAME.py ARGS` in YAML values and comments, shell
scripts and Markdown (backslash continuations joined); each is run through the job's real
`main` up to its `parse_config` call, which is replaced by one that stops right after
parsing. A shell variable assigned earlier in the same file (`COMMON="--data d ..."`) is
expanded, since it carries flags; any other expansion (`"$DATA"`) stands for a value the
test cannot know and is replaced by "1", valid for every str, int and float flag. A
command whose `--config` file is under runs/ reads what an earlier step writes (the serve
config jobs/tune.py writes, checked by the Tune tests), so it cannot be parsed here and is
not collected.
The Serve application (RayService, serve config) is checked against jobs/serve.py's
`ServeConfig` and Ray Serve's own deploy schema.
"""
from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.job_flags import parse_job_flags

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
# A command ends at a line end without a backslash, or at a Markdown backtick.
COMMAND = re.compile(r"python\S*\s+(?:\S*/)?jobs/(\w+)\.py\b((?:[^\n\\`]|\\\n)*)")
ASSIGNMENT = re.compile(r'^(\w+)="([^"$]*)"', re.MULTILINE)
SHELL_END = {"|", "||", "&&", ";", "&", ">", "2>&1"}


def yaml_documents() -> list[tuple[Path, object]]:
    docs = []
    for path in sorted(CLUSTER.rglob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text())]
    return docs


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _comments(text: str) -> str:
    return "\n".join(re.sub(r"^\s*# ?", "", line) for line in text.splitlines() if line.lstrip().startswith("#"))


def job_commands() -> list[tuple[str, str, list[str]]]:
    """(where, job name, argv) of every job command in the READMEs, bench/RESULTS.md and cluster/: YAML values (folded block
    scalars included) and comments, shell scripts, the READMEs, the Dockerfile."""
    texts = [(name, (ROOT / name).read_text()) for name in ("README.md", "bench/RESULTS.md")]
    for path in sorted(CLUSTER.rglob("*")):
        where = str(path.relative_to(ROOT))
        if path.suffix == ".yaml":
            texts.append((where, _comments(path.read_text())))
            texts += [(where, s) for d in yaml.safe_load_all(path.read_text()) for s in _strings(d)]
        elif path.suffix in {".sh", ".md"} or path.name == "Dockerfile":
            texts.append((where, path.read_text()))
    found = []
    for where, text in texts:
        for m in COMMAND.finditer(text):
            variables = {a.group(1): a.group(2).replace("\\\n", " ")
                         for a in ASSIGNMENT.finditer(text, 0, m.start())}
            argv = []
            for token in shlex.split(m.group(2).replace("\\\n", " "), comments=True):
                if token in SHELL_END:
                    break
                if token.startswith("$"):
                    name = token.strip("${}")
                    argv += shlex.split(variables[name]) if name in variables else ["1"]
                else:
                    argv.append(token)
            if any(a == "--config" and b.startswith("runs/") for a, b in zip(argv, argv[1:])):
                continue
            line = text.count("\n", 0, m.start()) + 1
            found.append((f"{where} line {line}", m.group(1), argv))
    return found


def test_every_file_parses():
    for path in sorted(CLUSTER.rglob("*.json")):
        assert isinstance(json.loads(path.read_text()), dict), path
    assert len(yaml_documents()) >= 6


def test_the_expected_manifests_exist():
    kinds = {(p.name, d.get("kind")) for p, d in yaml_documents() if isinstance(d, dict)}
    assert {("raycluster.yaml", "RayCluster"), ("rayjob-distill.yaml", "RayJob"),
            ("rayservice.yaml", "RayService")} <= kinds


COMMANDS = job_commands()


def test_commands_are_found_in_manifests_scripts_and_readme():
    where = {w.split(" ")[0] for w, _, _ in COMMANDS}
    assert {"README.md", "bench/RESULTS.md", "cluster/kuberay/rayjob-distill.yaml", "cluster/aws.yaml", "cluster/README.md",
            "cluster/local_two_node.sh"} <= where
    assert any(job == "distill" for w, job, _ in COMMANDS if w.startswith("cluster/kuberay/rayjob-distill.yaml"))


@pytest.mark.parametrize("where,job,argv", COMMANDS, ids=[f"{w}:{j}" for w, j, _ in COMMANDS])
def test_command_names_a_job_with_flags_it_accepts(where, job, argv, capsys):
    assert (ROOT / "jobs" / f"{job}.py").is_file(), f"{where}: jobs/{job}.py does not exist"
    if argv == ["--help"]:
        return
    try:
        parse_job_flags(job, argv)
    except SystemExit:
        pytest.fail(f"{where}: jobs/{job}.py refuses {shlex.join(argv)}:\n{capsys.readouterr().err}")


def test_the_flag_check_catches_unknown_flags_and_bad_values(capsys):
    with pytest.raises(SystemExit):
        parse_job_flags("distill", ["--data", "d", "--output", "o", "--student-depth", "4"])
    assert "unrecognized arguments: --student-depth" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_job_flags("distill", ["--data", "d", "--output", "o", "--epochs", "two"])
    config = parse_job_flags("distill", ["--data", "d", "--output", "o", "--student-layers", "2"])
    assert config.student_layers == 2


def _serve_configs() -> list[tuple[str, dict]]:
    configs = []
    for path, doc in yaml_documents():
        if isinstance(doc, dict) and doc.get("kind") == "RayService":
            configs.append((path.name, yaml.safe_load(doc["spec"]["serveConfigV2"])))
        elif isinstance(doc, dict) and "applications" in doc:
            configs.append((path.name, doc))
    return configs


def test_serve_applications_use_serve_py_settings():
    from ray.serve.schema import ServeDeploySchema

    from jobs.serve import ServeConfig, build_app, model_specs

    configs = _serve_configs()
    assert any(name == "rayservice.yaml" for name, _ in configs)
    for name, config in configs:
        ServeDeploySchema.model_validate(config)
        for app in config["applications"]:
            module, attr = app["import_path"].split(":")
            assert getattr(importlib.import_module(module), attr) is build_app, name
            model_specs(ServeConfig(**app["args"]))  # known settings, valid values, distinct ids


def test_rayjob_and_cluster_specs_mount_the_shared_storage_the_job_writes_to():
    for path, doc in yaml_documents():
        if not isinstance(doc, dict) or doc.get("kind") not in {"RayCluster", "RayJob", "RayService"}:
            continue
        spec = doc["spec"]
        cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
        groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
        for group in groups:
            (container, *_) = group["template"]["spec"]["containers"]
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/mnt/shared" in mounts, f"{path.name}: a pod group lacks the shared volume"
        if doc["kind"] == "RayJob":
            argv = shlex.split(spec["entrypoint"])
            for flag in ("--data", "--output", "--teacher", "--storage-path"):
                assert argv[argv.index(flag) + 1].startswith("/mnt/shared/"), f"{path.name}: {flag}"


def test_aws_config_matches_the_cluster_launcher_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load((CLUSTER / "aws.yaml").read_text()), schema)


def test_deepspeed_configs_name_their_zero_stage():
    from jobs.common.deepspeed_engine import load_ds_config, zero_stage

    stages = {p.name: zero_stage(load_ds_config(p)) for p in sorted((CLUSTER / "deepspeed").glob("*.json"))}
    assert stages == {"zero0.json": 0, "zero2.json": 2, "zero3.json": 3, "zero3_offload.json": 3}
    offload = load_ds_config(CLUSTER / "deepspeed" / "zero3_offload.json")["zero_optimization"]
    assert offload["offload_param"]["device"] == offload["offload_optimizer"]["device"] == "cpu"


def test_bf16_auto_is_decided_by_the_workers_device_not_the_drivers(monkeypatch):
    # cluster/aws.yaml's head node, where `ray job submit` runs the driver, has no GPU:
    # deciding there trained every GPU worker in fp32.
    import torch

    from jobs.common.deepspeed_engine import load_ds_config, resolve_ds_config, resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    driver = resolve_ds_config(load_ds_config(CLUSTER / "deepspeed" / "zero2.json"), 8, 2, 4)
    assert driver["bf16"]["enabled"] == "auto" and driver["train_batch_size"] == 64
    assert resolve_precision(driver, torch.device("cuda", 0))["bf16"]["enabled"] is True
    assert resolve_precision(driver, torch.device("cpu"))["bf16"]["enabled"] is False
    assert resolve_precision({}, torch.device("cuda", 0))["bf16"]["enabled"] is True
    forced = {"bf16": {"enabled": True}}
    assert resolve_precision(forced, torch.device("cpu")) == forced
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision(driver, torch.device("cuda", 0))["bf16"]["enabled"] is False


def test_ml1m_recipe_stages_chain_on_one_split():
    """cluster/ml1m/: each stage reads the previous one's output, all on the same data,
    history length and split (validation items trained on)."""
    def load(job: str, name: str):
        return parse_job_flags(job, ["--config", str(CLUSTER / "ml1m" / name)])

    items, teacher, student = (load("pretrain_items", "items.yaml"), load("train_teacher", "teacher.yaml"),
                               load("distill", "student.yaml"))
    assert teacher.item_table == items.output and student.teacher == teacher.output
    for stage in (items, teacher, student):
        assert (stage.data, stage.max_len, stage.train_on_valid) == (items.data, 200, True)
    assert teacher.backbone.name == "smollm2-135m" and teacher.backbone.layers == 8
    assert len(teacher.backbone.lora_targets) == 7
    assert student.student_layers * 4 == teacher.backbone.layers
