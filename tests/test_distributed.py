"""Data-parallel training: global negatives give one process's loss and gradients, and
``mclx train --nproc 2`` ends with the same weights on every process.

All the processes are started by the module's one fixture: two gloo processes that each
take half of a fixed global batch (:mod:`helpers.ddp`), and a short ``--nproc 2`` run.
The reference is the plain single-process loss on the whole batch, in float64.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from helpers import mclx, tiny_train_args
from helpers.ddp import global_batch, small_model, step, trained_grads

from mclx.checkpoint import load_checkpoint

MODELS = ("mclstexp", "bleep")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_runs(synthetic, tmp_path_factory):
    """Every data-parallel launch of the module: the 2-process step and the CLI run."""
    import torch.multiprocessing as mp

    d = tmp_path_factory.mktemp("ddp")
    mp.start_processes(step, args=(2, _port(), str(d)), nprocs=2, start_method="spawn")
    ranks = [dict(np.load(d / f"{r}.npz")) for r in range(2)]
    out = d / "m.pt"
    res = mclx(*tiny_train_args(synthetic, out, "--nproc", "2", epochs=1, batch_size=100))
    return {"ranks": ranks, "cli": res, "ckpt": out}


@pytest.mark.parametrize("name", MODELS)
def test_two_processes_x_64_give_the_loss_and_gradients_of_one_x_128(ddp_runs, name):
    model = small_model(name)
    loss = model.loss(*global_batch())
    loss.backward()
    loss = loss.item()
    want = trained_grads(model)
    for rank, got in enumerate(ddp_runs["ranks"]):
        grads = {k.split("/grad/")[1]: v for k, v in got.items() if k.startswith(f"{name}/grad/")}
        assert grads.keys() == want.keys()
        dloss = abs(float(got[f"{name}/loss"]) - loss)
        dgrad = max(np.abs(grads[k] - want[k]).max() / (np.abs(want[k]).max() + 1e-300)
                    for k in want)  # fmt: skip
        print(f"{name} rank {rank}: loss {loss:.12f} |dloss| {dloss:.2e}; "
              f"max relative gradient difference {dgrad:.2e}")  # fmt: skip
        assert dloss < 1e-12
        for k in want:
            np.testing.assert_allclose(grads[k], want[k], rtol=1e-9, atol=1e-12, err_msg=k)
        # local negatives (each process's 64 alone), what global negatives replace, differ
        assert abs(float(got[f"{name}/local_negatives"]) - loss) > 1e-3


def test_nproc_2_trains_with_equal_weights_on_both_processes(ddp_runs):
    res = ddp_runs["cli"]
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("mclx: trained") == 1, res.stdout  # rank 0 alone reports
    ck = load_checkpoint(ddp_runs["ckpt"])
    dp = ck.provenance["data_parallel"]
    assert dp["processes"] == 2 and dp["backend"] == "gloo"
    assert dp["rank_fingerprints"] == [ck.fingerprint, ck.fingerprint]
    assert len(ck.provenance["loss_history"]) == 1
    assert np.isfinite(ck.provenance["loss_history"]).all()
    assert not ddp_runs["ckpt"].with_name("m.pt.state").exists()
    assert torch.isfinite(next(iter(ck.model.parameters()))).all()
