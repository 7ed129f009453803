"""Security defaults: nothing listens beyond loopback unless asked, secrets in the environment reach no
output, credentials are refused on the command line and in configs, and nothing unpickles.

The end-to-end counterpart on a real multi-node cluster (a secret in the nodes' environment, grepped
for in the stores, job logs and Ray's session logs) is in tests/test_cluster.py.
"""

from __future__ import annotations

import ast
import ipaddress
import re
import secrets
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# the code that runs: the library, the job entrypoints, the cluster scripts
SOURCES = sorted([*(ROOT / "engine").rglob("*.py"), *(ROOT / "jobs").glob("*.py"), *(ROOT / "cluster").rglob("*.py")])
# credentials a run could pick up from its environment (values planted by the tests below)
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY",
                    "GOOGLE_OAUTH_ACCESS_TOKEN", "RAY_AUTH_TOKEN")
IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
# keyword arguments that choose an address something listens on
FILE_NAME = re.compile(r"^[\w.-]+\.\w+$")
BIND_KEYWORDS = {"host", "dashboard_host", "_node_ip_address", "node_ip_address", "ip_address", "bind_address"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _constants(tree: ast.Module) -> dict[str, object]:
    """Module-level ``NAME = <constant>`` assignments."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = node.value.value
    return found


def _call_name(call: ast.Call) -> str:
    func = call.func
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_the_sources_are_scanned():
    names = {str(p.relative_to(ROOT)) for p in SOURCES}
    assert {"engine/training/distributed.py", "jobs/synthesize.py", "cluster/local_cluster.py"} <= names


def _bind_problems(path: Path) -> list[str]:
    """Address literals that are not loopback, and addresses passed to something that listens
    (ray.init's node IP and dashboard host, a server's host) that are not loopback constants."""
    problems = []
    tree = _tree(path)
    constants = _constants(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.strip()
            if text in ("0.0.0.0", "::", "[::]") or (IPV4.match(text) and not ipaddress.ip_address(text).is_loopback):
                problems.append(f"{path.name}:{node.lineno}: address literal {text!r}")
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg not in BIND_KEYWORDS:
                    continue
                value = keyword.value
                if isinstance(value, ast.Name) and value.id in constants:
                    value = ast.Constant(constants[value.id])
                if not (isinstance(value, ast.Constant) and isinstance(value.value, str) and IPV4.match(value.value)
                        and ipaddress.ip_address(value.value).is_loopback):
                    problems.append(f"{path.name}:{node.lineno}: {_call_name(node)}({keyword.arg}=...) is not a loopback constant")
    return problems


def test_nothing_binds_a_non_loopback_address_by_default():
    assert [problem for path in SOURCES for problem in _bind_problems(path)] == []


def test_the_local_defaults_are_loopback():
    """connect()'s own local instance and the local cluster script: node IPs and the dashboard."""
    from engine.training import distributed

    assert ipaddress.ip_address(distributed.LOCAL_NODE_IP).is_loopback
    init_calls = [n for n in ast.walk(_tree(Path(distributed.__file__))) if isinstance(n, ast.Call) and _call_name(n) == "ray.init"]
    local = [c for c in init_calls if not any(k.arg == "address" for k in c.keywords)]
    assert len(local) == 1 and {k.arg for k in local[0].keywords} >= {"_node_ip_address", "dashboard_host"}
    script = _constants(_tree(ROOT / "cluster" / "local_cluster.py"))
    assert script["HEAD_IP"] == "127.0.0.2" and script["DASHBOARD_HOST"] == "127.0.0.1"
    assert 2 < script["FIRST_WORKER_OCTET"] < 255  # workers on 127.0.0.<n>


def _pickle_problems(path: Path) -> list[str]:
    """``torch.load`` without ``weights_only=True``, pickle/joblib/dill imports and loads, ``np.load``
    of pickles, ``torch.save``, file names with a pickle suffix."""
    from engine.training.checkpoint import PICKLE_SUFFIXES

    problems = []
    for node in ast.walk(_tree(path)):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve") for m in modules):
                problems.append(f"{where}: imports {modules}")
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        keywords = {k.arg: k.value for k in node.keywords}
        if name == "torch.load":
            weights_only = keywords.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                problems.append(f"{where}: torch.load without weights_only=True")
        if name == "torch.save":
            problems.append(f"{where}: torch.save (pickle); checkpoints are safetensors")
        if name in ("np.load", "numpy.load"):
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                problems.append(f"{where}: np.load with allow_pickle")
        if name.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle") and name.split(".")[-1] in ("load", "loads"):
            problems.append(f"{where}: {name}")
        for arg in node.args:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and FILE_NAME.match(arg.value) \
                    and arg.value.lower().endswith(PICKLE_SUFFIXES):
                problems.append(f"{where}: {name}({arg.value!r})")
    return problems


def test_nothing_unpickles_and_checkpoints_are_safetensors():
    """Checkpoints are safetensors + json (engine.training.checkpoint), pickles are refused on load."""
    assert [problem for path in SOURCES for problem in _pickle_problems(path)] == []
    checkpoint = (ROOT / "engine" / "training" / "checkpoint.py").read_text()
    assert "safetensors" in checkpoint and "_refuse_pickles" in checkpoint


def test_the_scanners_find_what_they_look_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport numpy as np\nimport ray\nimport torch\nHOST = '10.0.0.5'\n"
        "ray.init(dashboard_host='0.0.0.0')\nray.init(_node_ip_address=HOST)\nserve(host=address)\n"
        "torch.load('m.bin')\ntorch.load(f, weights_only=False)\ntorch.load(f, weights_only=True)\n"
        "np.load(f, allow_pickle=True)\npickle.loads(b)\ntorch.save(m, 'model.pt')\n")
    assert len(_bind_problems(bad)) == 5  # 10.0.0.5, 0.0.0.0 twice (literal, keyword), HOST, a variable
    problems = _pickle_problems(bad)
    assert sum("torch.load without" in p for p in problems) == 2 and sum("'m.bin'" in p or "'model.pt'" in p for p in problems) == 2
    assert any("imports ['pickle']" in p for p in problems) and any("pickle.loads" in p for p in problems)
    assert any("allow_pickle" in p for p in problems) and any("torch.save" in p for p in problems)


def test_a_secret_in_the_environment_reaches_no_output_of_a_synthesis_run(tmp_path, monkeypatch, capfd):
    """`lgesynth synthesize --sequential` with credentials in its environment: the token is in no file
    of the run (store attributes with the recorded config, reports) and not in its output (both file
    descriptors: what C extensions and subprocesses write too)."""
    import zarr

    from engine.cli import main
    from engine.config import to_dict
    from tests.synth_helpers import make_tiny_run, tiny_config

    base = make_tiny_run(tmp_path / "tiny")
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_config(base, run_dir, ["synthesis.max_candidates=4"])), sort_keys=False))
    planted = {name: secrets.token_hex(24) for name in SECRET_VARIABLES}
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    capfd.readouterr()
    code = main(["synthesize", "--config", str(config), "--sequential"])
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]

    group = zarr.open_group(str(run_dir / "synthetic.zarr"), mode="r")
    assert group.attrs["lgesynth"]["config"]["max_candidates"] == 4  # the recorded synthesis config is there
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 10
    leaks = [f"{p}: {name}" for p in files for name, value in planted.items() if value.encode() in p.read_bytes()]
    leaks += [f"output: {name}" for name, value in planted.items() if value in out + err]
    assert leaks == []


@pytest.mark.parametrize("argv", [
    ["synthesize", "--config", "{config}", "synthesis.storage_options.secret={token}"],
    ["synthesize", "--config", "{config}", "synthesis.storage_options.aws_secret_access_key={token}"],
    ["check-store", "{store}", "--storage-option", "secret={token}"],
    ["check-store", "{store}", "--storage-option", "client_kwargs={{aws_session_token: {token}}}"],
    ["config", "--config", "{config}", "synthesis.store=s3://AKIAEXAMPLE:{token}@bucket/x.zarr"],
    ["config", "--config", "{config}", "downstream.synthetic=gs://user:{token}@bucket/x.zarr"],
    ["check-store", "s3://AKIAEXAMPLE:{token}@bucket/x.zarr"],
])
def test_credentials_on_the_command_line_or_in_a_config_are_refused_without_echoing_them(tmp_path, capsys, argv):
    from engine.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"cohort: {{root: {tmp_path}}}\nrun_dir: {tmp_path / 'run'}\n")
    token = secrets.token_hex(16)
    code = main([a.format(config=config, token=token, store=tmp_path / "s.zarr") for a in argv])
    out = capsys.readouterr()
    assert code == 2 and "credential" in out.err
    assert token not in out.out + out.err


def test_a_user_name_alone_in_a_url_is_no_secret(tmp_path):
    from engine.config import ConfigError, refuse_url_credentials

    refuse_url_credentials("sftp://me@host/data/x.zarr", "synthesis.store")  # accepted
    refuse_url_credentials("/data/a:b@c/x.zarr", "synthesis.store")  # a path, not a URL
    with pytest.raises(ConfigError, match=r"synthesis.store: a URL with credentials in it \(s3://\*\*\*@b/x\)"):
        refuse_url_credentials("s3://k:s@b/x", "synthesis.store")
