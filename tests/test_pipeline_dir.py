"""The stage driver (``pipeline_dir.run_stages``) on a three-stage plan of its own, ranks as threads: under
torchrun a rank > 0 reads the markers only once rank 0 has checked OUT and deleted what a ``--from`` redoes."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from mobile_vmoe import pipeline_dir
from mobile_vmoe.pipeline_dir import StageDone, StagePlan, not_done, read_summary, run_stages


@dataclass
class Ran:
    rank: int  # the rank that ran the stage and wrote its marker


@dataclass
class Cfg:
    seed: int = 0


PLAN = StagePlan(("prep", "train", "report"), {"prep": Ran, "train": Ran, "report": Ran}, ("prep", "train"))


class Stages:
    """One rank's stage methods; ``train`` meets the other rank's like a DDP training (a barrier)."""

    def __init__(self, out: Path, rank: int, meet: threading.Barrier) -> None:
        self.out, self.rank, self.meet, self.ran = out, rank, meet, []

    def _stage(self, name: str) -> StageDone:
        self.ran.append(name)
        (self.out / name).write_text(str(self.rank))
        return StageDone([self.out / name], Ran(self.rank))

    def prep(self) -> StageDone:
        return self._stage("prep")

    def train(self) -> StageDone:
        self.meet.wait()  # alone in the group: BrokenBarrierError after the timeout, instead of a hang
        return self._stage("train")

    def report(self) -> StageDone:
        return self._stage("report")


def test_a_rank_above_0_waits_for_rank_0_to_delete_what_from_redoes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.delenv("RANK", raising=False)  # this thread is rank 0
    first = Stages(out, 0, threading.Barrier(1))  # the last run: one process, every stage done
    run_stages(first, out, Cfg(), None, PLAN, {}, set())
    assert first.ran == ["prep", "train", "report"] and all(
        not_done(out, s, PLAN) is None for s in PLAN.stages
    )

    # --from train under torchrun: rank 1 starts first and finds every marker of the last run in place; taken
    # for done, they would leave rank 0 alone in train's process group. One store, a client per rank (a client
    # serves one call at a time, like a rank's own process); waits bounded, so a failure cannot hang the suite.
    monkeypatch.setattr(pipeline_dir, "RANK0_WAIT_S", 60)
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
    )
    client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=60))
    monkeypatch.setattr(pipeline_dir, "_torchrun_store", lambda: store)
    meet = threading.Barrier(2, timeout=30)
    rank0, rank1 = Stages(out, 0, meet), Stages(out, 1, meet)
    failed: list[BaseException] = []

    def follow() -> None:
        try:
            pipeline_dir._follow(rank1, out, PLAN, client)
        except BaseException as e:  # noqa: BLE001 - the main thread reports it
            failed.append(e)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    follower.join(timeout=1.0)
    assert follower.is_alive() and rank1.ran == []  # still waiting for rank 0's key, not reading the markers

    run_stages(rank0, out, Cfg(), "train", PLAN, {}, set())
    follower.join(timeout=30)
    assert not follower.is_alive() and failed == []
    assert rank0.ran == ["train", "report"] and rank1.ran == ["train"]  # prep was done; report is rank 0's
    assert read_summary(out, "train", PLAN) == Ran(0) and (out / "report").read_text() == "0"
