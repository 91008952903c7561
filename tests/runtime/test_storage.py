"""Run folders on an fsspec URI (rlgen/runtime/storage.py): checkpoints, metrics, samples and the
report reach the URI, an upload cut short is never resumed from, and ``run.resume=auto`` works from
the URI alone (the staging folder deleted, as on a fresh machine)."""
import json
import os
import shutil
import uuid

import fsspec
import pytest

from rlgen.runtime.rundir import atomic_checkpoint, find_latest_checkpoint, read_metrics
from rlgen.runtime.storage import RunStore, is_uri, read_tree, staging_dir, write_tree


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A RunStore on a fresh memory:// root, staging under tmp_path."""
    monkeypatch.setenv("RLGEN_STAGING_DIR", str(tmp_path / "staging"))
    root = f"memory://bucket-{uuid.uuid4().hex[:8]}/runs"
    yield RunStore(root, "job")
    fsspec.filesystem("memory").rm(root.replace("memory://", "/"), recursive=True)


def checkpoint(store: RunStore, step: int) -> None:
    with atomic_checkpoint(store.local, step) as d:
        (d / "model.safetensors").write_bytes(bytes([step]) * 100)
        (d / "deepspeed").mkdir()
        (d / "deepspeed" / "optim.pt").write_bytes(b"o" * (10 + step))
        (d / "driver_state.json").write_text(json.dumps({"step": step}))


def remote(store: RunStore, rel: str) -> bytes:
    return store.fs.cat_file(f"{store.path}/{rel}")


def test_uri_roots_and_staging(tmp_path, monkeypatch):
    from rlgen.runtime.rundir import RunConfig

    monkeypatch.setenv("RLGEN_STAGING_DIR", str(tmp_path))
    assert is_uri("s3://b/runs") and is_uri("memory://x") and not is_uri("runs") and not is_uri("file:///tmp/r")
    assert RunConfig(root="file:///srv/runs", name="a").dir.as_posix() == "/srv/runs/a"  # a plain local path
    d = RunConfig(root="s3://b/runs", name="a").dir
    assert d == staging_dir("s3://b/runs", "a") and d.is_relative_to(tmp_path) and d.name == "a"
    assert staging_dir("s3://b/runs", "a") != staging_dir("s3://c/runs", "a")


def test_checkpoints_and_files_reach_the_uri_and_resume_from_it(store):
    (store.local / "samples").mkdir(parents=True)
    (store.local / "config.yaml").write_text("kind: train\n")
    (store.local / "metrics.jsonl").write_text('{"step": 0}\n')
    checkpoint(store, 0)
    store.push_checkpoint(0, keep=2)
    store.push_files()
    for step in (1, 2, 3):
        checkpoint(store, step)
        (store.local / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(step + 1)))
        (store.local / "samples" / f"train_{step:05d}.txt").write_text(f"sample {step}\n")
        store.push_checkpoint(step, keep=2)
        store.push_files()
    assert remote(store, "checkpoints/latest") == b"3"
    steps = sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(f"{store.path}/checkpoints", detail=False))
    assert steps == ["0", "2", "3", "latest"]  # pruned as locally: the 2 newest and step 0
    assert remote(store, "checkpoints/3/deepspeed/optim.pt") == b"o" * 13 and remote(store, "checkpoints/3/COMPLETE")
    assert remote(store, "samples/train_00003.txt") == b"sample 3\n" and remote(store, "config.yaml")

    shutil.rmtree(store.local)  # a new machine: nothing but the URI
    fresh = RunStore(store.uri.rsplit("/", 1)[0], "job")
    ckpt = fresh.pull()
    assert ckpt == fresh.local / "checkpoints" / "3" == find_latest_checkpoint(fresh.local)
    assert read_tree(ckpt) == {"COMPLETE": (ckpt / "COMPLETE").read_bytes(), "deepspeed/optim.pt": b"o" * 13,
                               "driver_state.json": b'{"step": 3}', "model.safetensors": bytes([3]) * 100}
    assert [r["step"] for r in read_metrics(fresh.local)] == [0, 1, 2, 3]
    assert not (fresh.local / "checkpoints" / "2").exists()  # only the checkpoint resumed from comes down
    uploads = []
    fresh._put = lambda src, rel: uploads.append(rel)
    fresh.push_files()  # nothing changed since the pull: nothing is uploaded again
    (fresh.local / "metrics.jsonl").write_text('{"step": 0}\n')  # a resume truncates the log: that goes up
    fresh.push_files()
    assert uploads == ["metrics.jsonl"]


def test_an_upload_cut_short_is_never_resumed_from(store):
    checkpoint(store, 1)
    store.push_checkpoint(1, keep=0)
    checkpoint(store, 2)
    d = store.local / "checkpoints" / "2"
    store.fs.put_file(str(d / "model.safetensors"), f"{store.path}/checkpoints/2/model.safetensors")  # no COMPLETE
    assert store.latest_step() == 1
    store.fs.pipe_file(f"{store.path}/checkpoints/latest", b"2")  # even if `latest` names it
    assert store.latest_step() == 1
    store.fs.pipe_file(f"{store.path}/checkpoints/latest", b"\xff")  # or is torn
    assert store.latest_step() == 1
    assert store.pull() == store.local / "checkpoints" / "1"


def test_a_fresh_run_moves_the_remote_one_aside(store):
    checkpoint(store, 1)
    store.push_checkpoint(1, keep=0)
    store.start_fresh()
    assert not store.fs.exists(store.path) and not store.local.exists()
    parent = store.path.rsplit("/", 1)[0]
    aside = [p for p in store.fs.ls(parent, detail=False) if ".prev-" in p]
    assert len(aside) == 1 and store.fs.exists(f"{aside[0]}/checkpoints/1/COMPLETE")


def test_unknown_protocol_is_one_clear_error():
    with pytest.raises(ValueError, match=r"run\.root: cannot open nosuchfs://b/runs/job with fsspec"):
        RunStore("nosuchfs://b/runs", "job")


def test_shipped_files_stay_inside_their_folder(tmp_path):
    files = {"a.bin": b"1", "deepspeed/state/x.pt": b"2"}
    write_tree(files, tmp_path / "d")
    assert read_tree(tmp_path / "d") == files
    with pytest.raises(ValueError, match="outside"):
        write_tree({"../evil": b"x"}, tmp_path / "d")
    assert not (tmp_path / "evil").exists()


@pytest.mark.slow  # two short Ray jobs (~1 min each)
def test_train_rl_on_a_uri_root_resumes_from_the_uri(tmp_path, monkeypatch):
    """A flow_grpo job with run.root on fsspec's LocalFileSystem under its non-default protocol
    (``local://``: the staging and upload path, inspectable on disk), learners shipping their
    checkpoint files through Ray; then the staging folder is deleted and the job resumes from the URI."""
    import train_rl
    from tests.runtime.test_jobs_e2e import COMMON, job_args
    from tests_helpers import tiny_flow_policy

    monkeypatch.setenv("RLGEN_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("RLGEN_SHIP_CHECKPOINTS", "1")
    root, out = f"local://{tmp_path / 'bucket'}", tmp_path / "bucket" / "job"
    config, *extra = job_args("flow_grpo", tmp_path, {"flow": tiny_flow_policy(tmp_path / "tiny"), "lm": None})
    base = ["--config", config, f"run.root={root}", "run.name=job", *COMMON, *extra, "eval.every=0"]
    assert train_rl.main([*base, "train.steps=2"]) == 0
    assert (out / "checkpoints" / "latest").read_text() == "2" and (out / "checkpoints" / "2" / "COMPLETE").is_file()
    assert (out / "report.md").is_file() and (out / "config.yaml").is_file() and list((out / "samples").iterdir())
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2]
    from rlgen.models import load_model

    load_model(out / "checkpoints" / "2")  # the uploaded policy loads on its own

    shutil.rmtree(tmp_path / "staging")
    assert train_rl.main([*base, "train.steps=3", "run.resume=auto"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 3]
    assert (out / "checkpoints" / "latest").read_text() == "3"
    state = json.loads((out / "checkpoints" / "3" / "driver_state.json").read_text())
    assert state["step"] == 3 and os.listdir(out / "checkpoints" / "3" / "deepspeed")
