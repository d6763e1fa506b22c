"""``mclx export``: the image encoder to ONNX, INT8 and TensorRT, each checked against
PyTorch (:func:`mclx.export.exporter.export`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mclx.cli.options import CONTEXT, ckpt_option, given, quiet_option
from mclx.cli.paths import MclxCommand, path_option


def _derived(params: dict[str, Any]):
    """What the export writes beside the checkpoint (or beside --onnx)."""
    from mclx.export.exporter import export_outputs

    if params.get("ckpt") is None:
        return
    for path in export_outputs(
        params["ckpt"], onnx_path=params.get("onnx_path"), int8=params.get("int8", False),
        openvino=params.get("openvino", False), trt=params.get("trt", False),
    ):  # fmt: skip
        yield "output", f"the export's {path.name}", path


@click.command("export", cls=MclxCommand, derive=_derived, context_settings=CONTEXT)
@ckpt_option()
@path_option(
    "--onnx",
    "onnx_path",
    role="output",
    help="ONNX output (default: beside the checkpoint, same stem).",
)
@click.option("--opset", type=click.IntRange(13), default=17, show_default=True)
@click.option("--int8", is_flag=True, help="Also write <stem>.int8.onnx (static, calibrated).")
@path_option(
    "--calib-data",
    role="input",
    help="her2st folder or folder of images for parity and INT8 calibration "
    "(default: random pixels).",
)
@click.option(
    "--openvino",
    is_flag=True,
    help="Also write <stem>.ov-int8.onnx: INT8 for OpenVINO by NNCF (the openvino extra).",
)
@click.option("--trt", is_flag=True, help="Also build a TensorRT engine (NVIDIA GPU only).")
@click.option("--fp16/--no-fp16", default=True, show_default=True, help="TensorRT FP16.")
@click.option(
    "--max-batch",
    type=click.IntRange(1),
    default=256,
    show_default=True,
    help="Largest batch of the TensorRT optimisation profile.",
)
@quiet_option("Only the final line.")
@click.pass_context
def export_cmd(
    ctx: click.Context, ckpt: Path, onnx_path, int8, calib_data, openvino, trt, quiet, **_
):
    """Export the image encoder to ONNX (and INT8 / TensorRT), checked against PyTorch.

    \b
    Writes model.onnx beside model.pt, then compares it with PyTorch on the same patches:
    FP32 must agree within 1e-4 relative, reduced precisions within cosine 0.99.
    Format options (--opset, --fp16, --max-batch) are refused without their format.
    \b
    Examples:
      mclx export --ckpt model.pt --calib-data ../shared/data/her2st
      mclx export --ckpt model.pt --int8 --calib-data ../shared/data/her2st
      mclx export --ckpt model.pt --openvino --calib-data ../shared/data/her2st
      mclx export --ckpt model.pt --trt --max-batch 128
    """
    from mclx.export.exporter import export
    from mclx.extras import need

    if openvino:  # before minutes of ONNX export and parity
        need("openvino", "nncf", message=f"{ckpt}: --openvino needs OpenVINO and NNCF, not "
             "installed here: .venv/bin/pip install -e '.[openvino]'")  # fmt: skip
    report = export(
        ckpt,
        onnx_path=onnx_path,
        int8=int8,
        calib_data=calib_data,
        openvino=openvino,
        trt=trt,
        log=(lambda *_: None) if quiet else click.echo,
        progress=not quiet,
        **given(ctx, "opset", "fp16", "max_batch"),
    )
    click.echo(f"mclx: exported {ckpt} (fingerprint {report['fingerprint']})")
