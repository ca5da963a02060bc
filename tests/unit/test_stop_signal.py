"""StopSignal: a stop the Slurm job asked for before the rank could take signals is not lost.

The Slurm tier shows the race end to end (a second start signalled while its ranks import); this
test pins the rule itself: the file the batch shell leaves counts as the signal on entry, and
nothing else does.
"""

import signal

from ltscale.trainer import StopSignal


def test_a_stop_file_present_on_entry_counts_as_the_signal(tmp_path, monkeypatch):
    request = tmp_path / "stop-requested"
    request.touch()
    monkeypatch.setenv(StopSignal.FILE_ENV, str(request))
    with StopSignal() as stop:
        assert stop.received == signal.SIGUSR1


def test_no_stop_without_the_file_or_a_signal(tmp_path, monkeypatch):
    monkeypatch.setenv(StopSignal.FILE_ENV, str(tmp_path / "stop-requested"))
    with StopSignal() as stop:
        assert stop.received is None
    monkeypatch.delenv(StopSignal.FILE_ENV)
    with StopSignal() as stop:
        assert stop.received is None


def test_a_signal_after_entry_is_recorded_and_handlers_are_restored(monkeypatch):
    monkeypatch.delenv(StopSignal.FILE_ENV, raising=False)
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignal() as stop:
        signal.raise_signal(signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before
