"""Data parallel on the CPU with gloo: two ranks under torchrun hold
bitwise-identical weights after K steps, equal (to float rounding) to one
process trained on the combined batch; ``convspec train --nproc-per-node``
starts the same ranks, and says in one line which one failed."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import convspec
from convspec.cli import main
from runtime import checkpoint as ckpt
from runtime import distributed as D
from runtime import runs
from runtime.train import TrainOptions, train

from test_train import PARAMS, SPEC, make_data

ROOT = Path(__file__).resolve().parents[1]

# Without dropout, the two ranks' randomness cannot differ from one process's: the flips are drawn for each
# global batch and each rank takes its share.
NO_RANDOM = SPEC.replace("[drop]\ntype=dropout2\ninputs=fc1\n", "").replace("inputs=drop", "inputs=fc1")

NEEDS_GLOO = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch has no gloo backend")


def write_spec(tmp_path: Path, text: str = NO_RANDOM) -> Path:
    """tiny.cfg and its params file beside it."""
    spec = tmp_path / "tiny.cfg"
    spec.write_text(text)
    (tmp_path / "tiny.params.cfg").write_text(PARAMS)
    return spec


DRIVER = """
import sys, torch
from runtime.train import Trainer, TrainOptions
import runtime.distributed as D
spec, data, out = sys.argv[1:4]
t = Trainer(TrainOptions(spec=spec, data=data, out=out, epochs=2, batch_size=32, progress=False,
                         overrides=["train.flip=1"], echo=lambda s: None))
t.run()
torch.save({k: v.detach().clone() for k, v in t.net.state_dict().items()}, f"{out}-rank{t.cluster.rank}.pt")
D.teardown(t.cluster)
"""


@NEEDS_GLOO
def test_two_gloo_ranks_match_one_process_on_the_combined_batch(tmp_path):
    spec = write_spec(tmp_path)
    data = make_data(tmp_path / "data")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(driver), str(spec), str(data), str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # convspec's own launcher, given the same command, starts the same two ranks: the same weights, bitwise.
    launched = tmp_path / "launched"
    proc = subprocess.run([sys.executable, "-m", "convspec", "train", str(spec), "--data", str(data), "--out",
                           str(launched), "--epochs", "2", "--batch-size", "32", "--set", "train.flip=1", "--quiet",
                           "--nproc-per-node", "2"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"starting 2 ranks (2 on this machine, 1 thread each); rank 1 writes to "
                                  f"{launched}/ranks/\n"), proc.stdout
    assert proc.stdout.count("\nepoch ") == 2 and f"done: {launched}  val top-1 " in proc.stdout  # rank 0 only
    assert "Traceback" not in proc.stderr and "torch/distributed" not in proc.stderr, proc.stderr
    by_launcher = ckpt.load(launched / "epoch-0002.pt")
    assert by_launcher["options"]["world"] == 2
    by_torchrun = ckpt.load(out / "epoch-0002.pt")["model"]
    assert by_launcher["model"].keys() == by_torchrun.keys()
    assert all(torch.equal(by_launcher["model"][k], by_torchrun[k]) for k in by_torchrun)
    # Resumed on another number of ranks, a net without dropout goes on with the same batches and updates
    # (a rank that was lost need not end the run): on one process it ends where two ranks end, to rounding.
    shutil.copytree(launched, tmp_path / "on-one")
    result = CliRunner().invoke(main, ["train", "--resume", "--out", str(tmp_path / "on-one"), "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert ("note: the run was trained on 2 ranks and resumes on 1: the same batches and updates (its net has no "
            "dropout), with each batch's gradient summed in another order, so equal up to float rounding") in result.output
    proc = subprocess.run([sys.executable, "-m", "convspec", "train", "--resume", "--out", str(launched), "--epochs",
                           "3", "--quiet", "--nproc-per-node", "2"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    on_one, on_two = (ckpt.load(run / "epoch-0003.pt")["model"] for run in (tmp_path / "on-one", launched))
    for k in on_two:
        torch.testing.assert_close(on_one[k], on_two[k], rtol=1e-4, atol=1e-6)
    # A resume keeps its batch: the advice is about the ranks (--batch-size, once given, was then refused).
    result = CliRunner().invoke(main, ["train", "--resume", "--out", str(launched), "--epochs", "4",
                                       "--nproc-per-node", "3"])
    assert (result.exit_code, result.stderr) == (1, "error: the run's batch of 32 does not split over 3 ranks; "
                                                    "resume it on a number of ranks that divides 32\n")
    rank0 = torch.load(f"{out}-rank0.pt", weights_only=True)
    rank1 = torch.load(f"{out}-rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # bitwise

    state = ckpt.load(out / "epoch-0002.pt")
    assert state["options"]["world"] == 2 and state["step"] == 2 * (144 // 32)
    single = train(TrainOptions(spec=str(spec), data=str(data), out=str(tmp_path / "one"), epochs=2, batch_size=32,
                                progress=False, overrides=["train.flip=1"], echo=lambda s: None))
    alone = ckpt.load(single.last_checkpoint)["model"]
    for k in rank0:
        torch.testing.assert_close(rank0[k], alone[k], rtol=1e-4, atol=1e-6)
    torch.manual_seed(0)  # the runs' seed: their initial weights
    initial = convspec.build(str(spec)).state_dict()
    assert all((rank0[k] - initial[k]).abs().max() > 1e-3 for k in rank0 if k.endswith("weight"))  # it trained
    assert torch.equal(state["model"]["fc2.weight"], rank0["fc2.weight"])
    # The metrics agree too: the ranks' sums are reduced before they are recorded.
    ddp_loss = state["history"][-1]["train_loss"]
    assert abs(ddp_loss - ckpt.load(single.last_checkpoint)["history"][-1]["train_loss"]) < 1e-4


# Rank 1 of a launched run fails on its own (as a GPU that runs out of memory would): the launcher's one line
# names the rank, what it said last and the file with all it said.
FAIL_ON_RANK_1 = """import os, sys
if os.environ.get("RANK") == "1":
    sys.stderr.write("something only rank 1 met\\n")
    sys.stderr.flush()
    os._exit(7)
"""


def _launch_two_ranks_with(sitecustomize: str, tmp_path: Path, epochs: int):
    """convspec train --nproc-per-node 2 on the tiny net, with code run as each rank's Python starts."""
    spec = write_spec(tmp_path)
    data = make_data(tmp_path / "data")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(sitecustomize)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "convspec", "train", str(spec), "--data", str(data), "--out", str(run),
                           "--epochs", str(epochs), "--quiet", "--nproc-per-node", "2"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc, run


def _signal_after_the_first_checkpoint(rank: int, name: str) -> str:
    """Code for each rank's Python to run as it starts: rank ``rank`` sends itself signal ``name``
    once the first epoch's checkpoint is on disk (not in a resumed run)."""
    return f"""import os, signal, sys, threading, time
from pathlib import Path
if os.environ.get("RANK") == "{rank}" and "--resume" not in sys.argv:
    def signal_after_the_first_checkpoint():
        run = Path(sys.argv[sys.argv.index("--out") + 1])
        while not (run / "epoch-0001.pt").exists():
            time.sleep(0.02)
        os.kill(os.getpid(), signal.{name})
    threading.Thread(target=signal_after_the_first_checkpoint, daemon=True).start()
"""


KILL_RANK_1_AFTER_EPOCH_1 = _signal_after_the_first_checkpoint(1, "SIGKILL")  # as the kernel's OOM killer does


@NEEDS_GLOO
def test_a_rank_killed_from_outside_says_how_to_continue(tmp_path):
    proc, run = _launch_two_ranks_with(KILL_RANK_1_AFTER_EPOCH_1, tmp_path, epochs=200)
    assert proc.returncode == 1, proc.stderr
    [log] = (run / "ranks").glob("*/attempt_0/1/stderr.log")
    assert proc.stderr.splitlines()[-1] == (
        f"rank 1: killed by SIGKILL (out of memory?); all of its output: {log}; continue from the last checkpoint "
        f"with: convspec train --resume --out {run} --nproc-per-node 2")


def test_a_rank_killed_after_the_run_finished_is_not_told_to_continue(tmp_path, monkeypatch):
    """A rank killed just as the run ended was told to continue it, and the resume then said
    the run had finished.  The ranks are stood in for by one process that finishes the run."""
    spec, data, run = write_spec(tmp_path), make_data(tmp_path / "data"), tmp_path / "run"

    def finish_then_lose_rank_1(argv, nproc, log_dir, *rest):
        train(TrainOptions(spec=str(spec), data=str(data), out=str(run), epochs=1, progress=False,
                           echo=lambda s: None))
        return D.RankFailure(rank=1, exit_code=-9, output=None)
    monkeypatch.setattr(D, "launch", finish_then_lose_rank_1)
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(data), "--out", str(run), "--epochs", "1",
                                    "--nproc-per-node", "2"])
    assert res.exit_code == 1, res.output
    assert res.stderr.splitlines()[-1] == (f"rank 1: killed by SIGKILL (out of memory?); the run had already finished "
                                           f"(epoch 1 of 1): {run} is complete")


def test_convspecs_own_rank_statuses_are_not_the_launchers(tmp_path, monkeypatch):
    """A machine whose rank lost contact with another exited 75, a status the README does not list."""
    spec, data, log = write_spec(tmp_path), make_data(tmp_path / "data"), tmp_path / "stderr.log"
    log.write_text("too few images here\n")
    for failure, said in [
        (D.RankFailure(rank=2, exit_code=D.LOST_A_RANK, output=None),
         "rank 2: lost contact with another rank, which stopped without a message here (on another machine? its own "
         "output says why)"),
        (D.RankFailure(rank=1, exit_code=D.STOPPED_ON_AN_ERROR, output=str(log)),
         f"rank 1: too few images here; all of its output: {log}"),
    ]:
        monkeypatch.setattr(D, "launch", lambda *args, failure=failure: failure)
        res = CliRunner().invoke(main, ["train", str(spec), "--data", str(data), "--out", str(tmp_path / "run"),
                                        "--nproc-per-node", "2"])
        assert (res.exit_code, res.stderr.splitlines()[-1]) == (1, said)


@NEEDS_GLOO
def test_a_nan_loss_on_two_ranks_is_said_once(tmp_path):
    """Every rank stops on a NaN together; rank 1's copy of the error once followed rank 0's
    as "rank 1: error: loss became nan ...", which read as rank 1's fault.  Which rank the
    agent sees stop first was a race that this run may not lose, so the test below pins
    the rule itself."""
    spec = write_spec(tmp_path)
    data = make_data(tmp_path / "data")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "convspec", "train", str(spec), "--data", str(data), "--out",
                           str(tmp_path / "run"), "--epochs", "2", "--quiet", "--nproc-per-node", "2",
                           "--set", "fc2.epsW=1e6"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "loss became" in line]
    assert len(said) == 1 and said[0].startswith("error: loss became ") and "fc2.epsW=..." in said[0], proc.stderr
    assert "rank 1" not in proc.stderr


def test_an_error_every_rank_reaches_is_left_to_rank_0(monkeypatch, capsys):
    """Which rank the agent sees stop first is a race; rank 1's copy of a shared error is
    marked by its exit status, so the launcher names rank 0, which said it already."""
    from types import SimpleNamespace as Failure

    from convspec.cli import _guard
    from convspec.errors import SpecError

    shared = SpecError("loss became nan at step 3 (epoch 1); ...")
    shared.every_rank = True
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    monkeypatch.setenv(D.LAUNCHER_ENV, "--nproc-per-node 2")
    # Under torchrun alone (no convspec launcher) every rank exits 1, as documented.
    for rank, launched, status in (("1", True, D.STOPPED_WITH_RANK_0), ("0", True, 1), ("1", False, 1)):
        monkeypatch.setenv("RANK", rank)
        if not launched:
            monkeypatch.delenv(D.LAUNCHER_ENV)
        with pytest.raises(SystemExit) as stop:
            _guard(Failure(obj=None), lambda: (_ for _ in ()).throw(shared))
        assert stop.value.code == status
    assert capsys.readouterr().err.count("error: loss became nan") == 3  # each rank's own output keeps it
    # An error rank 1 met on its own (before training: most likely every rank's) is marked too, otherwise.
    monkeypatch.setenv(D.LAUNCHER_ENV, "--nproc-per-node 2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as stop:
        _guard(Failure(obj=None), lambda: (_ for _ in ()).throw(SpecError("too few images")))
    assert stop.value.code == D.STOPPED_ON_AN_ERROR
    # Rank 1 stopped first by the clock, with the shared error: rank 0 is named.
    assert D.first_to_stop({0: Failure(exitcode=1, timestamp=6), 1: Failure(exitcode=D.STOPPED_WITH_RANK_0,
                                                                           timestamp=5)}) == 0


@NEEDS_GLOO
def test_a_rank_that_fails_is_named_in_one_line_with_its_output_file(tmp_path):
    proc, run = _launch_two_ranks_with(FAIL_ON_RANK_1, tmp_path, epochs=1)
    assert proc.returncode == 7, proc.stderr
    [log] = (run / "ranks").glob("*/attempt_0/1/stderr.log")
    assert proc.stderr == f"rank 1: something only rank 1 met; all of its output: {log}\n"
    assert log.read_text() == "something only rank 1 met\n"
    # The folder holds nothing but the ranks' logs, so the same --out can be used again.
    assert sorted(p.name for p in run.iterdir()) == ["ranks"]
    runs.check_can_create(run)


LAUNCH_ERRORS = [
    (["--nnodes", "2"], "error: --nnodes 2: give --rdzv-endpoint HOST:PORT, node 0's address and a free port, the "
                        "same on every machine"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "10.0.0.1:29500"],
     "error: --node-rank 2 is not below --nnodes 2; number the machines 0 to 1"),
    (["--rdzv-endpoint", "10.0.0.1:29500"],
     "error: --rdzv-endpoint is where several machines meet; give --nnodes too, or leave it out"),
    (["--nnodes", "2", "--rdzv-endpoint", "10.0.0.1"],
     "error: --rdzv-endpoint 10.0.0.1: expected HOST:PORT, e.g. 10.0.0.1:29500"),
    (["--nnodes", "2", "--rdzv-endpoint", "10.0.0.1:99999"],
     "error: --rdzv-endpoint 10.0.0.1:99999: port 99999 is not a port (1 to 65535); give node 0's free port, "
     "e.g. 29500"),
    # .invalid is reserved never to resolve (RFC 2606): the ranks waited ten minutes for it.
    (["--nnodes", "2", "--rdzv-endpoint", "nohost.invalid:29500"],
     "error: --rdzv-endpoint nohost.invalid:29500: cannot find the host nohost.invalid ({reason}); check the "
     "name, or give node 0's IP address"),
]


@pytest.mark.parametrize("options, message", LAUNCH_ERRORS, ids=[m[7:40] for _, m in LAUNCH_ERRORS])
def test_launch_options_that_cannot_work_are_one_line_before_any_rank_starts(tmp_path, options, message):
    spec = write_spec(tmp_path)
    result = CliRunner().invoke(main, ["train", str(spec), "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                                       "--nproc-per-node", "2", *options])
    if "{reason}" in message:  # the resolver's own words differ between systems
        try:
            socket.getaddrinfo("nohost.invalid", 29500)
        except socket.gaierror as err:
            message = message.format(reason=err.strerror)
        else:
            pytest.skip("this resolver answers for .invalid names")
    assert (result.exit_code, result.stderr, result.stdout) == (1, message + "\n", "")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options, message", [
    (["--nnodes", "2"], "error: --nnodes, --node-rank and --rdzv-endpoint place the ranks --nproc-per-node N "
                        "starts; give --nproc-per-node too"),
    (["--nproc-per-node", "2"], "error: --nproc-per-node starts the ranks itself; under torchrun, leave it out"),
])
def test_launch_options_out_of_place(tmp_path, monkeypatch, options, message):
    if "--nproc-per-node" in options:  # as torchrun's ranks see it
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(main, ["train", "spec.cfg", "--data", str(tmp_path), *options])
    assert (result.exit_code, result.stderr) == (1, message + "\n")


@pytest.mark.parametrize("gpus, options, message", [
    (2, ["--devices", "cuda:0,cuda:1"], "error: --devices cuda:0,cuda:1 with --nproc-per-node: each rank takes its "
     "own GPU (local rank r uses cuda:r); leave --devices out, and choose the GPUs with CUDA_VISIBLE_DEVICES"),
    (2, ["--nproc-per-node", "4"], "error: --nproc-per-node 4: this machine has 2 GPUs, one per rank; use at most 2"),
])
def test_launch_on_gpus_refuses_what_cannot_work(tmp_path, monkeypatch, gpus, options, message):
    # A machine with GPUs, as far as the checks can tell: the refusals come before any rank starts.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    spec = write_spec(tmp_path)
    nproc = [] if "--nproc-per-node" in options else ["--nproc-per-node", "2"]
    result = CliRunner().invoke(main, ["train", str(spec), "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                                       *nproc, *options])
    assert (result.exit_code, result.stderr) == (1, message + "\n")
    assert not (tmp_path / "run").exists()


@NEEDS_GLOO
def test_a_taken_port_for_the_machines_to_meet_is_one_line(tmp_path, monkeypatch):
    """A port in use on node 0 (another program, or two machines both given --node-rank 0) was
    "unexpected DistNetworkError ... This is a convspec bug" (exit 3)."""
    # The launcher runs in this process here and sets these for its ranks: undone after the test.
    monkeypatch.setenv(D.LAUNCHER_ENV, "")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads())))
    spec, data = write_spec(tmp_path), make_data(tmp_path / "data")
    with socket.socket(socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET) as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["train", str(spec), "--data", str(data), "--out", str(tmp_path / "run"),
                                           "--nproc-per-node", "1", "--nnodes", "2", "--node-rank", "0",
                                           "--rdzv-endpoint", f"localhost:{port}"])
    assert (result.exit_code, result.stderr.splitlines()[-1]) == (1, (
        f"error: --rdzv-endpoint localhost:{port}: port {port} is in use on this machine (by another program, or by "
        "another machine's launch also given --node-rank 0); choose a free port, the same on every machine, and "
        "give each machine its own --node-rank"))


@NEEDS_GLOO
def test_machines_started_with_other_settings_are_refused_on_each(tmp_path):
    """Each machine runs its own command: node 1 with another --seed trained on the wrong shard
    without a word, and with another --epochs the run ended in gloo's collective-mismatch abort."""
    spec, data = write_spec(tmp_path), make_data(tmp_path / "data")
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    node = lambda rank, *extra: [sys.executable, "-m", "convspec", "train", str(spec), "--data", str(data), "--out",
                                 str(tmp_path / f"run{rank}"), "--quiet", "--epochs", "1", "--nproc-per-node", "1",
                                 "--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", f"localhost:{port}",
                                 *extra]
    other = subprocess.Popen(node(1, "--seed", "7"), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    first = subprocess.run(node(0), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    _, other_err = other.communicate(timeout=300)
    said = ("error: rank 1 was started otherwise than rank 0: --seed is 7 there and 0 on rank 0; start every machine "
            "with the same command and data (only --node-rank differs)\n")
    assert (first.returncode, first.stderr) == (1, said)
    assert (other.returncode, other_err) == (1, said)


def test_resuming_on_a_machine_without_the_run_folder_says_each_machine_needs_it(tmp_path):
    """A machine's own --out holds only its ranks' logs: node 1 was told the run "stopped before its
    first epoch ended; start it again without --resume", while node 0 waited for it."""
    spec, run = write_spec(tmp_path), tmp_path / "run"
    (run / "ranks").mkdir(parents=True)
    result = CliRunner().invoke(main, ["train", str(spec), "--data", str(tmp_path), "--out", str(run), "--resume",
                                       "--nproc-per-node", "1", "--nnodes", "2", "--node-rank", "1",
                                       "--rdzv-endpoint", "10.0.0.1:29500"])
    assert (result.exit_code, result.stderr) == (1, (
        f"error: {run}: holds no checkpoint on this machine; every machine of a multi-machine run resumes from the "
        "run's checkpoints, so each needs the run folder (one on a shared file system, or a copy of node 0's)\n"))


def test_machines_that_never_meet_are_one_line():
    """torchrun's own words after its 900 s wait (torch 2.13), as convspec says them."""
    from runtime.distributed import rendezvous_problem

    waited = torch.distributed.DistStoreError("Timed out after 901 seconds waiting for clients. 1/2 clients joined.")
    assert rendezvous_problem(waited, "host0:29500", 2, 0) == (
        "waited 901 s at host0:29500 for the other machines, and 1 of 2 joined; start convspec train on the others "
        "with --node-rank 1 to 1 and the same --rdzv-endpoint, --nnodes and --nproc-per-node")
    client = torch.distributed.DistNetworkError("The client socket has timed out after 900000ms while trying to "
                                                "connect to (host0, 29500).")
    assert rendezvous_problem(client, "host0:29500", 2, 1) == (
        "waited for node 0 at host0:29500, which never answered; start convspec train with --node-rank 0 on the "
        "machine host0:29500 names (only one machine has --node-rank 0)")
    assert rendezvous_problem(torch.distributed.DistError("something else"), "host0:29500", 2, 1) is None


@NEEDS_GLOO
@pytest.mark.parametrize("signum", [2, 15], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_while_waiting_for_the_other_machines_stops_at_once(tmp_path, signum):
    """torchrun's agent waits for the other nodes inside C++, where Python raises no
    KeyboardInterrupt: Ctrl-C went unseen until the 900 s rendezvous timeout; SIGTERM
    ended the launcher without a word."""
    import signal
    import socket
    import time

    spec = write_spec(tmp_path)
    data = make_data(tmp_path / "data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The child takes Ctrl-C as a terminal's foreground job does (see tests/test_data.py's _GATED_PREPARE).
    child = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "from convspec.cli import main; sys.exit(main())")
    proc = subprocess.Popen([sys.executable, "-c", child, "train", str(spec), "--data", str(data),
                             "--out", str(tmp_path / "run"), "--quiet", "--nproc-per-node", "1", "--nnodes", "2",
                             "--node-rank", "0", "--rdzv-endpoint", f"127.0.0.1:{port}"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    assert first.startswith("starting 2 ranks (1 on node 0 of 2"), first
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # into the wait: node 0's store listens for the other machine
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    proc.send_signal(signum)
    start = time.monotonic()
    try:
        stderr = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert time.monotonic() - start < 30
    assert proc.returncode == 128 + signum and D.STOPPED_WAITING == 130
    assert stderr.strip() == (f"{signal.Signals(signum).name}: stopped while waiting for the machines to meet at "
                            f"127.0.0.1:{port}; no rank had started, so nothing was trained or saved")


def test_a_missing_data_path_is_one_error_and_starts_no_rank(tmp_path):
    spec = write_spec(tmp_path)
    result = CliRunner().invoke(main, ["train", str(spec), "--data", str(tmp_path / "nodata"), "--nproc-per-node", "2",
                                       "--out", str(tmp_path / "run")])
    assert (result.exit_code, result.stdout, result.stderr) == (
        1, "", f"{tmp_path / 'nodata'}: no such dataset path; give a prepared store, a CIFAR python folder, or an "
               "image folder with one sub-folder per class\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("launched, status, stderr", [
    ("--nproc-per-node 2", D.LOST_A_RANK, ""),  # the launcher names the rank that stopped first
    (None, 1, "error: rank 0 lost contact with another rank ([../third_party/gloo/transport/tcp/pair.cc:537] Read "
              "error [127.0.0.1]:52611: Connection reset by peer); that rank's own output says why it stopped\n"),
])
def test_a_rank_that_loses_another_says_so_without_blaming_convspec(monkeypatch, launched, status, stderr):
    import runtime.train

    def lost(options):
        raise RuntimeError("[../third_party/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:52611: "
                           "Connection reset by peer")

    monkeypatch.setattr(runtime.train, "train", lost)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    if launched:
        monkeypatch.setenv(D.LAUNCHER_ENV, launched)
    else:
        monkeypatch.delenv(D.LAUNCHER_ENV, raising=False)
    result = CliRunner().invoke(main, ["train", "spec.cfg"])
    assert (result.exit_code, result.stderr) == (status, stderr)


def test_the_rank_named_is_the_one_that_stopped_on_its_own():
    from types import SimpleNamespace as Failure

    # Rank 1 was killed; rank 0 then lost contact and rank 2 was stopped by the agent, all seen at one time.
    seen = {0: Failure(exitcode=D.LOST_A_RANK, timestamp=5), 1: Failure(exitcode=-9, timestamp=5),
            2: Failure(exitcode=-15, timestamp=5)}
    assert D.first_to_stop(seen) == 1
    assert D.first_to_stop({0: Failure(exitcode=1, timestamp=7), 1: Failure(exitcode=1, timestamp=6)}) == 1
    assert D.first_to_stop({0: Failure(exitcode=-15, timestamp=5), 1: Failure(exitcode=143, timestamp=5)}) == 0
    # Rank 1's error, likely rank 0's too: rank 0's own error is named if it had one, else rank 1's.
    assert D.first_to_stop({0: Failure(exitcode=1, timestamp=6),
                            1: Failure(exitcode=D.STOPPED_ON_AN_ERROR, timestamp=5)}) == 0
    assert D.first_to_stop({0: Failure(exitcode=D.LOST_A_RANK, timestamp=6),
                            1: Failure(exitcode=D.STOPPED_ON_AN_ERROR, timestamp=5)}) == 1
    # During training (an unreadable image in rank 1's share): rank 0, stopped by the agent first by the
    # clock, was named "killed by SIGTERM", and rank 1's error was nowhere on the terminal.
    assert D.first_to_stop({0: Failure(exitcode=-15, timestamp=5),
                            1: Failure(exitcode=D.STOPPED_ON_AN_ERROR, timestamp=6)}) == 1


def test_a_signal_to_one_rank_is_a_stop_after_saving_not_a_failure():
    """SIGTERM to rank 0 alone: rank 0 saved and said so (143), rank 1 stopped with it (130), and the
    launcher added "rank 1: SIGINT: stopped ..." and exited 130."""
    assert D.stopping_signal([143, 130]) == 15
    assert D.stopping_signal([130, 130]) == 2
    assert D.stopping_signal([130, D.LOST_A_RANK, -15]) == 2
    assert D.stopping_signal([-15, D.LOST_A_RANK]) is None  # killed before it could save: a failure, named
    assert D.stopping_signal([130, 1]) is None  # a rank's own error: named


@NEEDS_GLOO
def test_an_error_each_rank_meets_before_training_is_said_once(tmp_path):
    """A dataset too small for a batch, an unreadable image, a class count that differs from the
    net's: every rank met it, and the launcher repeated rank 0's line as "rank 1: ..."."""
    spec, data = write_spec(tmp_path), make_data(tmp_path / "data")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "convspec", "train", str(spec), "--data", str(data), "--out",
                           str(tmp_path / "run"), "--quiet", "--nproc-per-node", "2", "--batch-size", "1000"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stderr) == (1, f"{data}: 144 training images (48 of 192 are held out by "
                                                 "valFraction=0.25) make no full batch of 1000; use a smaller "
                                                 "--batch-size or more data\n")


def test_a_bad_spec_is_one_error_and_starts_no_rank(tmp_path):
    spec = write_spec(tmp_path, NO_RANDOM.replace("neuron=relu", "neuron=relux", 1))
    result = CliRunner().invoke(main, ["train", str(spec), "--data", str(tmp_path), "--nproc-per-node", "2",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and result.stdout == "", result.output
    assert result.stderr.splitlines()[0].endswith("unknown neuron function 'relux'; did you mean 'relu'?")
    assert str(spec) in result.stderr.splitlines()[0] and "rank" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_validations_progress_counts_every_ranks_images(monkeypatch, capsys):
    """With 2 ranks and 25,000 validation images the bar read 12500/12500: rank 0's share."""
    from runtime import evaluate as E

    monkeypatch.setattr(E, "all_reduce_sum", lambda tensor, cluster: tensor)
    # Rank 0's share of 7 images over 2 ranks: 4 (the larger), in batches of 3 and 1.
    batches = [(torch.zeros(3, 1, 3, 4, 4), torch.zeros(3, dtype=torch.int64)),
               (torch.zeros(1, 1, 3, 4, 4), torch.zeros(1, dtype=torch.int64))]
    E.evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2)), batches, torch.device("cpu"), 2,
               total=7, progress=True, cluster=D.Cluster(rank=0, world=2))
    drawn = [line.split("]")[1].split()[0] for line in capsys.readouterr().err.splitlines() if "evaluating" in line]
    assert drawn[-1] == "7/7"


def test_under_bare_torchrun_one_rank_a_machine_says_the_stop(monkeypatch, tmp_path):
    """Ctrl-C under torchrun: each rank printed "SIGINT: stopped ... Continue with: ..." on the shared terminal."""
    import runtime.train as T

    def stopped(options):
        raise T.TrainingStopped("SIGINT: stopped in epoch 1 after batch 3; saved run/interrupted.pt", 130)
    monkeypatch.setattr(T, "train", stopped)
    monkeypatch.delenv(D.LAUNCHER_ENV, raising=False)
    for rank, said in (("1", ""), ("0", "SIGINT: stopped in epoch 1 after batch 3; saved run/interrupted.pt\n")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        result = CliRunner().invoke(main, ["train", str(write_spec(tmp_path)), "--data", str(tmp_path)])
        assert (result.exit_code, result.stderr) == (130, said)


STOP_RANK_0_AFTER_EPOCH_1 = _signal_after_the_first_checkpoint(0, "SIGINT")  # as a user stopping a run would


@NEEDS_GLOO
def test_a_resumed_run_with_dropout_on_two_ranks_is_the_uninterrupted_run(tmp_path):
    """Only rank 0's random state was kept: after a resume every rank drew rank 0's dropout masks,
    so the run went on otherwise than it would have, with the same mask on each half of a batch."""
    # 20 epochs of a tenth of a second: the stop, sent once epoch 1's checkpoint is seen, comes well before
    # the end (with 3, it once came in the last epoch's validation, and the run just finished).
    spec, data = write_spec(tmp_path, SPEC), make_data(tmp_path / "data")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(STOP_RANK_0_AFTER_EPOCH_1)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = lambda out, *extra: [sys.executable, "-m", "convspec", "train", str(spec), "--data", str(data),
                                   "--out", str(out), "--epochs", "20", "--batch-size", "32", "--quiet",
                                   "--nproc-per-node", "2", *extra]
    whole = subprocess.run(command(tmp_path / "whole"), env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = tmp_path / "stopped"
    first = subprocess.run(command(stopped), cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**env, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])})
    assert first.returncode == 130, first.stderr[-3000:]
    resumed = subprocess.run([sys.executable, "-m", "convspec", "train", "--resume", "--out", str(stopped),
                              "--quiet", "--nproc-per-node", "2"], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = ckpt.load(tmp_path / "whole" / "epoch-0020.pt")["model"], ckpt.load(stopped / "epoch-0020.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # On another number of ranks this net's dropout masks would differ: refused, in one line.
    for options, now in (([], 1), (["--nproc-per-node", "4"], 4)):
        result = CliRunner().invoke(main, ["train", "--resume", "--out", str(stopped), "--epochs", "21", *options])
        assert (result.exit_code, result.stderr) == (1, f"{stopped}: the run was trained on 2 ranks and would resume "
                                                        f"on {now}, which changes the dropout masks each rank draws "
                                                        "(drop), so the run would not go on as it was; resume it on 2 "
                                                        "ranks in all (--nproc-per-node 2 on one machine), or train a "
                                                        "new run\n")


@NEEDS_GLOO
def test_compile_on_two_ranks_lets_no_torch_log_line_through(tmp_path):
    """DDP's forward opens a profiler range, and dynamo said "[rank0]:W... Profiler record function ... will be
    ignored" on every compiled data-parallel run."""
    spec, data = write_spec(tmp_path), make_data(tmp_path / "data")
    proc = subprocess.run([sys.executable, "-m", "convspec", "train", str(spec), "--data", str(data), "--out",
                           str(tmp_path / "run"), "--epochs", "1", "--quiet", "--compile", "--nproc-per-node", "2"],
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr[-3000:]


TERM_RANK_1_AFTER_EPOCH_1 = _signal_after_the_first_checkpoint(1, "SIGTERM")  # as a scheduler might send it


@NEEDS_GLOO
def test_sigterm_to_one_rank_stops_every_rank_as_sigterm(tmp_path):
    """Rank 0 said "signal: stopped ..." (or "SIGINT: stopped after epoch N" during validation) and the
    launcher's exit status was 130 or 143 by a race: the ranks now agree on the signal any of them got."""
    proc, run = _launch_two_ranks_with(TERM_RANK_1_AFTER_EPOCH_1, tmp_path, epochs=200)
    assert proc.returncode == 143, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "stopped" in line]
    assert len(said) == 1 and said[0].startswith("SIGTERM: stopped "), proc.stderr[-3000:]
