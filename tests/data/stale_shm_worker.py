"""A process that reads one batch of both streams, for the stale shared-memory test.

`python -m tests.data.stale_shm_worker ROOT CACHE MODE`; MODE "die": read, then SIGKILL this process group (the
process and python's resource tracker, which would otherwise unlink the shared memory it left), as a killed job
step ends; "start": read and print "started"; "clean": gd.data.loader.clean_stale_streaming(CACHE) first, then as
"start"; "list": print the folders each registry in /dev/shm names. Errors are printed, not raised, so the test can
read them. With GD_TEST_GO set, the worker writes GD_TEST_GO.ready.PID once imported and builds the loaders only
once GD_TEST_GO exists (many workers then register at once)."""
import os
import signal
import sys
import time

from gd.data.loader import build_loaders, clean_stale_streaming


def main() -> None:
    root, cache, mode = sys.argv[1:4]
    if mode == "list":
        from pathlib import Path

        from streaming.base.shared.prefix import _unpack_locals

        for path in sorted(Path("/dev/shm").glob("*_locals")):
            print(f"registered {' '.join(_unpack_locals(path.read_bytes())[0])}", flush=True)
        return
    if mode == "clean":
        print(f"removed {len(clean_stale_streaming(cache))}", flush=True)
    go = os.environ.get("GD_TEST_GO")
    if go:
        open(f"{go}.ready.{os.getpid()}", "w").close()
    while go and not os.path.exists(go):
        time.sleep(0.01)
    cfg = {"root": root, "cache": cache, "shuffle": True, "num_workers": 0, "drop_last": False}
    try:
        loaders = build_loaders(cfg, group_size=2, micro_batch=4, seed=0, rank=0, world_size=1)
        for loader in loaders:
            next(iter(loader))
    except (ValueError, OSError) as err:
        print(f"error: {err}", flush=True)
        return
    if mode == "die":
        os.killpg(0, signal.SIGKILL)
    print("started", flush=True)


if __name__ == "__main__":
    main()
