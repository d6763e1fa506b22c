"""Nothing a user has is destroyed (SPEC section 8, issue 25): every command's declared
outputs are refused, before any work, when they resolve to one of its inputs or to
another output, whatever the spelling (same path, hard link, symlink).

The property test enumerates the commands of the click group and the path parameters
each one declares (:mod:`mclx.cli.paths`), so a command or option added later is
covered without a test of its own."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import click
import pytest
from helpers.cli import assert_one_line_error, run_cli

from mclx.cli import cli
from mclx.cli.paths import MclxCommand, same_file

CONTENT = b"the user's file: never written over\n"


def commands(group: click.Group = cli, prefix: tuple[str, ...] = ()):
    """(command path, command) for every command of the group, sub-groups included."""
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def role_params(cmd: click.Command) -> list[click.Parameter]:
    return [p for p in cmd.params if getattr(p, "role", None)]


def _cases():
    for path, cmd in commands():
        params = role_params(cmd)
        outputs = [p for p in params if p.role != "input"]
        for out in outputs:
            for other in params:
                if other is out or (
                    other.role != "input" and params.index(other) < params.index(out)
                ):
                    continue
                yield pytest.param(
                    path, out.name, other.name, id=f"{' '.join(path)}:{out.name}={other.name}"
                )


CASES = list(_cases())
SPELLINGS = ["same", "hardlink", "symlink"]


def test_every_command_is_checked_and_declares_its_paths():
    """No command can skip the check: each is an MclxCommand, and each that writes a
    file declares an output (bank info and the group only read)."""
    found = dict(commands())
    assert {" ".join(p) for p in found} >= {
        "train", "evaluate", "bank build", "bank info", "export", "infer", "view", "analyze"
    }  # fmt: skip
    read_only = {("bank", "info"), ("cache", "info"), ("cache", "clear")}  # no file out
    for path, cmd in found.items():
        assert isinstance(cmd, MclxCommand), path
        if path not in read_only:
            assert any(p.role != "input" for p in role_params(cmd)), path
    assert len(CASES) >= 25


def _argv(path: tuple[str, ...], cmd: click.Command, values: dict[str, Path]) -> list[str]:
    """The command line setting ``values``, and a fresh missing path for every other
    required parameter (never read: the check comes first)."""
    argv = list(path)
    for p in cmd.params:
        value = values.get(p.name)
        if value is None and not p.required:
            continue
        value = value or values["_dir"] / f"missing_{p.name}"
        argv += [str(value)] if isinstance(p, click.Argument) else [p.opts[0], str(value)]
    return argv


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize(("path", "out_name", "other_name"), CASES)
def test_an_output_at_an_input_or_another_output_is_refused(
    tmp_path, capsys, monkeypatch, path, out_name, other_name, spelling
):
    monkeypatch.chdir(tmp_path)
    cmd = dict(commands())[path]
    target = tmp_path / "users_file"
    target.write_bytes(CONTENT)
    other = target
    if spelling == "hardlink":
        other = tmp_path / "hard_link"
        os.link(target, other)
    elif spelling == "symlink":
        other = tmp_path / "sym_link"
        other.symlink_to(target)
    before = sorted(os.listdir(tmp_path))
    argv = _argv(path, cmd, {out_name: other, other_name: target, "_dir": tmp_path})
    res = run_cli(capsys, argv)
    assert_one_line_error(res, "would")
    assert target.read_bytes() == CONTENT
    assert sorted(os.listdir(tmp_path)) == before


# the cases issue 25 names, and outputs the commands derive rather than take


def _refused(capsys, tmp_path, argv, *needles, keep=()):
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    res = run_cli(capsys, argv)
    assert_one_line_error(res, "would", *needles)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("slide.png", "m.pt", "b.npz", "m.onnx"):
        (tmp_path / name).write_bytes(CONTENT)
    return tmp_path


def test_issue_25_cases(files, capsys):
    _refused(
        capsys, files, ["infer", "slide.png", "--bank", "b.npz", "--out", "slide.png"], "--out"
    )
    _refused(capsys, files, ["bank", "build", "--ckpt", "m.pt", "--out", "m.pt"], "--ckpt")
    _refused(capsys, files, ["infer", "slide.png", "--bank", "b.npz", "--out", "p.h5ad",
                             "--geojson", "p.h5ad"], "--geojson")  # fmt: skip
    _refused(capsys, files, ["infer", "slide.png", "--bank", "b.npz", "--out", "p.h5ad",
                             "--spatialdata", "p.h5ad"], "--spatialdata")  # fmt: skip
    (files / "v").mkdir()
    (files / "v" / "a.h5ad").write_bytes(CONTENT)
    _refused(capsys, files, ["view", "v/a.h5ad", "--out", "v"], "PREDICTIONS")
    _refused(capsys, files, ["view", "v/a.h5ad", "--out", "."], "PREDICTIONS")


def test_derived_outputs_are_checked(files, capsys):
    # export writes <stem>.onnx beside the checkpoint: here the checkpoint itself
    _refused(capsys, files, ["export", "--ckpt", "m.onnx"], "m.onnx")
    _refused(capsys, files, ["export", "--ckpt", "m.pt", "--calib-data", "m.onnx"], "m.onnx")
    # infer's default output, SLIDE stem + .pred.h5ad, and its state file
    (files / "slide.pred.h5ad").write_bytes(CONTENT)
    _refused(capsys, files, ["infer", "slide.png", "--bank", "slide.pred.h5ad"], "--out")
    _refused(capsys, files, ["infer", "slide.png", "--bank", "b.npz", "--out", "x.h5ad",
                             "--spots", "x.h5ad.state"], "state")  # fmt: skip
    # a cohort's DIR/STEM.pred.h5ad and summary.csv
    _refused(capsys, files, ["infer", "slide.png", "m.pt", "--bank", "slide.pred.h5ad",
                             "--out-dir", "."], "slide.png")  # fmt: skip
    _refused(capsys, files, ["infer", "slide.png", "m.pt", "--bank", "b.npz", "--spots",
                             "summary.csv", "--out-dir", "."], "summary")  # fmt: skip
    # train's OUT.state, evaluate's default JSON and the files beside it
    _refused(capsys, files, ["train", "--out", "m.pt", "--genes", "m.pt.state"], "state")
    (files / "evaluate_bleep.json").write_bytes(CONTENT)
    _refused(capsys, files, ["evaluate", "--model", "bleep", "--genes", "evaluate_bleep.json"])
    _refused(capsys, files, ["evaluate", "--out", "r.json", "--bank", "r.genes.csv"], "CSV")


def test_the_checkpoint_a_bank_records_is_an_input(files, capsys):
    """Without --model, infer reads the checkpoint the bank names: not an output."""
    import numpy as np

    np.savez(files / "rec.npz", checkpoint=np.array(str(files / "m.pt")))
    _refused(capsys, files, ["infer", "slide.png", "--bank", "rec.npz", "--out", "m.pt"],
             "the bank's checkpoint")  # fmt: skip


def test_same_file_by_inode_name_and_not_yet_written(tmp_path):
    a = tmp_path / "a"
    a.write_bytes(CONTENT)
    os.link(a, tmp_path / "h")
    (tmp_path / "s").symlink_to(a)
    assert same_file(a, tmp_path / "h") and same_file(a, tmp_path / "s")
    assert same_file(tmp_path / "new", tmp_path / "." / "new")  # neither exists yet
    assert not same_file(a, tmp_path / "b")
    for x, y in itertools.combinations([a, tmp_path / "h", tmp_path / "s"], 2):
        assert same_file(y, x)


def test_different_files_still_run_to_their_own_errors(files, capsys):
    """The check refuses only collisions: distinct paths reach the command's own checks."""
    res = run_cli(capsys, ["bank", "build", "--ckpt", "m.pt", "--out", "out.npz", "--data", "."])
    assert res.returncode != 0
    assert "would" not in res.stderr
    assert not (files / "out.npz").exists()
