"""What a lab sees on its first afternoon (#29): the messages and progress of the
commands, through the real command line."""

from __future__ import annotations

import re

from helpers import run_cli


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
