"""What a lab sees on its first afternoon (#29): the messages and progress of the
commands, through the real command line."""

from __future__ import annotations

import re

from helpers import assert_one_line_error, mclx, needs, run_cli


def test_infer_bf16_takes_torch_bf16_and_says_how_much_tissue_it_tiled(
    slide_predictions, tmp_path, capsys
):
    folder = slide_predictions["h5ad"].parent
    out = tmp_path / "bf16.h5ad"
    args = ["infer", slide_predictions["slide"], "--bank", folder / "bank.npz", "--k", 20]
    res = run_cli(capsys, [*args, "--precision", "bf16", "--out", out, "-q"])
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    assert "/bf16" in line and out.is_file()  # was: no encoder backend available for bf16
    share = re.search(r"tiled (\d+)% of the tissue mask", line)
    assert share and 50 <= int(share.group(1)) <= 100, line


def _checkpoint(path):
    """A tiny untrained checkpoint (export needs no training)."""
    import torch

    from mclx.checkpoint import save_checkpoint
    from mclx.config import ModelCfg, PreprocessCfg
    from mclx.models import create_model

    torch.manual_seed(0)
    net = create_model(ModelCfg(encoder="tiny_cnn", n_genes=12, pos_size=(4, 4))).eval()
    pre = PreprocessCfg(genes=tuple(f"G{i}" for i in range(12)), mpp=0.7)
    save_checkpoint(path, net, preprocess=pre)
    return path


def test_export_openvino_without_its_extra_fails_before_any_work(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "nncf", None)  # as if not installed
    ck = _checkpoint(tmp_path / "m.pt")
    res = run_cli(capsys, ["export", "--ckpt", ck, "--openvino", "-q"])
    assert_one_line_error(res, f"{ck}: --openvino needs OpenVINO and NNCF", "-e '.[openvino]'")
    assert "staging" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # nothing exported


def test_export_marks_a_row_that_failed_parity(tmp_path, monkeypatch, capsys):
    import mclx.kernels
    from mclx.export import parity

    real = parity.compare
    calls = []

    def first_fails(reference, got):  # the first row recorded: torch-bf16
        calls.append(1)
        return real(reference, got) | ({"min_cosine": 0.9} if len(calls) == 1 else {})

    monkeypatch.setattr(mclx.kernels, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(parity, "compare", first_fails)
    ck = _checkpoint(tmp_path / "m.pt")
    res = run_cli(capsys, ["export", "--ckpt", ck])
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line for line in res.stdout.splitlines() if "min cosine" in line}
    assert "FAILED parity (cosine < 0.99)" in rows["torch-bf16"]
    assert "--recipe paper" in rows["torch-bf16"] and "->" not in rows["torch-bf16"]
    assert rows["onnx"].endswith(f"-> {tmp_path / 'm.onnx'}")


@needs("openvino")
def test_export_openvino_prints_no_library_noise(tmp_path, synthetic):
    ck = _checkpoint(tmp_path / "m.pt")
    res = mclx("export", "--ckpt", ck, "--openvino", "--calib-data", synthetic)  # a fresh process
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    assert "openvino-int8 int8" in out and "No CUDA runtime" not in out
    assert "WARNING:nncf" not in out and "subset size" not in out


def test_demo_banks_leave_out_the_section_they_predict(tmp_path):
    from mclx import demo

    (tmp_path / "data" / "ST-imgs" / "C" / "C2").mkdir(parents=True)
    (tmp_path / "data" / "ST-imgs" / "C" / "C2" / "C2.jpg").touch()
    steps = {s[0]: s for s in demo.her2st_steps(tmp_path, tmp_path / "m.pt", tmp_path / "b.npz")}
    bank = steps["bank"]
    assert "C2" not in bank[bank.index("--sections") + 1].split(",")
    assert "C2" in str(steps["infer"][1])
    assert steps["train"][steps["train"].index("--epochs") + 1] <= 10  # quick on a laptop
    assert demo.bank_sections("S1,S2,S3,S4", "S3") == "S1,S2,S4"
