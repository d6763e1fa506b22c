"""``python -m mclx.gpu_check`` where a CPU can check it: the skip without a GPU (one
JSON line, exit 77), argument handling, the report's format and exit status (with
stand-in checks), and the helpers the GPU checks rely on."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mclx import gpu_check
from mclx.gpu_check import SKIPPED, Check, default_checks, main, probe


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


def test_importing_the_checks_loads_no_gpu_library():
    code = (
        "import sys, mclx.gpu_check, mclx.gpu_checks, mclx.gpu_checks_pipeline; "
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
    monkeypatch.setattr(gpu_check, "probe", lambda: (gpus, None))
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
    good, bad = report["checks"]["good"], report["checks"]["bad"]
    assert good == {"ok": True, "seconds": good["seconds"], "problems": [], "images_per_s": 12.5}
    assert bad["ok"] is False and bad["problems"] == ["RuntimeError: boom second line"]
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


def test_probe_with_a_gpu_prints_it(has_gpu, capsys):
    assert main(["--probe"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "mclx_gpu_check": 1,
        "status": "gpu",
        "gpus": has_gpu,
    }


def test_engine_batches_and_neighbour_agreement():
    from mclx.gpu_checks import K, batches
    from mclx.gpu_checks_pipeline import agreement

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
    checkpoint for the synthetic genes, patches, a bank of it, a pyramidal slide."""
    from mclx.bank import load_bank
    from mclx.checkpoint import read_checkpoint_dict
    from mclx.gpu_checks import Workspace

    ws = Workspace(tmp_path)
    ws.made["data"] = synthetic  # the same synthetic sections, already written
    x = ws.patches(773)
    assert x.shape == (773, 224, 224, 3) and x.dtype == np.uint8
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

    import mclx.gpu_checks as gc

    fake_gpu.install(monkeypatch, 11)
    monkeypatch.setattr("mclx.inference.choose.torch_device", lambda d: torch.device(d))
    monkeypatch.setattr(gc, "_busy_null_stream", lambda: None)
    monkeypatch.setattr(gc, "_densenet_checkpoint", _tiny_checkpoint)
    monkeypatch.setattr(gc, "batches", lambda m: [1, m + 1])  # the edges, fewer images
    ws = gc.Workspace(tmp_path, most=0)
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
    """On this CPU machine it must run and name what is missing for the GPU path."""
    from helpers import fake_gpu

    from mclx.gpu_checks import environment

    fake_gpu.install(monkeypatch, 11)
    info, problems = environment(None)
    assert info["tensorrt"] == "11.4.0.106" and info["cuda_majors"]["cupy"] == 13
    assert info["onnxruntime_distributions"] == ["onnxruntime"]
    assert info["cuda_majors"]["nvrtc"] == 13 and info["cuda_majors"]["torch"] == 13
    assert "ONNX Runtime has no CUDAExecutionProvider" in problems
    assert "PyTorch sees no CUDA GPU" in problems
