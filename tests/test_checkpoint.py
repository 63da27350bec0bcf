"""Whole checkpoints: sharded safetensors, streaming, resume, parallel and dask engines."""
import json
import os
import pickle

import numpy as np
import pytest

from regroup import RegroupError, regroup_checkpoint, regroup_file
from regroup.source import Source, open_source
from regroup.io import write_safetensors

OPTS = dict(block=16, method="metis", seed=3)


def _tensors(seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(3):
        w = rng.standard_normal((64, 48)).astype(np.float32)
        w[rng.random(w.shape) < 0.8] = 0
        out[f"layers.{i}.fc.weight"] = w
        out[f"layers.{i}.fc.bias"] = rng.standard_normal(64).astype(np.float32)
    conv = rng.standard_normal((32, 8, 3, 3)).astype(np.float32)
    out["conv.weight_orig"] = conv
    out["conv.weight_mask"] = (rng.random(conv.shape) < 0.25).astype(np.float32)
    out["dense.weight"] = rng.standard_normal((32, 32)).astype(np.float32)
    return out


def _sharded(tmp_path, tensors):
    """A Hugging Face style sharded checkpoint: two shards and the index."""
    d = tmp_path / "ckpt"
    d.mkdir()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for fname, keys in shards.items():
        write_safetensors({k: tensors[k] for k in keys}, d / fname)
        weight_map.update({k: fname for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d


def test_single_file_equals_regroup_file_byte_for_byte(tmp_path):
    src = tmp_path / "model.safetensors"
    write_safetensors(_tensors(), src)
    regroup_file(src, **OPTS).save(tmp_path / "serial.npz")
    report = regroup_checkpoint(src, tmp_path / "stream.npz", **OPTS).report()
    assert (tmp_path / "serial.npz").read_bytes() == (tmp_path / "stream.npz").read_bytes()
    assert report["total"]["layers"] == 4 and report["total"]["resumed"] == 0
    assert {n["name"] for n in report["skipped"]} == {
        "dense.weight", "layers.0.fc.bias", "layers.1.fc.bias", "layers.2.fc.bias"}
    assert not (tmp_path / "stream.npz.parts").exists()


def test_other_formats_go_through_the_same_path(tmp_path):
    src = tmp_path / "model.npz"
    np.savez(src, **_tensors())
    regroup_file(src, **OPTS).save(tmp_path / "a.npz")
    regroup_checkpoint(src, tmp_path / "b.npz", **OPTS, jobs=2)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


@pytest.mark.parametrize("fmt", ["npz", "pt", "pt-legacy"])
def test_single_files_stream_one_layer_per_task(tmp_path, fmt):
    """.npz and PyTorch zip checkpoints are indexed without reading data; every task is
    sent only its own layer (a file read whole - a pre-1.6 pickle - sends that layer's
    tensors, never the checkpoint)."""
    tensors = _tensors()
    tensors["big.weight"] = np.zeros((512, 512), np.float32)   # 1 MB of dead weight
    tensors["big.weight"][::3, ::5] = 1.0
    if fmt == "npz":
        src = tmp_path / "model.npz"
        np.savez(src, **tensors)
    else:
        torch = pytest.importorskip("torch")
        src = tmp_path / "model.pt"
        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, src,
                   _use_new_zipfile_serialization=fmt == "pt")
    source = open_source(src)
    assert (source.tensors is None) == (fmt != "pt-legacy")
    layer = next(r for r in source.refs if r.name == "layers.0.fc.weight")
    assert len(pickle.dumps(source.for_layer(layer))) < 64 * 48 * 4 + 4096
    if source.tensors is None:   # skipped from the index alone, never read
        assert "1-D" in next(r for r in source.refs if r.name == "layers.0.fc.bias").problem
    regroup_file(src, **OPTS).save(tmp_path / "a.npz")
    regroup_checkpoint(src, tmp_path / "b.npz", **OPTS, jobs=2)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_weight_and_mask_in_different_shards(tmp_path):
    """A prune pair split by the sharding (X.weight_orig in one shard, X.weight_mask in the
    next) is read from both."""
    tensors = _tensors()
    d = tmp_path / "split"
    d.mkdir()
    first = {k: v for k, v in tensors.items() if k != "conv.weight_mask"}
    write_safetensors(first, d / "a.safetensors")
    write_safetensors({"conv.weight_mask": tensors["conv.weight_mask"]}, d / "b.safetensors")
    ref = next(r for r in open_source(d).refs if r.name == "conv.weight")
    assert ref.shards == (str(d / "a.safetensors"), str(d / "b.safetensors"))
    one = tmp_path / "one.safetensors"
    write_safetensors(tensors, one)
    from regroup import load_result
    regroup_checkpoint(d, tmp_path / "split.npz", **OPTS, jobs=2)
    a, b = load_result(tmp_path / "split.npz"), load_result(_save(tmp_path, one))
    assert np.array_equal(a["conv.weight"].mask, b["conv.weight"].mask)
    assert a["conv.weight"].metrics == b["conv.weight"].metrics


def test_sharded_directory_and_index_parallel_equal_serial(tmp_path):
    tensors = _tensors()
    d = _sharded(tmp_path, tensors)
    src = open_source(d)
    assert {s for r in src.refs for s in r.shards} == {
        str(d / "model-00001-of-00002.safetensors"), str(d / "model-00002-of-00002.safetensors")}
    regroup_checkpoint(d, tmp_path / "serial.npz", **OPTS)
    regroup_checkpoint(d / "model.safetensors.index.json", tmp_path / "index.npz", **OPTS)
    regroup_checkpoint(d, tmp_path / "jobs2.npz", **OPTS, jobs=2)
    serial = (tmp_path / "serial.npz").read_bytes()
    assert serial == (tmp_path / "index.npz").read_bytes()
    assert serial == (tmp_path / "jobs2.npz").read_bytes()
    # The same layers as one unsharded file (only the source identity differs).
    one = tmp_path / "one.safetensors"
    write_safetensors(tensors, one)
    from regroup import load_result
    a, b = load_result(tmp_path / "serial.npz"), load_result(_save(tmp_path, one))
    assert list(a) == list(b)
    for k in a:
        assert np.array_equal(a[k].mask, b[k].mask) and a[k].metrics == b[k].metrics


def _save(tmp_path, src):
    path = tmp_path / "unsharded.npz"
    regroup_file(src, **OPTS).save(path)
    return path


def test_resume_skips_finished_layers_and_recomputes_changed_ones(tmp_path):
    src = tmp_path / "model.safetensors"
    tensors = _tensors()
    write_safetensors(tensors, src)
    out = tmp_path / "out.npz"

    def stop_after_layer_0(name, done, total, info):
        if name == "layers.0.fc.weight":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        regroup_checkpoint(src, out, **OPTS, progress=stop_after_layer_0)
    assert not out.exists()                         # no partial result file
    # conv.weight and layers.0 regrouped (a skip has no part: it is decided from the input).
    assert len(list((tmp_path / "out.npz.parts").glob("*.npz"))) == 2
    report = regroup_checkpoint(src, out, **OPTS).report()
    assert report["total"]["resumed"] == 2 and report["total"]["layers"] == 4
    fresh = tmp_path / "fresh.npz"
    regroup_checkpoint(src, fresh, **OPTS)
    assert out.read_bytes() == fresh.read_bytes()
    assert not (tmp_path / "out.npz.parts").exists()
    # A part whose input changed is recomputed (its input hash differs).
    with pytest.raises(KeyboardInterrupt):
        regroup_checkpoint(src, out, **OPTS, progress=stop_after_layer_0)
    tensors["layers.0.fc.weight"] = tensors["layers.0.fc.weight"][::-1].copy()
    write_safetensors(tensors, src)
    assert regroup_checkpoint(src, out, **OPTS).stats["resumed"] == 1
    # Other options: nothing is reused.
    with pytest.raises(KeyboardInterrupt):
        regroup_checkpoint(src, out, **OPTS, progress=stop_after_layer_0)
    assert regroup_checkpoint(src, out, **{**OPTS, "seed": 4}).stats["resumed"] == 0


def test_dask_engine_on_an_in_process_cluster_equals_serial(tmp_path):
    """--engine dask --scheduler ADDRESS against a local in-process cluster."""
    distributed = pytest.importorskip("distributed")
    d = _sharded(tmp_path, _tensors())
    regroup_checkpoint(d, tmp_path / "serial.npz", **OPTS)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        report = regroup_checkpoint(d, tmp_path / "dask.npz", **OPTS, engine="dask",
                                    scheduler=cluster.scheduler_address).report()
    assert report["total"]["engine"] == "dask"
    assert (tmp_path / "serial.npz").read_bytes() == (tmp_path / "dask.npz").read_bytes()


def test_bad_checkpoints_say_what_is_wrong(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(RegroupError, match="without model.safetensors.index.json"):
        open_source(d)
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../x.safetensors"}}')
    with pytest.raises(RegroupError, match="outside the checkpoint directory"):
        open_source(d)
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "gone.safetensors"}}')
    with pytest.raises(RegroupError, match="shard 'gone.safetensors' is missing"):
        open_source(d)
    src = tmp_path / "m.safetensors"
    write_safetensors(_tensors(), src)
    with pytest.raises(RegroupError, match="no layer matches 'nope'"):
        regroup_checkpoint(src, tmp_path / "o.npz", layers="nope", **OPTS)
    with pytest.raises(ValueError, match="'engine' parameter"):
        regroup_checkpoint(src, tmp_path / "o.npz", engine="ray", **OPTS)
    assert not os.path.exists(tmp_path / "o.npz")


def test_cli_runs_a_sharded_directory_with_jobs(tmp_path, capsys):
    from regroup.cli import main
    d = _sharded(tmp_path, _tensors())
    args = ["--block", "16", "--method", "metis", "--seed", "3", "-q"]
    assert main(["run", str(d), "-o", str(tmp_path / "cli.npz"), "--jobs", "2", *args]) == 0
    regroup_checkpoint(d, tmp_path / "api.npz", **OPTS)
    assert (tmp_path / "cli.npz").read_bytes() == (tmp_path / "api.npz").read_bytes()


@pytest.mark.parametrize("fmt", ["grid", "shuffled"])
def test_a_global_budget_streams_in_parallel_with_identical_bytes(tmp_path, fmt):
    """The model-wide budget goes through the same pipeline: memory, parts, --jobs 2
    and dask give the same bytes, and a rerun resumes both passes."""
    from regroup import load_result
    from regroup.cli import main
    d = _sharded(tmp_path, _tensors())
    opts = {**OPTS, "method": "auto", "format": fmt, "budget_scope": "global",
            "layer_min": 0.25}
    regroup_file(d, **opts).save(tmp_path / "memory.npz")
    regroup_checkpoint(d, tmp_path / "serial.npz", **opts)
    cli = ["--block", "16", "--method", "auto", "--seed", "3", "--format", fmt, "-q",
           "--budget-scope", "global", "--layer-min", "0.25"]
    assert main(["run", str(d), "-o", str(tmp_path / "jobs.npz"), "--jobs", "2", *cli]) == 0
    memory = (tmp_path / "memory.npz").read_bytes()
    assert (tmp_path / "serial.npz").read_bytes() == memory
    assert (tmp_path / "jobs.npz").read_bytes() == memory
    res = load_result(tmp_path / "serial.npz")
    assert res.meta["options"]["budget_scope"] == "global"
    area = sum(r.metrics["kept_area"] for r in res.values())
    assert area <= sum(r.metrics["nnz"] for r in res.values())
    assert {r.metrics["budget_scope"] for r in res.values()} == {"global"}
    # The layers compete: the allotted areas differ from the per-layer iso areas.
    per_layer = regroup_file(d, **{**opts, "budget_scope": "layer"})
    assert [r.metrics["kept_area"] for r in res.values()] != [
        r.metrics["kept_area"] for r in per_layer.layers]
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        regroup_checkpoint(d, tmp_path / "dask.npz", **opts, engine="dask",
                           scheduler=cluster.scheduler_address)
    assert (tmp_path / "dask.npz").read_bytes() == memory


def test_a_global_run_resumes_both_passes(tmp_path):
    src = tmp_path / "m.safetensors"
    write_safetensors(_tensors(), src)
    opts = {**OPTS, "budget_scope": "global"}
    out = tmp_path / "g.npz"
    calls = []

    def stop_in_the_second_pass(name, done, total, info):
        calls.append(name)
        if name.endswith("(global budget)") and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        regroup_checkpoint(src, out, **opts, progress=stop_in_the_second_pass)
    assert not out.exists() and len(list((tmp_path / "g.npz.parts").glob("*.npz"))) >= 6
    run = regroup_checkpoint(src, out, **opts)
    assert run.stats["resumed"] == 4 and run.stats["resumed_global"] == 2
    fresh = tmp_path / "fresh.npz"
    regroup_checkpoint(src, fresh, **opts)
    assert out.read_bytes() == fresh.read_bytes()


def test_a_damaged_part_is_named_and_leaves_no_result(tmp_path):
    import zipfile

    from regroup import from_array, regroup_pattern
    from regroup.result import assemble_result, save_part

    w = np.random.default_rng(0).standard_normal((64, 96)) * (
        np.random.default_rng(1).random((64, 96)) < 0.2)
    part = tmp_path / "0.npz"
    save_part(part, [regroup_pattern(from_array(w, name="fc.weight"), block=16,
                                     method="sort")], {"status": "done"})
    out = tmp_path / "out.npz"
    assemble_result(str(out), [part], ["fc.weight"], {})      # intact: assembles
    assert out.exists()
    out.unlink()
    with zipfile.ZipFile(part) as zf:
        info = zf.getinfo("layers/0/mask.npy")
    raw = bytearray(part.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start + info.compress_size // 2] ^= 0xFF      # flip bits inside the deflate stream
    part.write_bytes(bytes(raw))
    with pytest.raises(RegroupError, match=r"layer 'fc.weight' is damaged.*run again"):
        assemble_result(str(out), [part], ["fc.weight"], {})
    assert not out.exists()
    meta_ok = part.read_bytes()
    part.write_bytes(meta_ok[: len(meta_ok) // 2])       # truncated: no central directory
    with pytest.raises(RegroupError, match=r"0\.npz: .*layer 'fc.weight' is damaged"):
        assemble_result(str(out), [part], ["fc.weight"], {})
    assert not out.exists()


class _DyingSource(Source):
    """Kills the worker process that loads layer ``conv.weight`` (as the OOM killer or a
    crash in native code would)."""

    def load(self, ref):
        if ref.name == "conv.weight":
            os._exit(3)
        return super().load(ref)


def test_a_dying_worker_names_its_layer_and_keeps_finished_ones(tmp_path, monkeypatch):
    import regroup.pipeline as ck
    src = tmp_path / "m.safetensors"
    write_safetensors(_tensors(), src)
    real = open_source(src)
    monkeypatch.setattr(ck, "open_source", lambda path: _DyingSource(
        real.path, real.refs, real.digest, None, real._index))
    out = tmp_path / "out.npz"
    with pytest.raises(RegroupError, match=r"m\.safetensors: a worker process died while "
                       r"regrouping .*'conv\.weight'.*rerun to resume"):
        regroup_checkpoint(src, out, **OPTS, jobs=2)
    assert not out.exists()
    monkeypatch.undo()                   # the crash is gone: the rerun resumes
    report = regroup_checkpoint(src, out, **OPTS, jobs=2).report()
    assert report["total"]["layers"] == 4 and out.exists()
    # conv (4th by size) started only after two of the three fc layers had finished.
    assert report["total"]["resumed"] >= 2


def test_a_dying_dask_worker_names_its_layer(tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    import dask

    import regroup.pipeline as ck
    src = tmp_path / "m.safetensors"
    # The conv layer alone: a dying dask worker takes the tasks queued on it down too.
    write_safetensors({k: v for k, v in _tensors().items() if k.startswith("conv")}, src)
    real = open_source(src)
    monkeypatch.setattr(ck, "open_source", lambda path: _DyingSource(
        real.path, real.refs, real.digest, None, real._index))
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                     dashboard_address=None) as cluster:
        with pytest.raises(RegroupError, match=r"died while regrouping layer 'conv\.weight'"):
            regroup_checkpoint(src, tmp_path / "out.npz", **OPTS, engine="dask",
                               scheduler=cluster.scheduler_address)
    assert not (tmp_path / "out.npz").exists()


def test_a_file_changed_after_indexing_is_named(tmp_path):
    from regroup import FormatError
    src = tmp_path / "model.npz"
    tensors = _tensors()
    np.savez(src, **tensors)
    source = open_source(src)
    ref = next(r for r in source.refs if r.name == "conv.weight")
    np.savez(src, **{k: v for k, v in tensors.items() if k != "conv.weight_mask"})
    with pytest.raises(FormatError, match=r"model\.npz: layer 'conv\.weight'.*"
                       r"'conv\.weight_mask'.*changed since it was indexed"):
        source.for_layer(ref).load(ref)


def test_a_damaged_first_pass_part_is_recomputed_when_a_global_run_resumes(tmp_path):
    """A part whose record still matches but whose content changed fails its seal: it is
    recomputed, not trusted (and not an error)."""
    from regroup import save_result
    from regroup.result import read_meta
    src = tmp_path / "m.safetensors"
    write_safetensors(_tensors(), src)
    opts = {**OPTS, "budget_scope": "global"}
    out = tmp_path / "g.npz"

    def stop_in_the_second_pass(name, done, total, info):
        if name.endswith("(global budget)"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        regroup_checkpoint(src, out, **opts, progress=stop_in_the_second_pass)
    parts = tmp_path / "g.npz.parts"
    victim = next(p for p in sorted(parts.glob("[0-9].npz"))
                  if not (parts / (p.stem + ".global.npz")).exists()
                  and read_meta(p)["status"] == "done")
    meta = {k: v for k, v in read_meta(victim).items() if k not in ("layers",
                                                                    "format_version")}
    save_result(victim, [], meta)          # its record still matches; its layout is gone
    run = regroup_checkpoint(src, out, **opts)
    assert run.stats["resumed"] == 3
    fresh = tmp_path / "fresh.npz"
    regroup_checkpoint(src, fresh, **opts)
    assert out.read_bytes() == fresh.read_bytes()
