"""Data-parallel training across processes and machines with ``torch.distributed``.

``torchrun --nproc-per-node N [--nnodes M ...] -m convspec train ...`` sets
RANK, WORLD_SIZE and LOCAL_RANK; :func:`setup` sees them, joins the process
group (NCCL when each rank has a GPU, gloo otherwise) and says which device
this rank uses.  Without them it is a single process and nothing changes.
Each rank reads every ``world``-th image of each global batch
(``loader.Batches``), ``DistributedDataParallel`` averages the gradients, and
only rank 0 prints and writes files.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Cluster:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(backend: str | None = None) -> Cluster:
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return Cluster()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > local_rank else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Cluster(rank, world, local_rank, backend)


def rank_device(cluster: Cluster) -> torch.device:
    """The device of this rank when data parallel: its local GPU, or the CPU."""
    if cluster.backend == "nccl":
        return torch.device(f"cuda:{cluster.local_rank}")
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, cluster: Cluster) -> torch.Tensor:
    """Sum over ranks (in place for CPU tensors); NCCL only reduces GPU tensors."""
    return _all_reduce(tensor, cluster, "SUM")


def _all_reduce(tensor: torch.Tensor, cluster: Cluster, op_name: str) -> torch.Tensor:
    if not cluster.distributed:
        return tensor
    op = getattr(dist.ReduceOp, op_name)
    if cluster.backend == "nccl":
        on_gpu = tensor.to(rank_device(cluster))
        dist.all_reduce(on_gpu, op=op)
        tensor.copy_(on_gpu.cpu())
    else:
        dist.all_reduce(tensor, op=op)
    return tensor


def agreed_signal_and_flags(signum: int | None, flags: tuple[bool, ...], cluster: Cluster) -> tuple:
    """(signal, *flags) agreed by every rank, in one all-reduce of maxima: the stop signal any rank
    got (SIGTERM over SIGINT, so that every rank stops, and exits, as by the stronger one), and
    each flag true if any rank says so."""
    values = torch.tensor([signum or 0, *(int(f) for f in flags)], dtype=torch.int64)
    _all_reduce(values, cluster, "MAX")
    first, *rest = values.tolist()
    return (first or None, *(bool(v) for v in rest))


def broadcast_flag(flag: bool, cluster: Cluster) -> bool:
    """True on every rank if any rank says so (a NaN on one rank stops all)."""
    return bool(_all_reduce(torch.tensor([int(flag)], dtype=torch.int64), cluster, "MAX").item())


def barrier(cluster: Cluster) -> None:
    if cluster.distributed:
        dist.barrier()


def teardown(cluster: Cluster) -> None:
    if cluster.distributed and dist.is_initialized():
        dist.destroy_process_group()


# --- the launcher behind convspec train --nproc-per-node -------------------------------


LAUNCHER_ENV = "CONVSPEC_LAUNCHED_WITH"
# The exit status of a rank whose collective failed because another rank went away: the launcher then
# names the rank that stopped first rather than this one.
LOST_A_RANK = 75
# The exit status of a rank other than 0 that stopped on an error every rank reached together (a NaN
# loss, seen through a collective): rank 0 says it, so the launcher does not say it again for this one.
STOPPED_WITH_RANK_0 = 76
# The exit status of a rank other than 0 that stopped on its own error before training (a short
# dataset, an unreadable image): most such errors every rank meets, and local rank 0 has said it on
# the terminal; the launcher names this rank only if local rank 0 did not stop on an error of its own.
STOPPED_ON_AN_ERROR = 77
# The exit statuses of convspec train stopped by Ctrl-C or SIGTERM after saving (128 + the signal).
SAVED_AND_STOPPED = (130, 143)


@dataclass(frozen=True)
class RankFailure:
    """The first rank to fail: its global rank, exit status (negative: the signal
    that killed it) and, for a rank whose output went to a file, that file.
    Rank -1: the launcher itself was signalled (Ctrl-C), and the ranks with it."""
    rank: int
    exit_code: int
    output: str | None  # None: its output went to this terminal


def usable_cpus() -> int:
    """The CPUs this process may run on: a container's or taskset's share, not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_threads_per_rank(nproc: int) -> int:
    """torchrun gives every rank one thread; on a CPU the cores can be shared out instead."""
    return max(1, usable_cpus() // nproc)


def launch(argv: list[str], nproc: int, log_dir: str, nnodes: int = 1, node_rank: int = 0,
           endpoint: str | None = None) -> RankFailure | None:
    """Run ``python -m convspec *argv`` as ``nproc`` ranks on this machine with
    ``torch.distributed.run`` (torchrun's engine): one machine on its own, or node
    ``node_rank`` of ``nnodes`` meeting at ``endpoint`` (HOST:PORT of node 0).
    Local rank 0 keeps this terminal (progress bars, the epoch lines, its errors);
    the other ranks write to ``log_dir``.  Returns None when every rank succeeded,
    else the rank that failed first.  torchrun's own log lines and its
    ChildFailedError report stay out of the way: the ranks say what went wrong."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for handler in logging.getLogger("torch.distributed").handlers:  # torch's own, set up when it is imported
        handler.addFilter(_not_the_agent)
    os.environ.setdefault("OMP_NUM_THREADS", str(cpu_threads_per_rank(nproc)))
    placement = [f"--nproc-per-node {nproc}"] + ([] if nnodes == 1 else [
        f"--nnodes {nnodes}", f"--node-rank {node_rank}", f"--rdzv-endpoint {endpoint}"])
    os.environ[LAUNCHER_ENV] = " ".join(placement)  # for the ranks' "Continue with: ..." line
    others = ",".join(f"{r}:3" for r in range(1, nproc))  # 3: stdout and stderr to files
    launcher = [f"--nproc-per-node={nproc}", f"--log-dir={log_dir}"] + ([f"--redirects={others}"] if others else [])
    if nnodes == 1:
        launcher.append("--standalone")
    else:
        launcher += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=static",
                     f"--rdzv-endpoint={endpoint}"]
    try:
        with _ctrl_c_while_waiting(endpoint or "localhost"):
            run(parse_args(launcher + ["--module", "convspec", *argv]))
    except SignalException as err:  # Ctrl-C or SIGTERM: the ranks got it too and said what they saved
        return RankFailure(-1, -err.sigval, None)
    except dist.DistError as err:  # the machines did not meet: torch's words end in "a convspec bug"
        problem = rendezvous_problem(err, endpoint or "localhost", nnodes, node_rank)
        if problem is None:
            raise
        from convspec.errors import fail
        raise fail(problem) from None
    except ChildFailedError as err:
        signal = stopping_signal([f.exitcode for f in err.failures.values()])
        if signal:
            return RankFailure(-1, -signal, None)
        rank = first_to_stop(err.failures)
        failure = err.failures[rank]
        output = None
        if failure.local_rank != 0:  # <log_dir>/<run id>_<random>/attempt_<n>/<local rank>/stderr.log
            logs = sorted(Path(log_dir).glob(f"*/attempt_*/{failure.local_rank}/stderr.log"),
                          key=lambda p: p.stat().st_mtime)
            output = str(logs[-1]) if logs else log_dir
        return RankFailure(rank, failure.exitcode, output)
    return None


def rendezvous_problem(err: Exception, endpoint: str, nnodes: int, node_rank: int) -> str | None:
    """One line for the ways machines fail to meet that torch reports as a bare DistError:
    node 0's port taken (by another program, or by a machine also given --node-rank 0), and
    the others never arriving within torchrun's rendezvous timeout (900 s)."""
    import re

    text = " ".join(str(err).split())
    port = endpoint.rpartition(":")[2]
    if "EADDRINUSE" in text or "address already in use" in text.lower():
        return (f"--rdzv-endpoint {endpoint}: port {port} is in use on this machine (by another program, or by "
                "another machine's launch also given --node-rank 0); choose a free port, the same on every "
                "machine, and give each machine its own --node-rank")
    waited = re.search(r"[Tt]imed out after (\d+) seconds waiting for clients\. (\d+)/(\d+) clients joined", text)
    if waited:
        seconds, joined, expected = waited.groups()
        return (f"waited {seconds} s at {endpoint} for the other machines, and {joined} of {expected} joined; "
                f"start convspec train on the others with --node-rank 1 to {nnodes - 1} and the same "
                f"--rdzv-endpoint, --nnodes and --nproc-per-node")
    if node_rank > 0 and ("timed out" in text or "timeout" in text.lower()):
        return (f"waited for node 0 at {endpoint}, which never answered; start convspec train with --node-rank 0 "
                f"on the machine {endpoint} names (only one machine has --node-rank 0)")
    return None


# What Ctrl-C during the rendezvous exits with: a shell's 128 + SIGINT.
STOPPED_WAITING = 130


@contextlib.contextmanager
def _ctrl_c_while_waiting(endpoint: str):
    """Make Ctrl-C work while this machine waits for the others.

    torchrun's agent waits for them inside TCPStore's C++ (up to 900 s), where Python
    cannot raise KeyboardInterrupt, so Ctrl-C went unseen until the wait timed out.
    The interpreter's C-level handler still writes each signal to a wakeup fd at once,
    and the wait releases the GIL, so a thread reading that fd can end the launcher
    while no rank has started.  Once the ranks start, the agent installs its own
    handler, and Ctrl-C is that handler's to stop them (and the ranks save)."""
    import signal
    import sys
    import threading

    waiting_handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(waiting_handler):
        yield  # set_wakeup_fd works from the main thread only; an ignored SIGINT needs nothing
        return

    def stop(signum: int) -> None:
        name = signal.Signals(signum).name
        sys.stderr.write(f"\n{name}: stopped while waiting for the machines to meet at {endpoint}; "
                         "no rank had started, so nothing was trained or saved\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    # SIGTERM (a scheduler's stop) killed the launcher without a word: it gets a Python handler for
    # the wait, so that it too reaches the wakeup fd; the agent sets its own once the ranks start.
    term_before = signal.getsignal(signal.SIGTERM)
    term_handler = (lambda signum, frame: stop(signum)) if term_before == signal.SIG_DFL else None
    if term_handler:
        signal.signal(signal.SIGTERM, term_handler)
    read_end, write_end = os.pipe()
    try:
        os.set_blocking(write_end, False)  # on Windows only from Python 3.12
        previous_fd = signal.set_wakeup_fd(write_end)
    except (AttributeError, OSError, ValueError):
        os.close(read_end)
        os.close(write_end)
        if term_handler:
            signal.signal(signal.SIGTERM, term_before)
        yield  # as before: Ctrl-C is seen once the wait ends
        return

    def watch() -> None:
        while True:
            try:
                got = os.read(read_end, 1)
            except OSError:
                return
            if not got:
                return  # the launcher closed the pipe: the wait is over
            if got[0] == signal.SIGINT and signal.getsignal(signal.SIGINT) is waiting_handler:
                stop(signal.SIGINT)  # exits STOPPED_WAITING
            if term_handler and got[0] == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is term_handler:
                stop(signal.SIGTERM)

    watcher = threading.Thread(target=watch, name="ctrl-c-while-waiting", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        if term_handler and signal.getsignal(signal.SIGTERM) is term_handler:
            signal.signal(signal.SIGTERM, term_before)
        os.close(write_end)
        watcher.join(timeout=5)
        os.close(read_end)


def stopping_signal(codes: list[int]) -> int | None:
    """The signal (2 or 15) when the ranks' exit statuses are a stop after saving: a signal to one
    rank stops them all once rank 0 has saved, and rank 0 said so.  The ranks that did not get it
    exit as if by Ctrl-C, so SIGTERM is the signal if any rank got one."""
    if any(c in SAVED_AND_STOPPED for c in codes) and all(
            c in SAVED_AND_STOPPED or c in (LOST_A_RANK, STOPPED_WITH_RANK_0, -2, -15) for c in codes):
        return 15 if 143 in codes else 2
    return None


def first_to_stop(failures: dict) -> int:
    """The rank that stopped first on its own: not one that lost contact with it,
    nor one the agent then stopped with SIGTERM (failures seen in one pass of the
    agent's monitor share a time, so the time alone cannot tell)."""
    own = {r: f for r, f in failures.items()
           if f.exitcode not in (LOST_A_RANK, STOPPED_WITH_RANK_0, STOPPED_ON_AN_ERROR, -15, 128 + 15)}
    # With no rank stopped on its own error, one that stopped on an error rank 0 did not meet is named
    # (during training: an unreadable image in its share), not rank 0 lost or stopped by the agent.
    errors = {r: f for r, f in failures.items() if f.exitcode == STOPPED_ON_AN_ERROR}
    pool = own or errors or failures
    return min(pool, key=lambda r: (pool[r].timestamp, r))


def _not_the_agent(record) -> bool:
    """torchrun's agent logs its workings (workers started, signalled, failed);
    convspec's launcher says in one line which rank failed instead."""
    return not record.name.startswith(("torch.distributed.elastic", "torch.distributed.run",
                                       "torch.distributed.launcher"))


def last_line(path: str) -> str | None:
    """The last line a rank wrote to its stderr file, for the one-line error."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    except OSError:
        return None
    return lines[-1] if lines else None
