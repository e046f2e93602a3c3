"""Misuse of the SyncMaster barrier gets a message that says what the user did."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from barrier_copies import run_copies

import syncbn_ext


@pytest.mark.parametrize(
    "bad_result, message",
    [
        (lambda items: [(str(copy_id), msg) for copy_id, msg in items], "copy id '0' of type str"),
        (lambda items: [(float(copy_id), msg) for copy_id, msg in items], "copy id 0.0 of type float"),
        (lambda items: [(copy_id == 1, msg) for copy_id, msg in items], "copy id False of type bool"),
        (lambda items: [copy_id for copy_id, _ in items], "got an item of type int"),
        (lambda items: [(copy_id, msg, 0) for copy_id, msg in items], "got an item of length 3"),
        (lambda items: None, "in a list, got None (a missing return statement?)"),
        (lambda items: 3, "in a list, got an object of type int"),
    ],
)
def test_a_callback_returning_malformed_pairs_gets_an_error_saying_so(bad_result, message):
    master = syncbn_ext.SyncMaster(bad_result, timeout=60)
    pipes = [master.register_slave(1)]
    _, errors = run_copies(master, pipes, lambda copy_id, _: copy_id)
    assert sorted(errors) == [0, 1]
    for error in errors.values():
        assert "the master callback must return (copy_id, result) pairs" in str(error), error
        assert message in str(error), error
        assert "Unable to cast" not in str(error)


def test_run_master_inside_the_callback_says_so():
    master = syncbn_ext.SyncMaster(lambda items: master.run_master(0), timeout=60)
    _, errors = run_copies(master, [], lambda copy_id, _: copy_id)
    message = str(errors[0])
    assert "run_master() was called from inside the master callback" in message
    assert "another thread" not in message


@pytest.mark.parametrize("method", ["reset", "register_slave"])
def test_reset_or_register_inside_the_callback_says_so(method):
    def callback(items):
        if method == "reset":
            master.reset()
        else:
            master.register_slave(5)
        return items

    master = syncbn_ext.SyncMaster(callback, timeout=60)
    pipes = [master.register_slave(1)]
    _, errors = run_copies(master, pipes, lambda copy_id, _: copy_id)
    assert sorted(errors) == [0, 1]
    for error in errors.values():
        assert f"{method}() was called from inside the master callback, in the middle of a pass" in str(error)
        assert "a slave registered after a pass ran" not in str(error)
    # The barrier still works.
    master2_results, errors = run_copies(syncbn_ext.SyncMaster(lambda items: items), [], lambda c, _: c)
    assert errors == {}


def test_a_replaced_replication_names_what_replaced_it():
    master = syncbn_ext.SyncMaster(lambda items: items, timeout=60)
    pipe = master.register_slave(1)
    waiter_error = {}

    def wait():
        try:
            pipe.run_slave(1)
        except BaseException as error:
            waiter_error["error"] = error

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.2)
    master.reset()
    thread.join(timeout=30)
    assert "replaced by a new one (reset() was called)" in str(waiter_error["error"])


def test_close_fails_every_later_pass_until_the_next_replication():
    master = syncbn_ext.SyncMaster(lambda items: items, timeout=60)
    pipes = [master.register_slave(1)]
    master.close("the replication failed")
    assert master.closed
    for _ in range(2):
        _, errors = run_copies(master, pipes, lambda copy_id, _: copy_id)
        assert sorted(errors) == [0, 1]
        assert all(isinstance(e, syncbn_ext.BarrierAbortedError) for e in errors.values())
        assert all("was closed: the replication failed" in str(e) for e in errors.values())
    master.reset()
    assert not master.closed
    results, errors = run_copies(master, [master.register_slave(1)], lambda copy_id, _: copy_id)
    assert errors == {}


def test_a_thread_of_a_closed_replication_starts_no_pass_even_on_a_later_replications_barrier():
    group = syncbn_ext.execute_replication_callbacks([torch.nn.Identity(), torch.nn.Identity()])[0].group
    master = syncbn_ext.SyncMaster(lambda items: items, timeout=60)  # a module's own barrier, reset each replication
    group.close("the forward was given up")
    assert group.closed and group.close_reason == "the forward was given up"
    master.reset()  # the next replication
    with group.replica(0):
        refused = r"refused a pass of .* by copy 0: .*the forward was given up"
        with pytest.raises(syncbn_ext.BarrierAbortedError, match=refused):
            master.run_master(1)
    assert master.run_master(2) == 2  # threads of the live replication are not affected


@pytest.mark.parametrize("value", ["5", None, True])
def test_a_timeout_set_to_no_number_gets_an_error_naming_the_property(value):
    # pybind's own message named no function and called the value arg1.
    master = syncbn_ext.SyncMaster(lambda items: items, timeout=7)
    with pytest.raises(TypeError, match=f"^SyncMaster.timeout must be a number of seconds, got {value!r} of type"):
        master.timeout = value
    master.timeout = torch.tensor(2.5)  # a number as float() takes it
    assert master.timeout == 2.5


def test_a_label_set_to_no_str_gets_an_error_naming_the_property():
    master = syncbn_ext.SyncMaster(lambda items: items)
    with pytest.raises(TypeError, match="^SyncMaster.label must be a str, got 1 of type int$"):
        master.label = 1
