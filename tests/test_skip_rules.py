"""Which tensors are layers to regroup: embedding tables, nearly dense tensors, layers
smaller than the block; and the progress a run shows over the layers it regroups."""
import json
import subprocess
import sys

import numpy as np
import pytest

import regroup
from regroup import RegroupOptions, read_patterns, regroup_file
from regroup.cli import main
from regroup.compare import compare
from regroup.io import embedding_name, layer_pattern, write_safetensors
from regroup.options import DENSE_ABOVE

from .conftest import EXAMPLE

RUN = ["--block", "16", "--method", "sort"]
TABLES = {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"}


def _pruned(rng, shape, density):
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) >= density] = 0
    return w


def _nearly_dense(rng, shape, zeros):
    w = rng.standard_normal(shape).astype(np.float32) + 5.0   # no accidental zero
    w.flat[rng.choice(w.size, zeros, replace=False)] = 0
    return w


@pytest.fixture
def bert_like(tmp_path):
    """A small BERT-like checkpoint whose every 2-D tensor is pruned, embedding tables
    and lm_head included, plus one 99.5 %-dense Linear."""
    rng = np.random.default_rng(0)
    tensors = {
        "embeddings.word_embeddings.weight": _pruned(rng, (256, 64), 0.5),
        "embeddings.position_embeddings.weight": _pruned(rng, (64, 64), 0.5),
        "embeddings.LayerNorm.weight": np.ones(64, np.float32),
        "encoder.layer.0.attention.self.query.weight": _pruned(rng, (64, 64), 0.3),
        "encoder.layer.0.intermediate.dense.weight": _pruned(rng, (128, 64), 0.3),
        # 41 zeros of 8192: density 0.995, above the default threshold.
        "encoder.layer.0.output.dense.weight": _nearly_dense(rng, (64, 128), 41),
        "lm_head.weight": _pruned(rng, (256, 64), 0.4),
    }
    path = tmp_path / "bert.safetensors"
    write_safetensors(tensors, path)
    return path


# -- the rules ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,table", [
    ("embeddings.word_embeddings.weight", "word_embeddings"),
    ("bert.embeddings.token_type_embeddings.weight", "token_type_embeddings"),
    ("transformer.wte.weight", "wte"), ("transformer.wpe.weight", "wpe"),
    ("model.embed_tokens.weight", "embed_tokens"), ("tok_embeddings.weight", "tok_embeddings"),
    ("gpt_neox.embed_in.weight", "embed_in"), ("decoder.embed_positions.weight",
                                               "embed_positions"),
    ("text_model.embeddings.token_embedding.weight", "token_embedding"),
    ("embedding.weight", "embedding"), ("wte", "wte"),
])
def test_embedding_tables_are_recognised_by_their_module_name(name, table):
    assert embedding_name(name, (1000, 64)) == table


@pytest.mark.parametrize("name,shape", [
    ("lm_head.weight", (1000, 64)),                       # the output Linear: regrouped
    ("embed_out.weight", (1000, 64)),                     # GPT-NeoX's output Linear
    ("encoder.embedding_hidden_mapping_in.weight", (256, 128)),  # ALBERT's projection
    ("embeddings_project.weight", (256, 128)),            # ELECTRA's projection
    ("embeddings.LayerNorm.weight", (64, 64)),            # inside the module, not a table
    ("patch_embed.proj.weight", (768, 3, 16, 16)),        # a patch-embedding convolution
    ("vision.embeddings.patch_embedding.weight", (768, 3, 16, 16)),
    ("embedding.weight", (64, 3, 3, 3)),                  # 4-D: a convolution, whatever its name
    ("encoder.layer.0.attention.self.query.weight", (64, 64)),
])
def test_linear_and_conv_layers_are_never_taken_for_tables(name, shape):
    assert embedding_name(name, shape) is None


def test_layer_pattern_defaults_keep_what_old_callers_got():
    """regroup_model calls layer_pattern without the new keywords: nothing new skipped."""
    w = _nearly_dense(np.random.default_rng(1), (64, 128), 41)
    pat, why = layer_pattern("embeddings.word_embeddings.weight", w, None)
    assert why is None and pat.nnz == w.size - 41
    pat, why = layer_pattern("fc.weight", w, None, dense_above=DENSE_ABOVE)
    assert pat is None and why.startswith("nearly dense (density 0.9950 > dense_above 0.95)")
    pat, why = layer_pattern("embeddings.word_embeddings.weight", w, None,
                             skip_embeddings=True)
    assert pat is None and "embedding table ('word_embeddings')" in why
    # Fully dense keeps its own reason, whatever the threshold (1.0 included).
    assert "fully dense" in layer_pattern("fc", np.ones((8, 8)), None, dense_above=1.0)[1]


def test_a_nan_tensor_is_still_an_error_not_a_dense_skip(tmp_path):
    w = np.ones((64, 64))
    w[3, 3] = np.nan
    with pytest.raises(regroup.RegroupError, match=r"layer 'fc': weight contains NaN or inf "
                                                   r"\(1 values\)"):
        layer_pattern("fc", w, None, source="x.npz", dense_above=0.5)


# -- the option ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, 0.0, 1.5, float("nan"), "x", None])
def test_hostile_thresholds_are_refused_naming_parameter_and_caller(bad, tmp_path):
    kind = TypeError if isinstance(bad, str) or bad is None else ValueError
    for caller, call in [
            ("RegroupOptions", lambda: RegroupOptions(dense_above=bad)),
            ("regroup_file", lambda: regroup_file(EXAMPLE, dense_above=bad)),
            ("compare", lambda: compare([EXAMPLE], ["sort"], dense_above=bad)),
            ("read_patterns", lambda: read_patterns(EXAMPLE, dense_above=bad))]:
        with pytest.raises(kind, match=rf"^The 'dense_above' parameter of {caller} must be "
                                       rf"a float in \(0, 1\]. Got {bad!r} instead"):
            call()


@pytest.mark.parametrize("value", ["0", "1.5", "nan", "-1"])
def test_cli_refuses_hostile_thresholds_with_exit_2(value, tmp_path, capsys):
    out = tmp_path / "x.npz"
    for cmd in (["run", str(EXAMPLE), "-o", str(out)], ["compare", str(EXAMPLE)]):
        assert main(cmd + ["--dense-above", value]) == 2
        err = capsys.readouterr().err
        assert f"The '--dense-above' option of regroup {cmd[0]} must be a float in (0, 1]" \
            in err and err.count("\n") == 1
    assert main(["run", str(EXAMPLE), "--dense-above", "x"]) == 2
    assert "invalid float value: 'x'" in capsys.readouterr().err
    assert not out.exists()


def test_the_threshold_is_recorded_and_old_records_read_as_before():
    opts = RegroupOptions(dense_above=0.9)
    assert opts.record()["dense_above"] == 0.9
    assert RegroupOptions.from_record(opts.record()) == opts
    assert RegroupOptions().dense_above == DENSE_ABOVE == 0.95
    # A record written before the option existed was made skipping only fully dense
    # tensors: it reads back as such.
    old = {k: v for k, v in RegroupOptions().record().items() if k != "dense_above"}
    assert RegroupOptions.from_record(old) == RegroupOptions(dense_above=1.0)
    # A file and model selection field: one layer's options reset it.
    assert opts.per_layer().dense_above == DENSE_ABOVE
    assert RegroupOptions(layers=["a.weight", "b.*"]).named("a.weight")
    assert not RegroupOptions(layers=["b.*"]).named("b.weight")
    assert not RegroupOptions().named("a.weight")


# -- run and compare -----------------------------------------------------------------------
def test_run_skips_tables_and_nearly_dense_tensors_with_reasons(bert_like, tmp_path):
    out, rep = tmp_path / "r.npz", tmp_path / "r.json"
    assert main(["run", str(bert_like), "-o", str(out), "--report", str(rep), "-q"] + RUN) == 0
    report = json.loads(rep.read_text())
    reasons = {s["name"]: s["reason"] for s in report["skipped"]}
    assert {r["name"] for r in report["layers"]} == {
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.intermediate.dense.weight", "lm_head.weight"}
    for name in TABLES:
        assert reasons[name].startswith("embedding table (")
        assert "name it exactly in layers" in reasons[name]
    assert reasons["encoder.layer.0.output.dense.weight"].startswith(
        "nearly dense (density 0.9950 > dense_above 0.95)")
    assert report["options"]["dense_above"] == 0.95
    assert regroup.load_result(out).meta["skipped"] == report["skipped"]


def test_dense_above_one_keeps_a_nearly_dense_layer(bert_like, tmp_path):
    rep = tmp_path / "r.json"
    assert main(["run", str(bert_like), "-o", str(tmp_path / "r.npz"), "--report", str(rep),
                 "-q", "--dense-above", "1"] + RUN) == 0
    report = json.loads(rep.read_text())
    assert "encoder.layer.0.output.dense.weight" in {r["name"] for r in report["layers"]}
    assert report["options"]["dense_above"] == 1.0
    pats, _ = read_patterns(bert_like, dense_above=1.0)
    assert "encoder.layer.0.output.dense.weight" in {p.name for p in pats}
    pats, skipped = read_patterns(bert_like)
    assert "nearly dense" in dict(skipped)["encoder.layer.0.output.dense.weight"]


def test_an_exact_name_in_layers_selects_a_table_a_glob_does_not(bert_like, tmp_path,
                                                                capsys):
    word = "embeddings.word_embeddings.weight"
    run = regroup_file(bert_like, block=16, method="sort", layers=[word, "lm_head.*"])
    assert [r.name for r in run.layers] == [word, "lm_head.weight"]
    assert run.skipped == []
    pats, _ = read_patterns(bert_like, layers=[word])
    assert [p.name for p in pats] == [word]
    # A glob is no request for a table: nothing usable, and the error says why.
    with pytest.raises(regroup.RegroupError, match=r"no usable layer: .*word_embeddings.weight: "
                                                   r"embedding table \('word_embeddings'\)"):
        regroup_file(bert_like, block=16, method="sort", layers="embeddings.*")
    out = tmp_path / "w.npz"
    assert main(["run", str(bert_like), "-o", str(out), "-q", "--layers", word] + RUN) == 0
    assert list(regroup.load_result(out)) == [word]
    assert main(["run", str(bert_like), "-o", str(out), "-q", "--layers", "*embeddings*"]
                + RUN) == 1
    assert "embedding table ('position_embeddings')" in capsys.readouterr().err


def test_compare_skips_tables_with_reasons_in_its_report(bert_like, tmp_path, capsys):
    skipped = []
    rows = compare([bert_like], ["identity", "sort"], block=16,
                   on_skip=lambda f, n, r: skipped.append((f, n, r)))
    assert {r["layer"] for r in rows} == {"encoder.layer.0.attention.self.query.weight",
                                          "encoder.layer.0.intermediate.dense.weight",
                                          "lm_head.weight"}
    reasons = {n: r for f, n, r in skipped}
    assert all(f == str(bert_like) for f, _, _ in skipped)
    assert all(reasons[t].startswith("embedding table") for t in TABLES)
    assert reasons["encoder.layer.0.output.dense.weight"].startswith("nearly dense")
    md = tmp_path / "c.md"
    assert main(["compare", str(bert_like), "--methods", "identity,sort", "--block", "16",
                 "--markdown", str(md)]) == 0
    assert f"4 tensors skipped; reasons in {md}" in capsys.readouterr().out
    text = md.read_text()
    assert "| file | layer | reason |" in text
    assert "| embeddings.word_embeddings.weight | embedding table ('word_embeddings')" in text
    # --dense-above reaches compare too.
    rows = compare([bert_like], ["identity"], block=16, dense_above=1.0)
    assert "encoder.layer.0.output.dense.weight" in {r["layer"] for r in rows}


# -- the 3-channel stem of a MobileNet -------------------------------------------------------
def _mobilenet_like(rng):
    return {"features.0.0.weight": _pruned(rng, (32, 3, 3, 3), 0.5),    # 32x27: stem
            "features.0.1.weight": np.ones(32, np.float32),
            "features.0.1.num_batches_tracked": np.array(5),
            "features.1.conv.0.0.weight": _pruned(rng, (32, 1, 3, 3), 0.5),  # depthwise
            "features.1.conv.1.weight": _pruned(rng, (64, 32, 1, 1), 0.4),
            "classifier.1.weight": _pruned(rng, (100, 64), 0.4)}


@pytest.mark.parametrize("fmt", ["npz", "pt"])
def test_a_stem_smaller_than_the_block_is_skipped_by_compare_run_and_show(fmt, tmp_path,
                                                                         capsys):
    """`regroup compare` (and `show` without --layer) stopped with exit 1 on a MobileNetV2
    checkpoint: its 32x3x3x3 stem flattens to 32x27, narrower than a 32x32 block, and
    the layers were read without the block, so the first one reached regroup_pattern."""
    tensors = _mobilenet_like(np.random.default_rng(2))
    src = tmp_path / f"mbv2.{fmt}"
    if fmt == "npz":
        np.savez(src, **tensors)
    else:
        torch = pytest.importorskip("torch")
        torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in tensors.items()}, src)
    md = tmp_path / "c.md"
    assert main(["compare", str(src), "--methods", "identity,sort", "--block", "32",
                 "--markdown", str(md)]) == 0
    assert "| features.0.0.weight | matrix 32x27 is smaller than the block 32x32 |" \
        in md.read_text()
    assert "| features.1.conv.0.0.weight | matrix 32x9 is smaller than the block 32x32 |" \
        in md.read_text()
    rep = tmp_path / "r.json"
    assert main(["run", str(src), "-o", str(tmp_path / "r.npz"), "--report", str(rep), "-q",
                 "--block", "32", "--method", "sort"]) == 0
    report = json.loads(rep.read_text())
    assert [r["name"] for r in report["layers"]] == ["features.1.conv.1.weight",
                                                     "classifier.1.weight"]
    assert {s["name"]: s["reason"] for s in report["skipped"]}["features.0.0.weight"] == \
        "matrix 32x27 is smaller than the block 32x32"
    pytest.importorskip("matplotlib")
    capsys.readouterr()
    png = tmp_path / "first.png"
    assert main(["show", str(src), "--block", "32", "--method", "sort", "-o", str(png)]) == 0
    assert "features.1.conv.1.weight" in capsys.readouterr().out
    # Asked for by name, the stem cannot be shown at this block: a failure naming why.
    assert main(["show", str(src), "--layer", "features.0.0.weight", "--block", "32",
                 "-o", str(png)]) == 1
    assert "matrix 32x27 is smaller than the block 32x32" in capsys.readouterr().err


# -- progress ------------------------------------------------------------------------------
def test_progress_counts_only_the_layers_to_regroup(bert_like, monkeypatch):
    from regroup.source import Source
    loaded = []
    load = Source.load

    def spy(self, ref):
        loaded.append(ref.name)
        return load(self, ref)

    monkeypatch.setattr(Source, "load", spy)
    calls = []
    run = regroup_file(bert_like, block=16, method="sort",
                       progress=lambda *a: calls.append(a))
    # Tables and the 1-D LayerNorm are known from the header: never read, never counted.
    assert not set(loaded) & (TABLES | {"embeddings.LayerNorm.weight"})
    assert [c[1:3] for c in calls] == [(i, 4) for i in range(1, 5)]
    info = {c[0]: c[3] for c in calls}
    dense = info["encoder.layer.0.output.dense.weight"]
    assert dense["status"] == "skipped" and dense["reason"].startswith("nearly dense")
    assert dense["shape"] == (64, 128)
    q = info["encoder.layer.0.attention.self.query.weight"]
    assert q["status"] == "done" and q["shape"] == (64, 64) and q["seconds"] >= 0
    assert q["retained"] == run.records[0]["metrics"]["retained"]
    assert len(run.skipped) == 4


def test_progress_without_a_terminal_is_one_line_per_finished_layer(bert_like, tmp_path,
                                                                   capsys):
    out = tmp_path / "r.npz"
    assert main(["run", str(bert_like), "-o", str(out)] + RUN) == 0   # capsys: no tty
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("[1/4] encoder.layer.0.attention.self.query.weight 64x64: ")
    assert " s, retained 0." in lines[0]
    assert any(line.startswith("[3/4] encoder.layer.0.output.dense.weight 64x128: skipped: "
                               "nearly dense") for line in lines)
    assert main(["run", str(bert_like), "-o", str(out), "-q"] + RUN) == 0
    assert capsys.readouterr().err == ""
    # A real pipe, as under a scheduler or `2> log`.
    proc = subprocess.run([sys.executable, "-m", "regroup.cli", "run", str(bert_like),
                           "-o", str(out), "--budget-scope", "global"] + RUN,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == [
        "[1/4]", "[2/4]", "[3/4]", "[4/4]", "[1/3]", "[2/3]", "[3/3]"]
    assert all("(global budget)" in line and "retained" in line for line in lines[4:])


def test_the_terminal_bar_counts_only_the_layers_to_regroup(bert_like, tmp_path,
                                                            monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main(["run", str(bert_like), "-o", str(tmp_path / "r.npz")] + RUN) == 0
    text = term.getvalue()
    assert "/4 [" in text and "/7 [" not in text and "[1/4] " not in text


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float8_e4m3fn",
                                   "int8", "bool"])
def test_the_density_count_agrees_with_the_pattern_for_every_torch_dtype(dtype):
    """The density is counted before the pattern is built (torch counts natively where
    it can, float8 goes through float32 as from_array reads it)."""
    torch = pytest.importorskip("torch")
    from regroup.pattern import count_kept, from_array
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(48, 40, generator=gen) * (torch.rand(48, 40, generator=gen) < 0.3))
    x = x.to(getattr(torch, dtype))
    assert count_kept(x) == from_array(x).nnz == int((x.float() != 0).sum())
    pat, why = layer_pattern("fc.weight", x, None, dense_above=0.5)
    assert why is None and pat.nnz == count_kept(x)
