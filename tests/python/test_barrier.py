"""The C++ SyncMaster/SlavePipe/FutureResult barrier, driven from Python threads."""

from __future__ import annotations

import collections
import copy
import pickle
import sys
import threading
import time

import child_processes
import pytest
import torch
from barrier_copies import run_copies

import syncbn_ext

Stats = collections.namedtuple("Stats", ["copy_id", "total", "tensor"])


def sum_callback(intermediates):
    total = sum(message[1] for _, message in intermediates)
    tensor = torch.stack([message[2] for _, message in intermediates]).sum(0)
    return [(copy_id, Stats(copy_id, total, tensor)) for copy_id, _ in intermediates]


@pytest.mark.parametrize("replicas", [2, 4, 8])
def test_thousand_passes_give_every_copy_the_right_result(replicas):
    master = syncbn_ext.SyncMaster(sum_callback, timeout=60)
    pipes = [master.register_slave(i) for i in range(1, replicas)]
    assert master.nr_slaves == replicas - 1

    def make_message(copy_id, index):
        return (copy_id, copy_id + index, torch.full((3,), float(copy_id * index)))

    results, errors = run_copies(master, pipes, make_message, passes=1000)
    assert errors == {}
    id_sum = replicas * (replicas - 1) // 2
    for copy_id in range(replicas):
        assert len(results[copy_id]) == 1000
        for index, result in enumerate(results[copy_id]):
            assert isinstance(result, Stats)  # any Python object travels, namedtuples included
            assert result.copy_id == copy_id
            assert result.total == id_sum + replicas * index
            torch.testing.assert_close(result.tensor, torch.full((3,), float(id_sum * index)))


def test_callback_sees_master_first_and_copies_in_id_order():
    seen = []

    def callback(intermediates):
        seen.append([copy_id for copy_id, _ in intermediates])
        # The slaves' results in reverse: the barrier routes them by copy id.
        return [intermediates[0]] + [(i, m * 10) for i, m in reversed(intermediates[1:])]

    master = syncbn_ext.SyncMaster(callback)
    pipes = [master.register_slave(i) for i in (3, 1, 2)]
    results, errors = run_copies(master, pipes, lambda copy_id, _: copy_id)
    assert errors == {}
    assert seen == [[0, 1, 2, 3]]
    assert {copy_id: values[0] for copy_id, values in results.items()} == {0: 0, 1: 10, 2: 20, 3: 30}
    assert master.slave_ids == [1, 2, 3]


def test_other_python_threads_progress_while_replicas_wait():
    master = syncbn_ext.SyncMaster(lambda items: items, timeout=60)
    pipe = master.register_slave(1)
    counter = 0
    stop = threading.Event()

    def count():
        nonlocal counter
        while not stop.is_set():
            counter += 1

    slave = threading.Thread(target=pipe.run_slave, args=("hello",))
    slave.start()  # waits in the barrier: it must not hold the GIL meanwhile
    time.sleep(0.05)
    counter_thread = threading.Thread(target=count)
    counter_thread.start()
    time.sleep(0.2)
    progress = counter
    stop.set()
    counter_thread.join()
    assert master.run_master("world") == "world"
    slave.join(timeout=30)
    assert not slave.is_alive()
    assert progress > 1000


class CustomError(Exception):
    def __init__(self, layer, detail):
        super().__init__(layer, detail)
        self.layer = layer


def test_callback_exception_reaches_every_copy_with_its_type_and_next_pass_works():
    fail = True

    def callback(intermediates):
        if fail:
            raise CustomError("bn1", "statistics went wrong")
        return intermediates

    master = syncbn_ext.SyncMaster(callback, timeout=60)
    pipes = [master.register_slave(i) for i in range(1, 4)]
    results, errors = run_copies(master, pipes, lambda copy_id, _: copy_id)
    assert sorted(errors) == [0, 1, 2, 3]
    for error in errors.values():
        assert type(error) is CustomError
        assert error.layer == "bn1"
        assert error.args == ("bn1", "statistics went wrong")
    fail = False
    results, errors = run_copies(master, pipes, lambda copy_id, _: copy_id + 100)
    assert errors == {}
    assert {copy_id: values[0] for copy_id, values in results.items()} == {0: 100, 1: 101, 2: 102, 3: 103}


def test_builtin_exception_types_survive():
    master = syncbn_ext.SyncMaster(lambda items: {}["missing"])
    pipes = [master.register_slave(1)]
    _, errors = run_copies(master, pipes, lambda copy_id, _: copy_id)
    assert [type(errors[i]) for i in (0, 1)] == [KeyError, KeyError]


def test_malformed_callback_result_fails_every_copy():
    master = syncbn_ext.SyncMaster(lambda items: items[:1], timeout=60)  # forgets the slaves
    pipes = [master.register_slave(1), master.register_slave(2)]
    _, errors = run_copies(master, pipes, lambda copy_id, _: copy_id)
    assert sorted(errors) == [0, 1, 2]
    assert all("one (copy_id, result) pair per copy" in str(error) for error in errors.values())


def test_a_slave_of_a_destroyed_master_fails_at_once_saying_so():
    master = syncbn_ext.SyncMaster(lambda items: items, timeout=60)
    pipe = master.register_slave(1)
    del master  # its pipe outlives it: no pass will ever run
    start = time.monotonic()
    with pytest.raises(syncbn_ext.BarrierAbortedError, match="its SyncMaster was destroyed"):
        pipe.run_slave("late")
    assert time.monotonic() - start < 30  # not the barrier's timeout (60 s)


def test_abort_wakes_every_waiter_and_the_next_pass_works():
    master = syncbn_ext.SyncMaster(lambda items: items, timeout=60)
    pipes = [master.register_slave(i) for i in range(1, 4)]
    errors = {}

    def wait(copy_id, step):
        try:
            step(copy_id)
        except BaseException as error:
            errors[copy_id] = error

    # Copies 0, 1 and 2 wait for copy 3, which "raised" and never comes.
    threads = [threading.Thread(target=wait, args=(0, master.run_master))]
    threads += [threading.Thread(target=wait, args=(p.identifier, p.run_slave)) for p in pipes[:2]]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    master.abort("replica 3 raised MemoryError")
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(errors) == [0, 1, 2]
    for error in errors.values():
        assert isinstance(error, syncbn_ext.BarrierAbortedError)
        assert isinstance(error, syncbn_ext.BarrierError) and isinstance(error, RuntimeError)
        assert "replica 3 raised MemoryError" in str(error)
    with pytest.raises(syncbn_ext.BarrierAbortedError):
        pipes[2].run_slave(3)  # a straggler of the aborted pass fails at once
    results, run_errors = run_copies(master, pipes, lambda copy_id, _: copy_id)
    assert run_errors == {}
    assert {copy_id: values[0] for copy_id, values in results.items()} == {0: 0, 1: 1, 2: 2, 3: 3}


def test_timeout_names_the_missing_copies_and_the_barrier_recovers():
    master = syncbn_ext.SyncMaster(lambda items: items, timeout=0.2)
    master.label = "layer4.bn2"
    pipes = [master.register_slave(i) for i in range(1, 5)]
    start = time.monotonic()
    with pytest.raises(syncbn_ext.BarrierTimeoutError) as caught:
        master.run_master("alone")
    assert time.monotonic() - start < 10
    assert isinstance(caught.value, TimeoutError)
    assert "copies that never arrived: [1, 2, 3, 4]" in str(caught.value)
    assert "layer4.bn2" in str(caught.value)
    master.timeout = 60
    # The copies that missed pass 1 fail at once when they reach it (they are its stragglers)...
    for pipe in pipes:
        with pytest.raises(syncbn_ext.BarrierTimeoutError, match=r"\[1, 2, 3, 4\]"):
            pipe.run_slave(pipe.identifier)
    # ...and pass 2 works for everyone.
    results, errors = run_copies(master, pipes, lambda copy_id, _: copy_id * 2)
    assert errors == {}
    assert {copy_id: values[0] for copy_id, values in results.items()} == {0: 0, 1: 2, 2: 4, 3: 6, 4: 8}


def test_a_copy_late_at_a_failed_pass_gets_that_pass_s_error_not_a_later_one_s():
    master = syncbn_ext.SyncMaster(lambda items: items, timeout=0.3)
    late = master.register_slave(1)
    with pytest.raises(syncbn_ext.BarrierTimeoutError):  # pass 1: copy 1 never comes
        master.run_master("alone")
    master.abort("meant for pass 2")  # fails pass 2
    with pytest.raises(syncbn_ext.BarrierTimeoutError, match=r"in pass 1: copies that never arrived: \[1\]"):
        late.run_slave("late for pass 1")
    with pytest.raises(syncbn_ext.BarrierAbortedError, match="meant for pass 2"):
        late.run_slave("pass 2")


# Passes that fail for 2 seconds while another thread pickles the barrier (reading its label and timeout under its
# lock, holding the GIL). Run in a child process: a deadlock there holds the GIL for good.
_FAILING_PASSES_WHILE_PICKLING = """
import pickle, sys, threading, time
import syncbn_ext

def callback(items):
    if sys.argv[1] == "raises":
        raise KeyError("callback failed")
    master.abort("aborted in the callback")
    return [(copy_id, [object()]) for copy_id, _ in items]

master = syncbn_ext.SyncMaster(callback, timeout=5)
threading.Thread(target=lambda: [pickle.dumps(master) for _ in iter(int, 1)], daemon=True).start()
passes, end = 0, time.monotonic() + 2
while time.monotonic() < end:
    try:
        master.run_master([object()])
    except (KeyError, syncbn_ext.BarrierAbortedError):
        passes += 1
print(passes)
"""


# The program ends (an uncaught error) while daemon threads still wait in the barrier: pipes and futures of masters
# freed as the interpreter shuts down.
_EXIT_WHILE_THREADS_WAIT = """
import sys, threading, time
import torch, syncbn_ext

masters = [syncbn_ext.SyncMaster(lambda items: items, timeout=60.0) for _ in range(2)]
pipes = [master.register_slave(1) for master in masters]
future = syncbn_ext.FutureResult()
threading.Thread(target=lambda: pipes[0].run_slave((torch.ones(1), 1)), daemon=True).start()
threading.Thread(target=lambda: future.get(60.0), daemon=True).start()
time.sleep(0.3)
raise OverflowError("the main thread failed")
"""


@pytest.mark.parametrize("attempt", range(3))
def test_a_program_ending_while_daemon_threads_wait_in_the_barrier_exits_with_its_status(attempt):
    # Those threads, woken as the interpreter shut down, took the GIL back in a destructor (pybind's
    # gil_scoped_release); the thread's forced exit from inside it aborted the process ("terminate called without
    # an active exception", status 134) instead of the traceback and status 1.
    finished = child_processes.run([sys.executable, "-c", _EXIT_WHILE_THREADS_WAIT], timeout=60)
    assert finished.returncode == 1, finished.stderr
    assert "OverflowError: the main thread failed" in finished.stderr
    assert "terminate called" not in finished.stderr


@pytest.mark.parametrize("failing", ["raises", "aborts"])
def test_failed_passes_release_python_objects_outside_the_lock_other_threads_take_with_the_gil(failing):
    # A failed pass's error and a discarded callback's results hold Python objects, whose release takes the GIL; the
    # barrier releases them after its lock. Before, a thread waiting for the lock with the GIL held deadlocked with
    # the pass within a second.
    finished = child_processes.run([sys.executable, "-c", _FAILING_PASSES_WHILE_PICKLING, failing], timeout=60)
    assert finished.returncode == 0, finished.stderr
    assert int(finished.stdout) > 0


def test_finish_fails_whoever_waits_for_a_copy_that_sends_no_more():
    master = syncbn_ext.SyncMaster(lambda items: items, timeout=60)
    pipes = [master.register_slave(1), master.register_slave(2)]
    results, errors = run_copies(master, pipes, lambda copy_id, _: copy_id)  # pass 1: everyone
    assert errors == {}
    master.finish(2)  # copy 2's forward returned after one pass
    results, errors = run_copies(master, pipes[:1], lambda copy_id, _: copy_id)  # copies 0 and 1 make pass 2
    assert sorted(errors) == [0, 1]
    for error in errors.values():
        assert isinstance(error, syncbn_ext.BarrierError)
        assert "copy 2 finished its forward after 1 synchronized call(s), but copy" in str(error)
    with pytest.raises(ValueError, match="no such copy"):
        master.finish(7)


@pytest.mark.parametrize("callback", [None, 3, "merge"])
def test_a_master_callback_that_cannot_be_called_is_refused_when_the_master_is_made(callback):
    # It was accepted, and the first pass failed with "'NoneType' object is not callable", naming nothing.
    with pytest.raises(TypeError, match="SyncMaster: master_callback must be callable"):
        syncbn_ext.SyncMaster(callback)


def test_timeout_from_environment(monkeypatch):
    monkeypatch.setenv("SYNCBN_TIMEOUT", "7.5")
    assert syncbn_ext.default_timeout_seconds() == 7.5
    assert syncbn_ext.SyncMaster(lambda items: items).timeout == 7.5
    assert syncbn_ext.SyncMaster(lambda items: items, timeout=2).timeout == 2
    monkeypatch.setenv("SYNCBN_TIMEOUT", " 5 \n")  # blanks around it (a shell export, an .env file)
    assert syncbn_ext.default_timeout_seconds() == 5
    monkeypatch.setenv("SYNCBN_TIMEOUT", "later")
    with pytest.raises(ValueError, match="SYNCBN_TIMEOUT"):
        syncbn_ext.SyncMaster(lambda items: items)
    for unset in ("", "  "):  # empty or blank: as unset (a blank one raised, an empty one did not)
        monkeypatch.setenv("SYNCBN_TIMEOUT", unset)
        assert syncbn_ext.default_timeout_seconds() == 300
    monkeypatch.delenv("SYNCBN_TIMEOUT")
    assert syncbn_ext.default_timeout_seconds() == 300
    with pytest.raises(ValueError, match="positive"):
        syncbn_ext.SyncMaster(lambda items: items, timeout=0)


def test_registering_after_a_pass_starts_a_new_generation():
    master = syncbn_ext.SyncMaster(lambda items: items, timeout=60)
    old = [master.register_slave(1)]
    run_copies(master, old, lambda copy_id, _: copy_id)
    new = [master.register_slave(1), master.register_slave(2)]
    assert master.nr_slaves == 2
    with pytest.raises(syncbn_ext.BarrierAbortedError, match="earlier replication"):
        old[0].run_slave(1)
    with pytest.raises(ValueError, match="0 is the master"):
        master.register_slave(0)
    results, errors = run_copies(master, new, lambda copy_id, _: copy_id)
    assert errors == {}
    assert sorted(results) == [0, 1, 2]


def test_a_slave_may_enter_its_pass_before_the_other_slaves_register():
    # As in the established library, only the master's pass ends a replication's registrations: a slave started as
    # soon as it has its pipe waits in run_slave while the next copy registers, and the master collects both.
    master = syncbn_ext.SyncMaster(
        lambda items: [(copy_id, sum(m for _, m in items)) for copy_id, _ in items], timeout=60
    )
    master.reset()
    results, errors, threads = {}, {}, []

    def run(pipe):
        try:
            results[pipe.identifier] = pipe.run_slave(pipe.identifier)
        except BaseException as error:
            errors[pipe.identifier] = error

    for copy_id in (1, 2):
        threads.append(threading.Thread(target=run, args=(master.register_slave(copy_id),)))
        threads[-1].start()
        time.sleep(0.2)  # copy 1 waits in its pass when copy 2 registers
    results[0] = master.run_master(0)
    for thread in threads:
        thread.join(timeout=60)
    assert errors == {} and results == {0: 3, 1: 3, 2: 3}


def test_replication_without_a_pass_then_a_smaller_one():
    # Eval mode replicates without any pass; the next replication registers the same ids again.
    master = syncbn_ext.SyncMaster(lambda items: items, timeout=60)
    for _ in range(3):
        pipes = [master.register_slave(i) for i in (1, 2, 3)]
    assert master.slave_ids == [1, 2, 3]
    results, errors = run_copies(master, pipes, lambda copy_id, _: copy_id)
    assert errors == {} and sorted(results) == [0, 1, 2, 3]
    # A batch of one sample replicates copy 0 alone: its hook resets the master.
    master.reset()
    assert master.nr_slaves == 0
    assert master.run_master("alone") == "alone"


def test_pickle_and_deepcopy_keep_callback_timeout_and_label():
    master = syncbn_ext.SyncMaster(sum_callback, timeout=12)
    master.label = "bn"
    master.register_slave(1)
    for clone in (pickle.loads(pickle.dumps(master)), copy.deepcopy(master)):
        assert clone.master_callback is sum_callback
        assert clone.timeout == 12
        assert clone.label == "bn"
        assert clone.nr_slaves == 0  # registrations belong to a replication, not to the object


ESTABLISHED_COMM = """
class SyncMaster:  # pickles as the established library's pure-Python SyncMaster does: its callback only
    def __init__(self, master_callback):
        self._master_callback = master_callback

    def __getstate__(self):
        return {"master_callback": self._master_callback}
"""


def each_its_own(intermediates):
    return list(intermediates)


def test_a_pickle_of_the_established_librarys_barrier_loads_as_ours(monkeypatch):
    # A module of the user's own holding the established library's SyncMaster, saved whole, loaded with our class
    # in its place (a KeyError 'timeout' before): the default timeout and label.
    comm = type(sys)("established_comm")
    exec(ESTABLISHED_COMM, comm.__dict__)
    monkeypatch.setitem(sys.modules, "established_comm", comm)
    saved = pickle.dumps(comm.SyncMaster(each_its_own))
    comm.SyncMaster = syncbn_ext.SyncMaster
    master = pickle.loads(saved)
    assert type(master) is syncbn_ext.SyncMaster and master.master_callback is each_its_own
    assert master.timeout == syncbn_ext.default_timeout_seconds()
    assert master.label == syncbn_ext.SyncMaster(each_its_own).label
    assert master.run_master(3) == 3


def test_future_result():
    future = syncbn_ext.FutureResult()
    assert not future.ready()
    threading.Timer(0.05, future.put, args=({"value": 1},)).start()
    assert future.get(timeout=30) == {"value": 1}
    future.put(2)
    with pytest.raises(RuntimeError, match="not been fetched"):
        future.put(3)
    assert future.get() == 2
    with pytest.raises(syncbn_ext.BarrierTimeoutError, match=r"within 0\.05 s"):
        future.get(timeout=0.05)


@pytest.mark.parametrize("timeout", [1e10, 1e300, float("inf")])
def test_future_result_waits_for_a_timeout_too_long_for_the_clock(timeout):
    # As the barrier's: no deadline, instead of one overflowed into the past (which failed at once).
    future = syncbn_ext.FutureResult()
    threading.Timer(0.2, future.put, args=("late",)).start()
    assert future.get(timeout=timeout) == "late"


def test_c10_errors_keep_their_python_types():
    # _C is built against torch's own pybind11, so c10::ValueError arrives as ValueError.
    with pytest.raises(ValueError, match="replicas are not isomorphic"):
        syncbn_ext.execute_replication_callbacks([torch.nn.Linear(1, 1), torch.nn.ReLU()])
