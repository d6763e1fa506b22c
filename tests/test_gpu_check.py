"""``python -m mclx.gpu_check`` where a CPU can check it: the skip without a GPU (one
JSON line, exit 77), argument handling, the report's format and exit status (with
stand-in checks), and the helpers the GPU checks rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mclx.gpu_check import SKIPPED, Check, default_checks, main, probe, runner


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "mclx.gpu_check", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("args", [[], ["--probe"], ["--only", "retrieval"]])
def test_without_a_gpu_it_says_so_in_one_json_line_and_exits_77(args):
    gpus, reason = probe()
    if gpus is not None:
        pytest.skip(f"this machine has a GPU ({gpus['names']}): the skip does not apply")
    res = _run(*args)
    assert res.returncode == SKIPPED == 77, res
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and res.stderr == ""
    out = json.loads(lines[0])
    assert out["status"] == "skipped" and out["ok"] is False and out["reason"] == reason
    assert "NVIDIA" in reason or "CUDA" in reason


def test_offline_check_without_a_gpu_is_one_json_line_and_77(tmp_path):
    """``make gpu-check-offline`` on a CPU machine: the probe answers before anything is
    installed (no wheels needed), one JSON line with the reason, exit 77."""
    gpus, reason = probe()
    if gpus is not None:
        pytest.skip(f"this machine has a GPU ({gpus['names']}): the skip does not apply")
    root = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/bin:/bin", "WHEELS": str(tmp_path / "none"), "PYTHON3": sys.executable}
    res = subprocess.run(["bash", str(root / "toolkit/gpu_check/offline.sh")], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == SKIPPED, res
    (line,) = res.stdout.strip().splitlines()
    assert json.loads(line) == {
        "mclx_gpu_check": 1, "status": "skipped", "ok": False, "reason": reason,
    }  # fmt: skip
    assert res.stderr == "" and not (tmp_path / "none").exists()


def test_importing_the_checks_loads_no_gpu_library():
    code = (
        "import sys, mclx.gpu_check, mclx.gpu_check.engines, mclx.gpu_check.pipeline; "
        "import mclx.gpu_check.backends, mclx.gpu_check.environment; "
        "mclx.gpu_check.default_checks(); "
        "print(sorted({'torch', 'cupy', 'tensorrt', 'onnxruntime'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_list_names_every_check(capsys):
    assert main(["--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(default_checks())
    assert {"environment", "tensorrt_fp16", "retrieval", "infer", "throughput"} <= set(listed)
    assert all(c.about and c.run.__doc__ for c in default_checks().values())


@pytest.mark.parametrize("args", [["--only", "nosuch"], ["--skip", "retrieval,bogus"], ["--x"]])
def test_bad_arguments_are_one_line_and_exit_2(args):
    res = _run(*args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m mclx.gpu_check: error:"), res.stderr
    if args[0] == "--only":
        assert "unknown check(s) nosuch (environment, " in lines[0]


def _fake_checks(calls):
    def good(ws):
        """Passes."""
        calls.append(("good", ws.root))
        return {"images_per_s": 12.5}, []

    def bad(ws):
        """Raises."""
        calls.append(("bad", ws.root))
        raise RuntimeError("boom\nsecond line")

    def unhappy(ws):
        """Finds a problem."""
        calls.append(("unhappy", ws.root))
        return {"min_cosine": 0.5}, ["min cosine 0.5000"]

    return {"good": Check(good, "g"), "bad": Check(bad, "b"), "unhappy": Check(unhappy, "u")}


@pytest.fixture
def has_gpu(monkeypatch):
    gpus = {"count": 1, "names": ["Stand-in GPU"], "driver_cuda": "13.0"}
    monkeypatch.setattr(runner, "probe", lambda: (gpus, None))
    return gpus


def test_report_of_a_run_with_failures(has_gpu, tmp_path, capsys):
    calls = []
    out = tmp_path / "report.json"
    rc = main(["--skip", "unhappy", "--out", str(out), "--workdir", str(tmp_path / "w")],
              checks=_fake_checks(calls))  # fmt: skip
    assert rc == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert json.loads(out.read_text()) == report
    assert report["status"] == "failed" and report["ok"] is False and report["failed"] == ["bad"]
    assert report["gpus"] == has_gpu and report["mclx_gpu_check"] == 1
    assert report["ran"] == ["good", "bad"] and report["skipped"] == {}
    good, bad = report["checks"]["good"], report["checks"]["bad"]
    assert good == {
        "status": "passed", "ok": True, "seconds": good["seconds"], "problems": [],
        "images_per_s": 12.5,
    }  # fmt: skip
    assert bad["ok"] is False and bad["problems"] == ["RuntimeError: boom second line"]
    assert bad["status"] == "failed"
    assert any("boom" in line for line in bad["trace"])
    assert [c[0] for c in calls] == ["good", "bad"] and calls[0][1] == tmp_path / "w"
    assert "gpu-check: bad: FAILED: RuntimeError: boom" in captured.err


def test_a_run_that_passes_exits_0(has_gpu, capsys):
    calls = []
    assert main(["--only", "good"], checks=_fake_checks(calls)) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["status"] == "passed"
        and report["failed"] == []
        and list(report["checks"]) == ["good"]
    )
    assert main(["--only", "unhappy"], checks=_fake_checks(calls)) == 1
    assert json.loads(capsys.readouterr().out)["checks"]["unhappy"]["problems"] == [
        "min cosine 0.5000"
    ]


def test_a_check_whose_package_is_missing_is_skipped_not_failed(has_gpu, capsys):
    """A bare CUDA machine has no TensorRT: its checks are skipped with the reason, the
    rest runs, and the run passes (exit 0) when all that ran passed; a check may also
    skip itself (``Skipped``). Nothing run at all is not a pass (77)."""
    from mclx.gpu_check.workspace import Skipped

    calls = []
    checks = _fake_checks(calls)
    checks["needs_trt"] = Check(checks["bad"].run, "t", lambda: "tensorrt is not installed")

    def later(ws):
        """Finds out it cannot run."""
        raise Skipped("onnxruntime-gpu is not installed")

    checks["later"] = Check(later, "l")
    assert main(["--only", "good,needs_trt,later"], checks=checks) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "passed" and report["ok"] and report["ran"] == ["good"]
    assert report["skipped"] == {
        "needs_trt": "tensorrt is not installed", "later": "onnxruntime-gpu is not installed",
    }  # fmt: skip
    assert report["checks"]["needs_trt"]["status"] == "skipped" and calls == [("good", calls[0][1])]
    assert main(["--only", "needs_trt,later"], checks=checks) == SKIPPED
    assert json.loads(capsys.readouterr().out)["status"] == "skipped"
    assert main(["--only", "needs_trt,unhappy"], checks=checks) == 1


def test_infer_runs_each_installed_backend_on_its_own(monkeypatch, tmp_path):
    """No engine is exported before the other backends run: a backend that is not
    installed is skipped with its reason, one that fails is named, the rest run."""
    from mclx.gpu_check import pipeline
    from mclx.gpu_check.workspace import Workspace

    monkeypatch.setattr(pipeline, "tensorrt_missing", lambda: "tensorrt is not installed")
    monkeypatch.setattr(pipeline, "onnxruntime_cuda_missing", lambda: "CPU build only")
    ran = []

    def infer_one(ws, name, args):
        ran.append(name)
        if name == "torch_cuda":
            raise RuntimeError("exit 1: mclx: error: CUDA out of memory")
        where = {"device": "cpu", "bank_device": "cpu", "tiles": 3, "tiles_per_s": 1.0}
        return where, np.ones((3, 2))

    monkeypatch.setattr(pipeline, "_infer_one", infer_one)
    details, problems = pipeline.infer(Workspace(tmp_path))
    assert ran == ["torch_cpu", "torch_cuda"] and "torch_cpu" in details
    assert problems == ["torch_cuda: RuntimeError: exit 1: mclx: error: CUDA out of memory"]
    assert details["skipped"] == {
        "onnxruntime_cuda": "CPU build only",
        "tensorrt_cuda": "tensorrt is not installed",
        "engine_device_cpu": "tensorrt is not installed",
    }


def test_probe_with_a_gpu_prints_it(has_gpu, capsys):
    assert main(["--probe"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "mclx_gpu_check": 1,
        "status": "gpu",
        "gpus": has_gpu,
    }


def test_engine_batches_and_neighbour_agreement():
    from mclx.gpu_check.pipeline import agreement
    from mclx.gpu_check.workspace import K, batches

    assert batches(32) == [1, 7, 32, 33, 101] and batches(256)[-1] == 773
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(K + 300, 8)).astype(np.float32)
    q = rng.normal(size=(3, 8)).astype(np.float32)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        keys / np.linalg.norm(keys, axis=1, keepdims=True)
    ).T
    idx = np.argsort(-cos, axis=1)[:, :K]
    pred = rng.random((3, 4))
    same = agreement(idx, idx, pred, pred, q, keys)
    assert same["rows_with_other_neighbours"] == 0 and same["all_near_ties"]
    other = idx.copy()
    other[1, -1] = np.argsort(-cos[1])[K + 50]  # clearly not a near-tie
    res = agreement(other, idx, pred * 1.5, pred, q, keys)
    assert res["rows_with_other_neighbours"] == 1 and not res["all_near_ties"]
    assert res["gaps_of_those_rows"][0] > 0 and res["max_pred_rel_err"] > 0.4


def test_workspace_inputs_are_made_on_the_cpu(tmp_path, synthetic):
    """What the GPU checks build their engines and runs from: a DenseNet-121
    checkpoint for the synthetic genes shaped as the default recipe's model (its 461 µm
    wider field of view: 6-channel patches), patches, a bank of it, a pyramidal slide."""
    from mclx.bank import load_bank
    from mclx.checkpoint import read_checkpoint_dict
    from mclx.gpu_check.workspace import Workspace

    ws = Workspace(tmp_path)
    ws.made["data"] = synthetic  # the same synthetic sections, already written
    x = ws.patches(773)
    assert ws.ck().preprocess.views_um == (461.0,) and ws.ck().model_cfg.context_fov_um == 461
    assert x.shape == (773, 224, 224, 6) and x.dtype == np.uint8
    assert len({a.tobytes() for a in x[:400]}) == 400  # distinct images up to 4 x 100 spots
    fp = read_checkpoint_dict(ws.checkpoint())["fingerprint"]
    assert read_checkpoint_dict(ws.checkpoint("other.pt", seed=1))["fingerprint"] != fp
    bank = load_bank(ws.bank())
    assert bank.fingerprint == fp and len(bank) == 300 and bank.k <= len(bank)
    assert ws.slide().stat().st_size > 10_000 and ws.checkpoint() is ws.checkpoint()


def _tiny_checkpoint(ws, name, seed):
    """The workspace's checkpoint with the tiny CNN instead of DenseNet-121."""
    import torch

    from mclx.checkpoint import save_checkpoint
    from mclx.config import ModelCfg, PreprocessCfg
    from mclx.models import create_model

    genes = tuple((ws.data() / "genes.txt").read_text().split())
    torch.manual_seed(seed)
    net = create_model(ModelCfg(encoder="tiny_cnn", n_genes=len(genes), pos_size=(64, 64)))
    save_checkpoint(ws.root / name, net.eval(), preprocess=PreprocessCfg(genes=genes, mpp=0.9))
    return ws.root / name


@pytest.mark.slow
def test_tensorrt_checks_run_on_the_stand_ins(tmp_path, synthetic, monkeypatch):
    """The TensorRT checks' own code (export at max batch 32, engines at 256 and in FP32,
    parity at the profile edges from host and device, the two refusals) on the TensorRT
    11 and CuPy stand-ins with a tiny model: all a GPU run executes, but the GPU."""
    import anndata  # noqa: F401  (imported before the fake cupy: it probes for cupyx)
    import torch
    from helpers import fake_gpu

    import mclx.gpu_check.engines as gc
    import mclx.gpu_check.workspace as gw

    fake_gpu.install(monkeypatch, 11)
    monkeypatch.setattr("mclx.inference.choose.torch_device", lambda d: torch.device(d))
    monkeypatch.setattr(gc, "_busy_null_stream", lambda: None)
    monkeypatch.setattr(gw, "_densenet_checkpoint", _tiny_checkpoint)
    monkeypatch.setattr(gc, "batches", lambda m: [1, m + 1])  # the edges, fewer images
    ws = gw.Workspace(tmp_path)
    ws.made["data"] = synthetic
    seen = {}
    for check in (gc.tensorrt_fp16, gc.tensorrt_fp32, gc.tensorrt_refusals):
        details, problems = check(ws)
        assert problems == [], (check.__name__, problems)
        seen[check.__name__] = details
    fp16 = seen["tensorrt_fp16"]
    assert fp16["export_max_batch_32"]["precision"] == "fp16"
    assert fp16["max_batch_256"]["profile"] == [1, 256]
    assert set(fp16["max_batch_256"]) >= {"batch_257_host", "batch_257_device"}
    assert seen["tensorrt_fp32"]["precision"] == "fp32"
    assert seen["tensorrt_fp32"]["batch_33_device"]["max_rel_err"] < 1e-4
    assert "re-export" in seen["tensorrt_refusals"]["other_checkpoint"]
    assert "describes another engine" in seen["tensorrt_refusals"]["other_build"]


def test_environment_check_runs_on_the_stand_ins(monkeypatch):
    """It runs wherever mclx does, reports the versions it finds and names what is
    missing of the optional GPU packages without failing on it; whichever ONNX Runtime
    build is installed (the CPU one here, the GPU one in a gpu venv)."""
    import torch
    from helpers import fake_gpu

    from mclx.gpu_check.environment import environment
    from mclx.inference.device import onnxruntime_distributions

    fake_gpu.install(monkeypatch, 11)
    info, problems = environment(None)
    assert info["tensorrt"] == "11.4.0.106" and info["cuda_majors"]["cupy"] == 13
    assert info["cupy"] == "14.2.0-fake" and info["numpy"] == np.__version__
    assert info["onnxruntime_distributions"] == onnxruntime_distributions()
    gpu_build = "onnxruntime-gpu" in onnxruntime_distributions()
    assert ("onnxruntime-gpu" in info["optional_missing"]) is not gpu_build
    assert "tensorrt" not in info["optional_missing"]  # the stand-in is there
    assert ("PyTorch sees no CUDA GPU" in problems) is not torch.cuda.is_available()
    assert not [p for p in problems if "CUDAExecutionProvider" in p and not gpu_build]


def test_environment_check_never_fails_on_a_missing_optional_package(monkeypatch):
    """No tensorrt, no cupy (a machine without the gpu extra): every version it can,
    the missing ones named, and no exception."""
    import sys

    from mclx.gpu_check.environment import environment

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "cupy", None)
    info, problems = environment(None)
    assert info["tensorrt"] == "not installed" and info["cupy"] == "not installed"
    assert info["torch"] and info["mclx"] and info["python"]
    assert set(info["optional_missing"]) >= {"cupy"}
    assert not [p for p in problems if "tensorrt" in p.lower() or "cupy" in p.lower()]


# --- the offline wheel set, in a stand-in of the bare CUDA image ------------------------


def _no_isolation() -> list[str]:
    """Build mclx's wheel with this environment's setuptools where it has one (a venv
    of Python >= 3.12 has none: pip then fetches it, as ``make gpu-wheels`` does)."""
    import importlib.util

    return ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A fresh venv that sees only the GPU image's packages (``helpers.image_env``: this
    environment's installs of them, linked), and the offline wheel set installed as
    ``make gpu-check-offline`` installs it: one ``pip install --no-index --no-deps
    --target`` of the pinned list (``toolkit/gpu_check/wheels.txt``, downloaded here for
    this interpreter: the GPU image's is 3.12) and mclx's own wheel. Returns the venv's
    python and the environment that puts the target folder on its path."""
    from helpers.image_env import ROOT, WHEELS, env_without_user_site, make_venv

    root = tmp_path_factory.mktemp("image")
    wheels, site = root / "whl", root / "site"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    steps = [
        [*pip, "download", "--no-deps", "--only-binary=:all:", "-r", WHEELS, "-d", wheels],
        [*pip, "wheel", "--no-deps", *_no_isolation(), "-w", wheels, ROOT],
    ]
    for step in steps:
        res = subprocess.run([str(a) for a in step], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
    python = make_venv(root / "venv")
    found = sorted(str(p) for p in wheels.glob("*.whl"))
    install = [*pip, "install", "--no-index", "--no-deps", "--target", str(site), *found]
    subprocess.run(install, check=True, capture_output=True)
    return python, env_without_user_site(site), site


def _in_image(image, *args, timeout=600):
    python, env, _ = image
    return subprocess.run(
        [str(python), *args], capture_output=True, text=True, env=env, timeout=timeout,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip


def test_image_stand_in_has_only_the_image_packages(image):
    """The stand-in is a real test: without the wheels, mclx and anndata do not import."""
    python, env, _ = image
    bare = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    code = "import importlib.util as u; print([u.find_spec(m) is None for m in {}])"
    mods = ["mclx", "anndata", "scanpy", "openslide", "torch", "numpy", "onnxruntime"]
    res = subprocess.run([str(python), "-c", code.format(mods)], env=bare, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert res.stdout.strip() == str([True, True, True, True, False, False, False])


def test_wheel_set_runs_the_gpu_check_in_the_image(image):
    """``python -m mclx.gpu_check --probe`` and ``--list`` from the installed wheels."""
    _, _, site = image
    where = _in_image(image, "-c", "import mclx; print(mclx.__file__)")
    assert where.stdout.strip().startswith(str(site)), where
    probe = _in_image(image, "-m", "mclx.gpu_check", "--probe")
    assert probe.returncode in (0, SKIPPED), probe.stderr
    assert json.loads(probe.stdout)["status"] in ("gpu", "skipped")
    listed = _in_image(image, "-m", "mclx.gpu_check", "--list")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == list(default_checks())


def test_wheel_set_is_complete_for_the_gpu_path_and_its_tests(image):
    """Everything the checks import: the environment step runs (TensorRT and
    onnxruntime-gpu named as missing, not failed) and the modules of the GPU path
    import (the test modules: the next test)."""
    code = (
        "import json, anndata, scanpy, openslide, hypothesis; "
        "import mclx.cli, mclx.wsi.runtime, mclx.bank, mclx.export.exporter, mclx.data.slide; "
        "import mclx.gpu_check.pipeline, mclx.gpu_check.engines, mclx.kernels.cpu_select; "
        "from mclx.gpu_check.environment import environment; "
        "info, problems = environment(None); print(json.dumps(info, default=str))"
    )
    res = _in_image(image, "-c", code)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["anndata"] != "not installed" and info["scanpy"] != "not installed"
    assert info["tensorrt"] == "not installed" and "tensorrt" in info["optional_missing"]
    assert "onnxruntime-gpu" in info["optional_missing"]


def test_offline_script_installs_the_wheels_and_runs_check_and_tests_in_the_image(image, tmp_path):
    """``toolkit/gpu_check/offline.sh`` end to end with the image's python3 (a stand-in
    whose probe answers "GPU"): the one ``pip install --no-index --no-deps --target``,
    then ``python3 -m mclx.gpu_check`` (77 here: the check's own probe finds no GPU) and
    ``pytest -m gpu tests``, whose every module collects and whose tests skip here."""
    if probe()[0] is not None:
        pytest.skip("this machine has a GPU: the check would run for real (make gpu-check)")
    python, _, site = image
    wheels = site.parent / "whl"
    fake = tmp_path / "python3"
    fake.write_text(
        "#!/bin/bash\n"
        'if [ "$1" = toolkit/gpu_check/probe.py ]; then echo \'{"status": "gpu"}\'; exit 0; fi\n'
        f'if [ "$1 $2" = "-m pip" ]; then exec {sys.executable} "$@"; fi\n'
        f'exec {python} "$@"\n'
    )
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON3": str(fake)}
    env["WHEELS"] = str(wheels)
    script = Path(__file__).resolve().parents[1] / "toolkit/gpu_check/offline.sh"
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    last = res.stderr.strip().splitlines()[-1]
    assert last == "gpu-check-offline: python -m mclx.gpu_check exit 77, pytest -m gpu exit 0"
    assert res.returncode == 1, res.stdout[-3000:]
    assert json.loads(res.stdout.splitlines()[0])["status"] == "skipped"  # no GPU: said so
    assert " skipped, " in res.stdout and "error" not in res.stdout.lower()
    assert (wheels / "site" / "mclx" / "gpu_check" / "runner.py").is_file()
