"""Interruption safety: `mclx train` and `mclx infer` killed mid-run, `mclx train --resume`.

The kills are real signals sent to `python -m mclx` subprocesses, timed on a progress
marker (the training-state file appearing, the progress bar counting tiles), never a
fixed sleep. The rest runs the command line in-process, which is much faster here.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_cli, tiny_train_args

from mclx.checkpoint import load_checkpoint
from mclx.training.train_state import StateFile

EPOCHS = 3  # of two steps each (100 spots, batches of 50)
KILL_EPOCHS = 20  # frozen-encoder epochs are short: time to kill the run after the first


def train_args(data: Path, out: Path, *extra, epochs: int = EPOCHS, frozen: bool = True):
    """The tiny model on S1 in batches of 50, saving its state every epoch (the default
    may skip short ones; ``extra`` comes last and overrides); a frozen encoder by
    default (dropout draws on torch's generator; fine-tuning adds augmentation)."""
    return tiny_train_args(
        data, out, "--save-every", "1", *extra, sections="S1", epochs=epochs, batch_size=50,
        frozen=frozen,
    )  # fmt: skip


def stop_after(monkeypatch, epoch: int) -> None:
    """Make the next in-process run stop as Ctrl-C would, right after ``epoch``."""
    original = StateFile.on_epoch

    def on_epoch(self, done, total, snapshot):
        original(self, done, total, snapshot)
        if done == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(StateFile, "on_epoch", on_epoch)


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp*"))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, different[:5]
    assert load_checkpoint(a).fingerprint == load_checkpoint(b).fingerprint


@pytest.fixture(scope="module")
def reference(synthetic, tmp_path_factory) -> Path:
    """The uninterrupted run that the killed ones must reproduce."""
    from mclx.cli import main

    out = tmp_path_factory.mktemp("reference") / "ref.pt"
    main(train_args(synthetic, out, epochs=KILL_EPOCHS))
    assert out.is_file() and not Path(f"{out}.state").exists()  # no clutter on success
    return out


@pytest.mark.parametrize(
    ("frozen", "epochs", "stop"), [(False, 2, 1), (True, EPOCHS, 2)], ids=["finetune", "frozen"]
)
def test_resume_after_a_stop_gives_the_uninterrupted_weights(
    synthetic, tmp_path, capsys, monkeypatch, frozen, epochs, stop
):
    """Fine-tuning also draws its augmentation from torch's generator."""
    ref = tmp_path / "ref.pt"
    assert run_cli(capsys, train_args(synthetic, ref, epochs=epochs, frozen=frozen)).returncode == 0
    out = tmp_path / "m.pt"
    state = Path(f"{out}.state")
    with monkeypatch.context() as m:
        stop_after(m, stop)
        res = run_cli(capsys, train_args(synthetic, out, epochs=epochs, frozen=frozen))
    assert res.returncode == 130 and res.stderr.strip() == "mclx: error: interrupted"
    assert not out.exists() and not temps(tmp_path)
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == stop and len(saved["history"]) == stop
    assert set(saved["rng"]) == {"torch", "cuda", "numpy", "python", "data"}
    # a frozen encoder's weights are not in the state (they never change)
    assert any(k.startswith("image_encoder.") for k in saved["model"]) is not frozen

    res = run_cli(capsys, train_args(synthetic, out, "--resume", epochs=epochs, frozen=frozen))
    assert res.returncode == 0, res.stderr
    assert_same_weights(out, ref)
    prov = load_checkpoint(out).provenance
    assert prov["loss_history"] == load_checkpoint(ref).provenance["loss_history"]
    assert prov["resumed_at"] == [stop]
    assert not state.exists() and not temps(tmp_path)


def test_save_every_and_a_different_epoch_count(synthetic, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.pt"
    state = Path(f"{out}.state")
    with monkeypatch.context() as m:
        stop_after(m, 3)
        args = train_args(synthetic, out, "--save-every", "2")
        assert run_cli(capsys, args).returncode == 130
    assert torch.load(state, weights_only=True)["epoch"] == 2  # the last saved epoch
    res = run_cli(capsys, train_args(synthetic, out, "--resume", epochs=1))
    assert_one_line_error(res, str(state), "2 epochs are already done", "--epochs 1")
    # --epochs may change on resume, down to the epochs done (or up: extend a run)
    res = run_cli(capsys, train_args(synthetic, out, "--resume", epochs=3))
    assert res.returncode == 0 and not state.exists()
    assert len(load_checkpoint(out).provenance["loss_history"]) == 3
    res = run_cli(capsys, train_args(synthetic, out, "--resume"))
    assert_one_line_error(res, "no training state to resume")
    with monkeypatch.context() as m:
        stop_after(m, 1)
        args = train_args(synthetic, out, "--save-every", "0", epochs=2)
        assert run_cli(capsys, args).returncode == 130
    assert not state.exists()


def test_default_saves_as_often_as_5_percent_of_the_time_allows(tmp_path):
    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

    def run(epoch_s: float, save_s: float, epochs: int = 100) -> list[int]:
        saved = []
        sf = StateFile(tmp_path / "m.pt.state", background=False)
        sf._clock = clock = Clock()

        def save(snap):
            clock.now += save_s
            saved.append(snap["epoch"])

        sf.save = save
        for epoch in range(1, epochs + 1):
            clock.now += epoch_s
            sf.on_epoch(epoch, epochs, lambda e=epoch: {"epoch": e})
        return saved

    assert run(epoch_s=60, save_s=0.2) == list(range(1, 100))  # all but the last
    # 0.7 s epochs, 0.15 s saves: at most one save per 3 s
    assert run(epoch_s=0.7, save_s=0.15)[:4] == [1, 6, 11, 16]


def test_resume_refuses_missing_corrupt_and_mismatched_states(
    synthetic, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "m.pt"
    state = Path(f"{out}.state")
    resume = train_args(synthetic, out, "--resume")
    res = run_cli(capsys, resume)
    assert_one_line_error(res, str(state), "no training state to resume")

    with monkeypatch.context() as m:
        stop_after(m, 1)
        assert run_cli(capsys, train_args(synthetic, out)).returncode == 130
    good = state.read_bytes()
    # other arguments or other data than the saved run: refused, the state kept
    for extra, needle in [
        (["--lr", "1e-3"], "train.lr"),
        (["--seed", "3"], "train.seed"),
        (["--log-base", "e"], "preprocess.log_base"),
    ]:
        res = run_cli(capsys, [*resume, *extra])
        assert_one_line_error(res, str(state), "different arguments", needle)
    res = run_cli(capsys, [*train_args(synthetic, out, "--resume", frozen=False)])
    assert_one_line_error(res, str(state), "different arguments", "freeze_encoder")
    other = [a if a != "S1" else "S1,S2" for a in resume]
    assert_one_line_error(run_cli(capsys, other), str(state), "sections")
    edited = shutil.copytree(synthetic, tmp_path / "edited")  # one count changed
    counts = edited / "data" / "ST-cnts" / "S1.tsv.gz"
    header, first, *rest = gzip.decompress(counts.read_bytes()).decode().splitlines()
    spot, value, *more = first.split("\t")
    first = "\t".join([spot, str(int(value) + 7), *more])
    counts.write_bytes(gzip.compress("\n".join([header, first, *rest, ""]).encode()))
    other = [a.replace(str(synthetic), str(edited)) for a in resume]
    assert_one_line_error(run_cli(capsys, other), str(state), "data")
    res = run_cli(capsys, train_args(synthetic, out, "--resume", epochs=1))
    assert res.returncode == 0  # epochs done == --epochs: just writes the checkpoint
    assert load_checkpoint(out).provenance["epochs"] == 1
    assert not state.exists()

    state.write_bytes(good[: len(good) // 2])
    assert_one_line_error(run_cli(capsys, resume), str(state), "unreadable", "truncated")
    state.write_bytes(b"\x00garbage" * 100)
    assert_one_line_error(run_cli(capsys, resume), str(state), "unreadable")
    shutil.copy(out, state)  # a checkpoint is not a training state
    assert_one_line_error(run_cli(capsys, resume), str(state), "not an mclx training state")
    state.write_bytes(good)
    payload = torch.load(state, weights_only=True)
    del payload["model"][next(iter(payload["model"]))]  # readable, but not this model's
    torch.save(payload, state)
    assert_one_line_error(run_cli(capsys, resume), str(state), "do not fit the model")
    assert not temps(tmp_path)


_CTRL_C_IN_THREAD_START = """
import os, signal, threading
from mclx.training.train_state import _ctrl_c_deferred

signal.signal(signal.SIGINT, signal.default_int_handler)  # CI may start us with it ignored
inside = []
busy = threading.Event()  # another thread running, as torch's and Ray's are
other = threading.Thread(target=busy.wait)
other.start()
try:
    with _ctrl_c_deferred():
        os.kill(os.getpid(), signal.SIGINT)  # to the process: any thread gets it
        for _ in range(1000):  # Python would raise here, between bytecodes
            inside.append(1)
        worker = threading.Thread(target=inside.append, args=("started",))
        worker.start()
        worker.join()
    print("no KeyboardInterrupt")
except KeyboardInterrupt:
    print("KeyboardInterrupt after", len(inside), inside[-1])
finally:
    busy.set()
    other.join()
print("handler restored", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
"""


def test_ctrl_c_while_the_save_thread_starts_is_raised_after_it_started():
    """A Ctrl-C inside ``Thread.start`` used to leave a thread that could not be joined
    ("cannot join thread before it is started", exit 1 instead of 130). Run in a fresh
    interpreter: a process-wide SIGINT inside the long-lived pytest process crashed it
    (SIGSEGV, twice in CI at this test) once earlier tests had loaded native libraries."""
    res = subprocess.run(
        [sys.executable, "-c", _CTRL_C_IN_THREAD_START], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    # the interrupt waited for the thread's start, then came; the handler is restored
    assert res.stdout.split() == ["KeyboardInterrupt", "after", "1001", "started",
                                  "handler", "restored", "True"], res.stdout  # fmt: skip


def test_a_new_run_replaces_a_stale_state_and_cleans_temp_files(synthetic, tmp_path, capsys):
    out = tmp_path / "m.pt"
    state = Path(f"{out}.state")
    state.write_bytes(b"an old interrupted run")
    stale = [tmp_path / ".m.pt.a1b2c3d4.tmp.pt", tmp_path / ".m.pt.state.zz_99xyz.tmp.state"]
    for p in stale:
        p.write_bytes(b"half a file")
    keep = tmp_path / ".other.pt.a1b2c3d4.tmp.pt"  # another output's: not ours to delete
    keep.write_bytes(b"x")
    res = run_cli(capsys, train_args(synthetic, out, epochs=2))
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith("mclx: warning: ") and str(state) in res.stderr
    assert not state.exists() and temps(tmp_path) == [keep.name]


# -- real signals to real processes ------------------------------------------------------


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Mclx:
    """``python -m mclx ARGS`` running in the background, its output collected live."""

    running: list[subprocess.Popen] = []

    def __init__(self, args, cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mclx", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # SIGABRT dumps the stacks
            # a shell running the tests in the background ignores SIGINT, and children
            # inherit that (Python then installs no KeyboardInterrupt handler): give the
            # child the default disposition a user's terminal gives
            preexec_fn=_default_sigint,
        )
        self.running.append(self.proc)
        self.out, self.err = bytearray(), bytearray()
        self.readers = [
            threading.Thread(target=self._pump, args=(s, b), daemon=True)
            for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for t in self.readers:
            t.start()

    @staticmethod
    def _pump(stream, buf: bytearray) -> None:
        while chunk := os.read(stream.fileno(), 65536):
            buf.extend(chunk)

    def wait_for(self, ready, what: str, timeout: float = 240) -> None:
        """Poll ``ready()`` until true; fail if the process ends first or time runs out."""
        end = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"mclx ended before {what} (rc {self.proc.returncode}): {self.stderr}")
            if time.monotonic() > end:
                self.proc.send_signal(signal.SIGABRT)  # where is it stuck?
                self.proc.wait(timeout=60)
                pytest.fail(f"no {what} after {timeout} s: {self.stderr[-4000:]}")
            time.sleep(0.01)

    def kill(self, sig: int) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=120)
        for t in self.readers:
            t.join(timeout=10)
        return rc

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")


@pytest.fixture(autouse=True)
def _no_leftover_process():
    """A failed test must not leave its mclx subprocess running."""
    yield
    while Mclx.running:
        proc = Mclx.running.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


GOOD = b"a complete checkpoint from an earlier run\n"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_training_keeps_the_old_output_and_resumes(
    synthetic, reference, tmp_path, capsys, sig
):
    out = tmp_path / "m.pt"
    state = Path(f"{out}.state")
    out.write_bytes(GOOD)  # an earlier good output must survive the kill untouched
    run = Mclx(train_args(synthetic, out, epochs=KILL_EPOCHS))
    run.wait_for(state.exists, "a training state (one complete epoch)")
    rc = run.kill(sig)
    assert out.read_bytes() == GOOD
    saved = torch.load(state, weights_only=True)  # complete: written atomically
    assert 1 <= saved["epoch"] < KILL_EPOCHS
    if sig == signal.SIGINT:
        assert rc == 130, run.stderr[-4000:]
        assert run.stderr.strip() == "mclx: error: interrupted", run.stderr
        assert not temps(tmp_path)  # Ctrl-C cleans its temporary file up
    else:
        assert rc == -signal.SIGKILL
        # SIGKILL during a state save leaves its temporary file (nothing can clean up
        # after SIGKILL); the next run deletes such files. Make sure there is one.
        assert set(temps(tmp_path)) <= {p.name for p in tmp_path.glob(".m.pt.state.*.tmp.state")}
        (tmp_path / ".m.pt.state.k1ll3d_0.tmp.state").write_bytes(b"torn")
    res = run_cli(capsys, train_args(synthetic, out, "--resume", epochs=KILL_EPOCHS))
    assert res.returncode == 0, res.stderr
    assert_same_weights(out, reference)
    assert load_checkpoint(out).provenance["resumed_at"] == [saved["epoch"]]
    assert not state.exists() and not temps(tmp_path)


@pytest.fixture(scope="module")
def infer_inputs(synthetic, reference, tmp_path_factory):
    """A bank for the reference checkpoint and a slide with many overlapping tiles."""
    from mclx.bank import build_bank, save_bank

    d = tmp_path_factory.mktemp("infer")
    bank = save_bank(build_bank(reference, synthetic, sections=["S1", "S2"]), d / "bank.npz")
    slide = synthetic / "data" / "ST-imgs" / "S" / "S3" / "S3.jpg"
    return slide, bank


TILES = re.compile(r"infer:.*?\|\s*([1-9]\d*)/(\d+)")


def infer_args(infer_inputs, out: Path, *extra):
    """~1,300 overlapping tiles in small batches, the predictions saved every 2 batches."""
    slide, bank = infer_inputs
    return ["infer", slide, "--bank", bank, "--out", out, "--mpp", "0.9", "--stride", "48",
            "--batch-size", "4", "--workers", "1", "--save-every", "2", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def infer_reference(infer_inputs, tmp_path_factory):
    """The uninterrupted run that a killed and resumed one must reproduce."""
    from mclx.cli import main

    out = tmp_path_factory.mktemp("infer_reference") / "ref.h5ad"
    main([str(a) for a in infer_args(infer_inputs, out, "-q")])
    assert out.is_file() and not Path(f"{out}.state").exists()  # no clutter on success
    return ad.read_h5ad(out)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_inference_writes_nothing_and_resumes(
    infer_inputs, infer_reference, tmp_path, capsys, sig
):
    out, state = tmp_path / "pred.h5ad", tmp_path / "pred.h5ad.state"
    out.write_bytes(GOOD)
    run = Mclx([*infer_args(infer_inputs, out), "--plot", "GENE001"], cwd=tmp_path)
    run.wait_for(state.exists, "saved predictions (two batches)")
    run.wait_for(lambda: TILES.search(run.stderr), "tiles on the progress bar")
    done, total = map(int, TILES.findall(run.stderr)[-1])
    assert done < total / 2, "the slide is too small to interrupt mid-run"
    rc = run.kill(sig)
    if sig == signal.SIGINT:
        assert rc == 130 and "Traceback" not in run.stderr
        last = re.split(r"[\r\n]+", run.stderr.strip())[-1]
        assert last == "mclx: error: interrupted", run.stderr[-500:]
    else:
        assert rc == -signal.SIGKILL
    # killed before writing: the old predictions stand, no plot; the saved state stays
    assert out.read_bytes() == GOOD
    names = {p.name for p in tmp_path.iterdir()} - set(temps(tmp_path))
    assert names == {"pred.h5ad", "pred.h5ad.state"}
    with np.load(state) as z:
        saved = int(z["done"])
    assert 8 <= saved < total and saved % 8 == 0  # whole saves of 2 batches of 4
    res = run_cli(capsys, [*infer_args(infer_inputs, out, "-q"), "--resume"])
    assert res.returncode == 0, res.stderr
    pred = ad.read_h5ad(out)
    assert pred.uns["mclx"]["resumed_from_tile"] == saved
    assert list(pred.obs_names) == list(infer_reference.obs_names)
    assert np.array_equal(pred.X, infer_reference.X)  # bit for bit
    assert not state.exists() and not temps(tmp_path)


def test_infer_resume_refuses_other_inputs_and_missing_or_torn_states(
    infer_inputs, tmp_path, capsys
):
    from mclx.wsi.infer_state import InferState

    out = tmp_path / "p.h5ad"
    res = run_cli(capsys, [*infer_args(infer_inputs, out, "-q"), "--resume"])
    assert_one_line_error(res, "p.h5ad.state", "no saved run to resume")
    # a state saved by a run with k=3: resuming with the default k is refused
    state = InferState(tmp_path / "p.h5ad.state")
    state.record = {"k": 3, "batch_size": 4}
    state.save(np.zeros((8, 2), np.float32), 8)
    res = run_cli(capsys, [*infer_args(infer_inputs, out, "-q"), "--resume"])
    assert_one_line_error(res, "p.h5ad.state", "different arguments or data", "k: 3")
    state.path.write_bytes(b"torn")
    res = run_cli(capsys, [*infer_args(infer_inputs, out, "-q"), "--resume"])
    assert_one_line_error(res, "p.h5ad.state", "unreadable", "without --resume")
    assert not out.exists()
