"""Tensor-parallel ranks 1..T-1 of an engine: started by the engine process (rank 0), they
hold their shard of the model and of the KV cache and replay the calls rank 0 announces
(``vserve.worker.tensor_parallel``).

Lifecycle: a worker lives exactly as long as its engine. ``start_workers`` (in the engine)
watches them and ends the engine process when one exits; a worker exits when its engine
does (parent-death poll, or the broken group) and ignores SIGINT/SIGTERM sent to the whole
process group, like its engine, which decides when to stop. A worker's startup error is
printed with its traceback on the shared stderr, then the engine stops.

    python -m vserve.engine.tp_worker --rank R --world-size T --rendezvous FILE
        --model-dir DIR --config HEX --engine-index I --threads N
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from vserve.config import EngineConfig
from vserve.launch.lifetime import (
    exit_when_parent_dies,
    flush_and_exit,
    set_process_title,
    spawn_child,
)
from vserve.logging_utils import get_logger, init_logging
from vserve.roles import ENGINE_INDEX_FLAG, TP_RANK_FLAG, TP_WORKER_MODULE, engine_name

if TYPE_CHECKING:
    from vserve.worker.tensor_parallel import TensorParallel

logger = get_logger(__name__)


def worker_name(engine_index: int, rank: int) -> str:
    return f"{engine_name(engine_index)}_TP{rank}"


def start_workers(config: EngineConfig, model_dir: Path, engine_index: int) -> TensorParallel:
    """Start ranks 1..T-1 and join the group as rank 0; returns the group. From here on the
    death of any worker ends this (the engine) process: its collectives would wait forever."""
    import torch

    from vserve.worker.tensor_parallel import TensorParallel, check_tensor_parallel

    size = config.device.tensor_parallel_size
    check_tensor_parallel(config, model_dir)
    workdir = Path(tempfile.mkdtemp(prefix="vserve-tp-"))  # private (0700)
    rendezvous = workdir / "rendezvous"
    procs = [spawn_child(TP_WORKER_MODULE, [
        TP_RANK_FLAG, str(rank), "--world-size", str(size), "--rendezvous", str(rendezvous),
        "--model-dir", str(model_dir), "--config", config.to_msgpack().hex(),
        ENGINE_INDEX_FLAG, str(engine_index), "--threads", str(torch.get_num_threads())],
        worker_name(engine_index, rank)) for rank in range(1, size)]

    def watch() -> None:
        while True:
            for rank, p in enumerate(procs, start=1):
                code = p.poll()
                if code is not None:
                    logger.error("tensor-parallel rank %d (pid %d) exited with code %s; the "
                                 "engine stops", rank, p.pid, code)
                    for other in procs:
                        if other.poll() is None:
                            other.kill()
                    flush_and_exit(1)
            time.sleep(0.2)

    threading.Thread(target=watch, name="tp-watch", daemon=True).start()
    try:
        return TensorParallel(0, size, rendezvous)
    finally:
        # Every rank is through the rendezvous (its closing barrier), or the start failed.
        shutil.rmtree(workdir, ignore_errors=True)


def run_worker(rank: int, size: int, rendezvous: Path, model_dir: Path,
               config: EngineConfig) -> int:
    import torch

    from vserve.worker.model_runner import ModelRunner
    from vserve.worker.tensor_parallel import Op, TensorParallel

    tp = TensorParallel(rank, size, rendezvous)
    runner = ModelRunner(config, model_dir, tp=tp)
    model = runner.model
    hidden: torch.Tensor | None = None
    with torch.inference_mode():
        while True:
            op, payload = tp.receive()
            if op == Op.FORWARD:
                runner.batch_rows.block_table.apply(payload.journal)
                pos, meta = runner.step_metadata(payload.rows, payload.qsl, payload.seq_lens)
                hidden = model(payload.input_ids, pos, runner.kv_caches, meta)
            elif op == Op.LOGITS:
                assert hidden is not None
                model.compute_logits(hidden[payload])
            elif op == Op.ALLOC:
                runner.allocate_kv_cache(int(payload))
            else:
                tp.close()
                logger.info("tensor-parallel rank %d stopped", rank)
                return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vserve-tp-worker")
    p.add_argument(TP_RANK_FLAG, dest="rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--rendezvous", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--config", required=True, help="the engine's EngineConfig, msgpack hex")
    p.add_argument(ENGINE_INDEX_FLAG, dest="engine_index", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    name = worker_name(args.engine_index, args.rank)
    init_logging(name)
    set_process_title(name)
    engine_pid = os.getppid()
    exit_when_parent_dies(use_pdeathsig=False)
    # The engine decides when to stop (see the module docstring).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    torch.set_num_threads(max(1, args.threads))
    try:
        code = run_worker(args.rank, args.world_size, Path(args.rendezvous),
                          Path(args.model_dir),
                          EngineConfig.from_msgpack(bytes.fromhex(args.config)))
    except BaseException as e:  # noqa: BLE001 - reported with its traceback, then exit
        # A group broken by the engine's own death is no error of this rank's.
        if os.getppid() == engine_pid:
            logger.error("tensor-parallel rank %d failed: %s", args.rank,
                         "".join(traceback.format_exception(e)))
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
