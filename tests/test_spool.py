"""The spool's group fsync of a folder (DirSync): concurrent writers into one folder share fsyncs, and no
caller returns before an fsync that started after its call has finished. Real folders and real fsyncs;
the first fsync is held open by the test so that the others' arrival during it is certain, not timed."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ihd_node.intake.spool import DirSync, fsync_dir, write_atomic
from tests.waiting import poll_until


class HeldSync:
    """fsync_dir that records when each call started and holds the first one until released."""

    def __init__(self, fail_first: bool = False) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.fail_first = fail_first
        self.calls = 0

    def __call__(self, folder: Path) -> None:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(30)
            if self.fail_first:
                raise OSError(5, "simulated EIO")
        fsync_dir(folder)


def run_writers(sync: DirSync, folder: Path, held: HeldSync, n: int) -> list[BaseException | None]:
    results: list[BaseException | None] = [None] * (n + 1)

    def call(i: int) -> None:
        try:
            sync(folder)
        except BaseException as exc:  # noqa: BLE001 (the test inspects it)
            results[i] = exc

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert held.entered.wait(30)
    others = [threading.Thread(target=call, args=(i,)) for i in range(1, n + 1)]
    for t in others:
        t.start()
    # All of them have a ticket (they called after the first fsync started) before it is released.
    assert poll_until(lambda: sync._inside.get(folder) == n + 1, 30)
    held.release.set()
    for t in [first, *others]:
        t.join(30)
        assert not t.is_alive()
    return results


def test_writers_arriving_during_an_fsync_share_the_next_one(tmp_path: Path) -> None:
    held = HeldSync()
    sync = DirSync(held)
    assert run_writers(sync, tmp_path, held, 6) == [None] * 7
    assert held.calls == 2  # one per writer before (7)
    assert sync._inside == {} and sync._asked == {}  # nothing kept once nobody waits


def test_a_failed_fsync_fails_its_caller_only_and_the_others_sync_again(tmp_path: Path) -> None:
    held = HeldSync(fail_first=True)
    sync = DirSync(held)
    results = run_writers(sync, tmp_path, held, 4)
    assert isinstance(results[0], OSError) and results[1:] == [None] * 4
    assert held.calls == 2


def test_one_writer_alone_gets_its_own_fsync_each_time(tmp_path: Path) -> None:
    calls: list[Path] = []
    sync = DirSync(lambda folder: calls.append(folder))
    for _ in range(3):
        sync(tmp_path)
    assert calls == [tmp_path] * 3


@pytest.mark.parametrize("n", [8])
def test_concurrent_atomic_writes_into_one_folder_all_land(tmp_path: Path, n: int) -> None:
    folder = tmp_path / "series"
    threads = [threading.Thread(target=write_atomic, args=(folder / f"{i}.dcm", bytes([i]) * 1000),
                                kwargs={"fault": None}) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{i}.dcm" for i in range(n))
    assert all((folder / f"{i}.dcm").read_bytes() == bytes([i]) * 1000 for i in range(n))


def test_new_study_and_series_folders_are_fsynced_in_their_parents(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename into a new folder is durable only when the folder's own entry is: each folder made for
    a new study or series is fsynced in its parent, once; a file into an existing folder syncs only it."""
    import ihd_node.intake.spool as spool

    synced: list[Path] = []
    monkeypatch.setattr(spool, "_dir_sync", DirSync(lambda folder: synced.append(folder)))
    root = tmp_path / "spool"
    root.mkdir()
    write_atomic(root / "1.2" / "1.2.3" / "a.dcm", b"x", fault=None)
    assert synced == [root, root / "1.2", root / "1.2" / "1.2.3"]
    synced.clear()
    write_atomic(root / "1.2" / "1.2.3" / "b.dcm", b"y", fault=None)
    assert synced == [root / "1.2" / "1.2.3"]
