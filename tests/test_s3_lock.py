"""Issue 13 item 7: on S3 the output lock is a conditional create (If-None-Match: *), and a dead
run's lock is replaced with a conditional write on its ETag: one holder per trial, on a real
S3 server (moto) on loopback, several processes starting together."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from pathlib import Path

import pytest
from upath import UPath

from hats_margin import OutputLockedError
from hats_margin.resume import LOCK_NAME, OutputLock

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
sys.path.insert(0, str(Path(__file__).parent / "reliability"))
from test_lock_race import CONTENDERS, dead_pid, holders, race

from helpers import moto_s3

BUCKET = "locks"
TRIALS = 25


class SerialMotoServer(moto_server.ThreadedMotoServer):
    """moto's server, answering one request at a time.

    moto checks ``If-None-Match``/``If-Match`` and then stores the object in two steps, without a
    lock, so two concurrent requests can both pass the check: a race of the emulator, not of
    S3, whose conditional writes are atomic. Serialising the requests gives the store the
    atomicity the lock relies on (and a check-then-write lock still fails here)."""

    def _server_entry(self):
        from moto.moto_server.threaded_moto_server import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
            make_server,
        )

        app = DomainDispatcherApplication(create_backend_app)
        one_at_a_time = threading.Lock()

        def serial(environ, start_response):
            with one_at_a_time:
                return list(app(environ, start_response))

        self._server = make_server(self._ip_address, self._port, serial, True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()


@pytest.fixture(scope="module")
def s3():
    with moto_s3(SerialMotoServer) as options:
        s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(BUCKET)
        yield options


def fs(options):
    return s3fs.S3FileSystem(**options, skip_instance_cache=True)


def test_one_holder_among_simultaneous_runs_on_s3(s3):
    target = f"s3://{BUCKET}/free/artifact"
    outcomes = race(target, lambda trial: None, trials=TRIALS, storage_options=s3)
    assert [holders(o) for o in outcomes] == [1] * TRIALS
    assert not fs(s3).exists(f"{BUCKET}/free/artifact/{LOCK_NAME}")


def test_one_taker_of_a_stale_lock_on_s3(s3):
    key = f"{BUCKET}/stale/artifact/{LOCK_NAME}"
    record = {"host": socket.gethostname(), "pid": dead_pid(), "started": 0, "fingerprint": "f", "phase": "finishing"}

    def stale_lock(trial):
        fs(s3).pipe_file(key, json.dumps(record).encode())

    outcomes = race(f"s3://{BUCKET}/stale/artifact", stale_lock, trials=TRIALS, storage_options=s3)
    assert [holders(o) for o in outcomes] == [1] * TRIALS
    assert all(sorted(o) == [0] * (CONTENDERS - 1) + [3] for o in outcomes), outcomes


def test_a_live_lock_on_s3_is_refused_and_left_alone(s3):
    target = UPath(f"s3://{BUCKET}/live/artifact", **s3)
    record = {"host": socket.gethostname(), "pid": os.getppid(), "started": 1}
    (target / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(OutputLockedError, match=f"pid {os.getppid()}.*If that run is dead, delete"):
        OutputLock(target).acquire()
    assert json.loads((target / LOCK_NAME).read_text()) == record


def test_a_lock_taken_on_s3_is_released(s3):
    target = UPath(f"s3://{BUCKET}/mine/artifact", **s3)
    lock = OutputLock(target, {"a": 1})
    lock.acquire()
    lock.set_phase("finishing")
    assert json.loads((target / LOCK_NAME).read_text())["phase"] == "finishing"
    lock.release()
    assert not (target / LOCK_NAME).exists()


def test_partition_identity_on_s3_is_its_etag_from_the_listing(s3):
    """Issue 13 item 8 on object storage: the identity of a partition file is its ETag (with its
    size), taken from the one listing planning makes; a changed object has another identity."""
    from hats_margin.io import scan_leaves

    store = fs(s3)
    key = f"{BUCKET}/identity/cat/dataset/Norder=1/Dir=0/Npix=44.parquet"
    store.pipe_file(key, b"first version")
    catalog = UPath(f"s3://{BUCKET}/identity/cat", **s3)
    first = scan_leaves(catalog)[(1, 44)]
    etag = store.info(key)["ETag"]
    assert first == f"{len(b'first version')}:{etag}"
    store.pipe_file(key, b"other version")  # same size, other bytes
    catalog = UPath(f"s3://{BUCKET}/identity/cat", **s3)
    catalog.fs.invalidate_cache()
    assert scan_leaves(catalog)[(1, 44)] != first
